"""Dataset condensation and coresets: a small stand-in for a dataset, ``ipc`` images per class.

Users who merge models trained on different datasets often cannot share those datasets, but
data-based steps (activation matching, REPAIR, STE) need some inputs. :func:`condense` builds
a tiny labelled set in the same normalised space as :func:`symmerge.data.get_dataset`
(``(x / 255 - mean) / std``) with one of four methods:

``"dm"``: distribution matching (Zhao & Bilen, WACV 2023)
    Synthetic images ``S_c`` start as random real images of each class ``c``. Every iteration
    draws a freshly initialised embedding network ``psi`` (``model`` without its classifier
    head) and a real batch ``R_c`` per class, and takes one SGD step on the images for

    .. math:: L = \\sum_c \\| \\overline{\\psi(R_c)} - \\overline{\\psi(S_c)} \\|_2^2

    (bars are means over the batch). The paper's image learning rate (1.0) is kept for its
    ConvNet (``model="convnet"``) and other models; the MLP defaults to ``10 * ipc`` (see
    :data:`DEFAULTS`).

``"dc"``: gradient matching, "dataset condensation" (Zhao, Mopuri & Bilen, ICLR 2021)
    Outer loop over freshly initialised networks ``theta``. For each network, ``outer_loop``
    times: update the images to minimise :math:`\\sum_c D(\\nabla_\\theta \\ell(R_c),
    \\nabla_\\theta \\ell(S_c))`, then train the network ``inner_loop`` SGD steps on the
    synthetic set. ``D`` is the paper's layer-wise distance (:func:`gradient_distance`):
    for every weight tensor, reshaped to (output units, rest), the sum over output units of
    ``1 - cos`` between the two gradients' rows.

``"random"``: ``ipc`` real images per class drawn with a seeded generator (also the
    initialisation of ``dm`` and ``dc`` for the same seed, so their gain over it is visible).

``"herding"``: greedy herding per class (Welling, ICML 2009; Rebuffi et al., iCaRL): pick,
    one at a time, the real image that brings the running mean of the picks closest to the
    class mean, without replacement. The space is raw normalised pixels by default
    (``herding_space="pixels"``: deterministic, no network); ``"features"`` uses the
    embedding of a seeded, randomly initialised ``model`` without its head.

Defaults are sized for a CPU (documented per function); papers use far more iterations
(DM: 20000 with a ConvNet; DC: 1000 outer iterations), and both use differentiable siamese
augmentation (DSA) in their best results, which this module does not implement.

Determinism: on CPU the same seed gives bitwise-identical images (seeded generators for
batches and network initialisations, deterministic kernels, no global RNG state touched).

Example::

    from symmerge.condense import condense, evaluate_condensed, save_condensed
    cset = condense("mnist", model="mlp", ipc=10, method="dm", iterations=500)
    print(evaluate_condensed(cset)["accuracy"])
    save_condensed(cset, "mnist_dm_ipc10.safetensors")
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from symmerge.progress import peak_rss_mb, progress_bar

__all__ = [
    "DEFAULTS",
    "FORMAT_VERSION",
    "METHODS",
    "CondensedSet",
    "CondensedSetError",
    "condense",
    "dc_distance",
    "dm_loss",
    "evaluate_condensed",
    "gradient_distance",
    "herding_select",
    "load_condensed",
    "random_select",
    "save_condensed",
    "save_grid_png",
    "train_on_condensed",
]

#: Method names accepted by :func:`condense`.
METHODS: tuple[str, ...] = ("dm", "dc", "random", "herding")

#: Per-method defaults (CPU-sized; see the module docstring for the papers' values).
DEFAULTS: dict[str, dict[str, Any]] = {
    # paper: 20000 iterations, batch_real 256, lr_img 1.0 (ConvNet), momentum 0.5. That lr
    # barely moves the images with an MLP embedder, whose randomly initialised features are
    # far smaller than the instance-normalised ConvNet's. For the zoo MLP the default is
    # lr_img_per_ipc * ipc: the loss's curvature w.r.t. the images falls as 1/ipc, and on
    # MNIST lr 100 was best of 1/10/100/300 at ipc 10 (300 diverged), 10 worked and 30
    # diverged at ipc 1. Other models (normalised features, e.g. a BN ResNet-20 on CIFAR-10,
    # where lr 100 and 10 diverged) get the paper's 1.0.
    "dm": {
        "iterations": 1000,
        "lr_img_convnet": 1.0,
        "lr_img_per_ipc": 10.0,
        "momentum": 0.5,
        "batch_real": 256,
    },
    "dc": {"iterations": 50, "lr_img": 0.1, "momentum": 0.5, "batch_real": 128, "lr_net": 0.01},
}

FORMAT_NAME = "symmerge.condensed"
FORMAT_VERSION = 1
_HEADER_KEY = "symmerge"
ModelSpec = str | Callable[[], nn.Module]


class CondensedSetError(ValueError):
    """A condensed-set file exists but cannot be used (truncated, foreign, wrong shape...)."""


@dataclass
class CondensedSet:
    """A condensed dataset: ``images`` (N, C, H, W) float32 in normalised space, ``labels``
    (N,) int64, sorted by class with ``ipc`` images each, and ``metadata`` (dataset, method,
    ipc, seed, iterations, model, time_s, peak_rss_mb, symmerge_version, date, ...)."""

    images: Tensor
    labels: Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dataset(self) -> str | None:
        return self.metadata.get("dataset")

    @property
    def num_classes(self) -> int:
        return int(self.metadata.get("num_classes", int(self.labels.max()) + 1))

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(images, labels)``, e.g. for ``merge(..., data=[cset.tensors])``."""
        return self.images, self.labels


