"""Small-image datasets (MNIST, Fashion-MNIST, CIFAR-10) as whole in-memory tensors.

Merging experiments train many small models, so this module skips ``DataLoader`` entirely:
datasets are loaded once as uint8 arrays (cached as ``.npy`` after the first decode), turned
into normalised float tensors (optionally already on the GPU), and batched by index slicing.

Where the files are looked for (``root`` is :func:`data_root`):

* MNIST: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
* Fashion-MNIST: the same four files under ``<root>/FashionMNIST/raw/``
* CIFAR-10, first found of: ``<root>/cifar-10-batches-py/`` (the official python batches),
  ``<root>/cifar-10-python.tar.gz``, ``<root>/cifar10-jpeg/{train,test}/<class>/NNNN.jpg``,
  ``<root>/cifar10-jpeg.tar.gz`` (the same tree, tarred).

Missing files are downloaded from the usual public mirrors into ``root`` (set
``SYMMERGE_NO_DOWNLOAD=1`` or pass ``download=False`` to forbid it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import numbers
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "SPLIT_KINDS",
    "cache_dir",
    "class_split",
    "data_root",
    "dataset_info",
    "dirichlet_concentrations",
    "dirichlet_split",
    "get_dataset",
    "iterate_batches",
    "load_arrays",
    "parse_part",
    "random_crop_flip",
    "read_idx",
    "shard_split",
    "split_indices",
    "validate_split",
]

_CIFAR_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

#: Static facts per canonical dataset name. mean/std are per channel, on the [0, 1] scale.
DATASETS: dict[str, dict[str, Any]] = {
    "mnist": {
        "num_classes": 10,
        "input_shape": (1, 28, 28),
        "mean": (0.1307,),
        "std": (0.3081,),
        "classes": [str(i) for i in range(10)],
        "sizes": {"train": 60000, "test": 10000},
    },
    "fashion-mnist": {
        "num_classes": 10,
        "input_shape": (1, 28, 28),
        "mean": (0.2860,),
        "std": (0.3530,),
        "classes": _FASHION_CLASSES,
        "sizes": {"train": 60000, "test": 10000},
    },
    "cifar10": {
        "num_classes": 10,
        "input_shape": (3, 32, 32),
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "classes": _CIFAR_CLASSES,
        "sizes": {"train": 50000, "test": 10000},
    },
}

_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}

_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
_CIFAR_PY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_PY_DIR = "cifar-10-batches-py"
_CIFAR_PY_TAR = "cifar-10-python.tar.gz"
_CIFAR_JPEG_DIR = "cifar10-jpeg"
_CIFAR_JPEG_TAR = "cifar10-jpeg.tar.gz"
_CACHE_VERSION = 1


# --------------------------------------------------------------------------- names and paths


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(_ALIASES)}")
    return _ALIASES[key]


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Dataset root: ``root`` if given, else ``$SYMMERGE_DATA``, else ``~/.cache/symmerge/data``."""
    if root is None:
        root = os.environ.get("SYMMERGE_DATA") or "~/.cache/symmerge/data"
    return Path(root).expanduser()


def dataset_info(name: str) -> dict[str, Any]:
    """Static facts about a dataset (a fresh copy, safe to mutate)."""
    key = _canonical(name)
    info = DATASETS[key]
    return {
        "name": key,
        "num_classes": info["num_classes"],
        "input_shape": tuple(info["input_shape"]),
        "mean": tuple(info["mean"]),
        "std": tuple(info["std"]),
        "classes": list(info["classes"]),
        "sizes": dict(info["sizes"]),
    }


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def cache_dir(root: str | os.PathLike[str] | None = None) -> Path | None:
    """Where decoded ``.npy`` arrays for ``root`` are cached, or None if nowhere is writable.

    ``$SYMMERGE_CACHE`` wins, then ``<root>/.symmerge_cache``; a read-only root (e.g. a shared
    dataset folder) falls back to ``~/.cache/symmerge/arrays/<hash of root>`` so caches of
    different roots never mix.
    """
    r = data_root(root).resolve()
    env = os.environ.get("SYMMERGE_CACHE")
    candidates = []
    if env:
        candidates.append(Path(env).expanduser() / hashlib.sha1(str(r).encode()).hexdigest()[:12])
    candidates.append(r / ".symmerge_cache")
    digest = hashlib.sha1(str(r).encode()).hexdigest()[:12]
    candidates.append(Path("~/.cache/symmerge/arrays").expanduser() / digest)
    for c in candidates:
        if c.parent == r and not _root_writable(r):
            continue
        if _writable_dir(c):
            return c
    return None


