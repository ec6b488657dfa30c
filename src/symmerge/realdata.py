"""Merge data for real models: ``imagefolder:DIR`` images and ``text:FILE`` lines.

A timm, torchvision or Hugging Face model was trained on inputs made its own way (a size, a
crop, a mean/std; a tokenizer), so merge data only measures its activations faithfully in
that space. These two ``--data`` sources (:mod:`symmerge.sources`) therefore preprocess with
the model's own recipe, found from the first model and its reference string:

* ``imagefolder:DIR``: one subfolder per class (torchvision's ImageFolder layout: class index
  = sorted subfolder order), PNG/JPEG images read with PIL. Preprocessing: timm's data
  config (``resolve_data_config`` / ``create_transform``) for a timm model; the image
  processor of an ``hf:DIR`` that has a ``preprocessor_config.json``; otherwise a resize and
  centre crop to the model's input shape (torchvision's 87.5 % crop) with the mean/std of
  the models' dataset, else ImageNet's. :class:`Preprocessing` (``--image-size``, ``--mean``,
  ``--std``) overrides. Images become RGB or greyscale as the model's channels ask.
* ``text:FILE``: one example per line (blank lines skipped), tokenised by the tokenizer of
  the ``hf:DIR``, truncated and padded to ``max_length`` (pad token, else eos): ``(N, L)``
  long token ids, what :mod:`symmerge.resolve`'s Hugging Face wrapper takes. ``LABEL<TAB>text``
  gives an integer label; other lines get the placeholder label 0, which every consumer
  accepts (activation statistics ignore labels) but which STE would fit as a real target,
  so give STE labelled lines (the ``noise:`` precedent).

``samples`` images or lines are drawn with ``seed`` (all when fewer). Problems raise
:class:`symmerge.sources.DataSourceError` naming the source and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.sources import DataSourceError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "REAL_KINDS",
    "Preprocessing",
    "is_real_source",
    "load_real_source",
]

#: Source kinds this module reads (``KIND:PATH``).
REAL_KINDS = ("imagefolder", "text")

#: File endings read as images (case-insensitive); other files in class folders are ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: torchvision's (and most ImageNet models') normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision's evaluation crop: resize to size / 0.875 (256 for 224), centre-crop size.
TORCHVISION_CROP = 0.875

#: Files that make a directory a tokenizer (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")  # fmt: skip

_LABELLED = re.compile(r"([+-]?\d+)\t(.*)", re.DOTALL)

#: Images converted to a tensor batch: PIL images in, (N, C, H, W) float out.
_Transform = Callable[[list[Any]], Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """Explicit preprocessing (the CLI's ``--image-size``, ``--mean``, ``--std``,
    ``--max-length``); a set field overrides what the model's own recipe says."""

    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_length: int = 128

    def __post_init__(self) -> None:
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"image size must be two positive integers, got {self.image_size}")
        if self.std is not None and min(self.std, default=1.0) <= 0:
            raise ValueError(f"std values must be positive, got {self.std}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, 3):
                raise ValueError(f"{name} needs 1 or 3 values (channels), got {len(values)}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(
                f"mean and std must have one value per channel each; got {len(self.mean)} "
                f"and {len(self.std)}"
            )
        if self.max_length < 1:
            raise ValueError(f"max length must be >= 1, got {self.max_length}")

    @property
    def channels(self) -> int | None:
        """Channels the explicit mean/std imply (None when neither is given)."""
        given = self.mean if self.mean is not None else self.std
        return None if given is None else len(given)


def is_real_source(item: str) -> bool:
    """Whether a ``--data`` item is read here (``imagefolder:...`` or ``text:...``)."""
    kind, colon, _ = item.partition(":")
    return bool(colon) and kind.strip().lower() in REAL_KINDS


def load_real_source(
    item: str,
    *,
    reference: str | None = None,
    preprocessing: Preprocessing | None = None,
    samples: int = 5000,
    seed: int = 0,
    model: nn.Module | None = None,
    datasets: Sequence[str | None] = (),
) -> tuple[Tensor, Tensor]:
    """Inputs and labels of one ``imagefolder:DIR`` or ``text:FILE`` item (module docstring).

    Args:
        reference: the first model's reference (``timm:NAME=FILE``, ``hf:DIR``...): where
            the tokenizer or image processor is found.
        preprocessing: explicit overrides (defaults: the model's own).
        model: the first model; its preprocessing is used, and the inputs and labels must
            fit it (a forward pass).
        datasets: the models' datasets; the first known one gives a plain image model its
            mean/std.
    """
    prep = preprocessing or Preprocessing()
    kind, _, path = item.partition(":")
    path = path.strip()
    if not path:
        raise DataSourceError(f"{item!r}: write {kind.strip().lower()}:PATH")
    if kind.strip().lower() == "text":
        return _text_source(item, Path(path).expanduser(), reference, prep, samples, seed, model)
    return _image_source(
        item, Path(path).expanduser(), reference, prep, samples, seed, model, datasets
    )


# --------------------------------------------------------------------------------------
# the model: what it takes
# --------------------------------------------------------------------------------------


def _modality(model: nn.Module | None) -> str | None:
    """``"tokens"`` or ``"images"``: what the model is called on; None when unknown."""
    if model is None:
        return None
    inner = getattr(model, "model", model)  # resolve's wrapper keeps the HF model in .model
    main_input = getattr(inner, "main_input_name", None)
    if main_input == "input_ids":
        return "tokens"
    if main_input == "pixel_values":
        return "images"
    shape = getattr(model, "input_shape", None)
    if (shape is not None and len(tuple(shape)) == 3) or _first_conv(model) is not None:
        return "images"
    return None


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _hf_source(reference: str | None) -> str | None:
    """The directory (or cached hub id) of an ``hf:`` reference; None for other references
    and for ``hf:TYPE`` (a random model, with no files)."""
    if not reference or not reference.startswith("hf:"):
        return None
    name = reference[3:]
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    return name if "/" in name and not path.exists() else None


def _check_fits(model: nn.Module | None, x: Tensor, y: Tensor, item: str, what: str) -> None:
    """The model runs on two inputs and has an output for every label (2-D outputs)."""
    if model is None:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2].to(next(model.parameters()).device))
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            AssertionError) as exc:  # fmt: skip
        raise DataSourceError(
            f"the models do not accept the {what} of {item!r} (shape {tuple(x.shape[1:])}): "
            f"{str(exc).strip() or type(exc).__name__}"
        ) from None
    finally:
        model.train(was_training)
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if torch.is_tensor(o)), None)
    if torch.is_tensor(out) and out.ndim == 2 and len(y) and int(y.max()) >= out.shape[1]:
        raise DataSourceError(
            f"data source {item!r} has labels 0..{int(y.max())} but the models have "
            f"{out.shape[1]} outputs"
        )


