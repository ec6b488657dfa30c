"""Merge data from a source spec: dataset samples, class subsets, images converted from another
dataset, condensed sets, coresets and noise, one tensor pair.

Data-based methods (activation matching, STE) and REPAIR need a few labelled images, and a
user merging models of different datasets often has only a stand-in for each (PLeaS-free,
``algorithms.md`` §2: matching, least squares and BN reset on public data). A *spec* names
them, comma-separated (the ``--data`` option of ``symmerge merge`` / ``interpolate``):

* ``DATASET`` (``mnist``, ``fashion-mnist``, ``cifar10``...): ``samples`` images drawn at
  random from its train split;
* ``condensed:FILE``: every image of a set written by ``symmerge condense``
  (:func:`symmerge.condense.save_condensed`);
* ``coreset:METHOD:K[:DATASET]``: K train images per class chosen by ``random`` or
  ``herding`` (:func:`symmerge.condense.condense`), from ``DATASET`` or else from each of
  ``datasets`` (the datasets the models were trained on);
* ``noise:DATASET`` (or ``noise``, for each of ``datasets``): ``samples`` images of
  N(0, 1) pixels in DATASET's normalised space, seeded. Noise has no labels; it gets labels
  drawn uniformly from the dataset's classes so that every consumer accepts it (activation
  statistics, least squares, BN reset and REPAIR ignore labels, ``_check_fits`` and the
  cross-entropy of STE need valid ones; STE would fit random targets, so give it real data).
* ``imagefolder:DIR`` (a folder per class) and ``text:FILE`` (a line per example,
  ``LABEL<TAB>text`` for a label), for timm, torchvision and Hugging Face models: read and
  preprocessed the first model's own way (:mod:`symmerge.realdata`, which gets its
  ``reference`` and explicit ``preprocessing``). These take no suffixes.

Any item takes two suffixes, in this order (quote the spec in a shell: ``[`` and ``>`` are
special there):

* ``[CLASSES]``, e.g. ``cifar10[8-9]`` or ``cifar10[0,2,5-7]`` (the syntax of
  ``symmerge train --classes``): only images of those classes, labels unchanged (so a
  10-way head still fits). A ``DATASET`` source draws its ``samples`` from the subset.
* ``@TARGET``, e.g. ``cifar10@mnist`` or ``cifar10[8-9]@mnist``: the images converted into
  TARGET's input space (:func:`convert_images`: greyscale or channel copies, antialiased
  bilinear resize, TARGET's mean/std), for a model of TARGET fed another dataset.

Every source comes out in the normalised space of its dataset (of TARGET after ``>``), the
one :func:`symmerge.data.get_dataset` (and so ``symmerge train``) gives: a condensed file
whose metadata records another ``mean``/``std`` is converted exactly. The sources are
concatenated and shuffled with ``seed``. Problems raise :class:`DataSourceError` (a
``ValueError``) naming the source; images that do not fit the model suggest a ``@TARGET``.

Example::

    from symmerge import merge
    from symmerge.sources import data_source_batches

    data = data_source_batches("condensed:mnist.st,coreset:random:10:fashion-mnist", model=a)
    merged, result = merge([a, b], "ste", data=data)
    public = data_source_batches("cifar10[0-4]@mnist,noise:mnist", model=a)  # PLeaS-free
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symmerge.condense import condense, load_condensed
from symmerge.data import DATASETS, dataset_info, get_dataset, iterate_batches

if TYPE_CHECKING:
    from symmerge.realdata import Preprocessing

__all__ = [
    "CORESET_METHODS",
    "LUMA_WEIGHTS",
    "DataSourceError",
    "DataUnavailableError",
    "convert_images",
    "data_source_batches",
    "load_data_sources",
]

#: Selection methods a ``coreset:METHOD:K`` source accepts.
CORESET_METHODS = ("random", "herding")

#: ITU-R BT.601 luma weights (R, G, B): colour to greyscale in :func:`convert_images`.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

Root = str | os.PathLike[str] | None

#: Images, labels and the dataset whose normalised space the images are in.
_Part = tuple[Tensor, Tensor, str]


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
    reference: str | None = None,
    preprocessing: Preprocessing | None = None,
) -> tuple[Tensor, Tensor]:
    """Images and labels of the comma-separated sources in ``spec`` (see the module
    docstring), concatenated and shuffled with ``seed``.

    Args:
        spec: e.g. ``"mnist,fashion-mnist"``, ``"condensed:FILE"``, ``"coreset:random:10"``,
            ``"cifar10[0,2,5-7]@mnist,noise:mnist"`` (commas inside ``[...]`` list classes).
        root: the datasets' folder (:func:`symmerge.data.data_root` when ``None``).
        samples: images drawn from each ``DATASET`` and ``noise`` source.
        seed: seeds the samples, the coresets, the noise and the shuffle.
        datasets: what a ``coreset:METHOD:K`` or ``noise`` without a dataset draws from
            (repeats and ``None`` are skipped), normally the datasets the models were
            trained on; also the first guess of the ``@TARGET`` a misfit suggests.
        model: when given, each source's images must fit its input (``input_shape`` if it
            has one, and a forward pass) and its labels its outputs; ``imagefolder:`` and
            ``text:`` also use its preprocessing.
        reference: the first model's reference (``timm:NAME=FILE``, ``hf:DIR``...), where
            ``imagefolder:`` finds an image processor and ``text:`` a tokenizer.
        preprocessing: explicit image size, mean/std and text length
            (:class:`symmerge.realdata.Preprocessing`), overriding the model's own.

    Raises:
        DataSourceError: a bad spec or source, with a message naming it;
            :class:`DataUnavailableError` when a dataset's files are missing or unreadable.
    """
    items = _split_items(spec)
    if not items:
        raise DataSourceError(
            f"no data source in {spec!r}; give e.g. 'mnist,fashion-mnist', "
            "'condensed:FILE', 'coreset:random:10' or 'cifar10@mnist'"
        )
    from symmerge.realdata import is_real_source, load_real_source  # it imports this module

    # syntax errors before any loading; imagefolder:/text: items are paths, taken whole
    parsed = [None if is_real_source(item) else _parse_item(item) for item in items]
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for item, parts in zip(items, parsed, strict=True):
        if parts is None:  # checked against the model as it loads
            x, y = load_real_source(
                item, reference=reference, preprocessing=preprocessing, samples=samples,
                seed=seed, model=model, datasets=datasets,
            )  # fmt: skip
        else:
            base, classes, target = parts
            loaded = _load_source(item, base, classes, root, samples, seed, datasets)
            x, y = _join_parts(item, loaded, target)
        if len(y) == 0:
            raise DataSourceError(f"data source {item!r} holds no images")
        if xs and (tuple(x.shape[1:]) != tuple(xs[0].shape[1:]) or x.dtype != xs[0].dtype):
            real = parts is None or parsed[0] is None  # no dataset to convert to
            raise DataSourceError(
                f"data source {item!r} has inputs of shape {tuple(x.shape[1:])} but "
                f"{items[0]!r} has {tuple(xs[0].shape[1:])}; sources must share one shape"
                + (" (and kind: images or token ids)" if real else
                   _conversion_hint(item, tuple(xs[0].shape[1:]), datasets))
            )  # fmt: skip
        if model is not None and parts is not None:
            _check_fits(model, x, y, item, datasets)
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
    reference: str | None = None,
    preprocessing: Preprocessing | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`load_data_sources` cut into ``(x, y)`` batches of ``batch_size`` (the last may
    be smaller), ready for ``merge(..., data=...)``."""
    x, y = load_data_sources(
        spec, root=root, samples=samples, seed=seed, datasets=datasets, model=model,
        reference=reference, preprocessing=preprocessing,
    )  # fmt: skip
    return [(bx, by) for bx, by in iterate_batches((x, y), batch_size, shuffle=False)]


