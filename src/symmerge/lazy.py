"""Merge checkpoints on disk tensor by tensor, in bounded memory.

mergekit's users merge large models lazily from sharded safetensors; a permutation merge can
too, since every step reads one tensor at a time: the similarity of a group sums one product
per member tensor, the permutations are index vectors, and each merged tensor depends only on
the same tensor of every model. Here

- :class:`SafetensorsState` is a read-only state dict over one safetensors file or a Hugging
  Face directory (sharded or not): the header is parsed once, each access reads that tensor's
  bytes with a plain file read (no memory map left behind in the resident set);
- :func:`write_safetensors` streams tensors into a file whose header is written first, so no
  shard is ever held whole;
- :func:`merge_pretrained` merges ``save_pretrained`` directories with ``naive`` averaging or
  Git Re-Basin ``weight`` matching: the architecture is built and traced on the ``meta``
  device (no weights), similarities are recomputed from disk at each call
  (:class:`~symmerge.similarity.WeightSimilarity` with ``cache=False``), and the merged
  tensors are written shard by shard in the inputs' dtypes (float32 arithmetic), with the
  inputs' config, shared tokenizer files and a model card (:mod:`symmerge.export`).

Peak memory is then a few of the largest tensors plus the largest group's similarity
matrices (:func:`estimate_peak_bytes`), whatever the model size.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LAZY_METHODS",
    "NotFromDisk",
    "LazyMergeResult",
    "SafetensorsState",
    "estimate_peak_bytes",
    "merge_pretrained",
    "safetensors_files",
    "write_safetensors",
]

#: Methods :func:`merge_pretrained` runs from disk (the others need the models in memory).
LAZY_METHODS = ("naive", "weight")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_NAMES = {v: k for k, v in _DTYPES.items()}
_WEIGHT_INDEX = "model.safetensors.index.json"


class NotFromDisk(ValueError):
    """The inputs are fine but cannot be merged from disk (no safetensors files, or stored
    names that differ from the model's): load the models whole instead."""


@dataclass(frozen=True)
class _Entry:
    file: Path
    key: str  # the name inside the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > path.stat().st_size - 8:
            raise ValueError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a safetensors file ({exc})") from None
    return header, 8 + n


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a safetensors file or a ``save_pretrained`` directory (the shards
    its index names, else its single ``*.safetensors``); a ValueError when there are none."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / _WEIGHT_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} unindexed"
        raise ValueError(f"{path} has {what} safetensors weight files (and no {_WEIGHT_INDEX})")
    return found


class SafetensorsState(Mapping[str, torch.Tensor]):
    """A state dict whose tensors are read from safetensors files when accessed.

    Args:
        path: a safetensors file or a ``save_pretrained`` directory.
        prefix: prepended to the files' names (a model wrapped in another module).
        aliases: extra names reading another name's tensor (weights tied in the model but
            stored once), both with the prefix.

    Iteration yields the stored tensors only (not the aliases), in file order, so a merge
    built from it writes exactly what the input stored.
    """

    def __init__(
        self, path: str | Path, *, prefix: str = "", aliases: Mapping[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.entries: dict[str, _Entry] = {}
        for file in safetensors_files(self.path):
            header, base = _read_header(file)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
                lo, hi = info["data_offsets"]
                self.entries[prefix + key] = _Entry(
                    file, key, _DTYPES[info["dtype"]], tuple(info["shape"]), base + lo, hi - lo
                )
        self.aliases = dict(aliases or {})

    def entry(self, name: str) -> _Entry:
        return self.entries[self.aliases.get(name, name)]

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            e = self.entry(name)
        except KeyError:
            raise KeyError(name) from None
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        with e.file.open("rb") as f:
            f.seek(e.start)
            if f.readinto(memoryview(buf.numpy())) != e.nbytes:
                raise ValueError(f"{e.file} is truncated (tensor {e.key})")
        return buf.view(e.dtype).reshape(e.shape)

    def __contains__(self, name: object) -> bool:
        return name in self.entries or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def write_safetensors(
    path: str | Path,
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors come one at a time, in ``layout``'s order.

    ``layout`` gives each name's dtype and shape up front, so the header goes first and each
    tensor's bytes follow as it arrives; a tensor of another name, dtype or shape than
    announced is a ValueError (the file is removed).
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    names = iter(layout)
    try:
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, t in tensors:
                want = next(names, None)
                dtype, shape = layout.get(name, (None, None))
                if name != want or t.dtype != dtype or tuple(t.shape) != tuple(shape or ()):
                    raise ValueError(
                        f"tensor {name} ({t.dtype}, {tuple(t.shape)}) does not match the "
                        f"announced layout (next: {want}, {dtype}, {shape})"
                    )
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
            if next(names, None) is not None:
                raise ValueError(f"{path}: fewer tensors than announced")
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# merging save_pretrained directories
# --------------------------------------------------------------------------------------


@dataclass
class LazyMergeResult:
    """What :func:`merge_pretrained` did: permutations of the models (index vectors), the
    matching objective, and wall time per phase."""

    output: Path
    method: str
    perms: list[dict[str, torch.Tensor]] = field(default_factory=list)
    objective: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def estimate_peak_bytes(state: SafetensorsState, group_sizes: Iterable[int]) -> int:
    """A rough peak of :func:`merge_pretrained` above the interpreter: per model, the largest
    tensor read twice (raw and float32) and once unfolded; the merged tensor; the largest
    group's similarity in float32 and float64 (and the assignment solver's copy)."""
    largest = max((e.nbytes // max(1, e.dtype.itemsize) for e in state.entries.values()), default=0)
    n = max(group_sizes, default=0)
    return 4 * largest * 7 + 8 * n * n * 3


def merge_pretrained(
    sources: Sequence[str | Path],
    output: str | Path,
    *,
    method: str = "weight",
    lam: float = 0.5,
    seed: int = 0,
    max_sweeps: int = 100,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    card: Mapping[str, Any] | None = None,
    log: Any = None,
) -> LazyMergeResult:
    """Merge Hugging Face ``save_pretrained`` directories without loading them.

    Args:
        sources: directories of one model type and size (naive: any number; weight: two).
        output: the directory to write (a ``save_pretrained`` directory that
            ``from_pretrained`` loads); it must not exist unless ``overwrite``.
        method: ``"naive"`` (weight averaging) or ``"weight"`` (Git Re-Basin weight matching
            of the second model to the first, then the average).
        lam: weight of the second model (two models); more models are averaged uniformly.
        max_sweeps: bound on weight matching's sweeps over all groups.
        max_shard_bytes: shard size of the output.
        card: extra fields for the model card (what the command line knows).
        log: a callable taking one line of progress (``print``), or None.

    Raises :class:`NotFromDisk` (before writing anything) when the directories are fine but
    cannot be read tensor by tensor; ValueError for directories that do not merge at all.
    """
    from symmerge.export import check_output_dir, finish_hf_directory
    from symmerge.groupmap import GroupMap, iter_merged_tensors
    from symmerge.solvers.coordinate import weight_matching

    say = log or (lambda line: None)
    if method not in LAZY_METHODS:
        raise ValueError(f"merge_pretrained runs {LAZY_METHODS}, not {method!r}")
    dirs = [Path(s) for s in sources]
    if len(dirs) < 2 or (method == "weight" and len(dirs) != 2):
        raise ValueError(f"{method} merges {'two' if method == 'weight' else 'two or more'} "
                         f"models, got {len(dirs)}")  # fmt: skip
    output = Path(output)
    check_output_dir(output, dirs, overwrite)
    t0 = time.perf_counter()
    spec, names = _trace_on_meta(dirs)
    try:
        states = [SafetensorsState(d, prefix="model.") for d in dirs]
    except ValueError as exc:
        raise NotFromDisk(str(exc)) from None
    _check_keys(states, names, dirs)
    ref = states[0]
    say(f"traced on the meta device: {len(spec.groups)} groups; estimated peak memory "
        f"{estimate_peak_bytes(ref, (g.size for g in spec.groups.values())) / 2**30:.2f} GiB "
        "above the interpreter")  # fmt: skip
    timings = {"trace": time.perf_counter() - t0}
    n = len(dirs)
    w = [1.0 - lam, lam] if n == 2 else [1.0 / n] * n
    result = LazyMergeResult(output, method)
    t0 = time.perf_counter()
    if method == "weight":
        res = weight_matching(spec, states[0], states[1], max_sweeps=max_sweeps, seed=seed,
                              cache=False, log=say)  # fmt: skip
        ident = spec.identity_permutations()
        maps = {g: GroupMap.permutations([ident[g], res.perms[g]], w) for g in spec.groups}
        result.perms = [ident, dict(res.perms)]
        result.objective, result.iterations = dict(res.objective), res.iterations
        say(f"weight matching: {res.iterations} sweeps")
    else:
        maps = {g: GroupMap.identity(grp.size, n, w) for g, grp in spec.groups.items()}
    timings["match"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_merged(tmp, ref, iter_merged_tensors(spec, states, maps), max_shard_bytes, say)
        finish_hf_directory(tmp, dirs, {"method": method, "lam": lam, "seed": seed,
                                        **(card or {})})  # fmt: skip
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timings["write"] = time.perf_counter() - t0
    result.timings = timings
    return result


@dataclass
class _Names:
    keys: list[str]  # the model's state-dict names (with the wrapper's "model." prefix)
    tied: dict[str, list[str]]  # a name -> every name sharing its parameter


def _trace_on_meta(dirs: Sequence[Path]) -> tuple[Any, _Names]:
    """The spec and names of the first directory's architecture (built on the meta device);
    the other directories must have the same model type and sizes."""
    from symmerge.export import hf_config_dict
    from symmerge.resolve import HFModel, _transformers, hf_example_input
    from symmerge.spec import trace

    transformers = _transformers(f"hf:{dirs[0]}")
    configs = [hf_config_dict(d) for d in dirs]
    for d, c in zip(dirs[1:], configs[1:], strict=True):
        if c != configs[0]:
            diff = sorted(k for k in set(c) | set(configs[0]) if c.get(k) != configs[0].get(k))
            raise ValueError(
                f"hf:{d} is not the same model as hf:{dirs[0]}: their configs differ in "
                f"{', '.join(diff[:6])}; only models of one type and size merge"
            )
    config = transformers.AutoConfig.from_pretrained(dirs[0], local_files_only=True)
    arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"hf:{dirs[0]}: transformers has no class {arch}")
    with torch.device("meta"):
        try:
            model = cls._from_config(config, attn_implementation="sdpa")
        except ValueError:
            model = cls._from_config(config)
    wrapped = HFModel(model.eval())
    spec = trace(wrapped, (hf_example_input(wrapped, 0).to("meta"),))
    keys = list(wrapped.state_dict(keep_vars=True))
    by_param: dict[int, list[str]] = {}
    for name, t in wrapped.state_dict(keep_vars=True).items():
        by_param.setdefault(id(t), []).append(name)
    tied = [names for names in by_param.values() if len(names) > 1]
    return spec, _Names(keys, {n: names for names in tied for n in names})


def _check_keys(states: Sequence[SafetensorsState], names: _Names, dirs: Sequence[Path]) -> None:
    """Each name of the model is stored (or tied to one that is), nothing else is stored;
    tied names then read the stored one."""
    keys = set(names.keys)
    for state, d in zip(states, dirs, strict=True):
        for k in names.keys:
            stored = [t for t in names.tied.get(k, []) if t in state.entries]
            if k not in state.entries and stored:
                state.aliases[k] = stored[0]
        missing = [k for k in names.keys if k not in state]
        unexpected = [k for k in state.entries if k not in keys]
        if missing or unexpected:
            strip = len("model.")
            parts = [f"{label}: {', '.join(k[strip:] for k in ks[:5])}" for label, ks in
                     (("missing", missing), ("unexpected", unexpected)) if ks]  # fmt: skip
            detail = "; ".join(parts)
            raise NotFromDisk(f"the names stored in hf:{d} are not the model's ({detail})")


def _write_merged(
    out: Path,
    ref: SafetensorsState,
    merged: Iterator[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    say: Any,
) -> None:
    """Shards in ``ref``'s order and dtypes, HF names (``model-0000i-of-0000n``) and index."""
    shards: list[dict[str, _Entry]] = [{}]
    size = 0
    for name, e in ref.entries.items():
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = e
        size += e.nbytes
    count = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        layout = {e.key: (e.dtype, e.shape) for e in shard.values()}

        def take(shard: dict[str, _Entry] = shard) -> Iterator[tuple[str, torch.Tensor]]:
            for _ in shard:
                name, t = next(merged)
                yield shard[name].key, t.to(shard[name].dtype)

        write_safetensors(out / file, layout, take())
        weight_map.update({e.key: file for e in shard.values()})
        say(f"wrote {file} ({sum(e.nbytes for e in shard.values()) / 2**30:.2f} GiB)")
    if count > 1:
        index = {"metadata": {"total_size": ref.nbytes()}, "weight_map": weight_map}
        (out / _WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
