"""SymmetrySpec: which parameter axes share a permutation, found by tracing the model.

``trace(model, example_inputs)`` captures the model with ``torch.export`` (an ATen graph: it
traces timm and Hugging Face models where ``torch.fx.symbolic_trace`` fails), runs one
symmetry rule per op (:mod:`symmerge._rules`) over a union-find of axis atoms
(:mod:`symmerge._axes`), and turns every class of atoms that touches a parameter but no model
input or output into a :class:`Group`. ``SymmetrySpec.verify`` proves the result: permuting
every group at random must leave the model's function unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from symmerge import _rules
from symmerge._axes import AtomTable, Term, atom
from symmerge.io import load_state

__all__ = [
    "ActivationSite", "Factor", "FrozenAxis", "Group", "Member", "Segment", "SymmetrySpec",
    "TraceError", "VerifyResult", "register_op_rule", "trace",
]  # fmt: skip

register_op_rule = _rules.register_op_rule

# Frozen for these reasons, an axis holds no hidden units (it is an input, output or space).
_NOT_UNITS = ("model input", "model output", "spatial axis", "kernel window")


class TraceError(RuntimeError):
    """The model could not be captured, or contains an op without a symmetry rule."""


@dataclass(frozen=True)
class Factor:
    """One factor of a row-major product layout: a group's units, or an unpermuted axis."""

    group: str | None
    size: int


@dataclass(frozen=True)
class Segment:
    """A contiguous range of a tensor axis laid out as a row-major product of factors."""

    offset: int
    factors: tuple[Factor, ...]

    @property
    def size(self) -> int:
        return math.prod(f.size for f in self.factors)


@dataclass(frozen=True)
class Member:
    """A (tensor, axis) that a group permutes; ``segments`` say where its units sit on the axis.

    Most members are plain (one segment, one factor). A Linear after a flatten of (C, H, W)
    features has one segment with factors (C-group, H, W); an axis built by ``cat`` has one
    segment per concatenated part. ``role`` is ``"in"`` for an axis a matmul or convolution
    contracts (a weight's input axis: merge maps act on it by *unmerging*) and ``"out"`` for
    every other axis (outputs, biases, norm parameters, embeddings).
    """

    tensor: str
    axis: int
    segments: tuple[Segment, ...]
    role: str = "out"

    @property
    def is_plain(self) -> bool:
        return len(self.segments) == 1 and len(self.segments[0].factors) == 1


@dataclass(frozen=True)
class ActivationSite:
    """A graph value whose axis ``dim`` holds exactly one group's units (for statistics).

    ``module_output`` is True when the value is what ``module`` returns, so a forward hook on
    that module observes it in the eager model.
    """

    node: str
    module: str
    dim: int
    op: str
    module_output: bool = False