def _draw(n: int, samples: int, seed: int) -> list[int]:
    """``samples`` of ``range(n)`` drawn with ``seed`` (all, in order, when n <= samples)."""
    if n <= samples:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].tolist()


# --------------------------------------------------------------------------------------
# imagefolder:DIR
# --------------------------------------------------------------------------------------


def _image_source(
    item: str,
    folder: Path,
    reference: str | None,
    prep: Preprocessing,
    samples: int,
    seed: int,
    model: nn.Module | None,
    datasets: Sequence[str | None],
) -> tuple[Tensor, Tensor]:
    if _modality(model) == "tokens":
        raise DataSourceError(
            f"{item!r} gives images but the models take token ids (a text model); give "
            "text with text:FILE"
        )
    files, labels = _image_files(item, folder)
    keep = _draw(len(files), samples, seed)
    files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    transform, mode = _image_transform(item, model, reference, prep, datasets)
    x = None
    for start in range(0, len(files), 64):  # a chunk at a time: one copy of the set in memory
        chunk = transform([_open_image(f, mode) for f in files[start : start + 64]])
        if x is None:
            x = torch.empty((len(files), *chunk.shape[1:]), dtype=chunk.dtype)
        x[start : start + len(chunk)] = chunk
    assert x is not None
    y = torch.tensor(labels, dtype=torch.long)
    _check_fits(model, x, y, item, "images")
    return x, y


