"""Merging methods: short registered recipes over the pipeline's parts.

A method is a function ``fn(spec, models, *, data=None, lam=0.5, seed=0, **kw) -> MergeResult``
registered with :func:`register_method`. ``models`` are ``nn.Module`` s or state dicts (methods
that run the models on data need modules). Look methods up by name with :func:`get_method`.

Example:
    >>> from symmerge.methods import get_method, list_methods
    >>> "weight" in list_methods()
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
        state_dict: the merged weights.
        maps: the GroupMap of every group.
        objective: final objective per group (method-specific; for weight matching the
            similarity of the matched units).
        iterations: sweeps or rounds the solver ran (0 when it does not iterate).
        lap_seconds: time spent in assignment solves.
        other_seconds: every other second of the method (similarities, statistics, building).
        log: human-readable progress lines.
        method: the registered name.
        timings: finer split of the time, by stage.
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
    """A registered method: its function and where it comes from."""

    name: str
    fn: Method
    paper: str | None = None
    url: str | None = None

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str, *, paper: str | None = None, url: str | None = None
) -> Callable[[Method], Method]:
    """Decorator adding a method under ``name``; a name can be registered once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered (by {_REGISTRY[name].fn})")

    def decorator(fn: Method) -> Method:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered (by {_REGISTRY[name].fn})")
        _REGISTRY[name] = MethodInfo(name, fn, paper, url)
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
from symmerge.methods import rebasin as rebasin  # noqa: E402
from symmerge.methods import ste as ste  # noqa: E402
