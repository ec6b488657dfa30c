"""Merging methods: short registered recipes over the pipeline's parts.

A method is a function ``fn(spec, models, *, data=None, lam=0.5, seed=0, **kw) -> MergeResult``
registered with :func:`register_method`. ``models`` are ``nn.Module`` s or state dicts (methods
that run the models on data need modules). Look methods up by name with :func:`get_method`;
:func:`method_info` also says what a method can do (its capabilities: whether it needs data,
how many models it merges, ...), which ``merge()`` and the CLI read instead of lists of names.

Example:
    >>> from symmerge.methods import get_method, list_methods
    >>> "weight" in list_methods()
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from symmerge.groupmap import GroupMap

__all__ = [
    "MergeResult",
    "MethodInfo",
    "get_method",
    "list_methods",
    "method_info",
    "register_method",
]

Method = Callable[..., "MergeResult"]


@dataclass
class MergeResult:
    """What every method returns.

    Attributes:
        state_dict: the merged weights, as the method made them (before
            :func:`~symmerge.merging.merge` renormalises or fine-tunes the merged model).
        maps: the GroupMap of every group.
        objective: final objective per group (method-specific; for weight matching the
            similarity of the matched units).
        iterations: sweeps or rounds the solver ran (0 when it does not iterate).
        lap_seconds: time spent in assignment solves.
        other_seconds: every other second of the method (similarities, statistics, building).
        log: human-readable progress lines.
        method: the registered name.
        timings: finer split of the time, by stage; :func:`~symmerge.merging.merge` adds
            ``renorm`` (BN reset or REPAIR) and ``finetune`` when it runs them (not part of
            ``seconds``, the method's own time).
        details: method-specific facts worth recording (e.g. PLeaS's ratios and compute);
            ``details["bn_statistics"] == "fitted"`` says the method set the BatchNorm
            statistics the merged weights were fitted with (a reset would undo that fit).
    """

    state_dict: dict[str, torch.Tensor]
    maps: dict[str, GroupMap]
    objective: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    lap_seconds: float = 0.0
    other_seconds: float = 0.0
    log: list[str] = field(default_factory=list)
    method: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.lap_seconds + self.other_seconds

    def perms(self, model: int) -> dict[str, torch.Tensor]:
        """Model ``model``'s permutation of every group (permutation maps only)."""
        out = {}
        for name, gm in self.maps.items():
            if gm.perms is None:
                raise ValueError(f"group {name!r} is not merged by a permutation")
            out[name] = gm.perms[model]
        return out


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its function, where it comes from and what it can do.

    Attributes:
        name: the registered name.
        fn: the method's function.
        paper, url: the reference.
        needs_data: the method runs the models on data (``merge()`` requires ``data=``).
        max_models: the most models it merges at once (``None``: any number >= 2).
        unequal_widths: it can merge parents whose group widths differ.
        target_width: it can produce a merged model of a chosen width.
    """

    name: str
    fn: Method
    paper: str | None = None
    url: str | None = None
    needs_data: bool = False
    max_models: int | None = None
    unequal_widths: bool = False
    target_width: bool = False

    @property
    def summary(self) -> str:
        """The docstring's first paragraph on one line ("" without a docstring)."""
        doc = (self.fn.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split()) if doc else ""

    def accepts(self, num_models: int) -> bool:
        """Whether the method merges ``num_models`` models at once."""
        return num_models >= 2 and (self.max_models is None or num_models <= self.max_models)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: name, summary, reference and capabilities."""
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "url": self.url,
            "needs_data": self.needs_data,
            "max_models": self.max_models,
            "unequal_widths": self.unequal_widths,
            "target_width": self.target_width,
        }


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    *,
    paper: str | None = None,
    url: str | None = None,
    needs_data: bool = False,
    max_models: int | None = None,
    unequal_widths: bool = False,
    target_width: bool = False,
) -> Callable[[Method], Method]:
    """Decorator adding a method under ``name``; a name can be registered once.

    Args:
        name: the registered name.
        paper, url: the reference.
        needs_data: the method runs the models on data.
        max_models: the most models it merges at once (``None``: any number; 2 for pairwise
            methods). Every method merges at least 2.
        unequal_widths: it can merge parents whose group widths differ.
        target_width: it can produce a merged model of a chosen width.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered (by {_REGISTRY[name].fn})")
    for flag, value in (("needs_data", needs_data), ("unequal_widths", unequal_widths),
                        ("target_width", target_width)):  # fmt: skip
        if not isinstance(value, bool):
            raise ValueError(
                f"The {flag!r} parameter of register_method must be a bool. Got {value!r} instead."
            )
    if max_models is not None and (
        isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 2
    ):
        raise ValueError(
            "The 'max_models' parameter of register_method must be None or an int >= 2. "
            f"Got {max_models!r} instead."
        )

    def decorator(fn: Method) -> Method:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered (by {_REGISTRY[name].fn})")
        _REGISTRY[name] = MethodInfo(
            name, fn, paper, url, needs_data, max_models, unequal_widths, target_width
        )
        return fn

    return decorator


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def method_info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of a registered method (``ValueError`` if unknown)."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(list_methods())}"
        )
    return _REGISTRY[name]


def get_method(name: str) -> Method:
    """The function of a registered method (``ValueError`` listing the names if unknown)."""
    return method_info(name).fn


# Method modules register themselves on import.
from symmerge.methods import c2m3 as c2m3  # noqa: E402
from symmerge.methods import ensemble as ensemble  # noqa: E402
from symmerge.methods import fusion as fusion  # noqa: E402
from symmerge.methods import fusion_gradient as fusion_gradient  # noqa: E402
from symmerge.methods import mudsc as mudsc  # noqa: E402
from symmerge.methods import otfusion as otfusion  # noqa: E402
from symmerge.methods import pleas as pleas  # noqa: E402
from symmerge.methods import rebasin as rebasin  # noqa: E402
from symmerge.methods import ste as ste  # noqa: E402
from symmerge.methods import zipit as zipit  # noqa: E402
