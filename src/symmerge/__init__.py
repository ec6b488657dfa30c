"""symmerge: merge independently trained networks through the permutation symmetry of units."""

__version__ = "0.1.0"

from symmerge.groupmap import GroupMap, build_state_dict
from symmerge.merging import interpolation, merge
from symmerge.methods import MergeResult, get_method, list_methods, register_method
from symmerge.spec import Group, SymmetrySpec, TraceError, register_op_rule, trace

__all__ = [
    "Group",
    "GroupMap",
    "MergeResult",
    "SymmetrySpec",
    "TraceError",
    "__version__",
    "build_state_dict",
    "get_method",
    "interpolation",
    "list_methods",
    "merge",
    "register_method",
    "register_op_rule",
    "trace",
]