# --------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------


class _ConvNet(nn.Module):
    """The condensation papers' ConvNet: 3 x (conv3x3 128 -> instance norm -> ReLU -> avgpool2)
    then a linear head. Instance norm is ``GroupNorm(128, 128)`` as in the authors' code."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 128) -> None:
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [
                nn.Conv2d(c, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            c, h, w = width, h // 2, w // 2
        self.input_shape = tuple(int(s) for s in input_shape)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _model_factory(model: ModelSpec, dataset: str) -> tuple[Callable[[], nn.Module], str]:
    """``(factory, name)``: a no-argument builder of fresh classifiers for ``dataset``."""
    from symmerge.data import dataset_info

    info = dataset_info(dataset)
    if callable(model) and not isinstance(model, str):
        name = getattr(model, "__qualname__", None) or type(model).__name__
        return model, f"callable:{name}"
    if not isinstance(model, str):
        raise ValueError(f"model must be a zoo name, 'convnet' or a callable; got {model!r}")
    if model.strip().lower() == "convnet":
        return (lambda: _ConvNet(info["input_shape"], info["num_classes"])), "convnet"
    from symmerge.train import resolve_config

    config = resolve_config(model, dataset)  # validates the name (ValueError lists the grammar)

    def build() -> nn.Module:
        from symmerge.models import build_model

        return build_model(config["arch"], **config["kwargs"])

    return build, model


def _fresh(factory: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """A network initialised under ``seed`` without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = factory()
    if not isinstance(net, nn.Module):
        raise TypeError(f"the model factory returned a {type(net).__name__}, not an nn.Module")
    return net.to(device)


def _strip_head(net: nn.Module) -> nn.Module:
    """The network up to its classifier head: the last ``nn.Linear`` becomes ``Identity``."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(
            f"cannot find the classifier head of {type(net).__name__}: no nn.Linear layer. "
            "Pass a model whose head is its last nn.Linear, or use model='mlp'/'convnet'."
        )
    parent_name, _, child = last.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, nn.Identity())
    return net


def _seed_stream(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)


def _next_seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


# --------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------


def _class_means(z: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class means of rows of ``z`` (num_classes, D) and the per-class counts."""
    onehot = F.one_hot(y, num_classes).to(z.dtype)
    counts = onehot.sum(0)
    return (onehot.T @ z) / counts.clamp_min(1).unsqueeze(1), counts


def dm_loss(
    embed: nn.Module,
    real: Tensor,
    real_labels: Tensor,
    syn: Tensor,
    syn_labels: Tensor,
    num_classes: int,
) -> Tensor:
    """Distribution-matching loss: sum over classes of ``||mean embed(real_c) -
    mean embed(syn_c)||^2``, over the classes present in both sets.

    Real and synthetic images go through ``embed`` in one forward pass each (for networks
    without batch-dependent layers this equals the authors' per-class passes).
    """
    with torch.no_grad():
        mu_real, n_real = _class_means(embed(real).flatten(1), real_labels, num_classes)
    mu_syn, n_syn = _class_means(embed(syn).flatten(1), syn_labels, num_classes)
    both = ((n_real > 0) & (n_syn > 0)).to(mu_syn.dtype).unsqueeze(1)
    return (((mu_real - mu_syn) ** 2) * both).sum()


