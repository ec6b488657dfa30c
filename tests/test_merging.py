"""The merge()/interpolation() front door on a user's own model (no zoo metadata)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from symmerge.merging import BatchNormStatsWarning, interpolation, merge


def _pair() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    return a, b, (torch.randn(4, 3),)


def test_interpolation_endpoints_without_input_shape() -> None:
    a, b, x = _pair()
    points = list(interpolation([a, b], "weight", [0.0, 0.5, 1.0], example_inputs=x))
    assert [lam for lam, _ in points] == [0.0, 0.5, 1.0]
    with torch.no_grad():
        assert torch.allclose(points[0][1](x[0]), a(x[0]), atol=1e-6)
        assert torch.allclose(points[-1][1](x[0]), b(x[0]), atol=1e-6)  # aligned b == b


def test_merge_validates_its_parameters() -> None:
    a, b, x = _pair()
    with pytest.raises(ValueError, match="unknown method"):
        merge([a, b], "nope", example_inputs=x)
    with pytest.raises(ValueError, match="'lam'"):
        merge([a, b], "weight", lam=1.5, example_inputs=x)
    with pytest.raises(ValueError, match="needs data"):
        merge([a, b], "weight", renorm="repair", example_inputs=x)
    with pytest.raises(ValueError, match="at least 2"):
        merge([a], "weight", example_inputs=x)
    with pytest.raises(ValueError, match="example_inputs"):
        merge([a, b], "weight")


def test_merge_warns_when_batchnorm_statistics_are_left_interpolated() -> None:
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                             nn.Linear(6 * 4 * 4, 2)).eval()  # fmt: skip

    a, b = net(), net()
    for m in (a, b):  # distinct running statistics, as trained models have
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    x = (torch.randn(4, 3, 6, 6),)
    data = [(torch.randn(8, 3, 6, 6), torch.zeros(8, dtype=torch.long))]
    with pytest.warns(BatchNormStatsWarning, match="reset-bn"):
        merge([a, b], "weight", example_inputs=x)
    with pytest.warns(BatchNormStatsWarning, match="each point") as caught:
        list(interpolation([a, b], "weight", [0.0, 0.5, 1.0], example_inputs=x))
    assert len(caught) == 1  # once, not once per point or for the alignment's midpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchNormStatsWarning)
        merge([a, b], "weight", renorm="reset-bn", renorm_data=data, example_inputs=x)
        merge([a, b], "weight", lam=0.0, example_inputs=x)  # an endpoint keeps its own stats
        merge(list(_pair()[:2]), "weight", example_inputs=_pair()[2])  # no BatchNorm
        list(interpolation([a, b], "weight", [0.5], data=data, renorm="reset-bn",
                           example_inputs=x))  # fmt: skip
        for method in ("kf-linear", "kf-gradient"):  # they fit the statistics themselves
            merge([a, b], method, data=data, example_inputs=x)


def test_renormalising_leaves_the_methods_weights_in_the_result() -> None:
    """merge()'s REPAIR changes the merged model, not ``result.state_dict`` (the method's
    output, which curves and users read back)."""
    a, b, x = _pair()
    data = [(x[0], torch.zeros(len(x[0]), dtype=torch.long))]
    _, plain = merge([a, b], "weight", example_inputs=x)
    repaired, result = merge([a, b], "weight", data=data, renorm="repair", example_inputs=x,
                             block_sparse=False)  # fmt: skip
    for k, v in plain.state_dict.items():
        assert torch.equal(result.state_dict[k], v), k
    assert any(not torch.equal(t, plain.state_dict[k])
               for k, t in repaired.state_dict().items())  # fmt: skip


class _HalfNet(nn.Module):
    input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.head = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("method", ["activation", "zip", "pleas", "ste", "kf-gradient", "otfusion"])
def test_bfloat16_models_merge_on_float32_data(method: str) -> None:
    """Data comes as float32 images whatever the models' dtype; STE's proxy trains in float32."""
    import symmerge

    torch.manual_seed(0)
    model = _HalfNet().eval()
    model.norm.running_var.uniform_(0.5, 2.0)
    spec = symmerge.trace(model, (torch.randn(2, 3, 8, 8),))
    copy = spec.permuted(model, spec.random_permutations(seed=1)).eval()
    model, copy = model.bfloat16(), copy.bfloat16()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
            for _ in range(3)]  # fmt: skip
    kw = {"steps": 3} if method == "ste" else {"epochs": 1} if method == "kf-gradient" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchNormStatsWarning)
        merged, _ = merge([model, copy], method, data=data, renorm="repair", **kw)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    x = data[0][0].bfloat16()
    with torch.no_grad():
        want, got = model(x).float(), merged(x).float()
    assert (got - want).norm() / want.norm() < 2e-2  # bfloat16 round-off (REPAIR's statistics)
