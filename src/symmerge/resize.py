"""A traced model rebuilt at new widths, for any architecture, from its SymmetrySpec.

Merges that are not one-to-one change hidden widths: a zip or a side-by-side map keeps N·n
units, a partial merge n(1 + r), a clustering any K. :func:`resize` makes the *module* for such
a result once, so no method ever constructs layers itself. Nothing here is a table per
architecture: the new shape of every parameter and buffer follows from the spec's members
(which axes, which segments, which factors), and module attributes follow from the new shapes
(``Linear.in_features``, ``Conv2d.groups``, ``GroupNorm.num_groups``, ...) or, for other
modules (timm / Hugging Face attention), from integer attributes that equal an old width of
the module's own tensors or head structure. The result is checked by running it on example
inputs and comparing every observed activation width with the spec's new widths; a model
whose forward hard-codes a width that the spec says is free (a constant in a reshape, a
config value read at run time) is refused with :class:`ResizeError` naming the module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from symmerge.spec import Member, SymmetrySpec

__all__ = [
    "RECORD", "ResizeError", "group_widths", "new_shapes", "output_axes", "resize", "with_state",
]  # fmt: skip


#: attribute of a resized model: how it differs from its source architecture (group widths,
#: block counts, number of outputs), which a checkpoint records so it can be rebuilt
RECORD = "symmerge_resize"


class ResizeError(ValueError):
    """The requested widths are not valid for the spec, or the model cannot take them."""

    #: how far the model's forward got: (modules completed, -activation sites wrong)
    progress: tuple[int, int] = (0, 0)


def group_widths(spec: SymmetrySpec) -> dict[str, int]:
    """Current size of every group (the widths that make :func:`resize` an identity)."""
    return {name: g.size for name, g in spec.groups.items()}


def _plan(
    spec: SymmetrySpec, widths: Mapping[str, int], blocks: Mapping[str, int] | None
) -> tuple[dict[str, int], dict[str, int]]:
    """New size and block count of every group, validated (heads and GroupNorm groups whole)."""
    blocks = dict(blocks or {})
    unknown = sorted((set(widths) | set(blocks)) - set(spec.groups))
    if unknown:
        names = ", ".join(list(spec.groups)[:8]) + (" ..." if len(spec.groups) > 8 else "")
        raise ResizeError(f"the spec has no group {unknown[0]!r} (its groups: {names})")
    for name, w in {**widths, **blocks}.items():
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ResizeError(
                f"the width of group {name!r} must be a positive integer. Got {w!r} instead."
            )
    sizes = {name: int(widths.get(name, g.size)) for name, g in spec.groups.items()}
    counts: dict[str, int] = {}
    for name, g in spec.groups.items():
        if not g.blocks:
            if name in blocks:
                raise ResizeError(f"group {name!r} has no blocks (heads or GroupNorm groups)")
            continue
        head = g.block_group
        if head is not None:  # heads x head dims: the head count is the head group's size
            if name in blocks and blocks[name] != sizes[head]:
                raise ResizeError(
                    f"group {name!r} takes its head count from group {head!r} "
                    f"({sizes[head]}); resize {head!r} to change it"
                )
            count = sizes[head]
            if name not in widths:  # new head count, same head dim
                sizes[name] = count * (g.size // g.blocks)
        else:
            count = int(blocks.get(name, g.blocks))
        if sizes[name] % count:
            kind = "heads" if head else "blocks (GroupNorm groups)"
            raise ResizeError(
                f"width {sizes[name]} for group {name!r} would split one of its {count} {kind}: "
                f"it must be a multiple of {count}"
            )
        counts[name] = count
    return sizes, counts


def output_axes(spec: SymmetrySpec) -> list[tuple[str, int, int]]:
    """(tensor, axis, size) of every parameter axis that is a model output (a head's rows)."""
    return [
        (f.tensor, f.axis, f.size)
        for f in spec.frozen
        if any(r.startswith("model output") for r in f.reasons)
    ]


def new_shapes(
    spec: SymmetrySpec,
    sizes: Mapping[str, int],
    shapes: Mapping[str, Sequence[int]],
    num_outputs: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor once each group has the size ``sizes[group]`` (and the model
    ``num_outputs`` outputs, when given)."""
    out = {name: tuple(s) for name, s in shapes.items()}
    if num_outputs is not None:
        for tensor, axis, _ in output_axes(spec):
            for name in [tensor, *spec.aliases.get(tensor, [])]:
                if name in out:
                    shape = list(out[name])
                    shape[axis] = num_outputs
                    out[name] = tuple(shape)
    for mem in spec.members():
        for name in [mem.tensor, *spec.aliases.get(mem.tensor, [])]:
            if name in out:
                shape = list(out[name])
                shape[mem.axis] = _axis_size(mem, sizes)
                out[name] = tuple(shape)
    return out


def _axis_size(mem: Member, sizes: Mapping[str, int]) -> int:
    return sum(
        math.prod(sizes.get(f.group, f.size) if f.group else f.size for f in seg.factors)
        for seg in mem.segments
    )


def resize(
    model: nn.Module,
    spec: SymmetrySpec,
    widths: Mapping[str, int],
    *,
    blocks: Mapping[str, int] | None = None,
    num_outputs: int | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    example_inputs: Any = None,
    check: bool = True,
) -> nn.Module:
    """A new module of ``model``'s class whose groups have the given widths.

    Parameters and buffers get their new shapes from the spec. With ``state_dict`` (merged
    weights at the new widths) they *are* its tensors, not copies; without it, entries the old
    tensor had are copied (truncated where the width shrinks) and new entries are zero
    (``running_var``: one). Module attributes are updated to
    agree: torch layers from their new weight shapes, other modules' integer attributes
    (head counts, head dims, widths) where their value is an old width of exactly one kind
    among the module's own tensors, its direct children's tensors and its head structure.
    The input is not modified.

    Args:
        model: the model the spec was traced from.
        spec: its symmetry.
        widths: group name -> new number of units; groups left out keep their size. A head
            group (``Group.block_group`` of q/k and v/o) sets the head count; a blocked group
            alone sets the head dim. Widths must keep heads and GroupNorm groups whole.
        blocks: group name -> new block count for GroupNorm-style groups (default: keep the
            count, so blocks widen; a side-by-side merge of N models passes N x the count).
        num_outputs: new size of the model's output axis (a classifier's classes; per-task
            heads side by side), when it has one size on every head tensor.
        state_dict: the new model's tensors (every parameter and buffer, at the new shapes).
        example_inputs: inputs to check the result on (default: a batch of 2 of
            ``model.input_shape`` when the model has one). Every activation site of the spec
            must show its group's new width.
        check: run that check (on by default; ``ResizeError`` when it fails).

    Returns:
        The resized model, in the input's training mode.
    """
    sizes, counts = _plan(spec, widths, blocks)
    if num_outputs is not None:
        heads = {size for _, _, size in output_axes(spec)}
        if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
            raise ResizeError(f"num_outputs must be a positive integer. Got {num_outputs!r}.")
        if len(heads) != 1:
            raise ResizeError(
                f"num_outputs needs one output axis size on the model's parameters; found "
                f"{sorted(heads) or 'none'}"
            )
    shapes = _state_shapes(model)
    target = new_shapes(spec, sizes, shapes, num_outputs)
    old_sizes = {name: g.size for name, g in spec.groups.items()}
    if state_dict is not None:
        new = with_state(model, state_dict, target)
    else:  # tensors that change shape are made once and handed to deepcopy (no second copy)
        new = copy.deepcopy(model, _resized_tensors(model, target))
    ambiguous: list[_Ambiguous] = []
    if target != shapes or any(counts[g] != spec.groups[g].blocks for g in counts):
        ambiguous = _update_attributes(new, spec, old_sizes, sizes, counts)
    inputs = _example_inputs(model, example_inputs) if check else None
    if inputs is not None:
        _settle(new, spec, sizes, inputs, ambiguous)
    record = dict(getattr(model, RECORD, None) or {})
    changed = {g: n for g, n in sizes.items() if n != old_sizes[g]}
    record["widths"] = {**record.get("widths", {}), **changed}
    moved = {g: c for g, c in counts.items() if c != spec.groups[g].blocks}
    record["blocks"] = {**record.get("blocks", {}), **moved}
    if num_outputs is not None:
        record["num_outputs"] = num_outputs
    if record["widths"] or record["blocks"] or "num_outputs" in record:
        setattr(new, RECORD, record)
    return new


# ---------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    out = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({n: tuple(b.shape) for n, b in model.named_buffers(remove_duplicate=False)})
    return out


def _resized_tensor(old: torch.Tensor, shape: tuple[int, ...], fill: float) -> torch.Tensor:
    if tuple(old.shape) == shape:
        return old.detach().clone()
    out = torch.full(shape, fill, dtype=old.dtype, device=old.device)
    common = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape, strict=True))
    out[common] = old.detach()[common]
    return out


def with_state(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are the tensors of ``state_dict`` (no
    copy of the old weights, none of the new: a deepcopy plus ``load_state_dict`` costs two).

    ``shapes``: the shape each tensor must have (default: the model's own).
    """
    memo: dict[int, torch.Tensor] = {}
    problems = []
    transient = {  # buffers a state dict never holds (position ids, rotary frequencies)
        f"{prefix}.{b}" if prefix else b
        for prefix, mod in model.named_modules(remove_duplicate=False)
        for b in mod._non_persistent_buffers_set
    }
    for name, old in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if id(old) in memo:
            continue  # tied: the first name's tensor serves every name
        want = tuple(old.shape) if shapes is None else tuple(shapes[name])
        t = state_dict.get(name)
        if t is None and name in transient and tuple(old.shape) == want:
            continue  # the model's own copy is kept
        if t is None or tuple(t.shape) != want:
            got = "missing" if t is None else f"shape {tuple(t.shape)}"
            problems.append(f"{name}: {got}, expected {want}")
            continue
        t = t.detach().to(old.device)
        if not t.is_floating_point() or not old.is_floating_point():
            t = t.to(old.dtype)
        memo[id(old)] = (
            nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
        )
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError("the state dict does not fit the model: " + "; ".join(problems[:3]) + more)
    return copy.deepcopy(model, memo)


def _resized_tensors(
    model: nn.Module, target: Mapping[str, tuple[int, ...]]
) -> dict[int, torch.Tensor]:
    """id of every tensor whose shape changes -> its resized copy (a deepcopy memo, so tied
    tensors stay tied)."""
    memo: dict[int, torch.Tensor] = {}
    for name, old in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        shape = target[name]
        if tuple(old.shape) == shape or id(old) in memo:
            continue
        fill = 1.0 if name.rpartition(".")[2] == "running_var" else 0.0
        t = _resized_tensor(old, shape, fill)
        if isinstance(old, nn.Parameter):
            t = nn.Parameter(t, requires_grad=old.requires_grad)
        memo[id(old)] = t
    return memo


# ---------------------------------------------------------------------------------------
# module attributes
# ---------------------------------------------------------------------------------------

_CONV = (nn.modules.conv._ConvNd,)
_NORM_SHAPED = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


@dataclass(frozen=True)
class _Ambiguous:
    """An integer attribute equal to an old width that may or may not change with it."""

    module: str
    attr: str
    old: int
    changed: int
    owner: nn.Module

    @property
    def key(self) -> tuple[str, str]:  # one decision per class and attribute name
        return type(self.owner).__qualname__, self.attr


def _update_attributes(
    model: nn.Module,
    spec: SymmetrySpec,
    old: Mapping[str, int],
    new: Mapping[str, int],
    counts: Mapping[str, int],
) -> list[_Ambiguous]:
    """Make every module's attributes agree with its new tensors; returns the integer
    attributes that could mean either an unchanged or a changed width."""
    ambiguous: list[_Ambiguous] = []
    by_tensor: dict[str, list[Member]] = {}  # built once: every module below looks up its own
    for mem in spec.members():
        by_tensor.setdefault(mem.tensor, []).append(mem)
    gn_blocks = _groupnorm_blocks(spec, counts)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, _CONV):
            _update_conv(name, module)
        elif isinstance(module, nn.GroupNorm):
            if module.weight is not None:
                module.num_channels = int(module.weight.shape[0])
            module.num_groups = gn_blocks.get(name, module.num_groups)
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            ref = module.weight if module.weight is not None else module.running_mean
            if ref is not None:
                module.num_features = int(ref.shape[0])
        elif isinstance(module, _NORM_SHAPED):
            if getattr(module, "weight", None) is not None:
                module.normalized_shape = tuple(
                    module.weight.shape[-len(module.normalized_shape) :]
                )
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape
        elif not _is_torch_layer(module):
            ambiguous += _update_ints(name, module, spec, old, new, by_tensor)
    return ambiguous