def gradient_distance(grads_a: Sequence[Tensor], grads_b: Sequence[Tensor]) -> Tensor:
    """The DC paper's layer-wise distance between two lists of parameter gradients.

    Each weight gradient is reshaped to (output units, rest) and contributes
    ``sum_i (1 - <a_i, b_i> / (|a_i| |b_i| + 1e-6))`` over its output units ``i``.
    One-dimensional tensors (biases, norm scales) are skipped, as in the authors' code.
    """
    if len(grads_a) != len(grads_b):
        raise ValueError(f"gradient lists differ in length: {len(grads_a)} vs {len(grads_b)}")
    total = None
    for a, b in zip(grads_a, grads_b, strict=True):
        if a.dim() <= 1:
            continue
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        cos = (a2 * b2).sum(1) / (a2.norm(dim=1) * b2.norm(dim=1) + 1e-6)
        term = (1 - cos).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no weight tensor with more than one dimension to compare")
    return total


def dc_distance(
    net: nn.Module,
    real: Tensor,
    real_labels: Tensor,
    syn: Tensor,
    syn_labels: Tensor,
    *,
    create_graph: bool = False,
) -> Tensor:
    """Gradient-matching distance summed over classes: for each class ``c`` present in both
    sets, :func:`gradient_distance` between the cross-entropy gradients w.r.t. ``net``'s
    parameters on ``real_c`` and on ``syn_c``. ``create_graph=True`` keeps the graph so the
    result can be differentiated w.r.t. ``syn``."""
    params = [p for p in net.parameters() if p.requires_grad]
    total = syn.new_zeros(())
    for c in torch.unique(syn_labels).tolist():
        r_mask, s_mask = real_labels == c, syn_labels == c
        if not bool(r_mask.any()):
            continue
        loss_real = F.cross_entropy(net(real[r_mask]), real_labels[r_mask])
        g_real = [g.detach() for g in torch.autograd.grad(loss_real, params)]
        loss_syn = F.cross_entropy(net(syn[s_mask]), syn_labels[s_mask])
        g_syn = torch.autograd.grad(loss_syn, params, create_graph=create_graph)
        total = total + gradient_distance(g_real, g_syn)
    return total


# --------------------------------------------------------------------------------------
# selection (coresets and initialisation)
# --------------------------------------------------------------------------------------


def _class_pools(labels: Tensor, num_classes: int, ipc: int) -> list[Tensor]:
    pools = [torch.nonzero(labels == c).flatten().cpu() for c in range(num_classes)]
    short = [f"{c} ({len(p)})" for c, p in enumerate(pools) if len(p) < ipc]
    if short:
        raise ValueError(
            f"ipc={ipc} needs at least {ipc} real images per class; too few in class(es) "
            + ", ".join(short)
        )
    return pools


def random_select(labels: Tensor, num_classes: int, ipc: int, seed: int) -> Tensor:
    """Indices of ``ipc`` distinct random samples per class (class-major order), seeded."""
    gen = _seed_stream(seed, 1)
    picks = []
    for pool in _class_pools(labels, num_classes, ipc):
        picks.append(pool[torch.randperm(len(pool), generator=gen)[:ipc]])
    return torch.cat(picks)


def herding_select(features: Tensor, labels: Tensor, num_classes: int, ipc: int) -> Tensor:
    """Indices of ``ipc`` samples per class chosen by greedy herding (class-major order).

    Step ``k`` picks the unpicked sample ``i`` minimising ``||mu_c - (s + f_i) / k||``
    where ``s`` is the sum of the ``k - 1`` features already picked and ``mu_c`` the class
    mean. Deterministic (ties go to the lowest index). Computed as
    ``argmin_i ||f_i||^2 - 2 <f_i, k mu_c - s>`` (the same minimiser), one matrix-vector
    product per pick, in float64.
    """
    feats = features.flatten(1)
    picks = []
    for pool in _class_pools(labels, num_classes, ipc):
        f = feats[pool.to(feats.device)].double()
        mu = f.mean(0)
        sq = (f * f).sum(1)
        chosen = torch.zeros(len(pool), dtype=torch.bool, device=f.device)
        running = torch.zeros_like(mu)
        order = []
        for k in range(1, ipc + 1):
            dist = sq - 2 * (f @ (k * mu - running))
            dist[chosen] = math.inf
            i = int(torch.argmin(dist))
            chosen[i] = True
            running += f[i]
            order.append(i)
        picks.append(pool[torch.tensor(order, dtype=torch.long)])
    return torch.cat(picks)