def _image_files(item: str, folder: Path) -> tuple[list[Path], list[int]]:
    """Image files under ``folder/CLASS/`` (any depth) and their class indices."""
    if not folder.is_dir():
        raise DataSourceError(
            f"{item!r}: {folder} does not exist or is not a directory; imagefolder:DIR needs "
            "a folder with one subfolder of images per class"
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataSourceError(
            f"{item!r}: {folder} has no class subfolders; put each class's images in "
            f"{folder}/CLASS_NAME/ (class index = sorted folder order)"
        )
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
        files += found
        labels += [index] * len(found)
    if not files:
        raise DataSourceError(
            f"{item!r}: the class folders of {folder} ({', '.join(classes[:5])}"
            f"{', ...' if len(classes) > 5 else ''}) hold no images "
            f"({', '.join(IMAGE_SUFFIXES[:3])}...)"
        )
    return files, labels


def _open_image(path: Path, mode: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataSourceError(f"cannot read the image {path}: {exc}") from None


def _image_transform(
    item: str,
    model: nn.Module | None,
    reference: str | None,
    prep: Preprocessing,
    datasets: Sequence[str | None],
) -> tuple[_Transform, str]:
    """The model's preprocessing as a batch function, and the PIL mode images need."""
    kind = (reference or "").partition(":")[0]
    if (model is not None and hasattr(model, "pretrained_cfg")) or (
        kind == "timm" and model is None
    ):
        return _timm_transform(item, model, reference, prep)
    hf = _hf_source(reference)
    if hf is not None and (Path(hf) / "preprocessor_config.json").is_file():
        return _hf_transform(item, hf, model, prep)
    return _plain_transform(item, model, reference, prep, datasets)


def _mode(channels: int, item: str) -> str:
    if channels not in (1, 3):
        raise DataSourceError(
            f"{item!r}: the models take {channels}-channel images; image folders give "
            "1 (greyscale) or 3 (RGB) channels"
        )
    return "L" if channels == 1 else "RGB"


def _timm_transform(
    item: str, model: nn.Module | None, reference: str | None, prep: Preprocessing
) -> tuple[_Transform, str]:
    """timm's evaluation transform from the model's data config, with explicit overrides."""
    try:
        import timm
        import timm.data

        if model is None:  # a bare reference: the architecture holds the config
            model = timm.create_model(str(reference)[5:].partition("=")[0], pretrained=False)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise DataSourceError(f"{item!r}: cannot read the timm data config: {exc}") from None
    input_size = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))
    channels = prep.channels or int(input_size[0])
    args: dict[str, Any] = {}
    if prep.image_size is not None:
        args["input_size"] = (channels, *prep.image_size)
    if prep.mean is not None:
        args["mean"] = prep.mean
    if prep.std is not None:
        args["std"] = prep.std
    config = timm.data.resolve_data_config(args, model=model)
    transform = timm.data.create_transform(**config)
    channels = int(config["input_size"][0])
    return lambda images: torch.stack([transform(i) for i in images]), _mode(channels, item)


def _hf_transform(
    item: str, source: str, model: nn.Module | None, prep: Preprocessing
) -> tuple[_Transform, str]:
    """The ``hf:DIR`` image processor; explicit size/mean/std are passed to its call."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
    except (ImportError, OSError, ValueError, KeyError) as exc:
        raise DataSourceError(
            f"{item!r}: cannot load the image processor of hf:{source}: {exc}"
        ) from None
    kwargs: dict[str, Any] = {}
    if prep.image_size is not None:
        kwargs["size"] = {"height": prep.image_size[0], "width": prep.image_size[1]}
    if prep.mean is not None:
        kwargs["image_mean"] = [float(v) for v in prep.mean]
    if prep.std is not None:
        kwargs["image_std"] = [float(v) for v in prep.std]
    config = getattr(getattr(model, "model", model), "config", None)
    channels = prep.channels or int(getattr(config, "num_channels", 3) or 3)

    def transform(images: list[Any]) -> Tensor:
        out = processor(images=images, return_tensors="pt", **kwargs)["pixel_values"]
        return out.float()

    return transform, _mode(channels, item)


def _plain_transform(
    item: str,
    model: nn.Module | None,
    reference: str | None,
    prep: Preprocessing,
    datasets: Sequence[str | None],
) -> tuple[_Transform, str]:
    """Resize and centre-crop to the model's input shape, then the dataset's (else
    ImageNet's) mean/std: torchvision's recipe, and the zoo's for a zoo model."""
    from symmerge.data import dataset_info

    shape = tuple(getattr(model, "input_shape", None) or ())
    conv = _first_conv(model) if model is not None else None
    channels = prep.channels or (
        int(shape[0]) if len(shape) == 3 else conv.in_channels if conv is not None else 3
    )
    size = prep.image_size or (tuple(int(s) for s in shape[1:]) if len(shape) == 3 else None)
    if size is None:
        raise DataSourceError(
            f"{item!r}: cannot tell the image size the models take; pass --image-size H[,W] "
            "(and --mean/--std for their normalisation)"
        )
    stats = None
    for name in datasets:
        try:
            info = dataset_info(str(name)) if name else None
        except (KeyError, ValueError):
            info = None
        if info is not None and len(info["mean"]) == channels:
            stats = (tuple(info["mean"]), tuple(info["std"]))
            break
    if stats is None and channels == 3:
        stats = (IMAGENET_MEAN, IMAGENET_STD)
    mean = prep.mean or (stats[0] if stats else None)
    std = prep.std or (stats[1] if stats else None)
    if mean is None or std is None:
        raise DataSourceError(
            f"{item!r}: the models take {channels}-channel images of unknown normalisation; "
            "pass --mean and --std (one value per channel)"
        )
    torchvision = (reference or "").startswith("torchvision:") or type(model).__module__.startswith(
        "torchvision."
    )
    crop = TORCHVISION_CROP if torchvision and prep.image_size is None else 1.0
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def transform(images: list[Any]) -> Tensor:
        return torch.stack([(_resize_crop(i, size, crop) - m) / s for i in images])

    return transform, _mode(channels, item)


def _resize_crop(image: Any, size: tuple[int, ...], crop: float) -> Tensor:
    """Scale so the image covers ``size / crop`` (antialiased bilinear), centre-crop
    ``size``; [0, 1] pixels as a (C, H, W) tensor."""
    import numpy as np
    from PIL import Image

    h, w = size
    scale = max(h / image.height, w / image.width) / crop
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    image = image.crop((left, top, left + w, top + h))
    pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0)
    return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


