"""Block-sparse export: same outputs as the dense masked model, exact compute counts, and
checkpoint round trips (the layers PLeaS partial merges produce, algorithms.md §2)."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from symmerge import models
from symmerge.blocksparse import (
    BlockSparseConv2d,
    BlockSparseLinear,
    apply_block_record,
    block_record,
    block_sparse,
    masks_of,
)
from symmerge.flops import count_compute
from symmerge.io import (
    CheckpointError,
    build_architecture,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from symmerge.merging import merge
from symmerge.methods import list_methods, method_info

pytestmark = pytest.mark.usefixtures("one_thread")


def pleas_mask(n_out: int, n_in: int, kernel: tuple[int, ...] = (), seed: int = 0) -> Tensor:
    """Random ``[M | S_A | S_B]`` split of both axes, with zero ``S_A x S_B`` cross blocks."""
    g = torch.Generator().manual_seed(seed)

    def sets(n: int) -> Tensor:  # 0 = merged, 1 = A only, 2 = B only, in a shuffled order
        labels = torch.arange(n) % 3
        return labels[torch.randperm(n, generator=g)]

    out, inp = sets(n_out), sets(n_in)
    cross = ((out == 1)[:, None] & (inp == 2)) | ((out == 2)[:, None] & (inp == 1))
    return (~cross).view(n_out, n_in, *([1] * len(kernel))).expand(-1, -1, *kernel).clone()


def masked_copy(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """The dense reference: the model with its weights zeroed outside the masks."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            dense.get_submodule(name).weight.mul_(mask)
    return dense


def assert_close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def mlp() -> tuple[nn.Module, dict[str, Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 18), nn.ReLU(), nn.Linear(18, 9), nn.ReLU(), nn.Linear(9, 4)
    )
    masks = {"0": pleas_mask(18, 12, seed=1), "2": pleas_mask(9, 18, seed=2)}
    return model.eval(), masks


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 15, 3, stride=2, padding=1)
        self.head = nn.Linear(15 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.flatten(1))


def cnn() -> tuple[nn.Module, dict[str, Tensor]]:
    torch.manual_seed(0)
    masks = {"conv2": pleas_mask(15, 12, (3, 3), seed=3), "head": pleas_mask(5, 240, seed=4)}
    return CNN().eval(), masks


def test_mlp_matches_dense_masked_model() -> None:
    model, masks = mlp()
    sparse = block_sparse(model, masks)
    assert isinstance(sparse[0], BlockSparseLinear) and isinstance(sparse[2], BlockSparseLinear)
    assert type(model[0]) is nn.Linear  # the input model is not modified
    assert len(sparse[0].blocks) == 3  # M, S_A, S_B row classes
    x = torch.randn(7, 12)
    with torch.no_grad():
        assert_close(sparse(x), masked_copy(model, masks)(x))
        # a layer rebuilt as dense from its blocks is the masked layer
        torch.testing.assert_close(sparse[2].to_dense().weight, model[2].weight * masks["2"])
    for name, mask in masks_of(sparse).items():
        assert torch.equal(mask, masks[name])


def test_cnn_matches_dense_masked_model() -> None:
    model, masks = cnn()
    # a kernel-level zero inside a kept block must stay zero
    masks["conv2"][0, 0, 1, 1] = False
    sparse = block_sparse(model, masks)
    assert isinstance(sparse.conv2, BlockSparseConv2d)
    assert isinstance(sparse.head, BlockSparseLinear)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert_close(sparse(x), masked_copy(model, masks)(x))


def test_empty_rows_output_their_bias() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    mask = torch.ones(6, 4, 3, 3, dtype=torch.bool)
    mask[[1, 4]] = False
    sparse = block_sparse(layer, {"": mask})
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert_close(sparse(x), masked_copy(layer, {"": mask})(x))
        everything_off = block_sparse(layer, {"": torch.zeros_like(mask)})
        assert_close(everything_off(x), masked_copy(layer, {"": torch.zeros_like(mask)})(x))