# --------------------------------------------------------------------------------------
# the two optimisation loops
# --------------------------------------------------------------------------------------


def _real_batch(
    x: Tensor, y: Tensor, pools: list[Tensor], n: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    idx = torch.cat([p[torch.randperm(len(p), generator=gen)[:n]] for p in pools])
    idx = idx.to(x.device)
    return x[idx], y[idx]


def _run_dm(
    x: Tensor,
    y: Tensor,
    syn: Tensor,
    syn_y: Tensor,
    factory: Callable[[], nn.Module],
    num_classes: int,
    *,
    iterations: int,
    lr_img: float,
    momentum: float,
    batch_real: int,
    seed: int,
    progress: bool,
) -> tuple[Tensor, list[float]]:
    syn = syn.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=lr_img, momentum=momentum)
    pools = _class_pools(y, num_classes, 1)
    batch_gen, net_gen = _seed_stream(seed, 2), _seed_stream(seed, 3)
    history: list[float] = []
    bar = progress_bar(
        range(iterations), desc="DM", unit="it", enabled=progress, dynamic_ncols=True
    )
    for it in bar:
        embed = _strip_head(_fresh(factory, _next_seed(net_gen), x.device)).train()
        for p in embed.parameters():
            p.requires_grad_(False)
        xr, yr = _real_batch(x, y, pools, batch_real, batch_gen)
        loss = dm_loss(embed, xr, yr, syn, syn_y, num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        _check_finite(history, "DM", lr_img)
        if progress and (it % 20 == 0 or it == iterations - 1):
            bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.4g}")
    bar.close()
    return syn.detach(), history


def _check_finite(history: list[float], name: str, lr_img: float) -> None:
    """Stop on divergence: a non-finite loss, or one 100 times the first (these losses
    only fall when the step size is stable)."""
    value = history[-1]
    if not math.isfinite(value) or value > 100 * max(history[0], 1e-12):
        raise FloatingPointError(
            f"{name} diverged at image update {len(history) - 1} (loss {value:.4g}, first "
            f"{history[0]:.4g}); lower lr_img (was {lr_img:g}; the stable range shrinks as "
            "ipc falls and depends on the model)"
        )


def _dc_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) of the DC paper's code for ipc 1 / 10 / 50, interpolated."""
    if ipc <= 1:
        return 1, 1
    if ipc <= 10:
        return 10, 50
    if ipc <= 20:
        return 20, 25
    return 50, 10