def convert_images(x: Tensor, source: str, target: str) -> Tensor:
    """Images in ``source``'s normalised space, converted into ``target``'s input space.

    A model of one dataset can then run on another's images (PLeaS-free's public data). In
    [0, 1] pixels (un-normalised with ``source``'s mean/std): 3 -> 1 channels by the
    :data:`LUMA_WEIGHTS`, 1 -> 3 by copying, a bilinear antialiased resize to ``target``'s
    height and width, then ``target``'s mean/std. Every step is a convex combination of
    pixels, so images in [0, 1] stay in [0, 1]. The same dataset returns ``x`` unchanged.

    Raises:
        DataSourceError: an unknown dataset, or channel counts with no rule (only 3 -> 1,
            1 -> 3 and equal counts convert).
    """
    src, dst = dataset_info(_dataset_name(source)), dataset_info(_dataset_name(target))
    if src["name"] == dst["name"]:
        return x
    c, h, w = dst["input_shape"]
    view = (1, -1, 1, 1)

    def stats(info: dict, key: str) -> Tensor:
        return torch.tensor(info[key], dtype=x.dtype, device=x.device).view(view)

    pixels = x * stats(src, "std") + stats(src, "mean")
    if pixels.shape[1] == 3 and c == 1:
        luma = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(view)
        pixels = (pixels * luma).sum(1, keepdim=True)
    elif pixels.shape[1] == 1 and c == 3:
        pixels = pixels.expand(-1, 3, -1, -1)
    elif pixels.shape[1] != c:
        raise DataSourceError(
            f"cannot convert {pixels.shape[1]}-channel {src['name']} images to {c}-channel "
            f"{dst['name']} ones (only 3 -> 1, 1 -> 3 and equal counts)"
        )
    if tuple(pixels.shape[2:]) != (h, w):
        pixels = F.interpolate(
            pixels, size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )
    return (pixels - stats(dst, "mean")) / stats(dst, "std")


