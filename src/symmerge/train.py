"""Train and evaluate the reference networks whose weights symmerge later aligns and merges.

One small, reproducible recipe for every architecture: SGD (momentum 0.9, Nesterov, weight
decay 5e-4), a short linear warm-up followed by cosine decay to zero, cross-entropy (label
smoothing off by default). Data is put on the training device once and batched from there;
CIFAR-style convnets get random-crop (pad 4) + horizontal-flip augmentation computed on
tensors on that device, so no DataLoader workers are needed.

Reproducibility: on CPU, a given seed gives bit-identical weights (seeded init, seeded
shuffling and augmentation, ``torch.use_deterministic_algorithms``). On GPU the same seeding
is used but cuDNN autotuning and mixed precision (bf16, else fp16) are on for speed, so runs
are close but not bit-identical unless ``deterministic=True``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from symmerge.progress import progress_bar

__all__ = [
    "RECIPES",
    "evaluate",
    "recipe_for",
    "resolve_config",
    "resolve_device",
    "train_model",
    "warmup_cosine",
]

#: Per-family defaults. ``epochs`` for the convnets is a GPU-sized budget; on CPU pass fewer.
RECIPES: dict[str, dict[str, Any]] = {
    "mlp": {"lr": 0.05, "batch_size": 128, "epochs": 10},
    "resnet": {"lr": 0.1, "batch_size": 128, "epochs": 50},
    "vgg": {"lr": 0.05, "batch_size": 128, "epochs": 50},
    "vit": {"lr": 0.02, "batch_size": 128, "epochs": 50},
    "other": {"lr": 0.05, "batch_size": 128, "epochs": 20},
}

WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
WARMUP_FRACTION = 0.05  # of all optimisation steps, at least one step


def _family(arch: str) -> str:
    arch = arch.lower()
    for family in ("mlp", "resnet", "vgg", "vit"):
        if arch.startswith(family):
            return family
    return "other"


def recipe_for(arch: str) -> dict[str, Any]:
    """Default ``lr``/``batch_size``/``epochs`` for an architecture name (e.g. ``"vgg11"``)."""
    return dict(RECIPES[_family(arch)])


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` picks CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_config(
    name_or_config: str | Mapping[str, Any], dataset: str, **overrides: Any
) -> dict[str, Any]:
    """The ``{"arch", "kwargs"}`` config a model name gets for ``dataset``.

    Names get ``num_classes`` and ``input_shape`` from the dataset, then ``overrides``
    (e.g. ``width=128``); explicit configs are returned as given (plus ``overrides``).
    Raises ``KeyError``/``ValueError`` for unknown models or datasets, which lets callers
    (the CLI) validate before spending time on training.
    """
    from symmerge.data import dataset_info
    from symmerge.models import create_model

    info = dataset_info(dataset)
    if isinstance(name_or_config, str):
        _, config = create_model(
            name_or_config,
            num_classes=int(info["num_classes"]),
            input_shape=[int(s) for s in info["input_shape"]],
            **overrides,
        )
        return config
    if "arch" not in name_or_config:
        raise ValueError("a model config must have an 'arch' key (and 'kwargs')")
    kwargs = {**dict(name_or_config.get("kwargs") or {}), **overrides}
    return {"arch": name_or_config["arch"], "kwargs": kwargs}


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    """LR multiplier per step: linear warm-up to 1, then cosine decay to 0 at the end."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(1, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Switch deterministic kernels on for the duration of training, then restore."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        # warn_only off the CPU: some CUDA kernels have no deterministic variant
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic = prev[2]
        torch.backends.cudnn.benchmark = prev[3]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # CPU autocast is slower than fp32 on most CPUs
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from symmerge.report.provenance import cpu_name

    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _as_tensors(data: TensorDataset | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    tensors = data.tensors if isinstance(data, TensorDataset) else tuple(data)
    if len(tensors) != 2:
        raise ValueError("expected (inputs, labels) tensors")
    return tensors[0], tensors[1]


def _check_fits(model: nn.Module, x: Tensor, y: Tensor, dataset: str) -> None:
    """Fail early, and readably, when the model's input or output size cannot fit the data."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except RuntimeError as exc:
        raise ValueError(
            f"model does not accept {dataset} inputs of shape {tuple(x.shape[1:])}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if out.ndim != 2 or (y.numel() and out.shape[1] <= int(y.max())):
        raise ValueError(
            f"model outputs shape {tuple(out.shape)} but {dataset} labels go up to {int(y.max())}"
        )


def evaluate(
    model: nn.Module,
    dataset: str | TensorDataset | Sequence[Tensor],
    split: str = "test",
    classes: Sequence[int] | None = None,
    data_root: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1000,
    limit: int | None = None,
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of ``model`` on a dataset split.

    ``dataset`` is a name (loaded with :func:`symmerge.data.get_dataset`, restricted to
    ``classes``) or ready ``(x, y)`` tensors. ``accuracy`` is the argmax over all outputs;
    when ``classes`` is given, ``subset_accuracy`` also reports the argmax restricted to those
    classes' logits (the usual "task head" number for class-split experiments).
    ``limit`` evaluates only the first ``limit`` samples. The model's train/eval mode is
    restored afterwards.
    """
    from symmerge.data import iterate_batches

    dev = resolve_device(device) if device is not None else _model_device(model)
    name = dataset if isinstance(dataset, str) else None
    if isinstance(dataset, str):
        from symmerge.data import get_dataset

        x, y = _as_tensors(get_dataset(dataset, split, root=data_root, classes=classes))
    else:
        x, y = _as_tensors(dataset)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    model_dev = _model_device(model)
    if model_dev != dev:
        model.to(dev)
    cls_index = None if classes is None else torch.as_tensor(sorted(set(classes)), device=dev)
    amp = _autocast_dtype(dev)
    total_loss = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    sub_correct = torch.zeros((), dtype=torch.int64, device=dev)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for xb, yb in iterate_batches((x, y), batch_size, shuffle=False, device=dev):
                with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                    out = model(xb)
                logits = (out[0] if isinstance(out, tuple) else out).float()  # a wrapper's tuple
                total_loss += F.cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(1) == yb).sum()
                if cls_index is not None:
                    sub_pred = cls_index[logits[:, cls_index].argmax(1)]
                    sub_correct += (sub_pred == yb).sum()
    finally:
        model.train(was_training)
        if model_dev != dev:
            model.to(model_dev)
    n = int(y.shape[0])
    result: dict[str, Any] = {
        "dataset": name,
        "split": split,
        "classes": None if classes is None else [int(c) for c in classes],
        "n": n,
        "accuracy": correct.item() / n if n else float("nan"),
        "loss": total_loss.item() / n if n else float("nan"),
    }
    if cls_index is not None:
        result["subset_accuracy"] = sub_correct.item() / n if n else float("nan")
    return result


