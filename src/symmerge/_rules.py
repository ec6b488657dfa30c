"""Symmetry rules for ATen ops: which axes of inputs, weights and outputs share a permutation.

A rule receives a :class:`RuleContext` for one graph node and returns the layout terms of the
node's output (a list with one term per axis, or a tuple of such lists for ops with several
outputs). Rules are looked up by the op's overload-packet name (``"conv2d"``, ``"linear"``...);
in-place variants (``mul_``) use the rule of the out-of-place op. Ops tagged pointwise by
PyTorch broadcast-join all their tensor arguments, so most elementwise ops need no rule.
Users add rules for their own ops with :func:`register_op_rule`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from symmerge._axes import AtomTable, Term, atom, concat, prod

Dims = list[Term]
Rule = Callable[["RuleContext"], Any]

_RULES: dict[str, Rule] = {}

# Ops that carry no tensor data worth tracking (shape queries, asserts).
_IGNORED = {
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_assert_tensor_metadata",
    "_assert_scalar", "_assert_async", "sym_constrain_range", "sym_constrain_range_for_size",
    "_check_is_size", "_functional_sym_constrain_range", "_functional_assert_async",
}  # fmt: skip
# Ops whose output does not depend on the order of units along any axis of their inputs in a
# way we model: freeze every axis they touch. Freezing is always safe (it only removes
# symmetries); the reason is reported.
_FREEZE_ALL = {
    "sort", "argsort", "topk", "diff", "argmax", "argmin", "cumsum", "cumprod", "flip", "roll",
    "nonzero", "unique", "unique_consecutive", "unique_dim", "searchsorted", "bucketize",
    "item", "_local_scalar_dense",
    "index_put", "scatter", "scatter_add", "scatter_reduce", "index_add", "masked_scatter",
    "gather", "take_along_dim", "repeat_interleave", "tril", "triu", "diagonal", "diag",
    "diag_embed", "fft_fft", "fft_rfft", "fft_ifft", "fft_irfft", "grid_sampler",
    "grid_sampler_2d", "im2col", "col2im", "unfold", "max_unpool2d",
}  # fmt: skip


def register_op_rule(name: str | Any, rule: Rule, *, overwrite: bool = False) -> None:
    """Register the symmetry rule of an op (an ATen overload packet name or an op object)."""
    key = name if isinstance(name, str) else _op_name(name)
    if key in _RULES and not overwrite:
        raise ValueError(f"a symmetry rule for op '{key}' is already registered")
    _RULES[key] = rule


def _rule(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for n in names:
            register_op_rule(n, fn)
        return fn

    return deco


def _op_name(target: Any) -> str:
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


@dataclass
class _FamilyRecord:
    """A pending reshape split: ``src`` = base[0] x base[1] x ... (row-major), not yet unified.

    Indexing the major axis (select/unbind) *decouples*: the source becomes the concatenation
    of per-index copies of the minor atoms. Any other use *collapses*: the source becomes the
    plain product. Both may happen; each at most once.
    """

    src: Term
    base: list[Term]
    subs: list[dict[int, int]]
    collapsed: bool = False
    decoupled: bool = False


class Family(list):
    """Layout of a tensor whose leading split axis is a family of independent slices.

    ``qkv.reshape(B, N, 3, H, D)`` splits one projection axis into (3, H, D). If the result is
    only ever indexed along the 3-axis (``q, k, v = qkv.unbind(...)``), q, k and v may carry
    different head-dim permutations; a plain product layout would force one for all three.
    Family-aware rules (permute, transpose, squeeze, select, unbind, identity ops) carry the
    pending split along; any other rule sees the collapsed (product) layout.
    """

    axis: int
    rec: _FamilyRecord


def _substitute(term: Term, sub: dict[int, int]) -> Term:
    if term[0] == "a":
        return atom(sub.get(term[1], term[1]))
    return (term[0], tuple(_substitute(t, sub) for t in term[1]))


def _family(dims: Dims, axis: int, rec: _FamilyRecord) -> Family:
    fam = Family(dims)
    fam.axis, fam.rec = axis, rec
    return fam


def collapse(table: AtomTable, rec: _FamilyRecord) -> None:
    if not rec.collapsed:
        rec.collapsed = True
        table.unify(rec.src, prod(*rec.base), "reshape")


def _decouple(ctx: RuleContext, fam: Family) -> list[dict[int, int]]:
    rec = fam.rec
    if not rec.decoupled:
        rec.decoupled = True
        ctx.unify(rec.src, concat(*[prod(*(atom(c) for c in sub.values())) for sub in rec.subs]))
    return rec.subs


def _rearranged(value: Dims, order: list[int | None], fresh: Any) -> Dims:
    """Output axes picked from input axes (None: a new size-1 axis), keeping a Family."""
    out = [value[k] if k is not None else fresh(1) for k in order]
    if isinstance(value, Family) and value.axis in order:
        return _family(out, order.index(value.axis), value.rec)
    return out


class RuleContext:
    """What a rule sees of one node: its arguments' layouts, shapes and the atom table."""

    def __init__(
        self, table: AtomTable, values: dict[Any, Any], node: fx.Node, where: str, order: int = 0
    ):
        self.table, self.values, self.node, self.where = table, values, node, where
        self.order = order
        self.args = list(node.args)
        self.kwargs = dict(node.kwargs)

    # -- arguments ---------------------------------------------------------------------
    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default) if name else default

    def dims(self, x: Any) -> Dims | None:
        """Layout of a tensor argument (None for non-tensors); collapses a :class:`Family`."""
        if isinstance(x, fx.Node):
            v = self.values.get(x)
            if isinstance(v, Family):
                collapse(self.table, v.rec)
            return list(v) if isinstance(v, list) else None
        return None

    def family(self, x: Any) -> Family | None:
        v = self.values.get(x) if isinstance(x, fx.Node) else None
        return v if isinstance(v, Family) else None

    def raw(self, x: Any) -> Dims:
        """Layout of a tensor argument without collapsing a Family (for axis-moving rules)."""
        v = self.values.get(x)
        if not isinstance(v, list):
            raise NotImplementedError("argument is not a tensor")
        return v

    def shape(self, x: Any) -> tuple[int, ...]:
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        return tuple(int(s) for s in val.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape(self.node)

    def tensor_args(self) -> list[Dims]:
        out: list[Dims] = []

        def visit(n: Any) -> Any:
            d = self.dims(n)
            if d is not None:
                out.append(d)
            return n

        fx.node.map_aggregate((tuple(self.args), tuple(self.kwargs.values())), visit)
        return out

    def consume(self, *terms: Term) -> None:
        """Mark axes that a matmul contracts: on a weight, these are its *input* axes."""
        for t in terms:
            if t[0] == "a":
                self.table.consumed.add(t[1])

    def param_name(self, x: Any) -> str | None:
        return self.values.get(("param", x)) if isinstance(x, fx.Node) else None

    # -- building blocks -----------------------------------------------------------------
    def fresh(self, size: int, frozen: str | None = None) -> Term:
        return atom(self.table.new(size, frozen=f"{frozen} ({self.where})" if frozen else None))

    def unify(self, a: Term, b: Term) -> bool:
        return self.table.unify(a, b, f"axes could not be aligned at {self.where}")

    def freeze(self, term: Term, reason: str) -> None:
        for a in self.table.leaves(term):
            self.table.freeze(a, f"{reason} ({self.where})")

    def frozen_dims(self, shape: tuple[int, ...], reason: str) -> Dims:
        return [self.fresh(s, frozen=reason) for s in shape]

    def broadcast(self, operands: list[Dims], out_shape: tuple[int, ...]) -> Dims:
        """Numpy broadcasting: axes of equal, non-1 size are one permutation."""
        out: Dims = []
        n = len(out_shape)
        for k in range(n):
            size = out_shape[k]
            terms = [
                d[len(d) - n + k]
                for d in operands
                if len(d) - n + k >= 0 and self.table.term_size(d[len(d) - n + k]) == size
            ]
            if not terms:
                out.append(self.fresh(size))
                continue
            for t in terms[1:]:
                self.unify(terms[0], t)
            out.append(terms[0])
        return out

    def freeze_all_inputs(self, reason: str) -> None:
        for d in self.tensor_args():
            for t in d:
                self.freeze(t, reason)

    def slice_of(self, term: Term, start: int, stop: int) -> Term:
        """Layout of ``x[start:stop]`` along an axis: the axis must split there (else frozen)."""
        size = self.table.term_size(term)
        if start == 0 and stop == size:
            return term
        parts, mid = [], None
        for lo, hi in ((0, start), (start, stop), (stop, size)):
            if hi > lo:
                t = self.fresh(hi - lo)
                parts.append(t)
                if (lo, hi) == (start, stop):
                    mid = t
        self.unify(term, concat(*parts))
        assert mid is not None
        return mid


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _out_shapes(node: fx.Node) -> list[tuple[int, ...]]:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return [tuple(int(s) for s in v.shape) for v in val if isinstance(v, torch.Tensor)]
    return [tuple(int(s) for s in val.shape)]


# ---------------------------------------------------------------------------------------
# identity-like and pointwise
# ---------------------------------------------------------------------------------------


@_rule("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "_to_copy", "to",
       "type_as", "dropout", "feature_dropout", "alpha_dropout", "softmax", "_softmax",
       "log_softmax", "_log_softmax", "_safe_softmax", "copy", "native_dropout")  # fmt: skip
def _identity(ctx: RuleContext) -> Any:
    dims = ctx.raw(ctx.arg(0))
    n_out = len(_out_shapes(ctx.node))
    return dims if not isinstance(ctx.node.meta.get("val"), (list, tuple)) else (dims,) * n_out


def pointwise(ctx: RuleContext) -> Dims:
    return ctx.broadcast(ctx.tensor_args(), ctx.out_shape)


# elementwise ops that PyTorch does not tag as pointwise
_POINTWISE_UNTAGGED = """
    hardswish hardsigmoid mish softplus elu selu celu gelu silu leaky_relu rrelu threshold
    softshrink hardshrink logit log_sigmoid log_sigmoid_forward nan_to_num clamp clip
    masked_fill lerp addcmul addcdiv where fill __and__ __or__ __xor__ __invert__ __lshift__
    __rshift__ logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor
    bitwise_not eq ne lt le gt ge isnan isinf isfinite sign floor_divide remainder fmod
    _weight_norm
""".split()  # _weight_norm(v, g, dim) = g v / |v|: g broadcast against v, and the norm
# (over the axes other than dim) is blind to permutations of the axes it reduces
for _name in _POINTWISE_UNTAGGED:
    register_op_rule(_name, pointwise)


@_rule("prelu", "_prelu_kernel")
def _prelu(ctx: RuleContext) -> Dims:
    x, w = ctx.dims(ctx.arg(0)), ctx.dims(ctx.arg(1))
    if w and ctx.table.term_size(w[0]) > 1:
        ctx.unify(x[1 if len(x) > 1 else 0], w[0])
    return x


# ---------------------------------------------------------------------------------------
# linear algebra
# ---------------------------------------------------------------------------------------


def _hint_out(ctx: RuleContext, weight: Any, term: Term) -> None:
    """Name the class of a layer's output axis after the layer ('layer1.0.conv1.out')."""
    name = ctx.param_name(weight)
    if name and term[0] == "a":
        mod = name.rsplit(".", 1)[0] if "." in name else name
        r = ctx.table.find(term[1])
        if r not in ctx.table.hint or ctx.table.hint[r][0] > ctx.order:
            ctx.table.hint[r] = (ctx.order, f"{mod}.out")


@_rule("linear")
def _linear(ctx: RuleContext) -> Dims:
    x, w, b = ctx.dims(ctx.arg(0)), ctx.dims(ctx.arg(1)), ctx.dims(ctx.arg(2, "bias"))
    ctx.unify(x[-1], w[1])
    ctx.consume(w[1])
    if b:
        ctx.unify(b[0], w[0])
    _hint_out(ctx, ctx.arg(1), w[0])
    return x[:-1] + [w[0]]


@_rule("bilinear")
def _bilinear(ctx: RuleContext) -> Dims:
    """y_o = x1ᵀ W_o x2 + b_o: W (out, in1, in2) contracts x1 on axis 1 and x2 on axis 2."""
    x1, x2, w = ctx.dims(ctx.arg(0)), ctx.dims(ctx.arg(1)), ctx.dims(ctx.arg(2))
    b = ctx.dims(ctx.arg(3, "bias"))
    batch = ctx.broadcast([x1[:-1], x2[:-1]], ctx.out_shape[:-1])
    ctx.unify(x1[-1], w[1])
    ctx.unify(x2[-1], w[2])
    ctx.consume(w[1], w[2])
    if b:
        ctx.unify(b[0], w[0])
    _hint_out(ctx, ctx.arg(2), w[0])
    return batch + [w[0]]


@_rule("t", "numpy_T")
def _t(ctx: RuleContext) -> Dims:
    return list(reversed(ctx.dims(ctx.arg(0))))


def _matmul_dims(ctx: RuleContext, a: Dims, b: Dims) -> Dims:
    a1, b1 = len(a) == 1, len(b) == 1
    if a1:
        a = [ctx.fresh(1)] + a
    if b1:
        b = b + [ctx.fresh(1)]
    ctx.unify(a[-1], b[-2])
    ctx.consume(a[-1], b[-2])
    batch_shape = ctx.out_shape[: max(len(a), len(b)) - 2] if not (a1 or b1) else None
    if batch_shape is None:
        nb = max(len(a), len(b)) - 2
        batch_shape = tuple(
            max(
                ctx.table.term_size(d[len(d) - 2 - nb + k]) if len(d) - 2 - nb + k >= 0 else 1
                for d in (a, b)
            )
            for k in range(nb)
        )
    batch = ctx.broadcast([a[:-2], b[:-2]], batch_shape) if batch_shape else []
    out = batch + [a[-2], b[-1]]
    if a1:
        out.pop(-2)
    if b1:
        out.pop(-1)
    return out


@_rule("mm", "bmm", "matmul")
def _mm(ctx: RuleContext) -> Dims:
    return _matmul_dims(ctx, ctx.dims(ctx.arg(0)), ctx.dims(ctx.arg(1)))


@_rule("addmm", "baddbmm", "addbmm")
def _addmm(ctx: RuleContext) -> Dims:
    b = ctx.dims(ctx.arg(2))
    _hint_out(ctx, ctx.arg(2), b[-1])  # x @ W + bias with W (in, out), as HF's Conv1D
    out = _matmul_dims(ctx, ctx.dims(ctx.arg(1)), b)
    return ctx.broadcast([out, ctx.dims(ctx.arg(0))], ctx.out_shape)


@_rule("einsum")
def _einsum(ctx: RuleContext) -> Dims:
    eq = ctx.arg(0).replace(" ", "")
    operands = [ctx.dims(o) for o in ctx.arg(1)]
    if "..." in eq or "->" not in eq:
        raise NotImplementedError("einsum with ellipsis or implicit output")
    lhs, rhs = eq.split("->")
    letters: dict[str, Term] = {}
    for spec, dims in zip(lhs.split(","), operands, strict=True):
        for ch, t in zip(spec, dims, strict=True):
            if ctx.table.term_size(t) == 1 and ch in letters:
                continue
            if ch in letters and ctx.table.term_size(letters[ch]) == 1:
                letters[ch] = t
            elif ch in letters:
                ctx.unify(letters[ch], t)
            else:
                letters[ch] = t
    for spec, dims in zip(lhs.split(","), operands, strict=True):
        ctx.consume(*(t for ch, t in zip(spec, dims, strict=True) if ch not in rhs))
    return [letters[ch] for ch in rhs]


# ---------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------


def _conv_core(
    ctx: RuleContext, x: Dims, w: Dims, b: Dims | None, groups: int, transposed: bool
) -> Dims:
    """Channels: in = G x Cin_g, out = G x Cout_g; one permutation of the G groups, one of the
    within-group input channels and one of the within-group output channels."""
    if transposed:  # weight is (Cin, Cout/G, k...)
        w_in, w_out_g = w[0], w[1]
        c_out = ctx.table.term_size(w_out_g) * groups
        if groups == 1:
            ctx.unify(x[1], w_in)
            ctx.consume(w_in)
            out_c = w_out_g
        else:
            g, ci = ctx.fresh(groups), ctx.fresh(ctx.table.term_size(w_in) // groups)
            ctx.unify(x[1], prod(g, ci))
            ctx.unify(w_in, prod(g, ci))
            ctx.consume(w_in)
            out_c = prod(g, w_out_g)
    else:  # weight is (Cout, Cin/G, k...)
        c_out = ctx.table.term_size(w[0])
        if groups == 1:
            ctx.unify(x[1], w[1])
            ctx.consume(w[1])
            out_c = w[0]
        else:
            g = ctx.fresh(groups)
            co = ctx.fresh(c_out // groups)
            ctx.unify(x[1], prod(g, w[1]))
            ctx.consume(w[1])
            ctx.unify(w[0], prod(g, co))
            out_c = w[0]
    if b:
        ctx.unify(b[0], out_c)
    _hint_out(ctx, ctx.arg(1), out_c)
    for t in w[2:]:
        ctx.freeze(t, "kernel window of a convolution")
    for t in x[2:]:
        ctx.freeze(t, "spatial axis of a convolution")
    shape = ctx.out_shape
    spatial = [ctx.fresh(s, "spatial axis of a convolution") for s in shape[2:]]
    assert ctx.table.term_size(out_c) == c_out
    return [x[0], out_c] + spatial


@_rule("conv1d", "conv2d", "conv3d")
def _conv(ctx: RuleContext) -> Dims:
    groups = ctx.arg(6, "groups", 1)
    return _conv_core(
        ctx, ctx.dims(ctx.arg(0)), ctx.dims(ctx.arg(1)), ctx.dims(ctx.arg(2, "bias")), groups, False
    )


@_rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_t(ctx: RuleContext) -> Dims:
    groups = ctx.arg(6, "groups", 1)
    return _conv_core(
        ctx, ctx.dims(ctx.arg(0)), ctx.dims(ctx.arg(1)), ctx.dims(ctx.arg(2, "bias")), groups, True
    )


@_rule("convolution", "_convolution")
def _convolution(ctx: RuleContext) -> Dims:
    transposed, groups = bool(ctx.arg(6, "transposed", False)), ctx.arg(8, "groups", 1)
    return _conv_core(
        ctx,
        ctx.dims(ctx.arg(0)),
        ctx.dims(ctx.arg(1)),
        ctx.dims(ctx.arg(2, "bias")),
        groups,
        transposed,
    )


# ---------------------------------------------------------------------------------------
# normalization
# ---------------------------------------------------------------------------------------


def _per_channel(ctx: RuleContext, channel: Term, tensors: list[Any]) -> None:
    for t in tensors:
        d = ctx.dims(t)
        if d:
            ctx.unify(channel, d[0])


@_rule(
    "batch_norm",
    "instance_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional",
    "native_batch_norm",
    "cudnn_batch_norm",
    "_batch_norm_impl_index",
    "_batch_norm_no_update",
    "_batch_norm_with_update",
)
def _batch_norm(ctx: RuleContext) -> Any:
    x = ctx.dims(ctx.arg(0))
    _per_channel(ctx, x[1], ctx.args[1:5])
    shapes = _out_shapes(ctx.node)
    if len(shapes) == 1:
        return x
    rest = [
        [x[1]] if sh == (shapes[0][1],) else ctx.frozen_dims(sh, "normalization statistics")
        for sh in shapes[1:]
    ]
    return tuple([x] + rest)


@_rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(ctx: RuleContext) -> Any:
    x = ctx.dims(ctx.arg(0))
    k = len(ctx.arg(1))
    for t in (ctx.arg(2, "weight"), ctx.arg(3, "bias")):
        d = ctx.dims(t)
        if d:
            for a, b in zip(x[-k:], d, strict=True):
                ctx.unify(a, b)
    shapes = _out_shapes(ctx.node)
    if len(shapes) == 1:
        return x
    return tuple(
        [x]
        + [
            x[: len(sh) - k] + [ctx.fresh(1) for _ in range(k)]
            if len(sh) == len(x)
            else ctx.frozen_dims(sh, "normalization statistics")
            for sh in shapes[1:]
        ]
    )


@_rule("group_norm", "native_group_norm")
def _group_norm(ctx: RuleContext) -> Any:
    x = ctx.dims(ctx.arg(0))
    if ctx.node.target.__name__.startswith("native_group_norm"):
        weight, bias, groups = ctx.arg(1), ctx.arg(2), ctx.arg(6)
    else:
        groups, weight, bias = ctx.arg(1), ctx.arg(2, "weight"), ctx.arg(3, "bias")
    _per_channel(ctx, x[1], [weight, bias])
    channels = ctx.table.term_size(x[1])
    if 1 < groups < channels:
        segs = ctx.table.normalize(x[1])
        if segs is not None and len(segs) == 1 and len(segs[0]) == 1:
            ctx.table.add_blocks(segs[0][0], groups)
        else:
            ctx.freeze(x[1], "GroupNorm over a composite channel axis")
    shapes = _out_shapes(ctx.node)
    if len(shapes) == 1:
        return x
    return tuple([x] + [ctx.frozen_dims(sh, "normalization statistics") for sh in shapes[1:]])


# ---------------------------------------------------------------------------------------
# pooling and reductions
# ---------------------------------------------------------------------------------------


@_rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
       "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
       "adaptive_max_pool1d", "adaptive_max_pool2d", "_adaptive_avg_pool2d",
       "max_pool2d_with_indices", "lp_pool2d",
       # resampling acts on the spatial axes alone, as pooling does (U-Nets, FPNs, decoders)
       "interpolate", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
       "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
       "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
       "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")  # fmt: skip
def _pool(ctx: RuleContext) -> Any:
    x = ctx.dims(ctx.arg(0))
    shapes = _out_shapes(ctx.node)
    nspatial = len(shapes[0]) - (len(x) - len(shapes[0]) + 2)
    lead = x[: len(shapes[0]) - nspatial]
    for t in x[len(lead) :]:
        ctx.freeze(t, "spatial axis of a pooling")
    outs = [
        lead + [ctx.fresh(s, "spatial axis of a pooling") for s in sh[len(lead) :]] for sh in shapes
    ]
    if len(outs) > 1:
        for t in x[len(lead) :]:
            ctx.freeze(t, "pooling indices")
        outs[1:] = [ctx.frozen_dims(sh, "pooling indices") for sh in shapes[1:]]
        return tuple(outs)
    return outs[0]


def _reduce_dims(ctx: RuleContext, dims_arg: Any, keepdim: bool) -> Dims:
    x = ctx.dims(ctx.arg(0))
    if dims_arg is None or dims_arg == []:
        red = set(range(len(x)))
    else:
        red = {
            _norm_dim(d, len(x)) for d in ([dims_arg] if isinstance(dims_arg, int) else dims_arg)
        }
    out: Dims = []
    for k, t in enumerate(x):
        if k in red:
            if keepdim:
                out.append(ctx.fresh(1))
        else:
            out.append(t)
    return out


@_rule("sum", "mean", "amax", "amin", "nansum", "nanmean", "logsumexp", "prod", "any", "all")
def _reduce(ctx: RuleContext) -> Dims:
    dims = ctx.arg(1, "dim")
    if isinstance(dims, torch.dtype):
        dims = None
    return _reduce_dims(ctx, dims, bool(ctx.arg(2, "keepdim", False)))


@_rule("var", "std", "var_mean", "std_mean")
def _var(ctx: RuleContext) -> Any:
    out = _reduce_dims(ctx, ctx.arg(1, "dim"), bool(ctx.kwargs.get("keepdim", False)))
    return (out, out) if len(_out_shapes(ctx.node)) == 2 else out


@_rule("linalg_vector_norm", "norm")
def _norm(ctx: RuleContext) -> Dims:
    return _reduce_dims(ctx, ctx.arg(2, "dim"), bool(ctx.arg(3, "keepdim", False)))


@_rule("max", "min")
def _max(ctx: RuleContext) -> Any:
    if len(ctx.args) >= 2 and isinstance(ctx.args[1], int):  # max.dim -> (values, indices)
        d = _norm_dim(ctx.args[1], len(ctx.dims(ctx.arg(0))))
        ctx.freeze(ctx.dims(ctx.arg(0))[d], "max/min returns indices along this axis")
        out = _reduce_dims(ctx, d, bool(ctx.arg(2, "keepdim", False)))
        return (out, out)
    if len(ctx.tensor_args()) >= 2:
        return pointwise(ctx)
    return _reduce_dims(ctx, None, False)


# ---------------------------------------------------------------------------------------
# shape ops
# ---------------------------------------------------------------------------------------


def reshape_dims(ctx: RuleContext, x: Dims, out_shape: tuple[int, ...]) -> Dims:
    """Match runs of input and output axes with equal products; unify their layouts."""
    in_sizes = [ctx.table.term_size(t) for t in x]
    out: Dims = []
    family: tuple[int, _FamilyRecord] | None = None
    i = j = 0
    while i < len(x) or j < len(out_shape):
        if j < len(out_shape) and out_shape[j] == 1 and (i >= len(x) or in_sizes[i] != 1):
            out.append(ctx.fresh(1))
            j += 1
            continue
        if i < len(x) and in_sizes[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            i += 1
            continue
        i0, j0 = i, j
        pi, pj = in_sizes[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= in_sizes[i]
                i += 1
            else:
                pj *= out_shape[j]
                j += 1
        src = x[i0:i]
        if j - j0 == 1:
            out.append(prod(*src))
        elif (
            i - i0 == 1
            and all(
                ctx.table.term_size(t) == s
                for t, s in zip(_split_hint(ctx, src[0]), out_shape[j0:j], strict=False)
            )
            and len(_split_hint(ctx, src[0])) == j - j0
        ):
            out.extend(_split_hint(ctx, src[0]))
        elif i - i0 == 1 and out_shape[j0] > 1 and family is None:
            # one axis split into (n, ...): maybe a family of n slices (see Family)
            base = [ctx.fresh(s) for s in out_shape[j0:j]]
            subs = [
                {b[1]: ctx.table.new(ctx.table.term_size(b)) for b in base[1:]}
                for _ in range(out_shape[j0])
            ]
            family = (len(out), _FamilyRecord(src[0], base, subs))
            ctx.values.setdefault("__families__", []).append(family[1])
            out.extend(base)
        else:
            new = [ctx.fresh(s) for s in out_shape[j0:j]]
            ctx.unify(prod(*src), prod(*new))
            out.extend(new)
    return _family(out, *family) if family else out


def _split_hint(ctx: RuleContext, t: Term) -> list[Term]:
    return list(t[1]) if t[0] == "p" else [t]


@_rule("view", "reshape", "_unsafe_view", "view_copy", "_reshape_alias", "reshape_as", "view_as")
def _view(ctx: RuleContext) -> Dims:
    return reshape_dims(ctx, ctx.dims(ctx.arg(0)), ctx.out_shape)


@_rule("flatten")
def _flatten(ctx: RuleContext) -> Dims:
    x = ctx.dims(ctx.arg(0))
    if not x:
        return [ctx.fresh(1)]
    s, e = (
        _norm_dim(ctx.arg(1, "start_dim", 0), len(x)),
        _norm_dim(ctx.arg(2, "end_dim", -1), len(x)),
    )
    return x[:s] + [prod(*x[s : e + 1])] + x[e + 1 :]


@_rule("unflatten")
def _unflatten(ctx: RuleContext) -> Dims:
    return reshape_dims(ctx, ctx.dims(ctx.arg(0)), ctx.out_shape)


@_rule("squeeze")
def _squeeze(ctx: RuleContext) -> Dims:
    x = ctx.raw(ctx.arg(0))
    shape = ctx.shape(ctx.arg(0))
    dims = ctx.arg(1, "dim")
    if dims is None:
        dims = [k for k, n in enumerate(shape) if n == 1]
    dims = {_norm_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
    order = [k for k in range(len(x)) if not (k in dims and shape[k] == 1)]
    return _rearranged(x, order, ctx.fresh)


@_rule("unsqueeze")
def _unsqueeze(ctx: RuleContext) -> Dims:
    x = ctx.raw(ctx.arg(0))
    d = _norm_dim(ctx.arg(1), len(x) + 1)
    order: list[int | None] = list(range(len(x)))
    order.insert(d, None)
    return _rearranged(x, order, ctx.fresh)


@_rule("permute")
def _permute(ctx: RuleContext) -> Dims:
    x = ctx.raw(ctx.arg(0))
    return _rearranged(x, [_norm_dim(d, len(x)) for d in ctx.arg(1)], ctx.fresh)


@_rule("transpose", "swapaxes", "swapdims")
def _transpose(ctx: RuleContext) -> Dims:
    x = ctx.raw(ctx.arg(0))
    order: list[int | None] = list(range(len(x)))
    a, b = _norm_dim(ctx.arg(1), len(x)), _norm_dim(ctx.arg(2), len(x))
    order[a], order[b] = order[b], order[a]
    return _rearranged(x, order, ctx.fresh)


@_rule("movedim")
def _movedim(ctx: RuleContext) -> Dims:
    x = ctx.dims(ctx.arg(0))
    src, dst = ctx.arg(1), ctx.arg(2)
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [_norm_dim(d, len(x)) for d in src]
    dst = [_norm_dim(d, len(x)) for d in dst]
    order = [None] * len(x)
    for s, d in zip(src, dst, strict=True):
        order[d] = s
    rest = iter(k for k in range(len(x)) if k not in src)
    return [x[o if o is not None else next(rest)] for o in order]


@_rule("expand", "broadcast_to", "expand_copy")
def _expand(ctx: RuleContext) -> Dims:
    x = ctx.dims(ctx.arg(0))
    shape = ctx.out_shape
    lead = len(shape) - len(x)
    # copies along a new axis are all equal, so any permutation of that axis keeps them: free
    out = [ctx.fresh(s) for s in shape[:lead]]
    for t, s in zip(x, shape[lead:], strict=True):
        out.append(t if ctx.table.term_size(t) == s else ctx.fresh(s))
    return out


@_rule("repeat")
def _repeat(ctx: RuleContext) -> Dims:
    x = ctx.dims(ctx.arg(0))
    reps = list(ctx.arg(1))
    lead = len(reps) - len(x)
    out = [ctx.fresh(s) for s in ctx.out_shape[:lead]]
    for t, r in zip(x, reps[lead:], strict=True):
        out.append(t if r == 1 else prod(ctx.fresh(r), t))
    return out


@_rule("cat", "concat", "concatenate")
def _cat(ctx: RuleContext) -> Dims:
    parts = [ctx.dims(t) for t in ctx.arg(0)]
    parts = [
        p for p in parts if p is not None and not (len(p) == 1 and ctx.table.term_size(p[0]) == 0)
    ]
    d = _norm_dim(ctx.arg(1, "dim", 0), len(parts[0]))
    out = list(parts[0])
    for p in parts[1:]:
        for k in range(len(out)):
            if k != d:
                ctx.unify(out[k], p[k])
    nonempty = [p[d] for p in parts if ctx.table.term_size(p[d]) > 0]
    out[d] = concat(*nonempty)
    return out


@_rule("stack")
def _stack(ctx: RuleContext) -> Dims:
    parts = [ctx.dims(t) for t in ctx.arg(0)]
    d = _norm_dim(ctx.arg(1, "dim", 0), len(parts[0]) + 1)
    for p in parts[1:]:
        for a, b in zip(parts[0], p, strict=True):
            ctx.unify(a, b)
    new = concat(*[ctx.fresh(1) for _ in parts])
    return parts[0][:d] + [new] + parts[0][d:]


@_rule("slice")
def _slice(ctx: RuleContext) -> Dims:
    x = list(ctx.dims(ctx.arg(0)))
    d = _norm_dim(ctx.arg(1, "dim", 0), len(x))
    size = ctx.table.term_size(x[d])
    start, end, step = ctx.arg(2, "start"), ctx.arg(3, "end"), ctx.arg(4, "step", 1)
    start = 0 if start is None else start
    end = size if end is None else end
    start = max(0, min(size, start + size if start < 0 else start))
    end = max(start, min(size, end + size if end < 0 else end))
    if step != 1:
        ctx.freeze(x[d], "strided slice")
        x[d] = ctx.fresh(ctx.out_shape[d], "strided slice")
        return x
    x[d] = ctx.slice_of(x[d], start, end)
    return x


@_rule("narrow")
def _narrow(ctx: RuleContext) -> Dims:
    x = list(ctx.dims(ctx.arg(0)))
    d = _norm_dim(ctx.arg(1), len(x))
    start, length = ctx.arg(2), ctx.arg(3)
    x[d] = ctx.slice_of(x[d], start, start + length)
    return x


@_rule("select")
def _select(ctx: RuleContext) -> Dims:
    x = ctx.raw(ctx.arg(0))
    d = _norm_dim(ctx.arg(1), len(x))
    i = _norm_dim(ctx.arg(2), ctx.table.term_size(x[d]))
    if isinstance(x, Family) and x.axis == d:  # q = qkv[0]: q's own copies of the atoms
        sub = _decouple(ctx, x)[i]
        return [_substitute(t, sub) for k, t in enumerate(x) if k != d]
    ctx.slice_of(x[d], i, i + 1)
    return _rearranged(x, [k for k in range(len(x)) if k != d], ctx.fresh)


@_rule("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split",
       "split_with_sizes_copy")  # fmt: skip
def _split(ctx: RuleContext) -> tuple[Dims, ...]:
    x = ctx.dims(ctx.arg(0))
    shapes = _out_shapes(ctx.node)
    d = next(
        (k for k in range(len(x)) if any(sh[k] != ctx.table.term_size(x[k]) for sh in shapes)), 0
    )
    outs, pos = [], 0
    for sh in shapes:
        y = list(x)
        y[d] = ctx.slice_of(x[d], pos, pos + sh[d]) if sh[d] else ctx.fresh(0)
        pos += sh[d]
        outs.append(y)
    return tuple(outs)


@_rule("glu")
def _glu(ctx: RuleContext) -> Dims:
    """``glu(x, dim) = a * sigmoid(b)`` for the halves ``a, b`` of ``dim``: unit i of the
    output pairs unit i of each half, so both halves move with it."""
    x = list(ctx.dims(ctx.arg(0)))
    d = _norm_dim(ctx.arg(1, "dim", -1), len(x))
    n = ctx.table.term_size(x[d]) // 2
    a, b = ctx.slice_of(x[d], 0, n), ctx.slice_of(x[d], n, 2 * n)
    ctx.unify(a, b)
    x[d] = a
    return x


@_rule("pixel_shuffle", "pixel_unshuffle")
def _pixel_shuffle(ctx: RuleContext) -> Dims:
    """``(.., C r^2, H, W) <-> (.., C, H r, W r)``: channel ``c r^2 + k`` is channel ``c`` at
    spatial offset ``k``, so the C channels permute (each with its r^2 block) and the rest,
    which moves into space or out of it, is frozen."""
    x, shape = ctx.dims(ctx.arg(0)), ctx.shape(ctx.arg(0))
    r = int(ctx.arg(1))
    lead, (c, h, w) = shape[:-3], shape[-3:]
    why = "spatial offset of a pixel shuffle"
    if _op_name(ctx.node.target) == "pixel_shuffle":
        split = reshape_dims(ctx, x[:-3] + [x[-3]], (*lead, c // (r * r), r, r))
        for t in (*split[-2:], *x[-2:]):
            ctx.freeze(t, why)
        return split[:-2] + [ctx.fresh(h * r, why), ctx.fresh(w * r, why)]
    for t in x[-2:]:
        ctx.freeze(t, why)
    blocks = x[:-2] + [ctx.fresh(r, why), ctx.fresh(r, why)]
    return reshape_dims(ctx, blocks, (*lead, c * r * r)) + [
        ctx.fresh(h // r, why), ctx.fresh(w // r, why)]  # fmt: skip


@_rule("unbind")
def _unbind(ctx: RuleContext) -> tuple[Dims, ...]:
    fam = ctx.family(ctx.arg(0))
    d = _norm_dim(ctx.arg(1, "dim", 0), len(fam or ctx.raw(ctx.arg(0))))
    if fam is not None and fam.axis == d:
        subs = _decouple(ctx, fam)
        return tuple([_substitute(t, sub) for k, t in enumerate(fam) if k != d] for sub in subs)
    x = ctx.dims(ctx.arg(0))
    n = ctx.table.term_size(x[d])
    for i in range(n):
        ctx.slice_of(x[d], i, i + 1)
    return tuple(x[:d] + x[d + 1 :] for _ in range(n))


@_rule("embedding")
def _embedding(ctx: RuleContext) -> Dims:
    w, idx = ctx.dims(ctx.arg(0)), ctx.dims(ctx.arg(1))
    ctx.freeze(w[0], "embedding rows are indexed by input values")
    _hint_out(ctx, ctx.arg(0), w[1])
    return idx + [w[1]]


@_rule("index_select")
def _index_select(ctx: RuleContext) -> Dims:
    x = list(ctx.dims(ctx.arg(0)))
    d = _norm_dim(ctx.arg(1), len(x))
    ctx.freeze(x[d], "indexed by index_select")
    for t in ctx.dims(ctx.arg(2)) or []:
        ctx.freeze(t, "index tensor")
    x[d] = ctx.fresh(ctx.out_shape[d], "indexed by index_select")
    return x


@_rule("index")
def _index(ctx: RuleContext) -> Any:
    """Advanced indexing x[..., idx, ...]: indexed axes and index tensors are frozen."""
    x, indices = ctx.dims(ctx.arg(0)), list(ctx.arg(1))
    used = [k for k, i in enumerate(indices) if i is not None]
    for k in used:
        ctx.freeze(x[k], "indexed by a tensor")
        for t in ctx.dims(indices[k]) or []:
            ctx.freeze(t, "index tensor")
    if used != list(range(used[0], used[-1] + 1)):
        return freeze_everything(ctx, "non-adjacent advanced indexing")
    shape = ctx.out_shape
    tail = x[used[-1] + 1 :]
    mid = shape[used[0] : len(shape) - len(tail)]
    return x[: used[0]] + ctx.frozen_dims(mid, "indexed by a tensor") + tail


@_rule("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
       "replication_pad2d", "zero_pad2d")  # fmt: skip
def _pad(ctx: RuleContext) -> Dims:
    x = list(ctx.dims(ctx.arg(0)))
    for k, s in enumerate(ctx.out_shape):
        if ctx.table.term_size(x[k]) != s:
            ctx.freeze(x[k], "padded axis")
            x[k] = ctx.fresh(s, "padded axis")
    return x


@_rule(
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
)
def _sdpa(ctx: RuleContext) -> Any:
    q, k, v = (ctx.dims(ctx.arg(i)) for i in range(3))
    batch = ctx.broadcast([q[:-2], k[:-2], v[:-2]], ctx.shape(ctx.arg(0))[:-2])
    ctx.unify(q[-1], k[-1])
    ctx.unify(k[-2], v[-2])
    mask = ctx.dims(ctx.arg(3, "attn_mask"))
    if mask:
        ctx.broadcast(
            [batch + [q[-2], k[-2]], mask],
            tuple(ctx.shape(ctx.arg(0))[:-1]) + (ctx.table.term_size(k[-2]),),
        )
    out = batch + [q[-2], v[-1]]
    shapes = _out_shapes(ctx.node)
    if len(shapes) == 1:
        return out
    return tuple([out] + [ctx.frozen_dims(sh, "attention statistics") for sh in shapes[1:]])


# ops whose outputs are fresh constants (their values do not depend on unit order)
@_rule("zeros_like", "ones_like", "full_like", "empty_like", "zeros", "ones", "full", "empty",
       "new_zeros", "new_ones", "new_full", "new_empty", "scalar_tensor")  # fmt: skip
def _constant(ctx: RuleContext) -> Dims:
    return [ctx.fresh(s) for s in ctx.out_shape]


@_rule("arange", "linspace", "rand", "randn", "randint", "rand_like", "randn_like",
       "bernoulli", "normal", "eye", "randperm")  # fmt: skip
def _position_dependent(ctx: RuleContext) -> Dims:
    ctx.freeze_all_inputs("input of a random or position-dependent op")
    return ctx.frozen_dims(ctx.out_shape, "random or position-dependent values")


def freeze_everything(ctx: RuleContext, reason: str) -> Any:
    ctx.freeze_all_inputs(reason)
    shapes = _out_shapes(ctx.node)
    outs = tuple(ctx.frozen_dims(sh, reason) for sh in shapes)
    return outs if isinstance(ctx.node.meta.get("val"), (list, tuple)) else outs[0]


def lookup(node: fx.Node) -> tuple[str, Rule | None]:
    """Name and rule of a node's op; a pointwise-tagged op without its own rule broadcasts."""
    target = node.target
    name = _op_name(target)
    if target is operator.getitem:
        return "getitem", None
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    if base in _RULES:
        return base, _RULES[base]
    if name in _IGNORED:
        return name, _ignore
    if base in _FREEZE_ALL:
        return base, lambda ctx: freeze_everything(ctx, f"op {base} depends on unit order")
    tags = list(getattr(target, "tags", ()))
    if base != name:  # in-place variant: use the tags of the out-of-place op
        packet = getattr(torch.ops.aten, base, None)
        overload = getattr(packet, target._overloadname, None) if packet is not None else None
        tags += list(getattr(overload, "tags", ()))
    if torch.Tag.pointwise in tags:
        return base, pointwise
    return name, None


def _ignore(ctx: RuleContext) -> None:
    return None