def _is_torch_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn")


def _update_conv(name: str, conv: nn.modules.conv._ConvNd) -> None:
    """A grouped or depthwise conv keeps the channels each of its groups reads and writes, so
    its group count scales with its channels; a plain conv reads its weight's shape."""
    w = conv.weight  # (out, in / groups, ...) or, transposed, (in, out / groups, ...)
    whole, old_whole = (
        (w.shape[0], conv.in_channels) if conv.transposed else (w.shape[0], conv.out_channels)
    )
    if conv.groups > 1:
        per_group = old_whole // conv.groups
        if whole % per_group:
            raise ResizeError(
                f"module {name!r}: {whole} channels do not split into its groups of "
                f"{per_group} (groups={conv.groups})"
            )
        conv.groups = whole // per_group
    other = w.shape[1] * conv.groups
    if conv.transposed:
        conv.in_channels, conv.out_channels = whole, other
    else:
        conv.in_channels, conv.out_channels = other, whole


def _groupnorm_blocks(spec: SymmetrySpec, counts: Mapping[str, int]) -> dict[str, int]:
    """GroupNorm module name -> new group count (its group's block count)."""
    out: dict[str, int] = {}
    for name, g in spec.groups.items():
        if name in counts and g.block_group is None:
            for m in g.members:
                if m.tensor.endswith(".weight") or m.tensor.endswith(".bias"):
                    out[m.tensor.rpartition(".")[0]] = counts[name]
    return out


