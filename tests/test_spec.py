"""Invariance tests of the symmetry tracer: permuting every group must not change the function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import symmerge
from symmerge._axes import AtomTable, atom, concat, prod
from symmerge.models import ZOO_NAMES, create_model
from symmerge.spec import Group, Member, SymmetrySpec, TraceError

TOL = 1e-8  # verify runs in float64: a right spec gives ~1e-15, a wrong one O(1)


def _check(model: nn.Module, *inputs: torch.Tensor) -> SymmetrySpec:
    spec = symmerge.trace(model, inputs)
    assert spec.groups, "no symmetry found"
    assert spec.verify(model, *inputs) < TOL
    return spec


# ---- the sweep over every reference model and the timm models the issue names -----------


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_models_are_invariant(name: str) -> None:
    model, _ = create_model(name)
    _check(model, torch.randn(2, *model.input_shape))


@pytest.mark.parametrize(
    "name,size",
    [
        ("resnet50", 224),
        ("convnext_atto", 224),
        ("efficientnet_b0", 96),
        ("densenet121", 64),
        ("mobilenetv3_small_100", 96),
        ("regnetx_002", 64),
    ],
)
def test_timm_models_are_invariant(name: str, size: int) -> None:
    timm = pytest.importorskip("timm", reason="timm is installed by the test set-up")
    model = timm.create_model(name, pretrained=False).eval()
    _check(model, torch.randn(2, 3, size, size))


# ---- structure of the discovered groups ------------------------------------------------------


def test_mlp_groups_are_the_hidden_layers() -> None:
    model, _ = create_model("mlp")
    spec = _check(model, torch.randn(2, 1, 28, 28))
    assert sorted(g.size for g in spec.groups.values()) == [512, 512, 512]
    names = set(spec.groups)
    assert {"layers.0.out", "layers.2.out", "layers.4.out"} <= names or len(names) == 3
    for g in spec.groups.values():
        assert {m.axis for m in g.members} == {0, 1}  # out axis of one layer, in axis of next
        assert g.sites, "every hidden group is observable somewhere"
    frozen = {(f.tensor, f.axis): f.reasons for f in spec.frozen}
    first, last = next(iter(spec.shapes)), list(spec.shapes)[-2]
    assert any("model input" in r for r in frozen[(first, 1)])
    assert any("model output" in r for r in frozen[(last, 0)])


def test_resnet20_has_one_group_per_stage_stream_and_per_block() -> None:
    model, _ = create_model("resnet20x1")
    spec = _check(model, torch.randn(2, 3, 32, 32))
    assert len(spec.groups) == 3 + 9
    assert "layer2.0.conv1.out" in spec.groups
    stream = [
        g
        for g in spec.groups.values()
        if any("shortcut" in m.tensor and m.axis == 0 for m in g.members)
    ]
    assert len(stream) == 2  # stages 2 and 3 start with a projection shortcut
    for g in stream:  # a residual stream group touches many blocks
        assert len({m.tensor.split(".")[0] for m in g.members}) >= 2


def test_flatten_after_conv_permutes_blocks_of_features() -> None:
    model, _ = create_model("vgg11", input_shape=(3, 64, 64))
    spec = _check(model, torch.randn(2, 3, 64, 64))
    composite = [m for g in spec.groups.values() for m in g.members if not m.is_plain]
    assert composite, "the classifier input should be (channels x 2 x 2)"
    factors = composite[0].segments[0].factors
    assert [f.size for f in factors][1:] == [2, 2] and factors[0].group is not None


def test_groupnorm_groups_are_blocks_and_a_cross_block_swap_breaks_the_function() -> None:
    model, _ = create_model("resnet20x1-gn")
    x = torch.randn(2, 3, 32, 32)
    spec = _check(model, x)
    g = next(g for g in spec.groups.values() if g.blocks)
    width = g.size // g.blocks
    assert width > 1
    bad = torch.arange(g.size)
    bad[[0, width]] = bad[[width, 0]]  # swaps two units of different GroupNorm groups
    assert not g.is_valid_permutation(bad)
    with pytest.raises(ValueError, match="not a valid permutation"):
        spec.permute_state_dict(model.state_dict(), {g.name: bad})
    # bypass the check: the function really changes, so the block constraint is needed
    model = model.double().eval()
    member_free = SymmetrySpec({g.name: Group(g.name, g.size, g.members)}, [], spec.shapes)
    moved = member_free.permuted(model, {g.name: bad})
    with torch.no_grad():
        assert (moved(x.double()) - model(x.double())).abs().max() > 1e-6


def test_a_wrong_spec_is_caught_by_verify() -> None:
    model, _ = create_model("mlp", depth=2, width=32)
    x = torch.randn(2, 1, 28, 28)
    spec = _check(model, x)
    broken = copy.deepcopy(spec)
    g = next(iter(broken.groups.values()))
    g.members = [m for m in g.members if m.axis == 0]  # forget the next layer's input axis
    assert broken.verify(model, x) > 1e-3


def test_permutation_roundtrip_and_no_mutation() -> None:
    model, _ = create_model("resnet20x1")
    spec = symmerge.trace(model, torch.randn(2, 3, 32, 32))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perms = spec.random_permutations(3)
    inverse = {k: torch.argsort(p) for k, p in perms.items()}
    there = spec.permute_state_dict(sd, perms)
    back = spec.permute_state_dict(there, inverse)
    assert any(not torch.equal(there[k], sd[k]) for k in sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])
        assert torch.equal(model.state_dict()[k], sd[k])
    same = spec.permute_state_dict(sd, spec.identity_permutations())
    assert all(torch.equal(same[k], sd[k]) for k in sd)


# ---- op coverage on small hand-made models -----------------------------------------------------


class _Zoo(nn.Module):
    """Depthwise and grouped conv, concat, squeeze-excite, layer scale, channels-last LN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, multiplier 2
        self.grouped = nn.Conv2d(16, 8, 1, groups=2)
        self.se_fc1, self.se_fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.gamma = nn.Parameter(torch.rand(16))
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([x, self.grouped(self.dw(x))], dim=1)
        s = torch.sigmoid(self.se_fc2(torch.relu(self.se_fc1(y.mean((2, 3), keepdim=True)))))
        y = y * s
        y = y + self.gamma.view(1, -1, 1, 1) * y
        y = self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(y.flatten(2).mean(-1))