# --------------------------------------------------------------------------------------
# text:FILE
# --------------------------------------------------------------------------------------


def _text_source(
    item: str,
    file: Path,
    reference: str | None,
    prep: Preprocessing,
    samples: int,
    seed: int,
    model: nn.Module | None,
) -> tuple[Tensor, Tensor]:
    if _modality(model) == "images":
        raise DataSourceError(
            f"{item!r} gives token ids but the models take images; give images with imagefolder:DIR"
        )
    if not file.is_file():
        raise DataSourceError(f"{item!r}: {file} does not exist (or is not a file)")
    tokenizer = _tokenizer(item, reference)
    texts, labels = _read_lines(item, file)
    keep = _draw(len(texts), samples, seed)
    texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataSourceError(
                f"{item!r}: the tokenizer of {reference} has neither a pad nor an eos token "
                "to pad lines to --max-length with; add a pad token to it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    x = tokenizer(texts, padding="max_length", truncation=True, max_length=prep.max_length,
                  return_tensors="pt")["input_ids"].long()  # fmt: skip
    _check_vocabulary(item, model, x, prep.max_length, reference)
    y = torch.tensor(labels, dtype=torch.long)
    _check_fits(model, x, y, item, "token ids")
    return x, y


def _tokenizer(item: str, reference: str | None) -> Any:
    no_tokenizer = (
        f"no tokenizer: {item.strip()} needs the first model to be an hf:DIRECTORY with "
        "tokenizer files"
    )
    source = _hf_source(reference)
    if source is None:
        raise DataSourceError(f"{no_tokenizer} (it is {reference or 'not given'})")
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise DataSourceError(
            f"{no_tokenizer}; {source} has none of {', '.join(TOKENIZER_FILES[:4])}... "
            "(save the tokenizer there with tokenizer.save_pretrained)"
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (ImportError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DataSourceError(
            f"{no_tokenizer}; loading the one in {source} failed: {exc}"
        ) from None


def _read_lines(item: str, file: Path) -> tuple[list[str], list[int]]:
    """Non-blank lines, and their labels (``LABEL<TAB>text``; 0 for unlabelled lines)."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"{item!r}: cannot read {file} as UTF-8 text: {exc}") from None
    texts, labels = [], []
    for line in lines:
        if not line.strip():
            continue
        match = _LABELLED.fullmatch(line)
        label, text = (int(match[1]), match[2]) if match else (0, line)
        if label < 0:
            raise DataSourceError(f"{item!r}: labels must be >= 0, got {label} in {line!r}")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataSourceError(f"{item!r}: {file} holds no non-blank lines")
    return texts, labels


def _check_vocabulary(
    item: str, model: nn.Module | None, x: Tensor, length: int, reference: str | None
) -> None:
    """Ids within the model's vocabulary and the length within its positions."""
    config = getattr(getattr(model, "model", model), "config", None)
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise DataSourceError(
            f"{item!r}: --max-length {length} is more than the {positions} positions the "
            f"models take; pass --max-length {positions} or less"
        )
    vocab = getattr(text, "vocab_size", None)
    if isinstance(vocab, int) and int(x.max()) >= vocab:
        raise DataSourceError(
            f"{item!r}: the tokenizer of {reference} makes ids up to {int(x.max())} but the "
            f"models' vocabulary has {vocab}; the directory's tokenizer is not its model's"
        )
