"""Progress reporting that stays readable in logs, and the memory figure of run summaries.

On a terminal, :func:`progress_bar` shows a tqdm bar, as symmerge always did. Anywhere else (a
log file, a pipe, a batch job, a notebook) a redrawing bar either writes thousands of
carriage-return updates into the log or, with tqdm's ``disable=None``, nothing at all; there
:func:`progress_bar` writes plain one-line messages to stderr instead, at a bounded rate: one at
the start, at most one per ~10% of the total *and* per ``interval`` seconds (whichever is
rarer), and one at the end with the elapsed time. Never a carriage return.

The environment variable ``SYMMERGE_PROGRESS`` switches every report of the process:
``auto`` (default: a bar on a terminal, lines otherwise), ``0``/``off`` (silent), ``1``/``on``
(same as auto), ``bar`` (always tqdm) or ``plain`` (always lines). A function's own
``progress=False`` (the CLI's ``--no-progress``) is always silent.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar, cast

__all__ = ["ENV_VAR", "INTERVAL_S", "ProgressBar", "peak_rss_mb", "progress_bar", "progress_mode"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: The environment variable of the global switch.
ENV_VAR = "SYMMERGE_PROGRESS"
#: Least seconds between two plain progress lines (besides the start and end lines).
INTERVAL_S = 10.0
#: Least fraction of the total between two plain progress lines.
STEP_FRACTION = 0.1

_MODES = {"auto": "auto", "": "auto", "1": "auto", "on": "auto", "true": "auto", "yes": "auto",
          "0": "off", "off": "off", "false": "off", "no": "off", "bar": "bar", "tqdm": "bar",
          "plain": "plain", "lines": "plain"}  # fmt: skip
_warned: set[str] = set()
_clock = time.monotonic  # a module global, so that tests can replace it


class ProgressBar(Protocol[T_co]):
    """What :func:`progress_bar` returns: the part of tqdm's interface symmerge uses."""

    def __iter__(self) -> Iterator[T_co]: ...

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None: ...  # fmt: skip

    def close(self) -> None: ...


def progress_mode() -> str:
    """``"auto"``, ``"off"``, ``"bar"`` or ``"plain"``, from ``$SYMMERGE_PROGRESS``."""
    raw = os.environ.get(ENV_VAR, "auto").strip().lower()
    mode = _MODES.get(raw)
    if mode is None:
        if raw not in _warned:
            _warned.add(raw)
            warnings.warn(
                f"{ENV_VAR}={raw!r} is not one of auto, 0, 1, bar, plain; using auto",
                stacklevel=3,
            )
        mode = "auto"
    return mode


def is_terminal() -> bool:
    """Whether stderr, where progress goes, is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed or detached stream
        return False


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    interval: float | None = None,
    **tqdm_kwargs: Any,
) -> ProgressBar[T]:
    """Report progress over ``iterable`` (or, without one, over ``bar.update(n)`` calls).

    Use it like tqdm: iterate over the result, or call ``update``/``set_postfix`` and finally
    ``close`` (or use it in a ``with`` block). A tqdm bar on a terminal, plain stderr lines
    otherwise (see the module docstring), nothing when ``enabled`` is false.

    Args:
        iterable: what to iterate over; ``None`` for manual ``update`` calls.
        desc: what is progressing, the prefix of every report.
        total: expected number of items (default: ``len(iterable)`` where it has one).
        unit: the name of one item.
        enabled: ``False`` reports nothing (the caller's ``progress=False``).
        interval: least seconds between two plain lines (default :data:`INTERVAL_S`).
        tqdm_kwargs: passed on to tqdm on a terminal (e.g. ``leave``, ``dynamic_ncols``).
    """
    mode = progress_mode() if enabled else "off"
    if mode == "auto":
        mode = "bar" if is_terminal() else "plain"
    if mode == "off":
        return _Quiet(iterable)
    if mode == "plain":
        every = INTERVAL_S if interval is None else interval
        return _Lines(iterable, desc=desc, total=total, unit=unit, interval=every)
    from tqdm.auto import tqdm

    bar = tqdm(iterable, desc=desc, total=total, unit=unit, disable=False, **tqdm_kwargs)
    return cast(ProgressBar[T], bar)


class _Base(Generic[T]):
    def __init__(self, iterable: Iterable[T] | None) -> None:
        self.iterable = iterable
        self.n = 0

    def __enter__(self) -> _Base[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("this progress report has no iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:  # fmt: skip
        pass

    def close(self) -> None:
        pass


class _Quiet(_Base[T]):
    """Reports nothing."""


class _Lines(_Base[T]):
    """Plain, rate-limited progress lines on stderr (no carriage returns)."""

    def __init__(
        self, iterable: Iterable[T] | None, *, desc: str, total: int | None, unit: str,
        interval: float,
    ) -> None:  # fmt: skip
        super().__init__(iterable)
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.postfix = ""
        self._start = self._last_time = _clock()
        self._last_n = 0
        self._closed = False
        size = f"{total} {unit}" if total is not None else f"unknown number of {unit}"
        self._write(f"started ({size})")

    def _write(self, message: str) -> None:
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {message}{extra}", file=sys.stderr, flush=True)

    def _count(self) -> str:
        if self.total:
            return f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        return f"{self.n} {self.unit}"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._closed:
            return
        now = _clock()
        if now - self._last_time < self.interval:
            return
        if self.total:
            if self.n >= self.total or self.n - self._last_n < STEP_FRACTION * self.total:
                return  # the end line comes from close()
        self._last_time, self._last_n = now, self.n
        elapsed = now - self._start
        eta = ""
        if self.total and self.n > 0:
            eta = f", about {elapsed * (self.total - self.n) / self.n:.0f} s left"
        self._write(f"{self._count()} after {elapsed:.1f} s{eta}")

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:  # fmt: skip
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={_fmt(v)}" for k, v in items.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        elapsed = _clock() - self._start
        rate = f" ({self.n / elapsed:.3g} {self.unit}/s)" if elapsed > 0 and self.n else ""
        self._write(f"{self._count()} in {elapsed:.1f} s{rate}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (``getrusage``'s ``ru_maxrss``: KiB
    on Linux, bytes on macOS); 0.0 where ``resource`` does not exist (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