def _split_items(spec: str) -> list[str]:
    """The comma-separated items of ``spec``, stripped; commas inside ``[...]`` list classes."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth <= 0:
            items.append(spec[start:i])
            start, depth = i + 1, 0
    items.append(spec[start:])
    return [s.strip() for s in items if s.strip()]


def _dataset_name(name: str) -> str:
    """Canonical spelling of a dataset name, or a :class:`DataSourceError` listing the names."""
    try:
        return str(dataset_info(name)["name"])
    except (KeyError, ValueError) as exc:
        raise DataSourceError(str(exc.args[0] if exc.args else exc)) from None


def _distinct_datasets(datasets: Sequence[str | None]) -> list[str]:
    """Canonical names of ``datasets``, first occurrence only, ``None`` and "" skipped."""
    names: list[str] = []
    for d in datasets:
        if d and (n := _dataset_name(d)) not in names:
            names.append(n)
    return names


def _parse_item(item: str) -> tuple[str, list[int] | None, str | None]:
    """``ITEM[CLASSES]@TARGET`` -> (ITEM, sorted classes or None, canonical TARGET or None)."""
    base, arrow, target = item.rpartition("@")
    if not arrow:
        base, target = item, ""
    base, target = base.strip(), target.strip()
    if arrow and not (base and target):
        raise DataSourceError(f"{item!r}: write SOURCE@TARGET, e.g. cifar10@mnist")
    target_name = None
    if arrow:
        try:
            target_name = _dataset_name(target)
        except DataSourceError as exc:
            raise DataSourceError(f"{item!r}: unknown target {target!r}: {exc}") from None
    classes = None
    if base.endswith("]") and "[" in base:
        base, _, text = base[:-1].rpartition("[")
        base = base.strip()
        if not text.strip():
            raise DataSourceError(f"{item!r}: empty class subset; write e.g. cifar10[8-9]")
        from symmerge.cli import parse_class_spec  # the --classes syntax (lazy: cli is the UI)

        try:
            classes = parse_class_spec(text)
        except ValueError as exc:
            raise DataSourceError(f"{item!r}: {exc}") from None
    if "[" in base or "]" in base or "@" in base:
        raise DataSourceError(f"{item!r}: write SOURCE[CLASSES]@TARGET, e.g. cifar10[8-9]@mnist")
    return base, classes, target_name


def _check_classes(item: str, classes: list[int] | None, name: str) -> None:
    """Every class of the subset exists in ``name``."""
    n = int(dataset_info(name)["num_classes"])
    bad = [c for c in classes or () if c >= n]
    if bad:
        raise DataSourceError(
            f"{item!r}: {name} has classes 0-{n - 1}; got {', '.join(map(str, bad))}"
        )


def _keep_classes(part: _Part, classes: list[int] | None) -> _Part:
    x, y, name = part
    if classes is None:
        return part
    keep = torch.isin(y, torch.tensor(classes, dtype=y.dtype, device=y.device))
    return x[keep], y[keep], name


def _join_parts(item: str, parts: list[_Part], target: str | None) -> tuple[Tensor, Tensor]:
    """One item's images (converted to ``target`` when given) and labels, in one tensor pair."""
    if target is not None:
        try:
            parts = [(convert_images(x, name, target), y, target) for x, y, name in parts]
        except DataSourceError as exc:
            raise DataSourceError(f"{item!r}: {exc}") from None
    if len(parts) > 1 and len({tuple(x.shape[1:]) for x, _, _ in parts}) > 1:
        names = ", ".join(name for _, _, name in parts)
        raise DataSourceError(
            f"{item!r} draws from datasets of different shapes ({names}); name one, or "
            f"convert them with '{item}@DATASET'"
        )
    return torch.cat([x for x, _, _ in parts]), torch.cat([y for _, y, _ in parts])