@dataclass
class Group:
    """Units that must be permuted together.

    ``blocks`` (GroupNorm groups, attention heads) means a permutation must map each block of
    ``size // blocks`` consecutive units onto a block, in any order inside. With
    ``block_group`` (attention: heads x head dim), the blocks move as that group's permutation
    says, so q/k and v/o head dims of one attention share one head permutation.
    """

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    sites: list[ActivationSite] = field(default_factory=list)
    blocks: int | None = None
    block_group: str | None = None

    def random_permutation(
        self, generator: torch.Generator, block_perm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A random permutation allowed by the group; ``block_perm`` fixes how blocks move
        (the shared head permutation of a ``block_group``)."""
        if not self.blocks:
            return torch.randperm(self.size, generator=generator)
        width = self.size // self.blocks
        order = (
            torch.randperm(self.blocks, generator=generator)
            if block_perm is None
            else (torch.as_tensor(block_perm))
        )
        inner = [torch.randperm(width, generator=generator) for _ in range(self.blocks)]
        return torch.cat([order[b] * width + inner[b] for b in range(self.blocks)])

    def is_valid_permutation(self, perm: torch.Tensor) -> bool:
        """True when ``perm`` is a permutation of range(size) that respects the blocks."""
        perm = torch.as_tensor(perm)
        if perm.shape != (self.size,) or not torch.equal(
            perm.sort().values, torch.arange(self.size)
        ):
            return False
        if not self.blocks:
            return True
        width = self.size // self.blocks
        src = perm.view(self.blocks, width) // width
        return bool((src == src[:, :1]).all())


@dataclass(frozen=True)
class FrozenAxis:
    """Units of a parameter axis that are never permuted, and why."""

    tensor: str
    axis: int
    size: int
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of the invariance check of a spec."""

    max_abs_diff: float
    output_scale: float
    ok: bool


@dataclass
class SymmetrySpec:
    """The permutation symmetry of a model: its groups and the axes left frozen."""

    groups: dict[str, Group]
    frozen: list[FrozenAxis]
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, list[str]] = field(default_factory=dict)

    # ---- permutations -------------------------------------------------------------------
    def random_permutations(self, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        perms: dict[str, torch.Tensor] = {}
        for name, g in self.groups.items():  # block groups come before the groups they steer
            perms[name] = g.random_permutation(gen, perms.get(g.block_group or ""))
        return perms

    def block_permutation(self, group: str, perm: torch.Tensor) -> torch.Tensor:
        """How a permutation of a blocked group moves its blocks."""
        g = self.groups[group]
        width = g.size // g.blocks
        return torch.as_tensor(perm).view(g.blocks, width)[:, 0] // width

    def identity_permutations(self) -> dict[str, torch.Tensor]:
        return {name: torch.arange(g.size) for name, g in self.groups.items()}

    def axis_index(self, member: Member, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Index vector ``idx`` with ``new = old.index_select(axis, idx)`` for one member."""
        parts = []
        for seg in member.segments:
            idx = torch.zeros((), dtype=torch.long)
            for f in seg.factors:
                p = perms.get(f.group) if f.group is not None else None
                p = torch.arange(f.size) if p is None else torch.as_tensor(p, dtype=torch.long)
                idx = idx.unsqueeze(-1) * f.size + p
            parts.append(idx.reshape(-1) + seg.offset)
        return torch.cat(parts)

    def permute_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A new state dict with every group permuted (``perms``: group name -> index vector).

        Follows the convention new[i] = old[perm[i]] on every member axis. Groups missing from
        ``perms`` keep their order. The input is not modified.
        """
        unknown = set(perms) - set(self.groups)
        if unknown:
            raise KeyError(f"unknown groups {sorted(unknown)}; the spec has {len(self.groups)}")
        for name, p in perms.items():
            if not self.groups[name].is_valid_permutation(torch.as_tensor(p)):
                raise ValueError(
                    f"perms['{name}'] is not a valid permutation of the group "
                    f"(size {self.groups[name].size}, blocks "
                    f"{self.groups[name].blocks})"
                )
        for name, p in perms.items():
            head = self.groups[name].block_group
            if head and head in perms:
                if not torch.equal(self.block_permutation(name, p), torch.as_tensor(perms[head])):
                    raise ValueError(
                        f"perms['{name}'] moves its blocks differently from "
                        f"perms['{head}'], the head permutation it must share"
                    )
        perms = dict(perms)
        for name, p in list(perms.items()):  # a head permutation follows from its blocks
            head = self.groups[name].block_group
            if head and head not in perms:
                perms[head] = self.block_permutation(name, p)
        out = dict(state_dict)
        for m in self.members():
            if not any(f.group in perms for s in m.segments for f in s.factors):
                continue
            idx = self.axis_index(m, perms)
            for key in [m.tensor, *self.aliases.get(m.tensor, [])]:
                if key in out:
                    out[key] = out[key].index_select(m.axis, idx.to(out[key].device))
        return out

    def members(self) -> list[Member]:
        """Every permuted (tensor, axis) once, even when several groups share its axis."""
        seen: dict[tuple[str, int], Member] = {}
        for g in self.groups.values():
            for m in g.members:
                seen.setdefault((m.tensor, m.axis), m)
        return list(seen.values())

    def permuted(self, model: nn.Module, perms: Mapping[str, torch.Tensor]) -> nn.Module:
        """A permuted copy of ``model`` (the model itself is not modified)."""
        new = copy.deepcopy(model)
        load_state(new, self.permute_state_dict(model.state_dict(), perms))
        return new

    def verify(
        self,
        model: nn.Module,
        *example_inputs: Any,
        seed: int = 0,
        dtype: torch.dtype | None = torch.float64,
        jitter: bool = True,
    ) -> float:
        """Max |output difference| between ``model`` and a randomly permuted copy.

        Runs in float64 by default, so a correct spec gives round-off (about 1e-12 relative to
        the outputs) and a wrong one gives differences of the order of the outputs. ``jitter``
        first adds small noise to every parameter and to BatchNorm statistics of a copy: the
        symmetry is a property of the architecture, and zero-initialised layers (heads, last
        norms of residual blocks) would otherwise hide a wrong spec.
        """
        return self.check(
            model, *example_inputs, seed=seed, dtype=dtype, jitter=jitter
        ).max_abs_diff

    def check(
        self,
        model: nn.Module,
        *example_inputs: Any,
        seed: int = 0,
        dtype: torch.dtype | None = torch.float64,
        jitter: bool = True,
        tol: float = 1e-6,
    ) -> VerifyResult:
        """:meth:`verify` with the output scale and a verdict: ok when
        max |diff| <= tol * max(1, max |output|)."""
        ref = copy.deepcopy(model).eval()
        if jitter:
            _jitter_(ref, seed)
        if dtype is not None:
            ref = ref.to(dtype)
            example_inputs = tuple(
                x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x
                for x in example_inputs
            )
        perm = self.permuted(ref, self.random_permutations(seed)).eval()
        with torch.no_grad():
            a, b = _flat_tensors(ref(*example_inputs)), _flat_tensors(perm(*example_inputs))
        if len(a) != len(b) or not a:
            raise RuntimeError("the model's outputs contain no tensors to compare")
        diff = max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))
        scale = max(float(x.double().abs().max()) for x in a)
        return VerifyResult(diff, scale, diff <= tol * max(1.0, scale))

    # ---- reporting ----------------------------------------------------------------------
    @property
    def num_free_units(self) -> int:
        return sum(g.size for g in self.groups.values())

    def free_fraction(self) -> float:
        """Share of hidden units (those not on a model input or output axis) left free."""
        hidden = {
            (f.tensor, f.axis): f.size
            for f in self.frozen
            if not all(r.startswith(_NOT_UNITS) for r in f.reasons)
        }
        frozen_units = sum(hidden.values())
        free = self.num_free_units
        return free / (free + frozen_units) if free + frozen_units else 1.0

    def show(self, members: bool = True) -> str:
        lines = [
            f"{len(self.groups)} groups, {self.num_free_units} free units, "
            f"{self.free_fraction():.1%} of hidden units free"
        ]
        for g in self.groups.values():
            extra = ""
            if g.block_group:
                extra = f", {g.blocks} heads x {g.size // g.blocks} head dims ({g.block_group})"
            elif g.blocks:
                extra = f", {g.blocks} blocks x {g.size // g.blocks}"
            lines.append(
                f"group {g.name}: size {g.size}{extra}, {len(g.members)} members, "
                f"{len(g.sites)} activation sites"
            )
            if members:
                for m in g.members:
                    lines.append(f"    {m.tensor}[axis {m.axis}]{_layout_str(m, g.name)}")
        if self.frozen:
            lines.append("frozen axes:")
            for f in self.frozen:
                lines.append(f"    {f.tensor}[axis {f.axis}] ({f.size}): {'; '.join(f.reasons)}")
        return "\n".join(lines)


