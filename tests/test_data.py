"""Datasets: readers on synthetic files, the real local copies when SYMMERGE_DATA is set, splits."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from symmerge import data as D

REAL_ROOT = os.environ.get("SYMMERGE_DATA")
needs_real = pytest.mark.skipif(
    not REAL_ROOT, reason="SYMMERGE_DATA is not set: no local MNIST/CIFAR-10 copy to test against"
)


@pytest.fixture(autouse=True)
def _no_network_no_global_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network, and synthetic roots cache inside tmp_path."""
    monkeypatch.delenv("SYMMERGE_CACHE", raising=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# --------------------------------------------------------------------------- synthetic files


def _write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(root: Path, folder: str = "MNIST", n: int = 7, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


def test_read_idx_gz_and_plain(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    _write_idx(tmp_path / "b", arr, gz=False)
    for p in ("a.gz", "b"):
        got = D.read_idx(tmp_path / p)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, arr)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78" + bytes(8))
    with pytest.raises(ValueError, match="bad IDX magic"):
        D.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", arr, gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        D.read_idx(tmp_path / "short")


def test_synthetic_mnist_load_cache_and_invalidation(tmp_path: Path) -> None:
    truth = _fake_mnist(tmp_path)
    images, labels = D.load_arrays("MNIST", "train", root=tmp_path)
    assert images.shape == (7, 1, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (7,) and labels.dtype == np.int64
    np.testing.assert_array_equal(images[:, 0], truth["train"][0])
    np.testing.assert_array_equal(labels, truth["train"][1])

    # The decoded arrays are cached under the (writable) root and reused.
    cache = tmp_path / ".symmerge_cache"
    assert D.cache_dir(tmp_path) == cache
    assert (cache / "mnist-train-images.npy").is_file()
    again = D.load_arrays("mnist", "train", root=tmp_path)
    np.testing.assert_array_equal(again[0], images)

    # Replacing a source file invalidates the cache.
    new_labels = (truth["train"][1] + 1) % 10
    lab = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    _write_idx(lab, new_labels)
    os.utime(lab, ns=(1_000_000_000, 1_000_000_000))
    np.testing.assert_array_equal(D.load_arrays("mnist", "train", root=tmp_path)[1], new_labels)

    test_images, _ = D.load_arrays("mnist", "test", root=tmp_path)
    np.testing.assert_array_equal(test_images[:, 0], truth["test"][0])


def test_fashion_mnist_aliases_and_env_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = _fake_mnist(tmp_path, folder="FashionMNIST", n=3, seed=1)
    monkeypatch.setenv("SYMMERGE_DATA", str(tmp_path))
    for alias in ("fashion-mnist", "FashionMNIST", "fmnist", "fashion_mnist"):
        _, labels = D.load_arrays(alias, "test")
        np.testing.assert_array_equal(labels, truth["test"][1])


def test_read_only_root_caches_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ro"
    _fake_mnist(root, n=2)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root.chmod(0o555)
    try:
        cdir = D.cache_dir(root)
        assert cdir is not None and root not in cdir.parents
        assert str(cdir).startswith(str(tmp_path / "home"))
        D.load_arrays("mnist", "train", root=root)
        assert not (root / ".symmerge_cache").exists()
        assert (cdir / "mnist-train-images.npy").is_file()
    finally:
        root.chmod(0o755)


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def test_cifar_python_tarball_and_folder(tmp_path: Path) -> None:
    batches = {f"data_batch_{i}": _cifar_batch(4, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, 9)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if name == "test_batch" else 4))
    expected_train = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])

    images, labels = D.load_arrays("cifar-10", "train", root=tmp_path)
    assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images.reshape(20, -1), expected_train)
    assert labels.dtype == np.int64 and labels.tolist() == sum(
        (batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), []
    )

    # Same content straight from the official tarball layout.
    other = tmp_path / "tar_root"
    other.mkdir()
    with tarfile.open(other / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    t_images, t_labels = D.load_arrays("cifar10", "test", root=other)
    assert t_images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(t_labels, batches["test_batch"][b"labels"])


def test_cifar_unpickler_refuses_arbitrary_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        D.load_arrays("cifar10", "train", root=tmp_path)


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_cifar_image_tree_folder_and_tarball(tmp_path: Path) -> None:
    tree = tmp_path / "cifar10-jpeg"
    colors = {}
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("bird", "airplane")):  # folder order != label order on purpose
            for k in range(n):
                color = (10 * k, 100 + c, 7 if split == "train" else 8)
                colors[(split, cls, k)] = color
                path = tree / split / cls / f"{k:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_png(color))

    images, labels = D.load_arrays("cifar10", "train", root=tmp_path)
    # Labels follow sorted class names (airplane=0, bird=1), interleaved by file number.
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert images.shape == (6, 3, 32, 32)
    assert tuple(images[3, :, 5, 5]) == colors[("train", "bird", 1)]
    # Decoding one split cached the other as well.
    assert (tmp_path / ".symmerge_cache" / "cifar10-test-images.npy").is_file()
    t_images, t_labels = D.load_arrays("cifar10", "test", root=tmp_path)
    assert t_labels.tolist() == [0, 1, 0, 1]
    assert tuple(t_images[0, :, 0, 0]) == colors[("test", "airplane", 0)]

    tar_root = tmp_path / "tar_root"
    tar_root.mkdir()
    with tarfile.open(tar_root / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="cifar10-jpeg")
    tar_images, tar_labels = D.load_arrays("cifar10", "train", root=tar_root)
    np.testing.assert_array_equal(tar_images, images)
    np.testing.assert_array_equal(tar_labels, labels)