def _local_sizes(
    name: str, module: nn.Module, spec: SymmetrySpec, old: Mapping[str, int],
    new: Mapping[str, int], by_tensor: Mapping[str, list[Member]],
) -> dict[int, set[int]]:  # fmt: skip
    """old width -> the new widths it can mean, for the tensors of ``module`` and its direct
    children, their head counts and head dims."""
    prefix = f"{name}." if name else ""
    local = {f"{prefix}{k}" for k, _ in module.named_parameters(recurse=False)}
    local |= {f"{prefix}{k}" for k, _ in module.named_buffers(recurse=False)}
    for child_name, child in module.named_children():
        for k, _ in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
            local.add(f"{prefix}{child_name}.{k}")
    found: dict[int, set[int]] = {}
    for mem in (m for t in local for m in by_tensor.get(t, ())):
        for seg in mem.segments:
            for f in seg.factors:
                if f.group is None:
                    continue
                g = spec.groups[f.group]
                found.setdefault(old[f.group], set()).add(new[f.group])
                if g.blocks:
                    h_old = g.blocks
                    h_new = new[g.block_group] if g.block_group else h_old
                    found.setdefault(h_old, set()).add(h_new)
                    found.setdefault(old[f.group] // h_old, set()).add(new[f.group] // h_new)
        found.setdefault(_axis_size(mem, old), set()).add(_axis_size(mem, new))
    return found


def _update_ints(
    name: str, module: nn.Module, spec: SymmetrySpec, old: Mapping[str, int],
    new: Mapping[str, int], by_tensor: Mapping[str, list[Member]],
) -> list[_Ambiguous]:  # fmt: skip
    """Integer attributes equal to an old width that maps to one new width are updated; those
    that may keep or change their value (a width that equals an unchanged one) are returned."""
    sizes = _local_sizes(name, module, spec, old, new, by_tensor)
    ambiguous = []
    for attr, value in list(vars(module).items()):
        if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
            continue
        options = sizes.get(value, set())
        if len(options) == 1:
            setattr(module, attr, next(iter(options)))
        elif len(options - {value}) == 1:
            ambiguous.append(_Ambiguous(name, attr, value, next(iter(options - {value})), module))
    return ambiguous


# ---------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------


def _example_inputs(model: nn.Module, example_inputs: Any) -> tuple | None:
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    from symmerge.stats import shape_inputs

    return shape_inputs(model)


@contextmanager
def _module_stack(model: nn.Module, track: bool = True) -> Iterator[tuple[list, list]]:
    """The names of the modules being run, innermost last (to name where a forward fails),
    and those completed; nothing is recorded without ``track``."""
    stack: list[str] = []
    done: list[str] = []  # completed module calls, in order
    handles = []
    for name, m in model.named_modules() if track else ():
        handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: stack.append(n)))
        handles.append(m.register_forward_hook(lambda _m, _a, _o: done.append(stack.pop())))
    try:
        yield stack, done
    finally:
        for h in handles:
            h.remove()