def _layout_str(m: Member, group: str) -> str:
    if m.is_plain:
        return ""
    segs = []
    for s in m.segments:
        fs = " x ".join(
            f"<{f.group}>" if f.group == group else (f"{f.group}" if f.group else str(f.size))
            for f in s.factors
        )
        segs.append(f"[{s.offset}:{s.offset + s.size}] {fs or '1'}")
    return "  layout: " + " | ".join(segs)


def _jitter_(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                scale = float(p.detach().float().std()) if p.numel() > 1 else 0.0
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.add_((0.1 * scale + 0.02) * noise.to(p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                n = m.running_mean.numel()
                m.running_mean.add_(0.1 * torch.randn(n, generator=gen).to(m.running_mean))
                m.running_var.mul_(
                    torch.empty(n).uniform_(0.5, 1.5, generator=gen).to(m.running_var)
                )


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if torch.is_tensor(x):
            found.append(x)
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)
        elif isinstance(x, Sequence) and not isinstance(x, str):
            for v in x:
                visit(v)
        elif hasattr(x, "to_tuple"):
            visit(x.to_tuple())

    visit(out)
    return found


# ---------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
    unknown_ops: str = "error",
) -> SymmetrySpec:
    """Discover the permutation symmetry of ``model``.

    Args:
        model: any ``nn.Module``; traced in eval mode (its mode is restored afterwards).
        example_inputs: a tensor or tuple of positional inputs (use a batch of at least 2).
        example_kwargs: keyword inputs, if the model takes them.
        unknown_ops: ``"error"`` (default) raises :class:`TraceError` naming an op without a
            symmetry rule; ``"freeze"`` freezes every axis that op touches (always safe: it only
            removes symmetries) and records the reason in ``spec.frozen``.

    Returns:
        A :class:`SymmetrySpec`. Check it with ``spec.verify(model, *example_inputs)``.
    """
    if unknown_ops not in ("error", "freeze"):
        raise ValueError(
            f"The 'unknown_ops' parameter of trace must be 'error' or 'freeze'. "
            f"Got {unknown_ops!r} instead."
        )
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = model.training
    model.eval()
    structured: set[str] = set()  # modules whose output is not a tensor (no hook site)

    def record(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, __: Any, out: Any) -> None:
            if not torch.is_tensor(out):
                structured.add(name)

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules(remove_duplicate=False)
    ]
    try:
        ep = torch.export.export(model, args, kwargs=example_kwargs or {}, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}\n"
            "Check that the model runs on the example inputs; data-dependent Python control "
            "flow must be rewritten with torch.cond or removed."
        ) from e
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return _spec_from_export(ep, model, unknown_ops, structured)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return _clean_path(list(stack.values())[-1][0])


