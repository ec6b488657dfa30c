"""Write a merge in the format its inputs came in.

A user who merges two ``save_pretrained`` directories expects a directory that
``AutoModel.from_pretrained`` loads, in the inputs' dtype, with their tokenizer; a user who
merges two timm or torchvision state dicts expects a state dict their library loads. Merging
runs in float32 (or wider) whatever the inputs' dtype; this module casts back on the way out.
Zoo and other inputs keep symmerge's own checkpoint (:func:`symmerge.io.save_checkpoint`),
which is itself a plain safetensors state dict.
"""

from __future__ import annotations

import datetime as _dt
import filecmp
import json
import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "check_output_dir",
    "finish_hf_directory",
    "hf_config_dict",
    "save_hf_directory",
    "stored_dtype",
]

#: Files of a save_pretrained directory that are weights (never copied to a merge).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Config fields that say nothing about the architecture (they may differ between inputs).
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache")


def check_output_dir(output: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """An output directory may replace neither an input nor, without ``overwrite``, anything."""
    out = output.resolve()
    for p in inputs:
        src = Path(p).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"output {output} overlaps the input {p}; it is never overwritten")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a directory")


def hf_config_dict(path: Path) -> dict[str, Any]:
    """A directory's config.json less the fields that do not describe the architecture."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = json.loads(file.read_text())
    return {k: v for k, v in config.items() if k not in _CONFIG_NOISE}


def stored_dtype(tensors: Mapping[str, torch.Tensor] | Sequence[torch.dtype]) -> torch.dtype:
    """The most common floating dtype of a state dict (float32 when it has none)."""
    dtypes = tensors.values() if isinstance(tensors, Mapping) else tensors
    found = Counter(d.dtype if isinstance(d, torch.Tensor) else d for d in dtypes)
    floats = [(n, d) for d, n in found.items() if d.is_floating_point]
    return max(floats, key=lambda x: x[0])[1] if floats else torch.float32


def finish_hf_directory(out: Path, sources: Sequence[Path], card: Mapping[str, Any]) -> None:
    """Copy into ``out`` the inputs' non-weight files that all of them share (tokenizer,
    generation config, processors; config.json always from the first) and write a model card."""
    first = Path(sources[0])
    skipped = []
    for file in sorted(first.iterdir()):
        name = file.name
        if (not file.is_file() or name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES
                or name == "README.md" or (out / name).exists()):  # fmt: skip
            continue
        shared = all(
            (Path(s) / name).is_file() and filecmp.cmp(file, Path(s) / name, shallow=False)
            for s in sources[1:]
        )
        if shared or name == "config.json":
            shutil.copy2(file, out / name)
        else:
            skipped.append(name)
    (out / "README.md").write_text(_model_card(sources, card, skipped))


def _model_card(sources: Sequence[Path], card: Mapping[str, Any], skipped: Sequence[str]) -> str:
    from symmerge.io import _package_version

    method = card.get("method", "?")
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [symmerge, model-merging, {method}]",
        "---",
        "",
        "# A merge made with symmerge",
        "",
        f"- method: `{method}`" + (f" ({card['paper']})" if card.get("paper") else ""),
        *(f"- {k}: `{v}`" for k, v in card.items() if k not in ("method", "paper")),
        "- sources:",
        *(f"  - `{s}`" for s in sources),
        f"- symmerge {_package_version()}, torch {torch.__version__}, "
        f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}",
    ]
    if skipped:
        lines += ["", f"Not copied (they differ between the sources): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def save_hf_directory(
    model: nn.Module,
    output: Path,
    sources: Sequence[Path],
    card: Mapping[str, Any],
    *,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Save a merged Hugging Face model (the ``transformers`` module, or symmerge's wrapper
    of it) with ``save_pretrained``, each tensor in the dtype the first source stored it in,
    then the shared files and a model card; written beside and renamed, so an interrupted
    save leaves nothing at ``output``."""
    from symmerge.lazy import SafetensorsState

    check_output_dir(output, sources, overwrite)
    hf = getattr(model, "model", model)
    try:
        stored = {k: e.dtype for k, e in SafetensorsState(sources[0]).entries.items()}
    except ValueError:  # not safetensors (pytorch_model.bin): the config's dtype
        stored = {}
    default = stored_dtype(list(stored.values())) if stored else _config_dtype(hf)
    state = {k: v.to(stored.get(k, default)) if v.is_floating_point() else v
             for k, v in hf.state_dict().items()}  # fmt: skip
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        _record_dtype(tmp / "config.json", default)  # the model was float32 while saved
        finish_hf_directory(tmp, sources, card)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _record_dtype(config: Path, dtype: torch.dtype) -> None:
    """Say ``dtype`` in a written config.json, so ``from_pretrained`` loads the model so."""
    fields = json.loads(config.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in fields or key == "dtype":
            fields[key] = name
    config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def _config_dtype(hf: nn.Module) -> torch.dtype:
    dtype = getattr(hf.config, "dtype", None) or getattr(hf.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
