"""Merge data from a source spec: dataset samples, condensed sets and coresets, one tensor pair.

Data-based methods (activation matching, STE) and REPAIR need a few labelled images, and a
user merging models of different datasets often has only a stand-in for each. A *spec* names
them, comma-separated (the ``--data`` option of ``symmerge merge`` / ``interpolate``):

* ``DATASET`` (``mnist``, ``fashion-mnist``, ``cifar10``...): ``samples`` images drawn at
  random from its train split;
* ``condensed:FILE``: every image of a set written by ``symmerge condense``
  (:func:`symmerge.condense.save_condensed`);
* ``coreset:METHOD:K[:DATASET]``: K train images per class chosen by ``random`` or
  ``herding`` (:func:`symmerge.condense.condense`), from ``DATASET`` or else from each of
  ``datasets`` (the datasets the models were trained on).

Every source comes out in the normalised space of its dataset, the one
:func:`symmerge.data.get_dataset` (and so ``symmerge train``) gives: a condensed file whose
metadata records another ``mean``/``std`` is converted exactly. The sources are concatenated
and shuffled with ``seed``. Problems raise :class:`DataSourceError` (a ``ValueError``)
naming the source.

Example::

    from symmerge import merge
    from symmerge.sources import data_source_batches

    data = data_source_batches("condensed:mnist.st,coreset:random:10:fashion-mnist", model=a)
    merged, result = merge([a, b], "ste", data=data)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from symmerge.condense import condense, load_condensed
from symmerge.data import dataset_info, get_dataset, iterate_batches

__all__ = [
    "CORESET_METHODS",
    "DataSourceError",
    "DataUnavailableError",
    "data_source_batches",
    "load_data_sources",
]

#: Selection methods a ``coreset:METHOD:K`` source accepts.
CORESET_METHODS = ("random", "herding")

Root = str | os.PathLike[str] | None


class DataSourceError(ValueError):
    """A data source spec that cannot be used: bad syntax, an unknown dataset, an unreadable
    condensed file, or images and labels that do not fit the model."""


class DataUnavailableError(DataSourceError):
    """A well-formed source whose dataset files cannot be found or read.

    ``source`` is the item of the spec, ``reason`` the loader's message.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"data source {source!r}: {reason}")
        self.source = source
        self.reason = reason


def load_data_sources(
    spec: str,
    *,
    root: Root = None,
    samples: int = 5000,
    seed: int = 0,
    datasets: Sequence[str | None] = (),
    model: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """Images and labels of the comma-separated sources in ``spec`` (see the module
    docstring), concatenated and shuffled with ``seed``.

    Args:
        spec: e.g. ``"mnist,fashion-mnist"``, ``"condensed:FILE"``, ``"coreset:random:10"``.
        root: the datasets' folder (:func:`symmerge.data.data_root` when ``None``).
        samples: images drawn from each ``DATASET`` source.
        seed: seeds the samples, the coresets and the shuffle.
        datasets: what a ``coreset:METHOD:K`` without a dataset draws from (repeats and
            ``None`` are skipped), normally the datasets the models were trained on.
        model: when given, each source's images must fit its input (``input_shape`` if it
            has one, and a forward pass) and its labels its outputs.

    Raises:
        DataSourceError: a bad spec or source, with a message naming it;
            :class:`DataUnavailableError` when a dataset's files are missing or unreadable.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise DataSourceError(
            f"no data source in {spec!r}; give e.g. 'mnist,fashion-mnist', "
            "'condensed:FILE' or 'coreset:random:10'"
        )
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for item in items:
        x, y = _load_source(item, root, samples, seed, datasets)
        if len(y) == 0:
            raise DataSourceError(f"data source {item!r} holds no images")
        if xs and tuple(x.shape[1:]) != tuple(xs[0].shape[1:]):
            raise DataSourceError(
                f"data source {item!r} has images of shape {tuple(x.shape[1:])} but "
                f"{items[0]!r} has {tuple(xs[0].shape[1:])}; sources must share one shape"
            )
        if model is not None:
            _check_fits(model, x, y, item)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def data_source_batches(
    spec: str,
    batch_size: int = 500,
    *,
    root: Root = None,
    samples: int = 5000,
    seed: int = 0,
    datasets: Sequence[str | None] = (),
    model: nn.Module | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`load_data_sources` cut into ``(x, y)`` batches of ``batch_size`` (the last may
    be smaller), ready for ``merge(..., data=...)``."""
    x, y = load_data_sources(
        spec, root=root, samples=samples, seed=seed, datasets=datasets, model=model
    )
    return [(bx, by) for bx, by in iterate_batches((x, y), batch_size, shuffle=False)]


def _dataset_name(name: str) -> str:
    """Canonical spelling of a dataset name, or a :class:`DataSourceError` listing the names."""
    try:
        return str(dataset_info(name)["name"])
    except (KeyError, ValueError) as exc:
        raise DataSourceError(str(exc.args[0] if exc.args else exc)) from None


def _load_source(
    item: str, root: Root, samples: int, seed: int, datasets: Sequence[str | None]
) -> tuple[Tensor, Tensor]:
    """Images and labels of one source, in its dataset's normalised space."""
    kind, colon, rest = item.partition(":")
    if kind.lower() == "condensed" and colon:
        return _condensed(item, rest)
    if kind.lower() == "coreset" and colon:
        return _coreset(item, rest, root, seed, datasets)
    try:
        name = _dataset_name(item)
    except DataSourceError as exc:
        raise DataSourceError(
            f"{exc}; or one of condensed:FILE, coreset:random:K, coreset:herding:K"
        ) from None
    try:
        ds = get_dataset(name, "train", root=root)
    except (FileNotFoundError, ValueError) as exc:
        raise DataUnavailableError(item, str(exc)) from None
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:samples]
    x, y = ds.tensors
    return x[idx], y[idx]


