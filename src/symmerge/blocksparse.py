"""Block-sparse Linear and Conv2d layers: compute only a weight's structurally non-zero blocks.

PLeaS partial merges (algorithms.md §2, "Budget allocation" and "Zero cross-blocks") give layers
whose units are in sets ``[M | S_A | S_B]`` with ``W[S_A, S_B] = W[S_B, S_A] = 0``. A dense
layer still multiplies those zeros, so the compute a budget claims is not the compute spent.
:func:`block_sparse` rewrites layers from a weight *support mask* (True = may be non-zero;
nothing here is PLeaS-specific) so that the zeros are skipped.

How: the output rows are grouped into classes by their column support (the mask row reduced
over the kernel dims with ``any()``). Each class becomes one ordinary ``nn.Linear`` /
``nn.Conv2d`` over only the input channels of its support (an ``index_select`` on the channel
dim); the class outputs are concatenated and put back in the original row order with a stored
inverse permutation. Rows with empty support output their bias. Because the inner layers are
plain modules, :func:`symmerge.flops.count_compute` counts exactly ``sum over classes of rows *
cols * (positions * kernel)``, which for the PLeaS pattern is
``c·n_in·n_out·[(1 + r_in)(1 + r_out) − 2·r_in·r_out]``. The rewrite pays off when there are
few classes (three for PLeaS); a random mask gives up to one class per row, each a tiny layer.
The extra cost is one gather of the input per class with partial support and one of the output.

The structure is held twice: in buffers (``rows``, ``cols``, ``order``), so a ``state_dict``
holds everything, and as a compact JSON record (:func:`block_record`,
:func:`apply_block_record`) that :mod:`symmerge.io` stores as ``config["block_sparse"]`` to
rebuild the modules before loading the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BlockSparseConv2d",
    "BlockSparseLinear",
    "apply_block_record",
    "block_record",
    "block_sparse",
    "masks_of",
]

#: One row class: (output rows, input channels), ascending index tensors.
RowClass = tuple[Tensor, Tensor]


class _BlockSparse(nn.Module):
    """The logic shared by the Linear and Conv2d versions; ``dim`` is the channel dim."""

    dim: int
    n_in: int
    n_out: int

    def __init__(
        self, dense: nn.Module, classes: Sequence[RowClass], weight: Tensor | None
    ) -> None:
        super().__init__()
        weight = (dense.weight if weight is None else weight).detach()
        bias = None if dense.bias is None else dense.bias.detach()
        self.n_out, self.n_in = int(weight.shape[0]), int(weight.shape[1])
        self._kernel = tuple(int(k) for k in weight.shape[2:])
        device = weight.device
        long = {"dtype": torch.long, "device": device}
        full = [
            (torch.as_tensor(r, **long).sort().values, torch.as_tensor(c, **long).sort().values)
            for r, c in classes
        ]
        empty = [r for r, c in full if not len(c)]
        full = [(r, c) for r, c in full if len(c)]
        self.blocks = nn.ModuleList()
        for rows, cols in full:
            block = self._block(dense, len(cols), len(rows))
            with torch.no_grad():
                block.weight.copy_(weight[rows][:, cols])
                if bias is not None:
                    block.bias.copy_(bias[rows])
            block.requires_grad_(dense.weight.requires_grad)
            self.blocks.append(block)
        empty_rows = torch.cat(empty) if empty else torch.zeros(0, **long)
        self.register_parameter("empty_bias", None)  # the output of rows with no input support
        if bias is not None and len(empty_rows):
            self.empty_bias = nn.Parameter(bias[empty_rows].clone(), dense.bias.requires_grad)
        rows = torch.cat([r for r, _ in full] + [empty_rows])
        cols = torch.cat([c for _, c in full]) if full else torch.zeros(0, **long)
        self.register_buffer("rows", rows)  # output rows of the classes, class after class
        self.register_buffer("cols", cols)  # input channels of the classes, class after class
        self.register_buffer("order", torch.argsort(rows))  # concatenated outputs -> row order
        self._col_sizes = [len(c) for _, c in full]
        self._n_empty = len(empty_rows)

    def _block(self, dense: nn.Module, n_in: int, n_out: int) -> nn.Module:
        raise NotImplementedError

    def _constant_shape(self, x: Tensor, outs: list[Tensor]) -> list[int]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        outs, start = [], 0
        for block, size in zip(self.blocks, self._col_sizes, strict=True):
            part = x  # a class reading every input needs no gather
            if size != self.n_in:
                part = x.index_select(self.dim, self.cols.narrow(0, start, size))
            outs.append(block(part))
            start += size
        if self._n_empty:
            shape = self._constant_shape(x, outs)
            dtype = outs[0].dtype if outs else x.dtype
            if self.empty_bias is None:
                outs.append(x.new_zeros(shape, dtype=dtype))
            else:
                view = [-1] + [1] * (-self.dim - 1)  # bias along the channel dim
                outs.append(self.empty_bias.to(dtype).view(view).expand(shape))
        if len(outs) == 1:  # one class covering every row: rows are already in order
            return outs[0]
        return torch.cat(outs, self.dim).index_select(self.dim, self.order)

    def classes(self) -> list[tuple[list[int], list[int]]]:
        """The row classes as ``(rows, cols)`` index lists, in block order (empty last)."""
        rows, cols = self.rows.tolist(), self.cols.tolist()
        out, r0, c0 = [], 0, 0
        for block, size in zip(self.blocks, self._col_sizes, strict=True):
            n = int(block.weight.shape[0])
            out.append((rows[r0 : r0 + n], cols[c0 : c0 + size]))
            r0, c0 = r0 + n, c0 + size
        if self._n_empty:
            out.append((rows[r0:], []))
        return out

    def support(self) -> Tensor:
        """Boolean mask of the dense weight's shape: True where a block computes."""
        device = self.rows.device
        mask = torch.zeros(self.n_out, self.n_in, dtype=torch.bool, device=device)
        for rows, cols in self.classes():
            if cols:
                r, c = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
                mask[r[:, None], c] = True
        shape = (*mask.shape, *([1] * len(self._kernel)))
        return mask.view(shape).expand(-1, -1, *self._kernel).clone()

    def dense_weight(self) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)`` of the equivalent dense layer (zeros outside the blocks)."""
        params = [*self.parameters()]
        dtype = params[0].dtype if params else torch.get_default_dtype()
        device = self.rows.device
        weight = torch.zeros(self.n_out, self.n_in, *self._kernel, dtype=dtype, device=device)
        has_bias = self.empty_bias is not None or any(b.bias is not None for b in self.blocks)
        bias = torch.zeros(self.n_out, dtype=dtype, device=device) if has_bias else None
        for block, (rows, cols) in zip(self.blocks, self.classes(), strict=False):
            r, c = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
            weight[r[:, None], c] = block.weight.detach()
            if bias is not None:
                bias[r] = block.bias.detach()
        if self.empty_bias is not None:
            bias[self.rows[len(self.rows) - self._n_empty :]] = self.empty_bias.detach()
        return weight, bias

    def extra_repr(self) -> str:
        kept = sum(
            int(b.weight.shape[0]) * s for b, s in zip(self.blocks, self._col_sizes, strict=True)
        )
        return (
            f"{self.n_in}, {self.n_out}, classes={len(self.classes())}, "
            f"kept={kept / max(self.n_in * self.n_out, 1):.3f}"
        )


class BlockSparseLinear(_BlockSparse):
    """An ``nn.Linear`` that computes one inner Linear per row class (see the module doc).

    Args:
        dense: the layer to rewrite (its bias and dtype/device are kept).
        classes: ``(rows, cols)`` index pairs partitioning the output rows; ``cols`` is the
            input support of those rows (may be empty: those rows output their bias).
        weight: the dense weight to take the blocks from (default ``dense.weight``).
    """

    dim = -1

    def __init__(
        self, dense: nn.Linear, classes: Sequence[RowClass], weight: Tensor | None = None
    ) -> None:
        super().__init__(dense, classes, weight)
        self.in_features, self.out_features = self.n_in, self.n_out

    @classmethod
    def from_dense(cls, dense: nn.Linear, mask: Tensor) -> BlockSparseLinear:
        """The block-sparse layer computing ``dense`` with its weight zeroed outside ``mask``."""
        return cls(dense, _row_classes(mask), dense.weight.detach() * mask)

    def _block(self, dense: nn.Module, n_in: int, n_out: int) -> nn.Module:
        w = dense.weight
        has_bias = dense.bias is not None
        return nn.utils.skip_init(
            nn.Linear, n_in, n_out, bias=has_bias, device=w.device, dtype=w.dtype
        )

    def _constant_shape(self, x: Tensor, outs: list[Tensor]) -> list[int]:
        return [*x.shape[:-1], self._n_empty]

    def to_dense(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear``."""
        weight, bias = self.dense_weight()
        layer = nn.utils.skip_init(
            nn.Linear, self.n_in, self.n_out, bias=bias is not None,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        _copy_into(layer, weight, bias)
        return layer


class BlockSparseConv2d(_BlockSparse):
    """An ``nn.Conv2d`` (``groups=1``) computing one inner Conv2d per row class.

    The inner convs keep the stride, padding, dilation and padding mode, so each computes its
    rows exactly as the dense conv would. Arguments as for :class:`BlockSparseLinear`.
    """

    dim = -3

    def __init__(
        self, dense: nn.Conv2d, classes: Sequence[RowClass], weight: Tensor | None = None
    ) -> None:
        if dense.groups != 1:
            raise ValueError(f"grouped convs (groups={dense.groups}) are not supported")
        super().__init__(dense, classes, weight)
        self.in_channels, self.out_channels = self.n_in, self.n_out
        self.kernel_size, self.stride = dense.kernel_size, dense.stride
        self.padding, self.dilation = dense.padding, dense.dilation
        self.padding_mode = dense.padding_mode

    @classmethod
    def from_dense(cls, dense: nn.Conv2d, mask: Tensor) -> BlockSparseConv2d:
        """The block-sparse layer computing ``dense`` with its weight zeroed outside ``mask``."""
        return cls(dense, _row_classes(mask), dense.weight.detach() * mask)

    def _block(self, dense: nn.Module, n_in: int, n_out: int) -> nn.Module:
        return nn.utils.skip_init(
            nn.Conv2d, n_in, n_out, dense.kernel_size, stride=dense.stride,
            padding=dense.padding, dilation=dense.dilation, bias=dense.bias is not None,
            padding_mode=dense.padding_mode, device=dense.weight.device, dtype=dense.weight.dtype,
        )  # fmt: skip

    def _constant_shape(self, x: Tensor, outs: list[Tensor]) -> list[int]:
        if outs:
            spatial = list(outs[0].shape[-2:])
        elif self.padding == "same":
            spatial = list(x.shape[-2:])
        else:
            pad = (0, 0) if self.padding == "valid" else self.padding
            spatial = [
                (n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, p, d, k, s in zip(
                    x.shape[-2:], pad, self.dilation, self.kernel_size, self.stride, strict=True
                )
            ]
        return [*x.shape[:-3], self._n_empty, *spatial]

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d``."""
        weight, bias = self.dense_weight()
        layer = nn.utils.skip_init(
            nn.Conv2d, self.n_in, self.n_out, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, bias=bias is not None,
            padding_mode=self.padding_mode, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        _copy_into(layer, weight, bias)
        return layer


def _copy_into(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)


# --------------------------------------------------------------------------------------
# rewriting a model
# --------------------------------------------------------------------------------------


def _row_classes(mask: Tensor) -> list[RowClass]:
    """Group output rows by column support; classes ordered by their first row."""
    support = mask.flatten(2).any(-1) if mask.dim() > 2 else mask.bool()
    unique, inverse = torch.unique(support, dim=0, return_inverse=True)
    classes = [
        ((inverse == k).nonzero().flatten(), unique[k].nonzero().flatten())
        for k in range(len(unique))
    ]
    return sorted(classes, key=lambda rc: int(rc[0][0]))


def _layer(model: nn.Module, name: str) -> nn.Linear | nn.Conv2d:
    """The dense layer ``name`` of ``model``, or an error saying why it cannot be rewritten."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"no module named {name!r} in the model") from None
    kind = type(layer).__name__
    if isinstance(layer, _BlockSparse):
        raise ValueError(f"module {name!r} is already block-sparse")
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise ValueError(
            f"module {name!r} is a {kind}; only nn.Linear and nn.Conv2d can be made block-sparse"
        )
    if isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear):
        raise ValueError(
            f"module {name!r} belongs to an nn.MultiheadAttention, which uses its weight "
            "directly instead of calling it; it cannot be replaced"
        )
    base = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
    if type(layer).forward is not base.forward or (
        base is nn.Conv2d and type(layer)._conv_forward is not nn.Conv2d._conv_forward
    ):
        raise ValueError(
            f"module {name!r} is a {kind}, which overrides {base.__name__}'s forward; only the "
            f"plain {base.__name__} computation can be rewritten"
        )
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(
            f"module {name!r} is a grouped conv (groups={layer.groups}); only groups=1 works"
        )
    return layer


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the (possibly new) root."""
    if not name:
        return new
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)
    return model


def _sparse_class(layer: nn.Module) -> type[BlockSparseLinear] | type[BlockSparseConv2d]:
    return BlockSparseLinear if isinstance(layer, nn.Linear) else BlockSparseConv2d


def block_sparse(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` whose masked layers compute only their non-zero blocks.

    Args:
        model: any module; it is not modified.
        masks: module name (a plain ``nn.Linear`` or ``nn.Conv2d`` with ``groups=1``) ->
            boolean mask of that module's weight shape, True where the weight may be non-zero.

    Returns:
        A deep copy in which every layer with a not-all-True mask is a
        :class:`BlockSparseLinear` / :class:`BlockSparseConv2d`. It computes what the dense
        model does with the weight entries outside the masks set to zero: weight entries
        outside a mask are dropped, even when they are not zero.

    Raises:
        ValueError: naming the module, if it is missing, not a plain Linear/Conv2d, a grouped
            conv, or its mask has the wrong shape.
    """
    checked = {}
    for name, mask in masks.items():
        layer = _layer(model, name)
        mask = torch.as_tensor(mask, device=layer.weight.device)
        if tuple(mask.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"the mask of module {name!r} has shape {tuple(mask.shape)}, but its weight "
                f"has shape {tuple(layer.weight.shape)}"
            )
        mask = mask if mask.dtype == torch.bool else mask != 0
        if not bool(mask.all()):
            checked[name] = mask
    new = copy.deepcopy(model)
    for name, mask in checked.items():
        layer = new.get_submodule(name)
        new = _replace(new, name, _sparse_class(layer).from_dense(layer, mask))
    return new


def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """The support (boolean, dense weight shape) of every block-sparse layer in ``model``.

    Supports are per row class (all kernel positions of a kept channel are True), so
    ``block_sparse(dense_model, masks_of(sparse_model))`` rebuilds the same structure.
    """
    return {n: m.support() for n, m in model.named_modules() if isinstance(m, _BlockSparse)}


# --------------------------------------------------------------------------------------
# JSON record (checkpoints)
# --------------------------------------------------------------------------------------


def _encode(indices: Sequence[int]) -> str:
    """Ascending indices as comma-separated half-open runs: ``[0, 1, 2, 7]`` -> ``"0:3,7"``."""
    runs: list[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        start, stop = indices[i], indices[j] + 1
        runs.append(str(start) if stop == start + 1 else f"{start}:{stop}")
        i = j + 1
    return ",".join(runs)


def _decode(text: str, size: int, where: str) -> list[int]:
    out: list[int] = []
    try:
        for run in filter(None, str(text).split(",")):
            start, _, stop = run.partition(":")
            out.extend(range(int(start), int(stop) if stop else int(start) + 1))
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a list of 'start:stop' runs") from None
    if out != sorted(set(out)) or (out and (out[0] < 0 or out[-1] >= size)):
        raise ValueError(f"{where}: indices {text!r} are not ascending and within 0..{size - 1}")
    return out


def block_record(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """The block structure of ``model``'s block-sparse layers as JSON (``{}`` if none).

    Per layer name: ``{"rows": [...], "cols": [...]}``, one entry per row class in block
    order, each a string of comma-separated half-open runs (``"0:64,70"`` is rows 0-63 and 70).
    """
    record = {}
    for name, module in model.named_modules():
        if isinstance(module, _BlockSparse):
            classes = module.classes()
            record[name] = {
                "rows": [_encode(rows) for rows, _ in classes],
                "cols": [_encode(cols) for _, cols in classes],
            }
    return record


def apply_block_record(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Rewrite ``model``'s dense layers **in place** with the structure of a
    :func:`block_record`; returns the model (a new root only if the record names ``""``).

    The blocks take the dense layers' current weights; a checkpoint's state dict is loaded
    afterwards. Malformed records raise ``ValueError`` naming the layer.
    """
    for name, entry in record.items():
        layer = _layer(model, name)
        n_out, n_in = int(layer.weight.shape[0]), int(layer.weight.shape[1])
        if not isinstance(entry, Mapping) or not isinstance(entry.get("rows"), list):
            raise ValueError(f"block record of {name!r} must be {{'rows': [...], 'cols': [...]}}")
        rows, cols = entry["rows"], entry.get("cols")
        if not isinstance(cols, list) or len(cols) != len(rows):
            raise ValueError(f"block record of {name!r} needs one 'cols' entry per 'rows' entry")
        where = f"block record of {name!r}"
        classes = [
            (_decode(r, n_out, where), _decode(c, n_in, where))
            for r, c in zip(rows, cols, strict=True)
        ]
        seen = sorted(i for r, _ in classes for i in r)
        if seen != list(range(n_out)) or any(not r for r, _ in classes):
            raise ValueError(f"{where}: the row classes do not partition the {n_out} output rows")
        model = _replace(model, name, _sparse_class(layer)(layer, classes))
    return model


def export_merged(
    model: nn.Module,
    spec: Any,
    state_dicts: Sequence[Mapping[str, Tensor]],
    maps: Mapping[str, Any],
) -> nn.Module:
    """A merged model exported block-sparse, computing what ``model`` computes: every Linear /
    Conv2d (``groups=1``) whose merged weight has structurally empty blocks
    (:func:`symmerge.groupmap.merged_support` of the sources ``state_dicts`` under ``maps``)
    that are also zero in ``model`` computes only its other blocks. A method that fits its
    weights (least squares, gradient steps, fine-tuning) may fill a structurally empty block;
    it is kept. Layers whose merged weight does not have the builder's shape (per-task heads,
    stacked afterwards) stay dense."""
    from symmerge.groupmap import merged_support

    layers = {
        n: m
        for n, m in model.named_modules()
        if type(m) in (nn.Linear, nn.Conv2d) and getattr(m, "groups", 1) == 1
    }
    keys = [f"{n}.weight" for n in layers if f"{n}.weight" in state_dicts[0]]
    support = merged_support(spec, state_dicts, maps, keys)
    weights = {k: layers[k[: -len(".weight")]].weight.detach() for k in support}
    masks = {
        k[: -len(".weight")]: v.to(weights[k].device) | (weights[k] != 0)
        for k, v in support.items()
        if tuple(v.shape) == tuple(weights[k].shape)
    }
    return block_sparse(model, masks)