def test_all_true_mask_leaves_layer_unchanged() -> None:
    model, masks = mlp()
    sparse = block_sparse(model, {"0": torch.ones(18, 12, dtype=torch.bool)})
    assert type(sparse[0]) is nn.Linear


def test_compute_counts_only_kept_blocks() -> None:
    model, masks = cnn()
    x = torch.randn(2, 3, 8, 8)
    dense = count_compute(model, x)
    positions1, positions2 = 8 * 8, 4 * 4  # conv2 has stride 2
    expected_dense = {
        "conv1": positions1 * 12 * 3 * 9,
        "conv2": positions2 * 15 * 12 * 9,
        "head": 240 * 5,
    }
    assert dense.per_module == expected_dense
    assert dense.macs == sum(expected_dense.values())
    assert dense.params == sum(p.numel() for p in model.parameters())

    sparse = block_sparse(model, masks)
    compute = count_compute(sparse, x)
    expected = {
        "conv2": int(masks["conv2"].sum()) * positions2,  # every kernel position kept
        "head": int(masks["head"].sum()),
    }
    assert compute.macs == expected_dense["conv1"] + sum(expected.values())
    blocks = {n: v for n, v in compute.per_module.items() if n != "conv1"}
    assert sum(v for n, v in blocks.items() if n.startswith("conv2.")) == expected["conv2"]
    assert sum(v for n, v in blocks.items() if n.startswith("head.")) == expected["head"]
    # parameters: kept weight entries plus every bias
    kept = sum(int(m.sum()) for m in masks.values())
    dropped = sum(m.numel() for m in masks.values()) - kept
    assert compute.params == dense.params - dropped


def test_compute_matches_pleas_formula() -> None:
    """Contiguous [M | S_A | S_B] sets: c·n_in·n_out·[(1 + r_in)(1 + r_out) − 2·r_in·r_out]."""
    m_in, s_in, m_out, s_out = 6, 3, 4, 2
    n_in, n_out = m_in + s_in, m_out + s_out  # one parent's widths; r = s / n
    sets_in = [0] * m_in + [1] * s_in + [2] * s_in
    sets_out = [0] * m_out + [1] * s_out + [2] * s_out
    mask = torch.tensor([[{o, i} != {1, 2} for i in sets_in] for o in sets_out])
    layer = nn.Linear(len(sets_in), len(sets_out))
    r_in, r_out = s_in / n_in, s_out / n_out
    formula = n_in * n_out * ((1 + r_in) * (1 + r_out) - 2 * r_in * r_out)
    sparse = block_sparse(layer, {"": mask})
    assert count_compute(sparse, torch.randn(3, len(sets_in))).macs == pytest.approx(formula)


def test_count_compute_accepts_args_and_kwargs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Conv1d(2, 5, 3, groups=1)

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return self.a(x).sum() + self.b(y).sum()

    model = Two().train()
    x, y = torch.randn(6, 10, 4), torch.randn(6, 2, 7)
    expected = 10 * 4 * 3 + 5 * 5 * 2 * 3
    assert count_compute(model, (x, y)).macs == expected
    assert count_compute(model, {"x": x, "y": y}).macs == expected
    assert model.training  # the mode is restored


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, config = models.create_model("mlp", width=16, depth=2)
    masks = {"layers.1": pleas_mask(16, 784, seed=5), "layers.3": pleas_mask(16, 16, seed=6)}
    sparse = block_sparse(model, masks).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", sparse, config, {"seed": 0})
    record = read_checkpoint_metadata(path)["config"]["block_sparse"]
    assert set(record) == set(masks)
    loaded, _ = load_checkpoint(path)
    assert isinstance(loaded.layers[1], BlockSparseLinear)
    x = torch.randn(5, *model.input_shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))
    # a dense model saved with a stale record in its config stays dense
    path = save_checkpoint(tmp_path / "d.safetensors", model, {**config, "block_sparse": record})
    assert "block_sparse" not in read_checkpoint_metadata(path)["config"]
    assert type(load_checkpoint(path)[0].layers[1]) is nn.Linear


