"""symmerge: merge independently trained networks through the permutation symmetry of hidden units."""

from symmerge.spec import Group, SymmetrySpec, TraceError, trace

__version__ = "0.1.0"

__all__ = ["Group", "SymmetrySpec", "TraceError", "trace", "__version__"]