def test_op_coverage_model() -> None:
    model = _Zoo().eval()
    spec = _check(model, torch.randn(2, 3, 8, 8))
    concat_members = [m for g in spec.groups.values() for m in g.members if len(m.segments) > 1]
    assert concat_members, "the concat must show up as a segmented layout"


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 6), nn.Linear(4, 7)
        self.b = nn.Bilinear(6, 7, 5)
        self.o = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.b(torch.relu(self.a(x)), torch.tanh(self.c(x)))))


def test_bilinear_and_two_inputs() -> None:
    spec = _check(_Bilinear(), torch.randn(3, 4))
    assert sorted(g.size for g in spec.groups.values()) == [5, 6, 7]


class _WeightNormed(nn.Module):
    """torch's weight_norm parametrization (w = g v / |v|) on a hidden and on a conv layer."""

    def __init__(self) -> None:
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.conv, self.fc = wn(nn.Conv2d(3, 8, 3)), wn(nn.Linear(8, 12))
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(torch.relu(self.fc(h)))


def test_weight_norm_parametrizations_are_traced_and_merged_back() -> None:
    from symmerge.merging import merge

    model = _WeightNormed().eval()
    x = torch.randn(4, 3, 6, 6)
    spec = _check(model, x)
    assert sorted(g.size for g in spec.groups.values()) == [8, 12]
    assert any(m.tensor == "fc.parametrizations.weight.original0" for m in spec.members())
    copy_ = spec.permuted(model, spec.random_permutations(seed=1))
    merged, _ = merge([model, copy_], "weight", example_inputs=(x,))
    torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-6)


