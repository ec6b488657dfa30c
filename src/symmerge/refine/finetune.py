"""Fine-tuning a merged model on the merge's own labelled data (a few epochs after fusion).

Zero-shot results are the methods' own; fine-tuning is the step papers add after them
(neuron-interpolation fusion's "+ fine-tuning" rows, OT fusion's retraining). It uses only
the batches the merge was given, so every method gets the same budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from symmerge.stats import float_dtype, model_inputs

__all__ = ["finetune"]


def finetune(
    model: nn.Module,
    data: Iterable[Any],
    epochs: int,
    *,
    lr: float = 1e-4,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` in place for ``epochs`` passes over labelled ``data`` with Adam and
    cross-entropy on its logits (train mode, so BatchNorm statistics follow the weights);
    the batch order is shuffled per epoch by ``seed``. Returns the mean loss of each epoch.

    Raises:
        ValueError: ``epochs`` below 0, ``lr`` not positive, or batches without labels.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"finetune epochs must be an int >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"finetune lr must be > 0, got {lr!r}")
    if epochs == 0:
        return []
    batches = list(data)
    if not batches or not all(isinstance(b, tuple | list) and len(b) >= 2 for b in batches):
        raise ValueError("fine-tuning needs labelled (inputs, labels) batches in data")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            total, seen = 0.0, 0
            for k in torch.randperm(len(batches), generator=gen).tolist():
                args, kwargs = model_inputs(batches[k], device, float_dtype(model))
                labels = batches[k][1].to(device)
                loss = F.cross_entropy(model(*args, **kwargs), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(labels)
                seen += len(labels)
            losses.append(total / seen)
    model.eval()
    return losses