def _settle(
    model: nn.Module,
    spec: SymmetrySpec,
    sizes: Mapping[str, int],
    inputs: tuple,
    ambiguous: Sequence[_Ambiguous],
) -> None:
    """Check the model; while it fails, let each ambiguous attribute (all instances of one
    class and name together) take its changed value, kept when the forward then gets further
    (more module calls complete, or fewer activation widths are wrong)."""
    error = _failure(model, spec, sizes, inputs)
    keys: dict[tuple[str, str], list[_Ambiguous]] = {}
    for a in ambiguous:
        keys.setdefault(a.key, []).append(a)
    for entries in keys.values():
        if error is None:
            return
        for a in entries:
            setattr(a.owner, a.attr, a.changed)
        retry = _failure(model, spec, sizes, inputs)
        if retry is not None and retry.progress <= error.progress:
            for a in entries:
                setattr(a.owner, a.attr, a.old)
        else:
            error = retry
    if error is not None:
        raise error


def _failure(
    model: nn.Module, spec: SymmetrySpec, sizes: Mapping[str, int], inputs: tuple
) -> ResizeError | None:
    try:
        _check(model, spec, sizes, inputs)
    except ResizeError as exc:
        return exc
    return None


def _check(model: nn.Module, spec: SymmetrySpec, sizes: Mapping[str, int], inputs: tuple) -> None:
    """Run the resized model and compare each observed activation width with its group's.

    It runs first on the meta device (shapes only, no arithmetic: the check costs almost
    nothing); a model with an op that has no meta kernel, or that fails there, is run for real,
    which decides."""
    try:
        _run_check(_on_meta(model), spec, sizes, _to_meta(inputs), track=False)
        return
    except Exception:  # noqa: BLE001 - the real run below is the judge
        pass
    _run_check(model, spec, sizes, inputs)


