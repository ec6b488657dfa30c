"""Source checkpoints trained once and reused, keyed by what they are made of.

The key hashes the recipe (the ``train_model`` arguments), the training data (the dataset's
arrays, not its name) and the code version of the training code
(:func:`symmerge.report.provenance.training_code_version`). A file whose recorded key differs
is stale: it is retrained, never served.

A folder of reference checkpoints (``$SYMMERGE_CHECKPOINTS``: files made with ``symmerge
train`` and kept because they take long to make) may stand in for training: a file whose
recorded recipe is the recipe's (model, data, classes, seed, epochs, training subset; no
split) is copied into the report's folder byte for byte and used as it is. It was made by the
training code of its own day, not today's, so the report records where it came from and its
sha256 (:attr:`Checkpoint.reference`), never a key it was not made under.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "REFERENCE_ENV",
    "Checkpoint",
    "checkpoint_key",
    "dataset_fingerprint",
    "file_sha256",
    "find_reference",
    "train_many",
    "train_or_reuse",
    "weights_sha256",
]

#: Environment variable naming a folder of reference checkpoints.
REFERENCE_ENV = "SYMMERGE_CHECKPOINTS"
#: Recipe entries a reference checkpoint's training metadata must match, beside the model
#: (``model_name``, written by ``symmerge train``, or a report checkpoint's ``recipe``).
REFERENCE_FIELDS = ("dataset", "classes", "seed", "epochs", "limit_train")

_FINGERPRINTS: dict[tuple[str, str | None], str] = {}


@dataclass
class Checkpoint:
    """A source model and what identifies it.

    Attributes:
        model: the model, loaded from ``path`` (the same file whether trained now or reused).
        metadata: the checkpoint's metadata (the training info).
        path: the file.
        key: the cache key it was made for.
        sha256: of the file.
        weights_sha256: of the tensors alone (the file also records dates and timings).
        reused: whether the file was already there (or copied from a reference).
        reference: for a reference checkpoint, where it came from (file name, sha256, date
            and package versions it was trained with); ``None`` when trained for the report.
    """

    model: nn.Module
    metadata: dict[str, Any]
    path: Path
    key: str
    sha256: str
    weights_sha256: str
    reused: bool
    reference: dict[str, Any] | None = None


def dataset_fingerprint(name: str, root: str | None) -> str:
    """sha256 of a dataset's train and test arrays (memoised per process)."""
    from symmerge.data import load_arrays

    if (name, root) not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for split in ("train", "test"):
            images, labels = load_arrays(name, split, root)
            digest.update(images.tobytes())
            digest.update(labels.tobytes())
        _FINGERPRINTS[(name, root)] = digest.hexdigest()
    return _FINGERPRINTS[(name, root)]


def checkpoint_key(recipe: dict[str, Any], data: str, code: str) -> str:
    """The cache key of a checkpoint: sha256 of its recipe, data fingerprint and code version."""
    text = json.dumps({"recipe": recipe, "data": data, "code": code}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the state dict's names, dtypes, shapes and values, in name order."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        # flat first: a 0-d tensor (BatchNorm's num_batches_tracked) has no bytes view
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_name(recipe: dict[str, Any], key: str) -> str:
    parts = [recipe["dataset"], recipe["model"]]
    if recipe.get("classes"):
        parts.append("c" + "-".join(map(str, recipe["classes"])))
    if recipe.get("split"):
        parts.append(f"{recipe['split']}{recipe['part']}of{recipe['n_parts']}")
    parts.append(f"s{recipe['seed']}")
    return "_".join(parts) + f"_{key[:12]}.safetensors"


def find_reference(recipe: dict[str, Any], folder: Path) -> Path | None:
    """The checkpoint in ``folder`` trained with ``recipe`` (``None`` if none is): its
    metadata names the same model and :data:`REFERENCE_FIELDS`. A recipe with a split never
    matches (reference metadata does not record one)."""
    from symmerge.io import read_checkpoint_metadata

    if recipe.get("split") is not None or not Path(folder).is_dir():
        return None
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            meta = read_checkpoint_metadata(path)
        except Exception:  # not a symmerge checkpoint: not a reference
            continue
        model = meta.get("model_name") or (meta.get("recipe") or {}).get("model")
        if meta.get("split") is not None or model != recipe["model"]:
            continue
        if all(meta.get(k) == recipe.get(k) for k in REFERENCE_FIELDS):
            return path
    return None


