"""Refiners: steps that improve an alignment (or merged weights) after the solver.

STE, the straight-through estimator of Git Re-Basin (``ste.py``); layer-wise least squares
(``lstsq.py``: PLeaS's refit, shared with neuron-interpolation fusion); the levels that
gradient fusion fits one after another, cut from the traced spec (``levels.py``).

``_proxy_keys``, ``_PlainGroup``, ``_WarmAssignment`` and ``_WarmMatcher`` stay importable
from here as before ``refine`` became a package; the warm matching machinery now lives in
:mod:`symmerge.solvers.warm` under public names.
"""

from symmerge.refine.ste import (
    MATCHERS,
    OPTIMIZERS,
    STEResult,
    _proxy_keys,  # noqa: F401
    ste_refine,
)
from symmerge.solvers.warm import PlainGroup as _PlainGroup  # noqa: F401
from symmerge.solvers.warm import WarmAssignment as _WarmAssignment  # noqa: F401
from symmerge.solvers.warm import WarmMatcher as _WarmMatcher  # noqa: F401

__all__ = ["MATCHERS", "OPTIMIZERS", "STEResult", "ste_refine"]