def train_model(
    name_or_config: str | Mapping[str, Any],
    dataset: str,
    *,
    classes: Sequence[int] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    data_root: str | None = None,
    progress: bool = True,
    weight_decay: float = WEIGHT_DECAY,
    momentum: float = MOMENTUM,
    label_smoothing: float = 0.0,
    warmup_fraction: float = WARMUP_FRACTION,
    augment: bool | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    deterministic: bool | None = None,
    split: str | None = None,
    part: int | None = None,
    n_parts: int | None = None,
    split_seed: int = 0,
    alpha: float | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a model from scratch on ``dataset`` (optionally a class subset) and test it.

    ``name_or_config`` is a model name for :func:`symmerge.models.create_model` (sized for the
    dataset automatically) or a ``{"arch", "kwargs"}`` config. ``epochs``/``lr``/
    ``batch_size`` default to the architecture's recipe (:data:`RECIPES`). ``augment``
    defaults to crop+flip for convnets on CIFAR. ``limit_train``/``limit_test`` use only
    the first N training/test samples (quick tests and smoke runs). ``deterministic``
    defaults to True on CPU, False on GPU.

    ``split``/``part``/``n_parts`` train a parent for fusion on part ``part`` (1-based) of
    an ``n_parts``-way ``"iid"``, ``"dirichlet"`` or ``"shards"`` split of the training set
    (:func:`symmerge.data.split_indices` with ``split_seed`` and ``alpha``). The split is
    taken after ``classes`` (it divides that subset) and before ``limit_train`` (so the
    parts do not depend on it). Test metrics stay on the full test set (of ``classes``).

    Returns ``(model in eval mode, info)``; ``info`` holds ``config`` plus everything needed
    to reproduce and judge the run (recipe, test accuracy/loss on the same classes, timing,
    device, per-epoch history) and can be passed to :func:`symmerge.io.save_checkpoint`.
    """
    from symmerge.data import (
        dataset_info,
        get_dataset,
        iterate_batches,
        random_crop_flip,
        split_indices,
        validate_split,
    )

    ds_info = dataset_info(dataset)
    dataset = ds_info["name"]  # canonical spelling, e.g. "fmnist" -> "fashion-mnist"
    num_classes = int(ds_info["num_classes"])
    if split is None:
        if part is not None or n_parts is not None or alpha is not None:
            raise ValueError("part, n_parts and alpha need a split kind (split=...)")
    else:
        if part is None or n_parts is None:
            raise ValueError(f"split={split!r} needs part and n_parts")
        validate_split(split, n_parts, part, alpha)  # before the data is loaded
    dev = resolve_device(device)
    config = resolve_config(name_or_config, dataset)
    recipe = recipe_for(config["arch"])
    epochs = recipe["epochs"] if epochs is None else int(epochs)
    lr = recipe["lr"] if lr is None else float(lr)
    batch_size = recipe["batch_size"] if batch_size is None else int(batch_size)
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")
    if augment is None:
        augment = _family(config["arch"]) != "mlp" and dataset.lower().startswith("cifar")
    if deterministic is None:
        deterministic = dev.type == "cpu"
    classes = None if classes is None else sorted({int(c) for c in classes})

    x, y = _as_tensors(get_dataset(dataset, "train", root=data_root, classes=classes, device=dev))
    split_info = None
    if split is not None:
        assert part is not None and n_parts is not None
        idx = split_indices(y, split, n_parts, seed=split_seed, alpha=alpha)[part - 1].to(dev)
        x, y = x[idx], y[idx]
        split_info = {
            "kind": split,
            "part": part,
            "n_parts": n_parts,
            "alpha": alpha,
            "seed": split_seed,
        }
    if limit_train is not None:
        x, y = x[:limit_train], y[:limit_train]
    n_train = int(x.shape[0])
    if n_train == 0:
        where = "" if split_info is None else f" in {split} part {part}/{n_parts}"
        raise ValueError(f"no training samples in {dataset} for classes {classes}{where}")
    # Per-class counts of what is actually trained on: fusion weights parents' logits by them.
    class_counts = torch.bincount(y.cpu(), minlength=num_classes).tolist()
    drop_last = n_train >= batch_size  # avoids a size-1 last batch breaking BatchNorm
    steps_per_epoch = n_train // batch_size if drop_last else 1
    total_steps = steps_per_epoch * epochs
    warmup_steps = max(1, round(warmup_fraction * total_steps))

    from symmerge.models import build_model

    torch.manual_seed(seed)
    model = build_model(config["arch"], **config["kwargs"]).to(dev)
    _check_fits(model, x, y, dataset)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps)
    )
    amp = _autocast_dtype(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    aug_gen = torch.Generator().manual_seed(seed + 1)  # CPU generator: same draws anywhere
    history: list[dict[str, float]] = []

    t_start = time.perf_counter()
    with _determinism(deterministic, dev):
        for epoch in range(epochs):
            model.train()
            t_epoch = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            seen = 0
            bar = progress_bar(
                iterate_batches(
                    (x, y),
                    batch_size,
                    shuffle=True,
                    seed=seed * 100_003 + epoch,
                    device=dev,
                    drop_last=drop_last,
                ),
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="batch",
                enabled=progress,
                leave=True,
                dynamic_ncols=True,
            )
            for step, (xb, yb) in enumerate(bar):
                if augment:
                    xb = random_crop_flip(xb, padding=4, generator=aug_gen)
                with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                    logits = model(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach().double() * yb.shape[0]
                correct += (logits.detach().argmax(1) == yb).sum()
                seen += int(yb.shape[0])
                if progress and (step % 25 == 0 or step == steps_per_epoch - 1):
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / seen:.4f}",
                        acc=f"{correct.item() / seen:.3f}",
                        lr=f"{scheduler.get_last_lr()[0]:.4f}",
                    )
            bar.close()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            loss_value = loss_sum.item() / max(1, seen)
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch + 1} (loss {loss_value}); try a lower lr"
                )
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss_value,
                    "train_accuracy": correct.item() / max(1, seen),
                    "time_s": time.perf_counter() - t_epoch,
                }
            )
    train_time = time.perf_counter() - t_start

    model.eval()
    t_eval = time.perf_counter()
    test = evaluate(
        model, dataset, "test", classes=classes, data_root=data_root, device=dev, limit=limit_test
    )
    eval_time = time.perf_counter() - t_eval

    info: dict[str, Any] = {
        "config": config,
        "dataset": dataset,
        "classes": classes,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "optimizer": "sgd",
        "momentum": momentum,
        "nesterov": momentum > 0,
        "weight_decay": weight_decay,
        "label_smoothing": label_smoothing,
        "schedule": "linear warm-up + cosine to 0, stepped per batch",
        "warmup_steps": warmup_steps,
        "total_steps": total_steps,
        "augment": "random crop (pad 4) + horizontal flip" if augment else None,
        "n_train": n_train,
        "split": split_info,
        "class_counts": class_counts,
        "limit_train": limit_train,
        "limit_test": limit_test,
        "train_loss": history[-1]["train_loss"] if history else None,
        "train_accuracy": history[-1]["train_accuracy"] if history else None,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "n_test": test["n"],
        "train_time_s": round(train_time, 3),
        "eval_time_s": round(eval_time, 3),
        "time_per_epoch_s": round(train_time / epochs, 3) if epochs else None,
        "device": str(dev),
        "device_name": _device_name(dev),
        "mixed_precision": None if amp is None else str(amp).removeprefix("torch."),
        "deterministic": deterministic,
        "history": history,
    }
    if "subset_accuracy" in test:
        info["test_subset_accuracy"] = test["subset_accuracy"]
    return model, info