def _condensed(item: str, file: str) -> tuple[Tensor, Tensor]:
    if not file:
        raise DataSourceError(f"{item!r}: write condensed:FILE (a file from `symmerge condense`)")
    path = Path(file)
    if not path.is_file():
        raise DataSourceError(f"condensed set {path} does not exist (or is not a file)")
    try:
        cset = load_condensed(path)
    except (ValueError, OSError) as exc:
        raise DataSourceError(str(exc)) from None
    info = dataset_info(str(cset.dataset))
    mean = [float(v) for v in cset.metadata.get("mean", info["mean"])]
    std = [float(v) for v in cset.metadata.get("std", info["std"])]
    x = cset.images
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise DataSourceError(
            f"{path}: metadata mean/std have {len(mean)}/{len(std)} values for "
            f"{x.shape[1]} channels"
        )
    stored, wanted = [*mean, *std], [*info["mean"], *info["std"]]
    if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(stored, wanted, strict=True)):
        # stored in another space: back to [0, 1], then to the dataset's normalised space
        view = (1, -1, 1, 1)
        x = x * torch.tensor(std).view(view) + torch.tensor(mean).view(view)
        x = (x - torch.tensor(info["mean"]).view(view)) / torch.tensor(info["std"]).view(view)
    return x, cset.labels


def _coreset(
    item: str, rest: str, root: Root, seed: int, datasets: Sequence[str | None]
) -> tuple[Tensor, Tensor]:
    parts = rest.split(":")
    usage = f"{item!r}: write coreset:METHOD:K[:DATASET], METHOD one of {CORESET_METHODS}"
    if len(parts) not in (2, 3) or parts[0].lower() not in CORESET_METHODS:
        raise DataSourceError(usage)
    try:
        ipc = int(parts[1])
    except ValueError:
        raise DataSourceError(f"{usage}; K (images per class) must be an integer") from None
    if ipc < 1:
        raise DataSourceError(f"{item!r}: K (images per class) must be >= 1, got {ipc}")
    if len(parts) == 3:
        names = [_dataset_name(parts[2])]
    else:
        names = []
        for d in datasets:
            if d and (n := _dataset_name(d)) not in names:
                names.append(n)
        if not names:
            raise DataSourceError(
                f"{item!r}: the checkpoints do not record their dataset; name it, e.g. "
                f"coreset:{parts[0]}:{ipc}:mnist"
            )
    xs, ys = [], []
    for name in names:
        try:
            cset = condense(
                name, ipc=ipc, method=parts[0].lower(), seed=seed, data_root=root,
                device="cpu", progress=False,
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise DataUnavailableError(item, str(exc)) from None
        except ValueError as exc:
            raise DataSourceError(f"{item!r}: {exc}") from None
        xs.append(cset.images)
        ys.append(cset.labels)
    return torch.cat(xs), torch.cat(ys)


def _check_fits(model: nn.Module, x: Tensor, y: Tensor, item: str) -> None:
    """The model takes these images and has an output for every label."""
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(shape) != tuple(x.shape[1:]):
        raise DataSourceError(
            f"data source {item!r} has images of shape (C, H, W) = {tuple(x.shape[1:])} but "
            f"the models take {tuple(shape)}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2].to(next(model.parameters()).device))
    except RuntimeError as exc:
        raise DataSourceError(f"the models do not accept the images of {item!r}: {exc}") from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or int(y.max()) >= out.shape[1] or int(y.min()) < 0:
        raise DataSourceError(
            f"data source {item!r} has labels {int(y.min())}..{int(y.max())} but the models "
            f"have {out.shape[-1]} outputs"
        )
