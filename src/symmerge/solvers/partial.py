"""Partial matching (PLeaS): merge the best-matched units of each group, keep the rest of both
models side by side, and choose how much to keep apart under a compute budget.

After a permutation matching of model B to model A, group g keeps a fraction ``r_g`` of its
units separate: the ``(1 - r_g) n`` matched pairs with the highest similarity are averaged, the
other ``r_g n`` units of *each* model are kept as they are. The merged coordinates are
``[merged | A-private | B-private]`` (width ``n (1 + r_g)``), one split per group, so every
tensor of a residual stream shares it. As a :class:`~symmerge.groupmap.GroupMap` this is an index
map, and the builder's ``W* = sum_m M_m W_m U_m`` gives the partial merge: matched blocks
averaged, private rows reading the merged inputs, and zero blocks between A's and B's private
units. Blocked groups (GroupNorm groups, attention heads) split by whole blocks, so no merged
block mixes kept and merged units; a head group and the head-dim groups it steers split
together (one :func:`~symmerge.solvers.coordinate.coordinates` entry, one ratio).

Compute: a Linear or Conv layer with ``n_in`` inputs and ``n_out`` outputs at ratios
``r_in``, ``r_out`` costs ``c n_in n_out [(1 + r_in)(1 + r_out) - 2 r_in r_out]`` multiply-adds
once its two zero blocks are dropped (``c``: output positions times kernel size). The
:class:`ComputeModel` sums this over every Linear / Conv layer from the spec's layouts (fused
q/k/v outputs and flattens included), so ``budget(r) = F(r) / F(0)`` lies in ``[1, 2]``.
:func:`allocate` picks ratios meeting a budget.

Reference: Nasery, Hayase, Koh, Oh, "PLeaS: Merging Models with Permutations and Least
Squares", CVPR 2025, https://arxiv.org/abs/2407.02447
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from symmerge.flops import is_transposed_linear
from symmerge.groupmap import GroupMap
from symmerge.solvers.coordinate import coordinates
from symmerge.spec import Member, SymmetrySpec

__all__ = [
    "ALLOCATORS",
    "ComputeModel",
    "allocate",
    "compute_model",
    "partial_maps",
    "resolution",
]

#: Budget allocators of :func:`allocate`.
ALLOCATORS = ("score", "stagewise", "uniform")


def resolution(spec: SymmetrySpec, coord: Sequence[str]) -> int:
    """How finely a coordinate splits: its blocks (heads, GroupNorm groups) or its units."""
    grp = spec.groups[coord[0]]
    return grp.size if len(coord) > 1 else (grp.blocks or grp.size)


def _split(
    scores: torch.Tensor, kept: int
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Indices of the ``len - kept`` best scores (merged) and of the rest (kept apart), each
    ascending; ties go to the lower index (a stable sort), so the split is deterministic."""
    order = torch.sort(-scores.to(torch.float64), stable=True).indices
    merged, rest = order[: scores.numel() - kept], order[scores.numel() - kept :]
    return merged.sort().values, rest.sort().values


def partial_maps(
    spec: SymmetrySpec,
    perm: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    ratios: Mapping[str, float],
    lam: float = 0.5,
) -> dict[str, GroupMap]:
    """The partial-merge GroupMap of every group.

    Args:
        perm: model B's permutation of every group (``perm[g][i]``: the B unit matched to A's
            unit i), as from weight or activation matching.
        scores: per group, the similarity of every matched pair ``(i, perm[g][i])`` (higher:
            merged first); a head group's entry is ignored (its heads are scored by the mean
            scores of the head dims they hold).
        ratios: per coordinate (keyed by its first group), the fraction kept separate, rounded
            to the coordinate's :func:`resolution`.
        lam: model B's weight in the merged (averaged) units.
    """
    maps: dict[str, GroupMap] = {}
    w = (1.0 - lam, lam)
    for coord in coordinates(spec):
        res = resolution(spec, coord)
        kept = round(float(ratios.get(coord[0], 0.0)) * res)
        head = spec.groups[coord[0]]
        if len(coord) > 1:  # heads: score a head by the mean score of its head dims
            per_head = [scores[g].to(torch.float64).view(head.size, -1).mean(1) for g in coord[1:]]
            block_scores = torch.stack(per_head).mean(0)
            merged, rest = _split(block_scores, kept)
            maps[coord[0]] = _index_map([merged, rest], perm[coord[0]], head.size, w, None)
            for g in coord[1:]:
                width = spec.groups[g].size // head.size
                units = [_expand(b, width) for b in (merged, rest)]
                maps[g] = _index_map(units, perm[g], spec.groups[g].size, w, None)
            continue
        grp = spec.groups[coord[0]]
        if grp.blocks:  # GroupNorm groups: whole blocks merged or kept apart
            width = grp.size // grp.blocks
            block_scores = scores[grp.name].to(torch.float64).view(grp.blocks, width).mean(1)
            merged, rest = _split(block_scores, kept)
            units = [_expand(b, width) for b in (merged, rest)]
            maps[grp.name] = _index_map(units, perm[grp.name], grp.size, w, grp.blocks + kept)
        else:
            parts = list(_split(scores[grp.name], kept))
            maps[grp.name] = _index_map(parts, perm[grp.name], grp.size, w, None)
    return {g: maps[g] for g in spec.groups}