def test_missing_data_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError) as err:
        D.load_arrays("mnist", "train", root=tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg
    assert "SYMMERGE_DATA" in msg and "--data-root" in msg
    assert "Download disabled" in msg

    # With downloads on (and the network refused by the fixture) the reason is reported.
    monkeypatch.delenv("SYMMERGE_NO_DOWNLOAD", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        D.load_arrays("cifar10", "test", root=tmp_path)
    msg = str(err.value)
    assert "Download failed" in msg and "cifar-10-python.tar.gz" in msg
    assert "network disabled in tests" in msg
    assert str(tmp_path / "cifar10-jpeg.tar.gz") in msg
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()

    monkeypatch.setenv("SYMMERGE_NO_DOWNLOAD", "1")
    with pytest.raises(FileNotFoundError, match="Download disabled"):
        D.load_arrays("fmnist", "test", root=tmp_path)


def test_download_writes_into_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "mirror"
    truth = _fake_mnist(src, n=4)
    seen = []

    def fake_urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        seen.append(url)
        return io.BytesIO((src / "MNIST" / "raw" / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "root"
    images, labels = D.load_arrays("mnist", "test", root=root, download=True)
    np.testing.assert_array_equal(labels, truth["test"][1])
    assert (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()
    assert len(seen) == 2 and all(u.startswith("http") for u in seen)


def test_data_root_and_info(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SYMMERGE_DATA", str(tmp_path / "env"))
    assert D.data_root() == tmp_path / "env"
    assert D.data_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("SYMMERGE_DATA")
    assert D.data_root() == Path("~/.cache/symmerge/data").expanduser()

    info = D.dataset_info("CIFAR-10")
    assert info["num_classes"] == 10 and info["input_shape"] == (3, 32, 32)
    assert len(info["mean"]) == len(info["std"]) == 3 and info["classes"][0] == "airplane"
    assert D.dataset_info("fmnist")["classes"][-1] == "Ankle boot"
    assert D.dataset_info("mnist")["input_shape"] == (1, 28, 28)
    with pytest.raises(ValueError, match="unknown dataset"):
        D.dataset_info("imagenet")
    with pytest.raises(ValueError, match="split"):
        D.load_arrays("mnist", "val", root=tmp_path)


def test_get_dataset_normalises_and_filters_classes(tmp_path: Path) -> None:
    truth = _fake_mnist(tmp_path, n=50)
    ds = D.get_dataset("mnist", "train", root=tmp_path, classes=[3, 7])
    assert isinstance(ds, TensorDataset)
    x, y = ds.tensors
    keep = np.isin(truth["train"][1], [3, 7])
    assert len(y) == keep.sum() and set(y.tolist()) <= {3, 7}  # labels keep their values
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 28, 28)
    expected = (truth["train"][0][keep].astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- batching


def test_iterate_batches() -> None:
    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)
    ds = TensorDataset(x, y)
    batches = list(D.iterate_batches(ds, 4, shuffle=False))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(10))
    assert [len(b[1]) for b in D.iterate_batches(ds, 4, shuffle=False, drop_last=True)] == [4, 4]

    a = torch.cat([b[1] for b in D.iterate_batches(ds, 3, shuffle=True, seed=5)])
    b = torch.cat([b[1] for b in D.iterate_batches(ds, 3, shuffle=True, seed=5)])
    c = torch.cat([b[1] for b in D.iterate_batches(ds, 3, shuffle=True, seed=6)])
    assert a.tolist() == b.tolist() and sorted(a.tolist()) == list(range(10))
    assert a.tolist() != c.tolist()
    for xb, yb in D.iterate_batches(ds, 3, shuffle=True, seed=1):
        assert torch.equal(xb[:, 0].long(), yb)  # rows stay paired

    xs, ys = next(D.iterate_batches((np.ones((5, 2)), np.zeros(5)), 8, shuffle=False))
    assert isinstance(xs, torch.Tensor) and xs.shape == (5, 2) and ys.shape == (5,)
    with pytest.raises(ValueError, match="same length"):
        next(D.iterate_batches((x, y[:3]), 2, shuffle=False))


def test_random_crop_flip() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    torch.testing.assert_close(D.random_crop_flip(x, padding=0, flip=False), x)
    gen = torch.Generator().manual_seed(0)
    out = D.random_crop_flip(x, padding=2, generator=gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        crops = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        matches = [c for c in crops if torch.equal(out[i], c) or torch.equal(out[i], c.flip(2))]
        assert matches, "each output must be a (possibly flipped) crop of the padded input"


# --------------------------------------------------------------------------- splits


def _is_partition(parts: list[np.ndarray], n: int) -> bool:
    allidx = np.concatenate(parts)
    return len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_class_split() -> None:
    labels = np.array([0, 1, 2, 1, 0, 3])
    assert D.class_split(labels, [0, 1]).tolist() == [0, 1, 3, 4]
    assert D.class_split(torch.tensor(labels), [3]).tolist() == [5]
    assert D.class_split(labels, []).tolist() == []


def test_dirichlet_split() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = D.dirichlet_split(labels, 5, alpha=0.5, seed=0)
    assert len(parts) == 5 and _is_partition(parts, 1000)
    assert all(p.dtype == np.int64 for p in parts)
    again = D.dirichlet_split(labels, 5, alpha=0.5, seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
    other = D.dirichlet_split(labels, 5, alpha=0.5, seed=1)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other, strict=True))
    # Small alpha -> skewed clients; large alpha -> nearly the global class mix.
    skewed = D.dirichlet_split(labels, 4, alpha=0.05, seed=0, min_size=1)
    assert _is_partition(skewed, 1000) and min(len(p) for p in skewed) >= 1
    top = [np.bincount(labels[p], minlength=10).max() / len(p) for p in skewed]
    flat = [
        np.bincount(labels[p], minlength=10).max() / len(p)
        for p in D.dirichlet_split(labels, 4, alpha=1000.0, seed=0)
    ]
    assert np.mean(top) > 0.3 > max(flat)
    with pytest.raises(ValueError):
        D.dirichlet_split(labels, 0, alpha=1.0, seed=0)


def test_shard_split() -> None:
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    halves = D.shard_split(labels, 2, seed=0)
    assert _is_partition(halves, 300)
    assert set(labels[halves[0]]) == {0, 1, 2, 3, 4} and set(labels[halves[1]]) == {5, 6, 7, 8, 9}
    shards = D.shard_split(labels, 7, seed=3)
    assert _is_partition(shards, 300) and {len(s) for s in shards} <= {42, 43}
    again = D.shard_split(labels, 7, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(shards, again, strict=True))
    iid = D.shard_split(labels, 3, seed=0, by_class=False)
    assert _is_partition(iid, 300) and all(len(set(labels[s])) == 10 for s in iid)
    iid2 = D.shard_split(labels, 3, seed=1, by_class=False)
    assert not np.array_equal(iid[0], iid2[0])


# --------------------------------------------------------------------------- real local data


@needs_real
def test_real_mnist() -> None:
    x, y = D.load_arrays("mnist", "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    xt, yt = D.load_arrays("mnist", "test")
    assert xt.shape == (10000, 1, 28, 28)
    assert yt[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    ds = D.get_dataset("mnist", "test", classes=[0, 1])
    assert len(ds) == int(((yt == 0) | (yt == 1)).sum()) == 980 + 1135
    assert set(ds.tensors[1].tolist()) == {0, 1}
    full = D.get_dataset("mnist", "train").tensors[0]
    assert abs(full.mean().item()) < 0.01 and abs(full.std().item() - 1) < 0.01


@needs_real
def test_real_fashion_mnist() -> None:
    x, y = D.load_arrays("fashion-mnist", "train")
    assert x.shape == (60000, 1, 28, 28)
    assert np.bincount(y).tolist() == [6000] * 10
    assert len(D.load_arrays("fmnist", "test")[1]) == 10000


@needs_real
def test_real_cifar10() -> None:
    x, y = D.load_arrays("cifar10", "train")
    assert x.shape == (50000, 3, 32, 32) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [5000] * 10
    xt, yt = D.load_arrays("cifar10", "test")
    assert xt.shape == (10000, 3, 32, 32) and np.bincount(yt).tolist() == [1000] * 10
    info = D.dataset_info("cifar10")
    means = x[:5000].reshape(5000, 3, -1).mean(axis=(0, 2)) / 255
    np.testing.assert_allclose(means, info["mean"], atol=0.02)
    ds = D.get_dataset("cifar10", "test", classes=[3, 5])
    assert len(ds) == 2000 and set(ds.tensors[1].tolist()) == {3, 5}