def _root_writable(r: Path) -> bool:
    """Whether we may add a cache folder to the dataset root.

    Not when it does not exist (we would create it just to cache), and not when it has no
    write bits: root ignores permission bits, but a folder laid out read-only means "do not
    write here" (shared dataset copies).
    """
    try:
        return r.is_dir() and bool(r.stat().st_mode & 0o222) and os.access(r, os.W_OK)
    except OSError:
        return False


# --------------------------------------------------------------------------- readers


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip'd): big-endian magic, dims, then raw data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic {raw[:4].hex()}")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(dtypes[dtype_code])
    count = int(np.prod(shape))
    if len(raw) - header < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX data (shape {shape})")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves what the CIFAR python batches need (numpy arrays)."""

    _NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar"}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy") and (
            name in self._NUMPY
        ):
            if module.startswith("numpy.core") and hasattr(np, "_core"):
                # numpy 2 renamed numpy.core; go straight to the new home to avoid warnings.
                module = "numpy._core.multiarray"
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _read_cifar_batch(f: io.BufferedIOBase | Any) -> tuple[np.ndarray, np.ndarray]:
    batch = _CifarUnpickler(f, encoding="bytes").load()
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError("CIFAR batch without data/labels")
    images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(labels, dtype=np.int64)


