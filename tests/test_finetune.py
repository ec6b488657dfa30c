"""Fine-tuning after a merge: zero epochs is zero-shot, epochs lower the loss, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symmerge.merging import merge
from symmerge.models import create_model


def _models() -> list[nn.Module]:
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(create_model("mlp", width=32, depth=2)[0].eval())
    return out


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=g)
    y = (x.flatten(1)[:, :10].argmax(1)).long()  # a learnable rule
    return list(zip(x.split(64), y.split(64), strict=True))


def _loss(model: nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


def test_zero_epochs_is_the_zero_shot_merge() -> None:
    models, data = _models(), _data()
    plain, _ = merge(models, "kf-linear", data=data, restarts=2)
    zero, res = merge(models, "kf-linear", data=data, restarts=2, finetune=0)
    assert "finetune_loss" not in res.details
    for (k, v), w in zip(plain.state_dict().items(), zero.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_epochs_lower_the_loss_on_the_fusion_data_and_repeat() -> None:
    models, data = _models(), _data()
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    zero, _ = merge(models, "naive", data=data)
    tuned, res = merge(models, "naive", data=data, finetune=5)
    losses = res.details["finetune_loss"]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert _loss(tuned, data) < _loss(zero, data)
    again, _ = merge(models, "naive", data=data, finetune=5)
    for (k, v), w in zip(tuned.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    for k, v in models[0].state_dict().items():  # the inputs are not trained
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"finetune": -1}, "int >= 0"), ({"finetune": 1.5}, "int >= 0"),
     ({"finetune": 2, "data": None}, "needs data|trains on data")],
)  # fmt: skip
def test_bad_finetune_input(kwargs: dict, match: str) -> None:
    data = kwargs.pop("data", _data())
    with pytest.raises(ValueError, match=match):
        merge(_models(), "naive", data=data, **kwargs)


def test_unlabelled_batches_are_refused() -> None:
    data = [x for x, _ in _data()]
    with pytest.raises(ValueError, match="labelled"):
        merge(_models(), "naive", data=data, finetune=1)


def test_the_command_line_takes_finetune_as_a_parameter() -> None:
    from symmerge.cli import _params

    assert _params(["finetune=3", "restarts=2"], "kf-linear") == {"finetune": 3, "restarts": 2}


def test_renormalisation_and_finetuning_are_timed_apart_from_the_method() -> None:
    models, data = _models(), _data()
    _, plain = merge(models, "weight")
    assert "renorm" not in plain.timings and "finetune" not in plain.timings
    _, res = merge(models, "weight", data=data, renorm="repair", finetune=1)
    assert res.timings["renorm"] > 0 and res.timings["finetune"] > 0