def _locate(
    recipe: dict[str, Any], folder: Path, code: str, data_root: str | None,
    references: str | Path | None,
) -> tuple[str, Path | None, Path, bool]:  # fmt: skip
    """The recipe's key, its reference checkpoint (``None`` when there is none), its file in
    ``folder``, and whether that file is to be trained (no reference, no file of the key)."""
    key = checkpoint_key(recipe, dataset_fingerprint(recipe["dataset"], data_root), code)
    references = os.environ.get(REFERENCE_ENV) if references is None else references
    source = find_reference(recipe, Path(references)) if references else None
    path = Path(folder) / (_file_name(recipe, key) if source is None else source.name)
    stale = source is None and not (path.exists() and _key_of(path) == key)
    return key, source, path, stale


def train_many(
    recipes: Sequence[dict[str, Any]],
    folder: Path,
    *,
    code: str,
    data_root: str | None,
    jobs: int,
    references: str | Path | None = None,
) -> list[str]:
    """Make the checkpoints of ``recipes`` that ``folder`` lacks (or holds stale), ``jobs`` at
    a time in separate processes, each with its share of this process's torch threads: what
    :func:`train_or_reuse` then finds, in a fraction of the wall time on a multi-core CPU.

    Returns the errors of the trainings that failed (``train_or_reuse`` meets them again
    where the report prepares their setting, and records them there)."""
    unique = list({json.dumps(r, sort_keys=True): r for r in recipes}.values())
    todo = [r for r in unique if _locate(r, folder, code, data_root, references)[3]]
    if not todo:
        return []
    import multiprocessing

    threads = max(1, torch.get_num_threads() // jobs)
    spawn = multiprocessing.get_context("spawn")  # (fork would copy torch's thread pools)
    with ProcessPoolExecutor(
        min(jobs, len(todo)),
        mp_context=spawn,
        initializer=torch.set_num_threads,
        initargs=(threads,),
    ) as pool:
        futures = [pool.submit(_train_quietly, r, Path(folder), code, data_root, references)
                   for r in todo]  # fmt: skip
        return [e for e in (f.result() for f in futures) if e is not None]


def _train_quietly(
    recipe: dict[str, Any], folder: Path, code: str, data_root: str | None,
    references: str | Path | None,
) -> str | None:  # fmt: skip
    try:
        train_or_reuse(recipe, folder, code=code, data_root=data_root, references=references)
    except Exception as exc:  # returned: a worker's exception may not pickle
        return f"{type(exc).__name__}: {exc}"
    return None


def _key_of(path: Path) -> str | None:
    from symmerge.io import read_checkpoint_metadata

    return read_checkpoint_metadata(path).get("report_key")


def train_or_reuse(
    recipe: dict[str, Any],
    folder: Path,
    *,
    code: str,
    data_root: str | None,
    references: str | Path | None = None,
) -> Checkpoint:
    """The checkpoint of ``recipe`` in ``folder``: a reference checkpoint when
    ``references`` (default ``$SYMMERGE_CHECKPOINTS``) holds one for the recipe, else the
    folder's file when its key matches, else trained on CPU (deterministic) and saved.
    ``code`` is the training code version."""
    from symmerge.io import load_checkpoint, read_checkpoint_metadata, save_checkpoint
    from symmerge.train import train_model

    key, source, path, stale = _locate(recipe, folder, code, data_root, references)
    reference = None
    if source is not None:
        sha = file_sha256(source)
        if not path.exists() or file_sha256(path) != sha:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
        meta = read_checkpoint_metadata(path)
        reference = {"file": source.name, "sha256": sha, "trained": meta.get("date"),
                     "symmerge_version": meta.get("symmerge_version"),
                     "torch_version": meta.get("torch_version")}  # fmt: skip
    reused = not stale
    if stale:
        kwargs = {k: v for k, v in recipe.items() if k not in ("model", "dataset")}
        if recipe.get("split") is None:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("part", "n_parts", "split_seed")}
        model, info = train_model(recipe["model"], recipe["dataset"], data_root=data_root,
                                  device="cpu", progress=False, **kwargs)  # fmt: skip
        info = {**info, "report_key": key, "recipe": recipe}
        save_checkpoint(path, model, info["config"], info, overwrite=True)
    model, meta = load_checkpoint(path)
    return Checkpoint(model=model, metadata=meta, path=path, key=key, sha256=file_sha256(path),
                      weights_sha256=weights_sha256(model), reused=reused,
                      reference=reference)  # fmt: skip