def _clean_path(path: str) -> str:
    return path.replace("L['self'].", "").replace("L__self___", "")


def _spec_from_export(
    ep: Any, model: nn.Module, unknown_ops: str, structured: Collection[str] = ()
) -> SymmetrySpec:
    """The spec of an exported ``model``; ``structured`` names the modules that return a
    tuple or dict (a value computed last inside them is not what a hook on them receives)."""
    sig = ep.graph_signature
    tensor_names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    constants = set(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    non_persistent = {
        spec.target for spec in sig.input_specs if getattr(spec, "persistent", True) is False
    }
    table = AtomTable()
    values: dict[Any, Any] = {}
    member_terms: dict[str, list[Term]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    sites: list[tuple[int, ActivationSite]] = []

    for order, node in enumerate(ep.graph.nodes):
        val = node.meta.get("val")
        if node.op == "placeholder":
            if not isinstance(val, torch.Tensor):
                continue
            shape = tuple(int(s) for s in val.shape)
            if node.name in tensor_names:
                if not node.users:  # unused (e.g. the second name of a tied weight)
                    continue
                name = tensor_names[node.name]
                fixed = None
                if not (val.is_floating_point() or val.is_complex()):
                    fixed = f"integer tensor '{name}' (indices or counters)"
                elif name in non_persistent:
                    fixed = f"non-persistent buffer '{name}' (a constant of the architecture)"
                dims = [atom(table.new(s, frozen=fixed)) for s in shape]
                member_terms[name], shapes[name] = dims, shape
                values[("param", node)] = name
            else:
                reason = "constant tensor" if node.name in constants else "model input"
                dims = [atom(table.new(s, frozen=f"{reason} '{node.name}'")) for s in shape]
            values[node] = dims
        elif node.op == "call_function":
            where = f"node '{node.name}'" + (
                f" in module '{m}'" if (m := _module_path(node)) else ""
            )
            _run_rule(node, table, values, where, order, unknown_ops)
            result = values.get(node)
            if isinstance(result, list) and isinstance(val, torch.Tensor):
                for k, t in enumerate(result):
                    segs = table.normalize(t)
                    if segs and len(segs) == 1 and len(segs[0]) == 1:
                        sites.append(
                            (
                                segs[0][0],
                                ActivationSite(
                                    node.name, _module_path(node), k, _rules._op_name(node.target)
                                ),
                            )
                        )
        elif node.op == "output":

            def freeze_out(n: Any) -> Any:
                d = values.get(n) if isinstance(n, fx.Node) else None
                if isinstance(d, list):
                    for t in d:
                        for a in table.leaves(t):
                            table.freeze(a, "model output")
                return n

            fx.node.map_aggregate(node.args, freeze_out)
        elif node.op == "get_attr":
            raise TraceError(
                f"unexpected get_attr node '{node.name}' (submodule or "
                "higher-order op); this model needs a custom rule"
            )
    for rec in values.get("__families__", []):  # pending reshape splits nobody indexed
        if not rec.decoupled:
            _rules.collapse(table, rec)
    module_last: dict[str, str] = {}  # module path -> name of the last node it computes
    for node in ep.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            module_last[_clean_path(path)] = node.name
    for path in structured:
        module_last.pop(path, None)
    activations = [v for k, v in values.items() if isinstance(k, fx.Node) and isinstance(v, list)]
    activations += [
        d
        for k, v in values.items()
        if isinstance(k, fx.Node) and isinstance(v, tuple)
        for d in v
        if isinstance(d, list)
    ]
    return _build_spec(table, member_terms, shapes, sites, model, module_last, activations)


def _run_rule(
    node: fx.Node,
    table: AtomTable,
    values: dict[Any, Any],
    where: str,
    order: int,
    unknown_ops: str,
) -> None:
    name, rule = _rules.lookup(node)
    if name == "getitem":
        src, idx = node.args
        res = values.get(src)
        if isinstance(res, tuple) and isinstance(idx, int):
            values[node] = res[idx]
        return
    ctx = _rules.RuleContext(table, values, node, where, order)
    val = node.meta.get("val")
    if rule is None:
        if not ctx.tensor_args() and not _has_tensor(val):
            return
        if unknown_ops == "freeze":
            rule = lambda c: _rules.freeze_everything(c, f"unknown op {name}")  # noqa: E731
        else:
            raise TraceError(
                f"no symmetry rule for op '{name}' ({node.target}) at {where}. Register one "
                "with symmerge.register_op_rule(...), or trace with unknown_ops='freeze' to "
                "freeze every axis this op touches."
            )
    try:
        result = rule(ctx)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the node
        raise TraceError(
            f"symmetry rule for op '{name}' failed at {where}: {type(e).__name__}: {e}"
        ) from e
    if result is None:
        return
    _check_result(table, node, name, where, result, val)
    values[node] = result


def _has_tensor(val: Any) -> bool:
    return torch.is_tensor(val) or (isinstance(val, (list, tuple)) and any(map(_has_tensor, val)))


def _check_result(
    table: AtomTable, node: fx.Node, name: str, where: str, result: Any, val: Any
) -> None:
    """Guard against a rule that returns layouts not matching the real output shapes."""
    pairs = (
        [(result, val)]
        if isinstance(result, list)
        else [(r, v) for r, v in zip(result, val, strict=False) if torch.is_tensor(v)]
    )
    for dims, v in pairs:
        if dims is None:
            continue
        shape = tuple(int(s) for s in v.shape)
        got = tuple(table.term_size(t) for t in dims)
        if got != shape:
            raise TraceError(
                f"internal error: rule for op '{name}' at {where} gave a layout of "
                f"shape {got} for an output of shape {shape}"
            )


def _build_spec(
    table: AtomTable,
    member_terms: dict[str, list[Term]],
    shapes: dict[str, tuple[int, ...]],
    sites: list[tuple[int, ActivationSite]],
    model: nn.Module,
    module_last: dict[str, str],
    activations: list[list[Term]],
) -> SymmetrySpec:
    layouts: dict[tuple[str, int], list[list[int]]] = {}
    for name, dims in member_terms.items():
        for axis, t in enumerate(dims):
            segs = table.normalize(t, opaque=True)
            if segs is None:
                for a in table.leaves(t):
                    table.freeze(a, "axis layout is not a concatenation of products")
                continue
            layouts[(name, axis)] = segs
    for r, blocks in list(table.blocks.items()):
        if len(blocks) > 1 and table.find(r) == r:
            table.freeze(r, f"conflicting GroupNorm groupings {sorted(blocks)}")

    def is_free(r: int) -> bool:
        return table.size[r] > 1 and not table.frozen.get(r)

    roots = {k: [[table.find(a) for a in seg] for seg in segs] for k, segs in layouts.items()}
    fused = _find_head_blocks(table, roots, member_terms, activations, is_free)

    names: dict[int, str] = {}
    used: set[str] = set()
    contracted = {  # head-dim atoms that a weight contracts (v/out-proj, not q/k)
        r
        for key, segs in roots.items()
        if (t := member_terms[key[0]][key[1]])[0] == "a" and t[1] in table.consumed
        for seg in segs
        for r in seg
        if r in fused
    }

    def name_of(r: int, fallback: str) -> str:
        if r not in names:
            names[r] = _unique(table.hint.get(r, (0, fallback))[1], used)
        return names[r]

    groups: dict[str, Group] = {}
    for (tensor, axis), segs in roots.items():
        for seg in segs:
            for r in seg:
                if not is_free(r) or r in names:
                    continue
                if r in fused:  # a head-dim atom: the group is heads x head dim, blocked
                    h = fused[r]
                    if h not in names:
                        names[h] = _unique(_base(table, h, tensor) + ".heads", used)
                    heads = names[h]
                    groups.setdefault(heads, Group(heads, table.size[h]))
                    kind = ".vo" if r in contracted else ".qk"
                    names[r] = name = _unique(_base(table, r, tensor) + kind, used)
                    groups[name] = Group(
                        name, table.size[h] * table.size[r], blocks=table.size[h], block_group=heads
                    )
                elif r not in fused.values():
                    name = name_of(r, f"{tensor}:{axis}")
                    blocks = table.blocks.get(r)
                    groups[name] = Group(
                        name, table.size[r], blocks=next(iter(blocks)) if blocks else None
                    )
    frozen: list[FrozenAxis] = []
    for (tensor, axis), segs in roots.items():
        factors_by_seg, offset, touched = [], 0, set()
        reasons: list[str] = []
        for seg in segs:
            factors: list[Factor] = []
            k = 0
            while k < len(seg):
                r = seg[k]
                if k + 1 < len(seg) and fused.get(seg[k + 1]) == r:
                    d = seg[k + 1]
                    factors.append(Factor(names[d], table.size[r] * table.size[d]))
                    touched.add(names[d])
                    k += 2
                    continue
                if is_free(r):
                    factors.append(Factor(names[r], table.size[r]))
                    touched.add(names[r])
                else:
                    factors.append(Factor(None, table.size[r]))
                    if table.size[r] > 1:
                        reasons += [x for x in table.frozen.get(r, []) if x not in reasons]
                k += 1
            factors_by_seg.append(Segment(offset, tuple(factors)))
            offset += math.prod(table.size[a] for a in seg)
        term = member_terms[tensor][axis]
        role = "in" if term[0] == "a" and term[1] in table.consumed else "out"
        member = Member(tensor, axis, tuple(factors_by_seg), role)
        for gname in touched:
            groups[gname].members.append(member)
        if reasons:
            frozen.append(FrozenAxis(tensor, axis, shapes[tensor][axis], tuple(reasons)))
    for r, site in sites:
        r = table.find(r)
        if r in names and names[r] in groups:
            is_out = bool(site.module) and module_last.get(site.module) == site.node
            groups[names[r]].sites.append(dataclasses.replace(site, module_output=is_out))
    # heads groups first, so that blocked groups can use their permutation
    ordered = dict(sorted(groups.items(), key=lambda kv: kv[1].block_group is not None))
    return SymmetrySpec(ordered, frozen, shapes, _aliases(model))


def _base(table: AtomTable, r: int, fallback: str) -> str:
    """Module path of the projection whose output axis an atom was split from."""
    hint = table.hint.get(r, (0, fallback))[1]
    return re.sub(r"(\.out)?(\[\d+\])*$", "", hint)


def _unique(name: str, used: set[str]) -> str:
    base, k = name, 2
    while name in used:
        name, k = f"{base}#{k}", k + 1
    used.add(name)
    return name


def _find_head_blocks(
    table: AtomTable,
    param_roots: dict[tuple[str, int], list[list[int]]],
    member_terms: dict[str, list[Term]],
    activations: list[list[Term]],
    is_free: Any,
) -> dict[int, int]:
    """Find (head, head-dim) atom pairs whose product may take a *different* head-dim
    permutation in every head: returns {head_dim_root: head_root}.

    Attention reshapes a projection's output axis into heads x head dim. The atoms then carry a
    product permutation (one head-dim permutation for all heads), but the true symmetry is
    wider: heads permute as wholes and each head permutes its own dims, as long as nothing
    mixes heads at a fixed head dim. That holds when every tensor that carries the head-dim
    atom d also carries the head atom h: in parameters as the factor just before d (h x d on
    one axis), in activations either so or on another axis (B, H, N, D). A parameter or
    activation with d but without h (a norm over the head dim shared by all heads, a sum over
    heads) rules the pair out.
    """
    tensors: list[tuple[bool, list[list[list[int]]]]] = []
    by_param: dict[str, list[list[list[int]]]] = {}
    for (tensor, _axis), segs in param_roots.items():
        by_param.setdefault(tensor, []).append(segs)
    tensors += [(True, dims) for dims in by_param.values()]
    bad: set[int] = set()
    for dims in activations:
        norm = [table.normalize(t, opaque=True) for t in dims]
        if all(n is not None for n in norm):
            tensors.append((False, [[[table.find(a) for a in seg] for seg in n] for n in norm]))
        else:  # a layout we cannot read: none of its atoms may take per-head permutations
            bad.update(table.find(a) for t in dims for a in table.leaves(t))
    preds: dict[int, set[int | None]] = {}
    alone: dict[int, list[set[int]]] = {}  # activations where d leads its axis
    for is_param, dims in tensors:
        present = {r for segs in dims for seg in segs for r in seg}
        for segs in dims:
            for seg in segs:
                for k, d in enumerate(seg):
                    if not is_free(d):
                        continue
                    if k > 0:
                        preds.setdefault(d, set()).add(seg[k - 1] if is_free(seg[k - 1]) else None)
                    elif is_param:
                        bad.add(d)  # a parameter with d but no head: shared by all heads
                    else:
                        alone.setdefault(d, []).append(present)
    pairs = {}
    for d, ps in preds.items():
        if d in bad or len(ps) != 1 or None in ps:
            continue
        h = next(iter(ps))
        if all(h in present for present in alone.get(d, [])):
            pairs[d] = h
    heads = set(pairs.values())
    return {d: h for d, h in pairs.items() if d not in heads and h not in pairs}


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Other state-dict names of tied tensors, so permuting one permutes all of them."""
    by_id: dict[int, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    )
    for name, t in named:
        by_id.setdefault(id(t), []).append(name)
    return {
        n: [o for o in names if o != n] for names in by_id.values() if len(names) > 1 for n in names
    }