def _load_source(
    item: str,
    base: str,
    classes: list[int] | None,
    root: Root,
    samples: int,
    seed: int,
    datasets: Sequence[str | None],
) -> list[_Part]:
    """Images and labels of one source, in its dataset's normalised space, with its dataset."""
    kind, colon, rest = base.partition(":")
    if kind.lower() == "condensed" and colon:
        x, y, name = _condensed(item, rest)
        _check_classes(item, classes, name)
        return [_keep_classes((x, y, name), classes)]
    if kind.lower() == "coreset" and colon:
        return _coreset(item, rest, classes, root, seed, datasets)
    if kind.lower() == "noise":
        return _noise(item, rest if colon else None, classes, samples, seed, datasets)
    try:
        name = _dataset_name(base)
    except DataSourceError as exc:
        raise DataSourceError(
            f"{exc}; or one of condensed:FILE, coreset:random:K, coreset:herding:K, "
            "noise:DATASET (items take [CLASSES] and @TARGET suffixes)"
        ) from None
    _check_classes(item, classes, name)
    try:
        ds = get_dataset(name, "train", root=root, classes=classes)
    except (FileNotFoundError, ValueError) as exc:
        raise DataUnavailableError(item, str(exc)) from None
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:samples]
    x, y = ds.tensors
    return [(x[idx], y[idx], name)]


def _noise(
    item: str,
    given: str | None,
    classes: list[int] | None,
    samples: int,
    seed: int,
    datasets: Sequence[str | None],
) -> list[_Part]:
    """``samples`` N(0, 1) images in each dataset's normalised space, labels uniform over
    ``classes`` (all when None): placeholders every consumer accepts, see the module doc."""
    if given is not None:
        if not given.strip():
            raise DataSourceError(f"{item!r}: write noise:DATASET, e.g. noise:mnist")
        try:
            names = [_dataset_name(given)]
        except DataSourceError as exc:
            raise DataSourceError(f"{item!r}: {exc}") from None
    else:
        names = _distinct_datasets(datasets)
    if not names:
        raise DataSourceError(
            f"{item!r}: the checkpoints do not record their dataset; name it, e.g. noise:mnist"
        )
    parts, shapes = [], set()
    for name in names:
        info = dataset_info(name)
        if info["input_shape"] in shapes:  # N(0, 1) in any space of this shape: drawn once
            continue
        shapes.add(info["input_shape"])
        _check_classes(item, classes, name)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, *info["input_shape"], generator=gen)
        pool = torch.tensor(classes if classes is not None else range(info["num_classes"]))
        parts.append((x, pool[torch.randint(len(pool), (samples,), generator=gen)], name))
    return parts


def _condensed(item: str, file: str) -> _Part:
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
    return x, cset.labels, str(info["name"])


def _coreset(
    item: str,
    rest: str,
    classes: list[int] | None,
    root: Root,
    seed: int,
    datasets: Sequence[str | None],
) -> list[_Part]:
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
        names = _distinct_datasets(datasets)
        if not names:
            raise DataSourceError(
                f"{item!r}: the checkpoints do not record their dataset; name it, e.g. "
                f"coreset:{parts[0]}:{ipc}:mnist"
            )
    for name in names:
        _check_classes(item, classes, name)
    out = []
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
        out.append(_keep_classes((cset.images, cset.labels, name), classes))
    return out


def _conversion_hint(item: str, shape: tuple[int, ...], datasets: Sequence[str | None]) -> str:
    """``; convert them with 'SOURCE@TARGET'`` for a TARGET whose images have ``shape``: a
    dataset of the models when one fits, else any known dataset that does."""
    source = item.rpartition("@")[0].strip() if "@" in item else item
    fits = [n for n in DATASETS if tuple(DATASETS[n]["input_shape"]) == tuple(shape)]
    try:
        ours = _distinct_datasets(datasets)
    except DataSourceError:  # a checkpoint's unknown dataset: only the hint is at stake
        ours = []
    target = next((n for n in ours if n in fits), fits[0] if fits else "DATASET")
    return f"; convert them with '{source}@{target}'"


def _check_fits(
    model: nn.Module, x: Tensor, y: Tensor, item: str, datasets: Sequence[str | None] = ()
) -> None:
    """The model takes these images and has an output for every label."""
    shape = getattr(model, "input_shape", None)
    if shape is not None and tuple(shape) != tuple(x.shape[1:]):
        raise DataSourceError(
            f"data source {item!r} has images of shape (C, H, W) = {tuple(x.shape[1:])} but "
            f"the models take {tuple(shape)}"
            f"{_conversion_hint(item, tuple(int(s) for s in shape), datasets)}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2].to(next(model.parameters()).device))
    except RuntimeError as exc:
        raise DataSourceError(
            f"the models do not accept the images of {item!r} (shape {tuple(x.shape[1:])}): "
            f"{exc}; convert them with '{item.partition('@')[0].strip()}@DATASET'"
        ) from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or int(y.max()) >= out.shape[1] or int(y.min()) < 0:
        raise DataSourceError(
            f"data source {item!r} has labels {int(y.min())}..{int(y.max())} but the models "
            f"have {out.shape[-1]} outputs"
        )