def test_block_record_round_trip_and_errors() -> None:
    model, masks = cnn()
    sparse = block_sparse(model, masks)
    record = block_record(sparse)
    rebuilt = apply_block_record(CNN(), record)
    rebuilt.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), sparse(x))
    bad = {"head": {"rows": ["0:4"], "cols": ["0:240"]}}  # row 4 missing
    with pytest.raises(ValueError, match="'head'.*partition"):
        apply_block_record(CNN(), bad)


def test_corrupt_record_is_a_checkpoint_error(tmp_path: Path) -> None:
    model, config = models.create_model("mlp", width=8, depth=1)
    sparse = block_sparse(model, {"layers.1": pleas_mask(8, 784)})
    path = save_checkpoint(tmp_path / "m.safetensors", sparse, config)
    config = read_checkpoint_metadata(path)["config"]
    config["block_sparse"]["layers.1"]["cols"][0] = "0:9999"
    with pytest.raises(CheckpointError, match="block-sparse.*'layers.1'"):
        build_architecture(config, path)


def test_errors_name_the_module() -> None:
    model, masks = mlp()
    with pytest.raises(ValueError, match=r"'0'.*shape \(12, 18\).*\(18, 12\)"):
        block_sparse(model, {"0": torch.ones(12, 18, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'1' is a ReLU"):
        block_sparse(model, {"1": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no module named 'nope'"):
        block_sparse(model, {"nope": torch.ones(1, dtype=torch.bool)})
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="'0' is a grouped conv"):
        block_sparse(grouped, {"0": torch.ones(4, 2, 3, 3, dtype=torch.bool)})
    attention = nn.Sequential(nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match="'0.out_proj'.*MultiheadAttention"):
        block_sparse(attention, {"0.out_proj": torch.ones(4, 4, dtype=torch.bool)})
    sparse = block_sparse(model, masks)
    with pytest.raises(ValueError, match="'0' is already block-sparse"):
        block_sparse(sparse, {"0": masks["0"]})


#: Partial merges whose weights are built from the sources' (no fitting across blocks).
STRUCTURAL = ("zip", "mudsc", "pleas")


def _export_pair(name: str, **kwargs: object) -> tuple[Tensor, Tensor, float]:
    """Outputs of the dense and the block-sparse merge of two small MLPs, and the ratio of
    their multiply-adds."""
    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sources.append(models.create_model("mlp", width=16, depth=2)[0].eval())
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))]
    x = torch.randn(32, 1, 28, 28, generator=g)
    if name == "ste":
        kwargs = {**kwargs, "steps": 2}
    if name == "kf-gradient":
        kwargs = {**kwargs, "epochs": 3}
    use = data if method_info(name).needs_data else None
    outs, macs = [], []
    for sparse in (False, True):
        merged, _ = merge(sources, name, data=use, seed=0, block_sparse=sparse, **kwargs)
        with torch.no_grad():
            outs.append(merged(x))
        macs.append(count_compute(merged, (x[:1],)).macs)
    return outs[0], outs[1], macs[1] / macs[0]


@pytest.mark.parametrize("name", list_methods())
def test_every_method_exports_the_model_it_merged(name: str, one_thread: None) -> None:
    """``merge(..., block_sparse=True)`` computes what the dense merge computes, for every
    method: a block the structure leaves empty but a fitted method filled is kept."""
    dense, sparse, _ = _export_pair(name)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    if method_info(name).target_width:  # a partial merge (1.5x): private blocks stay empty
        params = inspect.signature(method_info(name).fn).parameters
        kwargs = {"budget": 1.5} if "budget" in params else {"width": 24}
        if name == "mudsc":  # its zip variant has the target width
            kwargs["variant"] = "zip"
        dense, sparse, ratio = _export_pair(name, **kwargs)
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
        if name in STRUCTURAL:  # their empty blocks stay empty, and cost nothing
            assert ratio < 1, ratio