def _on_meta(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for _, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if id(t) not in memo:
            meta = t.detach().to("meta")
            memo[id(t)] = (
                nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
            )
    return copy.deepcopy(model, memo)


def _to_meta(x: Any) -> Any:
    if torch.is_tensor(x):
        return x.to("meta")
    if isinstance(x, (tuple, list)):
        return type(x)(_to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    return x


def _run_check(
    model: nn.Module,
    spec: SymmetrySpec,
    sizes: Mapping[str, int],
    inputs: tuple,
    track: bool = True,
) -> None:
    expected: dict[str, list[tuple[str, int, int]]] = {}
    for name, g in spec.groups.items():
        for site in g.sites:
            if site.module_output:
                expected.setdefault(site.module, []).append((name, site.dim, sizes[name]))
    wrong: list[str] = []
    modules = dict(model.named_modules())
    handles = []
    for mod_name in expected:
        if mod_name not in modules:
            continue

        def hook(_m: nn.Module, _a: Any, out: Any, mod_name: str = mod_name) -> None:
            if not torch.is_tensor(out):
                return
            for group, dim, size in expected[mod_name]:
                if dim < out.dim() and out.shape[dim] != size:
                    wrong.append(
                        f"module {mod_name!r} gives {out.shape[dim]} units of group {group!r} "
                        f"(axis {dim}) where {size} were asked for"
                    )

        handles.append(modules[mod_name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with _module_stack(model, track) as (stack, done), torch.no_grad():
            try:
                model(*inputs)
            except Exception as exc:
                where = stack[-1] if stack else "<model>"
                error = ResizeError(
                    f"the resized model fails in module {where!r} "
                    f"({type(modules.get(where, model)).__name__}): {exc}. Its forward probably "
                    "hard-codes a width the spec says is free (a constant in a reshape, or a "
                    "config value read at run time); resize only groups it leaves free, or "
                    "make the forward read sizes from its inputs."
                )
                error.progress = (len(done), 0)
                raise error from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if wrong:
        error = ResizeError(
            "the resized model does not have the asked widths: "
            + "; ".join(wrong[:3])
            + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else "")
            + ". A module attribute that sets this width could not be updated unambiguously."
        )
        error.progress = (len(done), -len(wrong))
        raise error