def _run_dc(
    x: Tensor,
    y: Tensor,
    syn: Tensor,
    syn_y: Tensor,
    factory: Callable[[], nn.Module],
    num_classes: int,
    *,
    iterations: int,
    lr_img: float,
    momentum: float,
    batch_real: int,
    lr_net: float,
    loops: tuple[int, int],
    seed: int,
    progress: bool,
) -> tuple[Tensor, list[float]]:
    syn = syn.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=lr_img, momentum=momentum)
    pools = _class_pools(y, num_classes, 1)
    batch_gen, net_gen = _seed_stream(seed, 2), _seed_stream(seed, 3)
    outer, inner = loops
    history: list[float] = []
    bar = progress_bar(
        range(iterations), desc="DC", unit="net", enabled=progress, dynamic_ncols=True
    )
    for _ in bar:
        net = _fresh(factory, _next_seed(net_gen), x.device).train()
        net_opt = torch.optim.SGD(net.parameters(), lr=lr_net)
        for ol in range(outer):
            xr, yr = _real_batch(x, y, pools, batch_real, batch_gen)
            dist = dc_distance(net, xr, yr, syn, syn_y, create_graph=True)
            opt.zero_grad(set_to_none=True)
            dist.backward()
            opt.step()
            history.append(float(dist.detach()))
            _check_finite(history, "DC", lr_img)
            if ol == outer - 1:
                break
            xs, ys = syn.detach(), syn_y
            for _ in range(inner):  # full batch: ipc * classes is small
                net_loss = F.cross_entropy(net(xs), ys)
                net_opt.zero_grad(set_to_none=True)
                net_loss.backward()
                net_opt.step()
        if progress:
            bar.set_postfix(dist=f"{sum(history[-outer:]) / outer:.4g}")
    bar.close()
    return syn.detach(), history


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def condense(
    dataset: str,
    *,
    model: ModelSpec = "mlp",
    ipc: int = 10,
    method: str = "dm",
    seed: int = 0,
    iterations: int | None = None,
    data_root: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    lr_img: float | None = None,
    batch_real: int | None = None,
    dc_loops: tuple[int, int] | None = None,
    herding_space: str = "pixels",
    data: tuple[Tensor, Tensor] | None = None,
) -> CondensedSet:
    """Condense the train split of ``dataset`` to ``ipc`` images per class.

    Args:
        dataset: a :mod:`symmerge.data` name (``mnist``, ``fashion-mnist``, ``cifar10``).
        model: zoo name (``"mlp"``, ``"resnet20x4"``...), ``"convnet"`` (the papers'
            ConvNet) or a no-argument callable returning a fresh classifier for the
            dataset. DM embeds with it minus its last ``nn.Linear``; DC matches gradients of
            all its parameters; ``herding_space="features"`` embeds with it.
        ipc: images per class.
        method: one of :data:`METHODS`.
        seed: seeds the initial/random picks, the real batches and every fresh network.
        iterations: DM: image updates, each with a fresh network (default 1000; paper
            20000). DC: fresh networks, each giving ``outer_loop`` image updates (default
            50; paper 1000). Ignored by ``random``/``herding`` (recorded as 0).
        data_root: dataset folder (default ``$SYMMERGE_DATA``, see :func:`symmerge.data.data_root`).
        device: torch device (default CUDA if available, else CPU). Bitwise determinism is
            promised on CPU only.
        progress: report progress over iterations (:func:`symmerge.progress.progress_bar`).
        lr_img: image learning rate, SGD momentum 0.5 (default DC 0.1 as in the paper; DM
            1.0 as in the paper, but ``10 * ipc`` for the MLP, tuned on MNIST: see
            :data:`DEFAULTS`). Divergence raises ``FloatingPointError``.
        batch_real: real images per class per step (default DM 256, DC 128; paper 256).
        dc_loops: DC ``(outer_loop, inner_loop)``; default the paper's (10, 50) for
            ipc 10, (1, 1) for ipc 1, (50, 10) for ipc 50.
        herding_space: ``"pixels"`` or ``"features"`` (see the module docstring).
        data: optional ``(images, labels)`` to condense instead of the dataset's train
            split (same normalised space and shape; ``dataset`` still names the space).

    Returns:
        A :class:`CondensedSet`, images sorted by class. ``metadata`` records the settings,
        ``time_s`` (wall clock, data loading excluded), ``peak_rss_mb`` (the process's
        peak resident memory after the run, from ``getrusage``), ``peak_rss_delta_mb`` (how
        much this call raised that peak; 0 if the process had peaked before), on CUDA
        ``peak_cuda_mb``, ``indices`` (the real images picked by a coreset, or used as
        DM/DC's initialisation) and ``history`` (the matching loss per image update, DM/DC).
    """
    from symmerge.data import dataset_info, get_dataset
    from symmerge.io import _package_version
    from symmerge.train import _determinism, resolve_device

    info = dataset_info(dataset)
    if method not in METHODS:
        raise ValueError(f"unknown condensation method {method!r}; expected one of {METHODS}")
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    if iterations is not None and iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if herding_space not in ("pixels", "features"):
        raise ValueError(f"herding_space must be 'pixels' or 'features', got {herding_space!r}")
    if lr_img is not None and not lr_img > 0:
        raise ValueError(f"lr_img must be positive, got {lr_img!r}")
    if batch_real is not None and batch_real < 1:
        raise ValueError(f"batch_real must be >= 1, got {batch_real!r}")
    if dc_loops is not None and (len(dc_loops) != 2 or min(int(v) for v in dc_loops) < 1):
        raise ValueError(f"dc_loops must be two positive ints (outer, inner), got {dc_loops!r}")
    factory, model_name = _model_factory(model, info["name"])
    dev = resolve_device(device)
    num_classes = int(info["num_classes"])

    if data is None:
        x, y = get_dataset(info["name"], "train", root=data_root, device=dev).tensors
    else:
        x, y = (torch.as_tensor(t) for t in data)
        x, y = x.to(dev, torch.float32), y.to(dev, torch.int64)
    if tuple(x.shape[1:]) != tuple(info["input_shape"]) or len(x) != len(y):
        raise ValueError(
            f"data must be images of shape (N, {', '.join(map(str, info['input_shape']))}) "
            f"with N labels for {info['name']}; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) for {info['name']}")

    defaults = DEFAULTS.get(method, {})
    if method in ("random", "herding"):
        n_iter = 0
    else:
        n_iter = int(defaults["iterations"] if iterations is None else iterations)
    extra: dict[str, Any] = {}
    history: list[float] = []
    with _determinism(dev.type == "cpu", dev):
        # measured inside: switching deterministic mode on loads ~150 MB of torch libraries
        rss0 = peak_rss_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        if method == "herding":
            if herding_space == "pixels":
                feats = x
            else:
                embed = _strip_head(_fresh(factory, _next_seed(_seed_stream(seed, 4)), dev))
                embed.eval()
                with torch.no_grad():
                    feats = torch.cat([embed(x[i : i + 1000]) for i in range(0, len(x), 1000)])
            idx = herding_select(feats, y, num_classes, ipc)
            extra["herding_space"] = herding_space
        else:
            idx = random_select(y, num_classes, ipc, seed)
        images, labels = x[idx.to(dev)].clone(), y[idx.to(dev)].clone()
        if method in ("dm", "dc") and n_iter > 0:
            if method == "dm":
                default_lr = (
                    defaults["lr_img_per_ipc"] * ipc
                    if model_name.startswith("mlp")
                    else defaults["lr_img_convnet"]
                )
            else:
                default_lr = defaults["lr_img"]
            lr = float(lr_img if lr_img is not None else default_lr)
            br = int(batch_real if batch_real is not None else defaults["batch_real"])
            common = dict(
                iterations=n_iter,
                lr_img=lr,
                momentum=defaults["momentum"],
                batch_real=br,
                seed=seed,
                progress=progress,
            )
            extra.update(lr_img=lr, momentum=defaults["momentum"], batch_real=br)
            if method == "dm":
                images, history = _run_dm(x, y, images, labels, factory, num_classes, **common)
            else:
                loops = (int(dc_loops[0]), int(dc_loops[1])) if dc_loops else _dc_loops(ipc)
                images, history = _run_dc(
                    x, y, images, labels, factory, num_classes,
                    lr_net=defaults["lr_net"], loops=loops, **common,
                )  # fmt: skip
                extra.update(lr_net=defaults["lr_net"], outer_loop=loops[0], inner_loop=loops[1])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    rss1 = peak_rss_mb()
    if method in ("dm", "dc"):
        extra["init"] = "random real images (the 'random' method's picks for this seed)"
    extra["indices"] = idx.tolist()
    metadata: dict[str, Any] = {
        "dataset": info["name"],
        "num_classes": num_classes,
        "input_shape": list(info["input_shape"]),
        "mean": list(info["mean"]),
        "std": list(info["std"]),
        "method": method,
        "ipc": ipc,
        "seed": seed,
        "iterations": n_iter,
        "model": model_name,
        "n_real": int(len(y)),
        "device": str(dev),
        "time_s": round(elapsed, 3),
        "peak_rss_mb": round(rss1, 1),
        "peak_rss_delta_mb": round(rss1 - rss0, 1),
        "memory_note": "getrusage ru_maxrss: process high-water mark, includes the dataset",
        "symmerge_version": _package_version(),
        "torch_version": torch.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **extra,
        "history": [round(v, 6) for v in history],
    }
    if dev.type == "cuda":
        metadata["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return CondensedSet(images.detach().cpu().float(), labels.cpu().long(), metadata)


# --------------------------------------------------------------------------------------
# evaluation: train a fresh model on the condensed set only
# --------------------------------------------------------------------------------------


def _eval_model(cset: CondensedSet, model: ModelSpec | None) -> ModelSpec:
    """``model``, else the set's own model if it is a name, else ``"mlp"``."""
    if model is not None:
        return model
    stored = cset.metadata.get("model")
    return stored if isinstance(stored, str) and not stored.startswith("callable:") else "mlp"


def train_on_condensed(
    cset: CondensedSet,
    model: ModelSpec | None = None,
    *,
    epochs: int = 300,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A fresh ``model`` (default: the set's own model name, else ``"mlp"``) trained only on
    ``cset``: SGD with momentum, learning rate divided by 10 at half of ``epochs`` (the
    condensation papers' evaluation protocol, without their augmentation). Returns it in
    eval mode. Deterministic on CPU for a seed."""
    from symmerge.train import _determinism, resolve_device

    dataset = cset.dataset
    if dataset is None:
        raise ValueError("the condensed set has no 'dataset' in its metadata")
    factory, _ = _model_factory(_eval_model(cset, model), dataset)
    dev = resolve_device(device)
    net = _fresh(factory, seed, dev).train()
    x, y = cset.images.to(dev), cset.labels.to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, epochs // 2)], gamma=0.1)
    gen = _seed_stream(seed, 5)
    with _determinism(dev.type == "cpu", dev):
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen).to(dev)
            for i in range(0, len(x), batch_size):
                b = order[i : i + batch_size]
                loss = F.cross_entropy(net(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return net.eval()


def evaluate_condensed(
    cset: CondensedSet,
    model: ModelSpec | None = None,
    *,
    epochs: int = 300,
    lr: float = 0.01,
    seed: int = 0,
    data_root: str | Path | None = None,
    device: str | torch.device | None = None,
    test_data: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """Train a fresh model on ``cset`` only (:func:`train_on_condensed`) and report its test
    accuracy with :func:`symmerge.train.evaluate` (on ``test_data`` if given, else the
    dataset's test split). Returns ``evaluate``'s dict plus the training settings and time."""
    from symmerge.train import evaluate

    model = _eval_model(cset, model)
    eval_name = model if isinstance(model, str) else _model_factory(model, str(cset.dataset))[1]
    t0 = time.perf_counter()
    net = train_on_condensed(cset, model, epochs=epochs, lr=lr, seed=seed, device=device)
    train_time = time.perf_counter() - t0
    target = test_data if test_data is not None else cset.dataset
    result = evaluate(net, target, "test", data_root=None if data_root is None else str(data_root))
    result.update(
        {
            "eval_model": eval_name,
            "eval_epochs": epochs,
            "eval_lr": lr,
            "eval_seed": seed,
            "train_time_s": round(train_time, 3),
        }
    )
    return result


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------


def save_condensed(cset: CondensedSet, path: str | Path) -> Path:
    """Write ``cset`` to ``path`` (safetensors: ``images``, ``labels``; JSON metadata in the
    header under ``"symmerge"``, plus a pretty copy in ``<path>.json``). Written atomically;
    an existing file is never replaced (``FileExistsError``)."""
    from symmerge.io import sidecar_path

    path = Path(path)
    side = sidecar_path(path)
    existing = [str(p) for p in (path, side) if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite existing file(s): {', '.join(existing)}")
    _validate_tensors(cset.images, cset.labels, cset.metadata, str(path))
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "metadata": cset.metadata}
    try:
        text = json.dumps(doc, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"condensed-set metadata is not JSON-serialisable: {exc}") from exc
    tensors = {
        "images": cset.images.detach().cpu().float().contiguous(),
        "labels": cset.labels.detach().cpu().long().contiguous(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_side = path.with_name(path.name + ".tmp"), side.with_name(side.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: text})
        tmp_side.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        tmp_side.replace(side)
    finally:
        for p in (tmp, tmp_side):
            p.unlink(missing_ok=True)
    return path


def _validate_tensors(images: Tensor, labels: Tensor, meta: Mapping[str, Any], where: str) -> None:
    """Shape/dtype/range checks shared by saving and loading; raises ``CondensedSetError``."""
    from symmerge.data import dataset_info

    def bad(problem: str) -> CondensedSetError:
        return CondensedSetError(f"{where}: {problem}")

    if images.dim() != 4:
        raise bad(f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise bad(f"labels must be 1-D int64, got {labels.dtype} of shape {tuple(labels.shape)}")
    if not images.is_floating_point():
        raise bad(f"images must be floating point, got {images.dtype}")
    if len(images) == 0:
        raise bad("the set is empty (0 images)")
    if len(images) != len(labels):
        raise bad(f"{len(images)} images but {len(labels)} labels")
    if not bool(torch.isfinite(images).all()):
        raise bad("images contain NaN or infinite values")
    name = meta.get("dataset")
    try:
        info = dataset_info(str(name))
    except ValueError as exc:
        raise bad(f"metadata names an unknown dataset {name!r} ({exc})") from None
    if tuple(images.shape[1:]) != tuple(info["input_shape"]):
        raise bad(
            f"images have shape (C, H, W) = {tuple(images.shape[1:])} but {info['name']} "
            f"images are {tuple(info['input_shape'])}"
        )
    n = int(info["num_classes"])
    if int(labels.min()) < 0 or int(labels.max()) >= n:
        raise bad(
            f"labels span {int(labels.min())}..{int(labels.max())}, outside {info['name']}'s "
            f"classes 0..{n - 1}"
        )


def load_condensed(
    path: str | Path,
    expect_dataset: str | None = None,
    expect_classes: int | Sequence[int] | None = None,
) -> CondensedSet:
    """Read a file written by :func:`save_condensed` and validate it.

    Checks: a readable (not truncated) safetensors file with a symmerge condensed-set
    header; non-empty ``images`` (N, C, H, W) with finite values and C, H, W of the stored
    dataset; int64 ``labels`` within that dataset's classes. ``expect_dataset`` must match
    the stored dataset (aliases allowed). ``expect_classes``: an int ``n`` requires labels
    in ``0..n-1``; a sequence requires exactly that set of labels. Problems raise
    ``ValueError`` (:class:`CondensedSetError`) naming the file.
    """
    from symmerge.data import dataset_info
    from symmerge.io import _existing, _is_safetensors

    path = _existing(path)
    where = str(path)
    if not _is_safetensors(path):
        raise CondensedSetError(f"{where}: not a safetensors file (truncated or foreign file)")
    try:
        with safe_open(where, framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(where, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CondensedSetError(
            f"{where}: unreadable safetensors file (truncated?): {exc}"
        ) from exc
    try:
        doc = json.loads(header[_HEADER_KEY])
    except (KeyError, json.JSONDecodeError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CondensedSetError(
            f"{where}: not a symmerge condensed set (no '{FORMAT_NAME}' document in the "
            "header; checkpoints are read with symmerge.io.load_checkpoint)"
        )
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CondensedSetError(
            f"{where}: format_version {version!r}; this symmerge reads up to {FORMAT_VERSION}"
        )
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise CondensedSetError(f"{where}: 'metadata' must be a JSON object")
    missing = [k for k in ("images", "labels") if k not in tensors]
    if missing:
        raise CondensedSetError(f"{where}: missing tensor(s) {', '.join(missing)}")
    images, labels = tensors["images"], tensors["labels"]
    _validate_tensors(images, labels, meta, where)
    if expect_dataset is not None:
        want, have = dataset_info(expect_dataset)["name"], dataset_info(meta["dataset"])["name"]
        if want != have:
            raise CondensedSetError(f"{where}: holds a {have} set, expected {want}")
    if expect_classes is not None:
        present = sorted(set(labels.tolist()))
        if isinstance(expect_classes, int):
            if present[-1] >= expect_classes:
                raise CondensedSetError(
                    f"{where}: labels go up to {present[-1]}, expected {expect_classes} classes "
                    f"(0..{expect_classes - 1})"
                )
        elif present != sorted({int(c) for c in expect_classes}):
            raise CondensedSetError(
                f"{where}: holds classes {present}, expected {sorted(set(expect_classes))}"
            )
    return CondensedSet(images.float(), labels, meta)


def save_grid_png(cset: CondensedSet, path: str | Path, *, scale: int = 1, pad: int = 2) -> Path:
    """Save a PNG grid: one row per class, one column per image of that class, de-normalised
    to [0, 1] with the dataset's mean/std and clipped. ``scale`` enlarges each pixel."""
    import numpy as np
    from PIL import Image

    from symmerge.data import dataset_info

    info = dataset_info(str(cset.dataset))
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    x = (cset.images.detach().cpu() * std + mean).clamp(0, 1)
    classes = sorted(set(cset.labels.tolist()))
    rows = [x[cset.labels == c] for c in classes]
    cols = max(len(r) for r in rows)
    _, c, h, w = x.shape
    grid = torch.ones(c, len(rows) * (h + pad) + pad, cols * (w + pad) + pad)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top : top + h, left : left + w] = img
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if scale > 1:
        arr = np.repeat(np.repeat(arr, scale, axis=0), scale, axis=1)
    image = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