def _expand(blocks: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices of whole blocks, block after block."""
    return (blocks[:, None] * width + torch.arange(width)).reshape(-1)


def _index_map(
    parts: Sequence[torch.Tensor],
    perm: torch.Tensor,
    n: int,
    w: tuple[float, float],
    blocks: int | None,
) -> GroupMap:
    """``[merged | A-private | B-private]`` from A's merged units and A's units kept apart
    (B's are their matches ``perm[...]``)."""
    merged, rest = parts
    none = torch.full((rest.numel(),), -1, dtype=torch.long)
    perm = torch.as_tensor(perm, dtype=torch.long)
    idx_a = torch.cat([merged, rest, none])
    idx_b = torch.cat([perm[merged], none, perm[rest]])
    # matched units averaged with the weights w, private ones with their whole value
    found = GroupMap.partial_permutations([idx_a, idx_b], [n, n], w)
    return found if blocks is None else dataclasses.replace(found, blocks=blocks)


# ---------------------------------------------------------------------------------------
# compute
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    name: str
    positions: int  # output positions x kernel size (c)
    outs: tuple[tuple[int, str | None], ...]  # (segment size, coordinate or None)
    ins: tuple[tuple[int, str | None], ...]


@dataclass(frozen=True)
class ComputeModel:
    """Multiply-adds of every Linear / Conv layer of a partial merge, as a function of the
    ratio of every coordinate (keyed by its first group; a missing key means 0)."""

    layers: tuple[_Layer, ...]
    coords: tuple[str, ...]

    def macs(self, ratios: Mapping[str, float]) -> float:
        """Multiply-adds per example with the zero blocks dropped."""
        total = 0.0
        for layer in self.layers:
            for n_o, c_o in layer.outs:
                r_o = float(ratios.get(c_o, 0.0)) if c_o else 0.0
                for n_i, c_i in layer.ins:
                    r_i = float(ratios.get(c_i, 0.0)) if c_i else 0.0
                    factor = (1 + r_o) * (1 + r_i) - 2 * r_o * r_i
                    total += layer.positions * n_o * n_i * factor
        return total

    def budget(self, ratios: Mapping[str, float]) -> float:
        """Compute relative to one source model: in [1, 2]."""
        base = self.macs({})
        return self.macs(ratios) / base if base else 1.0


def _segments(mem: Member | None, size: int, coord_of: Mapping[str, str]) -> list[tuple[int, Any]]:
    """(size, coordinate) of every segment of an axis; a segment's coordinate is that of its
    group factors (they all share one: a head group and its head dims)."""
    if mem is None:
        return [(size, None)]
    out = []
    for seg in mem.segments:
        found = [coord_of[f.group] for f in seg.factors if f.group is not None]
        out.append((seg.size, found[0] if found else None))
    covered = sum(s for s, _ in out)
    if covered < size:  # entries outside every segment are not permuted
        out.append((size - covered, None))
    return out


def compute_model(
    spec: SymmetrySpec, model: nn.Module, example_inputs: tuple[Any, ...]
) -> ComputeModel:
    """The :class:`ComputeModel` of ``model``: one forward of ``example_inputs`` (a batch of
    one or more) measures every Linear / Conv layer's output positions."""
    coords = coordinates(spec)
    coord_of = {g: c[0] for c in coords for g in c}
    layouts: dict[str, dict[int, Member]] = {}
    for mem in spec.members():
        for name in [mem.tensor, *spec.aliases.get(mem.tensor, [])]:
            layouts.setdefault(name, {})[mem.axis] = mem
    positions: dict[str, int] = {}
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def hook(name: str) -> Callable[..., None]:
        def record(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Linear) or is_transposed_linear(mod):  # rows but the batch
                batch = out.shape[0] if out.dim() > 1 else 1
                positions[name] = out.numel() // out.shape[-1] // batch
            else:
                positions[name] = math.prod(out.shape[2:]) * math.prod(mod.kernel_size)

        return record

    mods = {
        n: m for n, m in model.named_modules() if isinstance(m, kinds) or is_transposed_linear(m)
    }
    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    layers = []
    for name, mod in mods.items():
        if name not in positions:
            continue  # not called on this input
        weight, out = mod.weight, int(is_transposed_linear(mod))  # the weight's output axis
        axes = layouts.get(f"{name}.weight", {})
        outs = _segments(axes.get(out), weight.shape[out], coord_of)
        ins = _segments(axes.get(1 - out), weight.shape[1 - out], coord_of)
        if getattr(mod, "groups", 1) > 1:  # grouped / depthwise: outputs read their own group
            ins = [(weight.shape[1], None)]
        layers.append(_Layer(name, positions[name], tuple(outs), tuple(ins)))
    return ComputeModel(tuple(layers), tuple(c[0] for c in coords))


# ---------------------------------------------------------------------------------------
# budget allocation
# ---------------------------------------------------------------------------------------


def allocate(
    compute: ComputeModel,
    budget: float,
    steps: Mapping[str, int],
    *,
    allocator: str = "score",
    scores: Mapping[str, float] | None = None,
    order: Sequence[str] | None = None,
) -> dict[str, float]:
    """Ratios (fraction kept separate, per coordinate) whose compute is ``budget`` times one
    model's, as near as the coordinates' resolution allows.

    Args:
        compute: the model's :class:`ComputeModel`.
        budget: in [1, 2].
        steps: per coordinate, its resolution (ratios are multiples of ``1 / steps[c]``).
        allocator: ``"score"`` maximises ``sum_c scores[c] * r_c`` under the budget greedily
            (the coordinate with the most score per added multiply-add is kept apart first,
            the last one partly; the constraint is bilinear, so this is the knapsack greedy,
            not an exact optimum); ``"stagewise"`` keeps the last coordinates of ``order``
            (input to output) apart first, as ZipIt!'s partial zip; ``"uniform"`` one ratio
            for every coordinate.
        scores: per coordinate, the value of keeping it apart (``"score"``), e.g. one minus its
            mean matched similarity.
        order: the coordinates from input to output (``"stagewise"``).
    """
    if allocator not in ALLOCATORS:
        raise ValueError(
            f"The 'allocator' parameter must be one of {ALLOCATORS}. Got {allocator!r} instead."
        )
    if not (isinstance(budget, (int, float)) and 1.0 <= budget <= 2.0):
        raise ValueError(f"The 'budget' parameter must be a float in [1, 2]. Got {budget!r}.")
    coords = list(compute.coords)
    target = budget * compute.macs({})
    ratios: dict[str, float] = {c: 0.0 for c in coords}
    if allocator == "uniform":
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if compute.macs({c: mid for c in coords}) <= target:
                lo = mid
            else:
                hi = mid
        ratios = {c: lo for c in coords}
    else:
        if allocator == "score":
            if scores is None:
                raise ValueError("allocator='score' needs scores (one per coordinate)")
            todo = list(coords)
        else:
            todo = list(reversed(order if order is not None else coords))
        while todo:
            now = compute.macs(ratios)
            gains = {c: compute.macs({**ratios, c: 1.0}) - now for c in todo}
            if allocator == "score":
                assert scores is not None
                pick = max(todo, key=lambda c: (scores.get(c, 0.0) / max(gains[c], 1e-12), c))
            else:
                pick = todo[0]
            todo.remove(pick)
            if now + gains[pick] <= target:
                ratios[pick] = 1.0
                continue
            if gains[pick] > 0:  # compute is linear in one ratio: the part that fits
                ratios[pick] = max(0.0, (target - now) / gains[pick])
            break
    return _quantise(compute, ratios, steps, target)


def _quantise(
    compute: ComputeModel, ratios: Mapping[str, float], steps: Mapping[str, int], target: float
) -> dict[str, float]:
    """Every ratio rounded to its coordinate's resolution; each fractional one is then moved
    to whichever neighbour brings the total compute nearer the target."""
    out = {c: round(r * steps[c]) / steps[c] for c, r in ratios.items()}
    for c, r in ratios.items():
        lo, hi = math.floor(r * steps[c]) / steps[c], math.ceil(r * steps[c]) / steps[c]
        if lo == hi:
            continue
        best = min((lo, hi), key=lambda v: abs(compute.macs({**out, c: v}) - target))
        out[c] = best
    return out
