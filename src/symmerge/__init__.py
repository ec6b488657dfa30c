"""symmerge: merge independently trained networks through the permutation symmetry of units."""

from symmerge.spec import Group, SymmetrySpec, TraceError, register_op_rule, trace

__version__ = "0.1.0"

__all__ = ["Group", "SymmetrySpec", "TraceError", "register_op_rule", "trace", "__version__"]