class _Decoder(nn.Module):
    """A small U-Net-like decoder: a GLU over channels, a pixel shuffle and unshuffle,
    bilinear and nearest upsampling, and a skip concatenated after resampling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # GLU halves: 8 channels
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.sub = nn.Conv2d(12, 20, 1)  # pixel shuffle by 2: 5 channels of 4 offsets
        self.fuse = nn.Conv2d(5 + 8, 6, 3, padding=1)
        self.head = nn.Linear(6 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = nn.functional.glu(self.stem(x), dim=1)
        h = torch.relu(self.down(skip))
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="bilinear")
        h = nn.functional.pixel_shuffle(torch.relu(self.sub(h)), 2)
        h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="nearest")
        h = torch.relu(self.fuse(torch.cat([h, skip], 1)))
        return self.head(nn.functional.pixel_unshuffle(h, 4).mean((2, 3)))


def test_resampling_pixel_shuffles_and_glu_keep_their_channels_free() -> None:
    from symmerge.merging import merge

    model = _Decoder().eval()
    x = torch.randn(4, 3, 8, 8)
    spec = _check(model, x)
    # glu's 8 channels (both halves move together), down's 12 (through the upsampling), the
    # 5 shuffled channels (blocks of 4 offsets), fuse's 6 (through the unshuffle)
    assert sorted(g.size for g in spec.groups.values()) == [5, 6, 8, 12]
    copy_ = spec.permuted(model, spec.random_permutations(seed=1))
    merged, _ = merge([model, copy_], "weight", example_inputs=(x,))
    torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-6)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 10)
        self.c = nn.Linear(10, 3)
        self.c2 = self.b  # the same module twice: tied weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.c2(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_tied_weights() -> None:
    model = _Tied()
    spec = _check(model, torch.randn(2, 6))
    assert spec.aliases


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(torch.einsum("bqd,bkd->bqk", q, k), dim=-1)
        return self.o(a @ v)


def test_einsum_and_matmul_attention() -> None:
    spec = _check(_Attn(), torch.randn(2, 5, 8))
    assert {g.size for g in spec.groups.values()} == {8}


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).view(-1, 2, 2)
        h = torch.linalg.inv(h + 3 * torch.eye(2)).reshape(-1, 4)
        return self.c(torch.relu(self.b(h)))


def test_unknown_op_names_the_op_or_freezes() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(TraceError, match="linalg_inv"):
        symmerge.trace(_Unknown(), x)
    spec = symmerge.trace(_Unknown(), x, unknown_ops="freeze")
    assert spec.verify(_Unknown(), x) < TOL
    assert any("unknown op" in r for f in spec.frozen for r in f.reasons)
    assert "b.out" in spec.groups  # the layers after the unknown op keep their symmetry
    with pytest.raises(ValueError, match="unknown_ops"):
        symmerge.trace(_Unknown(), x, unknown_ops="ignore")


def test_duplicate_rule_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        symmerge.register_op_rule("linear", lambda ctx: None)


# ---- the axis algebra ---------------------------------------------------------------------


def test_unify_splits_a_coarse_axis_into_a_product() -> None:
    t = AtomTable()
    flat, c, h = t.new(12), t.new(3), t.new(4)
    assert t.unify(atom(flat), prod(atom(c), atom(h)), "x")
    assert t.normalize(atom(flat)) == [[t.find(c), t.find(h)]]


def test_unify_splits_a_coarse_axis_into_a_concatenation() -> None:
    t = AtomTable()
    whole, a, b = t.new(10), t.new(4), t.new(6)
    assert t.unify(atom(whole), concat(atom(a), atom(b)), "x")
    assert t.normalize(atom(whole)) == [[t.find(a)], [t.find(b)]]


def test_unify_freezes_what_it_cannot_align() -> None:
    t = AtomTable()
    a, b, c = t.new(6), t.new(4), t.new(1)
    d = t.new(6)
    ok = t.unify(prod(atom(b), atom(c)), atom(d), "mismatch")  # 4 != 6
    assert not ok and t.frozen[t.find(d)] == ["mismatch"]
    assert t.find(a) not in t.frozen


def test_member_layout_index() -> None:
    spec = SymmetrySpec({"g": Group("g", 2)}, [], {})
    from symmerge.spec import Factor, Segment

    m = Member("w", 0, (Segment(0, (Factor("g", 2), Factor(None, 3))),))
    idx = spec.axis_index(m, {"g": torch.tensor([1, 0])})
    assert idx.tolist() == [3, 4, 5, 0, 1, 2]