def _cifar_batch_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _load_cifar_python(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Official python release, from the extracted folder or straight from the tarball."""
    parts = []
    if source.is_dir():
        for n in _cifar_batch_names(split):
            with open(source / n, "rb") as f:
                parts.append(_read_cifar_batch(f))
    else:
        with tarfile.open(source, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for n in _cifar_batch_names(split):
                if n not in members:
                    raise ValueError(f"{source}: no member {n}")
                fobj = tar.extractfile(members[n])
                assert fobj is not None
                parts.append(_read_cifar_batch(fobj))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _decode_images(blobs: Sequence[bytes]) -> np.ndarray:
    """Decode equally sized JPEG/PNG images to a (N, 3, H, W) uint8 array.

    Serial on purpose: for 32x32 images thread/process pools measured slower than a plain
    loop into a preallocated array (about 60 us an image).
    """
    from PIL import Image

    def one(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))

    if not blobs:
        return np.zeros((0, 3, 32, 32), dtype=np.uint8)
    first = one(blobs[0])
    out = np.empty((len(blobs), *first.shape), dtype=np.uint8)
    out[0] = first
    for i in range(1, len(blobs)):
        img = one(blobs[i])
        if img.shape != first.shape:
            raise ValueError(f"image {i} has shape {img.shape}, expected {first.shape}")
        out[i] = img
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _order_key(cls_idx: int, filename: str) -> tuple[int, str, int]:
    stem = Path(filename).stem
    return (int(stem) if stem.isdigit() else -1, stem, cls_idx)


def _assemble_jpeg(
    items: list[tuple[str, str, bytes]], where: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Items are (class folder, file name, bytes). Labels follow sorted class folder names.

    The JPEG tree has no global order, so images are interleaved by per-class file number
    (0000 of every class, then 0001, ...): any prefix of the result is class-balanced.
    """
    classes = sorted({c for c, _, _ in items})
    if not classes:
        raise ValueError(f"{where}: no images found")
    index = {c: i for i, c in enumerate(classes)}
    items.sort(key=lambda it: _order_key(index[it[0]], it[1]))
    labels = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    return _decode_images([b for _, _, b in items]), labels


_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _load_cifar_jpeg(source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits of the JPEG tree (one pass over a tarball is most of the cost)."""
    items: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    if source.is_dir():
        for split, bucket in items.items():
            split_dir = source / split
            if not split_dir.is_dir():
                continue
            for cdir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                for f in cdir.iterdir():
                    if f.suffix.lower() in _IMAGE_EXTS:
                        bucket.append((cdir.name, f.name, f.read_bytes()))
    else:
        with tarfile.open(source, "r:*") as tar:
            for m in tar:
                parts = Path(m.name).parts
                # .../<split>/<class>/<file>
                if (
                    m.isfile()
                    and len(parts) >= 3
                    and parts[-3] in items
                    and Path(parts[-1]).suffix.lower() in _IMAGE_EXTS
                ):
                    fobj = tar.extractfile(m)
                    assert fobj is not None
                    items[parts[-3]].append((parts[-2], parts[-1], fobj.read()))
    return {
        split: _assemble_jpeg(bucket, source / split if source.is_dir() else source)
        for split, bucket in items.items()
        if bucket
    }


# --------------------------------------------------------------------------- download


def _download_allowed(download: bool | None) -> bool:
    if download is not None:
        return download
    return os.environ.get("SYMMERGE_NO_DOWNLOAD", "").strip().lower() in ("", "0", "false", "no")


def _download(urls: Sequence[str], dest: Path) -> None:
    """Fetch the first URL that works into ``dest`` (atomically); raise with every error seen."""
    errors = []
    dest.parent.mkdir(parents=True, exist_ok=True)
    for url in urls:
        tmp = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
            return
        except Exception as err:  # any failure means "try the next mirror"
            errors.append(f"{url}: {err}")
            tmp.unlink(missing_ok=True)
    raise RuntimeError("; ".join(errors))


def _missing(name: str, looked: Sequence[Path], root: Path, note: str) -> FileNotFoundError:
    listing = "\n  ".join(str(p) for p in looked)
    return FileNotFoundError(
        f"{name} data not found under root {root}.\nLooked for:\n  {listing}\n{note}\n"
        "Point symmerge at a local copy with --data-root DIR or the SYMMERGE_DATA environment "
        "variable (DIR must contain e.g. MNIST/raw/*.gz, FashionMNIST/raw/*.gz, "
        f"{_CIFAR_PY_DIR}/, {_CIFAR_PY_TAR} or {_CIFAR_JPEG_TAR})."
    )


def _idx_files(root: Path, key: str, split: str) -> tuple[Path, Path] | None:
    folder = root / _IDX_FOLDERS[key] / "raw"
    prefix = _IDX_PREFIX[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        base = folder / f"{prefix}-{kind}-ubyte"
        gz = base.with_name(base.name + ".gz")
        found.append(gz if gz.is_file() else base if base.is_file() else None)
    if found[0] is None or found[1] is None:
        return None
    return found[0], found[1]


def _locate(key: str, split: str, root: Path, download: bool) -> tuple[str, list[Path]]:
    """Find (or download) the source files; returns (kind, paths)."""
    if key in _IDX_FOLDERS:
        files = _idx_files(root, key, split)
        if files is not None:
            return "idx", list(files)
        folder = root / _IDX_FOLDERS[key] / "raw"
        prefix = _IDX_PREFIX[split]
        names = [f"{prefix}-{k}-ubyte.gz" for k in ("images-idx3", "labels-idx1")]
        looked = [folder / n for n in names]
        note = "Download disabled (download=False or SYMMERGE_NO_DOWNLOAD)."
        if download:
            try:
                for n in names:
                    if not (folder / n).is_file():
                        _download([m + n for m in _IDX_MIRRORS[key]], folder / n)
                return "idx", looked
            except (RuntimeError, OSError) as err:
                note = f"Download failed: {err}"
        raise _missing(key, looked, root, note)

    candidates = [
        ("cifar-py", root / _CIFAR_PY_DIR, lambda p: (p / _cifar_batch_names(split)[0]).is_file()),
        ("cifar-py", root / _CIFAR_PY_TAR, Path.is_file),
        ("cifar-jpeg", root / _CIFAR_JPEG_DIR, lambda p: (p / split).is_dir()),
        ("cifar-jpeg", root / _CIFAR_JPEG_TAR, Path.is_file),
    ]
    for kind, path, ok in candidates:
        if ok(path):
            return kind, [path]
    looked = [p for _, p, _ in candidates]
    note = "Download disabled (download=False or SYMMERGE_NO_DOWNLOAD)."
    if download:
        try:
            _download([_CIFAR_PY_URL], root / _CIFAR_PY_TAR)
            return "cifar-py", [root / _CIFAR_PY_TAR]
        except (RuntimeError, OSError) as err:
            note = f"Download failed: {err}"
    raise _missing(key, looked, root, note)


# --------------------------------------------------------------------------- cache


def _stamp(paths: Sequence[Path]) -> list[list[Any]]:
    """Identity of the source files, so a replaced source invalidates the cache."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns if p.is_file() else 0])
    return out


def _cache_load(cdir: Path, tag: str, stamp: list[list[Any]]) -> tuple[np.ndarray, ...] | None:
    meta = cdir / f"{tag}.json"
    try:
        if json.loads(meta.read_text()) != {"version": _CACHE_VERSION, "source": stamp}:
            return None
        return np.load(cdir / f"{tag}-images.npy"), np.load(cdir / f"{tag}-labels.npy")
    except (OSError, ValueError):
        return None


def _cache_save(
    cdir: Path, tag: str, stamp: list[list[Any]], images: np.ndarray, labels: np.ndarray
) -> None:
    try:
        for suffix, arr in (("images", images), ("labels", labels)):
            tmp = cdir / f".{tag}-{suffix}.{os.getpid()}.npy"
            np.save(tmp, arr)
            os.replace(tmp, cdir / f"{tag}-{suffix}.npy")
        (cdir / f"{tag}.json").write_text(json.dumps({"version": _CACHE_VERSION, "source": stamp}))
    except OSError as err:
        warnings.warn(f"could not cache decoded arrays in {cdir}: {err}", stacklevel=3)


# --------------------------------------------------------------------------- public API


def load_arrays(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    download: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,).

    Decoded arrays are cached (see :func:`cache_dir`) so later loads take well under a second.
    ``download=None`` downloads missing files unless ``$SYMMERGE_NO_DOWNLOAD`` is set.
    """
    key = _canonical(name)
    _check_split(split)
    r = data_root(root)
    kind, paths = _locate(key, split, r, _download_allowed(download))
    stamp = _stamp(paths)
    tag = f"{key}-{split}"
    cdir = cache_dir(r)
    if cdir is not None:
        cached = _cache_load(cdir, tag, stamp)
        if cached is not None:
            return cached[0], cached[1]

    if kind == "idx":
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim == 3:
            images = images[:, None]
        images = images.astype(np.uint8, copy=False)
        labels = labels.astype(np.int64)
    elif kind == "cifar-py":
        images, labels = _load_cifar_python(paths[0], split)
    else:
        both = _load_cifar_jpeg(paths[0])
        if split not in both:
            raise ValueError(f"{paths[0]}: no {split}/<class>/*.jpg images")
        images, labels = both[split]
        other = "test" if split == "train" else "train"
        if cdir is not None and other in both:
            _cache_save(cdir, f"{key}-{other}", stamp, *both[other])
    if len(images) != len(labels):
        raise ValueError(f"{key}/{split}: {len(images)} images but {len(labels)} labels")
    images = np.ascontiguousarray(images)
    if cdir is not None:
        _cache_save(cdir, tag, stamp, images, labels)
    return images, labels


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std``, in place on one float copy."""
    x = images.to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.div_(255.0).sub_(m).div_(s)


def get_dataset(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    classes: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    download: bool | None = None,
) -> TensorDataset:
    """Normalised float32 images and int64 labels as a ``TensorDataset`` on ``device``.

    ``classes`` keeps only those labels, unchanged (so a 10-way head still fits). The uint8
    array is moved to the device before conversion, which makes GPU transfer 4x cheaper.
    """
    info = dataset_info(name)
    images, labels = load_arrays(name, split, root, download=download)
    if classes is not None:
        idx = class_split(labels, classes)
        images, labels = images[idx], labels[idx]
    x = _normalise(
        torch.from_numpy(np.ascontiguousarray(images)).to(device), info["mean"], info["std"]
    )
    y = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
    return TensorDataset(x, y)


def iterate_batches(
    dataset_or_tensors: TensorDataset | Sequence[torch.Tensor | np.ndarray],
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``(x, y)`` batches by indexing whole tensors (no DataLoader/worker overhead).

    Tensors already on ``device`` are sliced there (GPU-resident data stays on the GPU);
    others are sliced where they live and each batch is moved, so no full copy is made per
    epoch. ``shuffle`` with a ``seed`` gives the same order on every call.
    """
    if isinstance(dataset_or_tensors, TensorDataset):
        tensors = list(dataset_or_tensors.tensors)
    else:
        tensors = [
            t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in dataset_or_tensors
        ]
    if not tensors:
        raise ValueError("nothing to iterate over")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError("all tensors must have the same length")
    dev = torch.device(device)

    order: torch.Tensor | None = None
    if shuffle:
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        order = torch.randperm(n, generator=gen)
    # One copy of the order per device the tensors live on, not one transfer per batch.
    orders = {} if order is None else {t.device: order.to(t.device) for t in tensors}
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        batch = []
        for t in tensors:
            b = t[start:end] if order is None else t[orders[t.device][start:end]]
            batch.append(b.to(dev, non_blocking=True))
        yield tuple(batch)


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch, on whatever device ``x`` is on.

    Zero-pads by ``padding``, takes a random HxW crop per image and flips half the images
    horizontally. Works on normalised tensors (pads with 0 = the dataset mean).
    """
    n, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        xp = torch.nn.functional.pad(x, (padding,) * 4)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None]).view(n, 1, h, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev)[None]).view(n, 1, 1, w)
        batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
        chan = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
        x = xp[batch, chan, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x


# --------------------------------------------------------------------------- splits


def _labels_np(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    return arr


def class_split(labels: Any, classes: Sequence[int]) -> np.ndarray:
    """Indices (ascending, int64) of the samples whose label is in ``classes``."""
    arr = _labels_np(labels)
    return np.flatnonzero(np.isin(arr, np.asarray(list(classes)))).astype(np.int64)


def dirichlet_split(
    labels: Any, num_clients: int, alpha: float, seed: int, min_size: int = 0
) -> list[np.ndarray]:
    """Non-IID split: each class is divided among clients in Dirichlet(alpha) proportions.

    Small ``alpha`` gives very skewed clients, large ``alpha`` nearly IID ones. Every index
    lands in exactly one client; each client's indices are sorted. With ``min_size > 0`` the
    proportions are redrawn (seeded) until every client has at least that many samples.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be positive, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    arr = _labels_np(labels)
    rng = np.random.default_rng(seed)
    if min_size * num_clients > len(arr):
        raise ValueError(f"cannot give {num_clients} clients {min_size} samples each of {len(arr)}")
    for _ in range(1000):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(arr):
            idx = rng.permutation(np.flatnonzero(arr == c))
            props = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                buckets[k].append(part)
        clients = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(len(c) for c in clients) >= min_size:
            return clients
    raise RuntimeError(f"no Dirichlet draw gave every client >= {min_size} samples in 1000 tries")


def shard_split(labels: Any, num_shards: int, seed: int, by_class: bool = True) -> list[np.ndarray]:
    """Disjoint shards of (near) equal size covering every index.

    ``by_class=True`` sorts samples by label before cutting (shards hold one or few classes;
    2 shards of a balanced 10-class set are exactly classes 0-4 and 5-9); ``False`` cuts a
    random permutation (IID shards). The seed fixes the order of samples within a class.
    A class can straddle two shards; for shards of whole classes use
    ``split_indices(labels, "shards", n)``.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    arr = _labels_np(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(arr))
    if by_class:
        order = order[np.argsort(arr[order], kind="stable")]
    return [np.sort(s).astype(np.int64) for s in np.array_split(order, num_shards)]


# --------------------------------------------------------------------------- training regimes

#: Data regimes for training the parents of a fusion (algorithms.md §5(a) "Regimes").
SPLIT_KINDS = ("iid", "dirichlet", "shards")

#: Default Dirichlet concentrations: evenly spaced over this range, one per part.
_DIRICHLET_RANGE = (1.0, 5.0)


def validate_split(
    kind: str, n_parts: int, part: int | None = None, alpha: float | None = None
) -> None:
    """Raise ``ValueError`` naming the bad argument, so callers can check before loading data.

    ``part`` is 1-based (``1 <= part <= n_parts``), as in ``--part K/N``.
    """
    if kind not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {kind!r}; expected one of {', '.join(SPLIT_KINDS)}")
    if isinstance(n_parts, bool) or not isinstance(n_parts, int | np.integer) or n_parts < 2:
        raise ValueError(f"the number of parts N must be an integer >= 2, got {n_parts!r}")
    if part is not None and (
        isinstance(part, bool) or not isinstance(part, int | np.integer) or not 1 <= part <= n_parts
    ):
        raise ValueError(f"part K must be an integer in [1, {n_parts}] (1-based), got {part!r}")
    if alpha is not None:
        if kind != "dirichlet":
            raise ValueError(f"alpha only applies to the dirichlet split, not {kind!r}")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not (math.isfinite(alpha) and alpha > 0)
        ):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


def parse_part(spec: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``: part K (1-based) of N; raises ``ValueError`` when malformed."""
    k_text, slash, n_text = str(spec).strip().partition("/")
    try:
        if not slash:
            raise ValueError
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"part must look like K/N, e.g. 1/2 or 3/5; got {spec!r}") from None
    validate_split("iid", n, k)
    return k, n


def _concentrations(
    rng: np.random.Generator, num_classes: int, n_parts: int, alpha: float | None
) -> np.ndarray:
    if alpha is not None:
        return np.full((num_classes, n_parts), float(alpha))
    base = np.linspace(*_DIRICHLET_RANGE, n_parts)
    return rng.permuted(np.tile(base, (num_classes, 1)), axis=1)  # each row shuffled alone


def dirichlet_concentrations(
    num_classes: int, n_parts: int, *, seed: int = 0, alpha: float | None = None
) -> torch.Tensor:
    """The ``(num_classes, n_parts)`` Dirichlet concentrations ``split_indices`` uses.

    Row ``c`` is for the c-th smallest label present. By default (the paper's non-IID scheme,
    algorithms.md §5(a)) each row is ``linspace(1, 5, n_parts)`` shuffled independently, so
    every class favours different parts while the largest/smallest ratio stays 5; ``alpha``
    gives every entry that value instead. Same ``seed``, same draws as ``split_indices``.
    """
    validate_split("dirichlet", n_parts, alpha=alpha)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(_concentrations(rng, int(num_classes), n_parts, alpha))


def split_indices(
    labels: Any, kind: str, n_parts: int, *, seed: int = 0, alpha: float | None = None
) -> list[torch.Tensor]:
    """All ``n_parts`` index sets of a training-set split: disjoint, covering, each ascending.

    Computing every part from one ``seed`` is what makes parents trained on parts 1..N of
    the same split see disjoint data, so this seed must not be the training seed.

    * ``"iid"``: a seeded random permutation cut into N near-equal parts (sizes differ by at
      most one, as ``numpy.array_split``).
    * ``"dirichlet"``: per class, proportions ``p ~ Dir(a_c)`` over the N parts and the class's
      (shuffled) samples cut at ``round(cumsum(p) * n_c)``. ``a_c`` is, by default, the
      paper's ``linspace(1, 5, N)`` shuffled per class (our reading of "α evenly spaced from
      1 to 5 ... and shuffled"); with ``alpha`` every entry is ``alpha``. See
      :func:`dirichlet_concentrations`. Parts may be small or even empty for tiny data.
    * ``"shards"``: whole classes per part: the classes present are shuffled, then cut as
      evenly as possible (``numpy.array_split``), so every class is in exactly one part.
      Needs at least N classes. (Unlike :func:`shard_split`, which cuts sorted samples.)

    Returns int64 CPU tensors indexing ``labels``. Raises ``ValueError`` for an unknown
    ``kind``, ``n_parts < 2``, ``alpha <= 0`` (or ``alpha`` with a kind other than
    dirichlet), non-integer labels, or too few samples or classes.
    """
    validate_split(kind, n_parts, alpha=alpha)
    arr = _labels_np(labels)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    if len(arr) < n_parts:
        raise ValueError(f"cannot split {len(arr)} samples into {n_parts} parts")
    rng = np.random.default_rng(seed)
    classes = np.unique(arr)
    if kind == "iid":
        pieces = np.array_split(rng.permutation(len(arr)), n_parts)
    elif kind == "shards":
        if len(classes) < n_parts:
            raise ValueError(
                f"shards needs at least one class per part: {len(classes)} classes "
                f"for {n_parts} parts"
            )
        groups = np.array_split(rng.permutation(classes), n_parts)
        pieces = [np.flatnonzero(np.isin(arr, g)) for g in groups]
    else:
        conc = _concentrations(rng, len(classes), n_parts, alpha)
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for c, a in zip(classes, conc, strict=True):
            idx = rng.permutation(np.flatnonzero(arr == c))
            props = rng.dirichlet(a)
            cuts = np.rint(np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                buckets[k].append(piece)
        pieces = [np.concatenate(b) for b in buckets]
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in pieces]
