"""Checkpoint files: safetensors weights plus the metadata needed to rebuild the model.

Format (``format_version`` 2)
-----------------------------
``<path>`` is a plain safetensors file holding the model's ``state_dict`` (contiguous CPU
tensors). Its header metadata has one key, ``"symmerge"``, whose value is a JSON document::

    {"format": "symmerge.checkpoint", "format_version": 1,
     "config": {"arch": ..., "kwargs": {...},         # the source architecture
                "resize": {"widths": {group: n}, "blocks": {group: k}, "num_outputs": c},
                "block_sparse": {layer: {"rows": [runs, ...], "cols": [runs, ...]}}},
     "aliases": {"tied.name": "kept.name", ...},      # tied tensors stored once
     "metadata": {"dataset": ..., "seed": ..., ..., "symmerge_version": ..., "date": ...}}

``arch`` is a zoo architecture (:func:`symmerge.models.build_model`), ``timm:NAME``
(``timm.create_model(NAME, **kwargs)``), ``torchvision:NAME``
(``torchvision.models.get_model(NAME, weights=None, **kwargs)``, less an ``input_shape``
kwarg), ``hf:CLASS`` (a Hugging Face ``transformers.CLASS`` built from the config dict in
``kwargs["config"]``, called on its main input: :func:`symmerge.resolve.hf_from_config`) or
``module:package.module:factory`` (the user's own architecture: ``factory(**kwargs)``; a
resized one also needs ``input_shape`` in the kwargs or as an attribute of the model).
``resize`` is present for a model whose widths differ from that architecture's (a zip,
partial merge, side-by-side ensemble, per-task heads): the source is built, traced and
resized (:func:`symmerge.resize.resize`) before the weights are loaded.
Version 1 (no ``resize``) is read unchanged.

``block_sparse`` is present when the model holds block-sparse layers
(:mod:`symmerge.blocksparse`): per layer name, its row classes in block order, each as output
rows and input channels written as comma-separated half-open runs (``"0:64,70"``). On load the
(resized) architecture is built, those layers are rewritten with that structure, and then the
weights are loaded. Files without the key load as before.

The header copy is authoritative, so a checkpoint is one self-contained file that any
safetensors reader can open. For people (and ``jq``) a pretty-printed copy of the same
document is also written beside it as ``<path>.json``; it is only read back when the
header has no symmerge entry (for example if a tool rewrote the file without metadata).

Users can also bring their own checkpoints: a state dict (safetensors or a weights-only
``.pth``) read by :func:`load_state_dict_file` once a model reference names its architecture
(:mod:`symmerge.resolve`), or a whole ``nn.Module`` saved with ``torch.save``, which
:func:`load_checkpoint` unpickles only when asked (``trust_pickle=True``: unpickling runs code
from the file).
"""

from __future__ import annotations

import datetime as _dt
import json
import pickle
import platform
import re
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_NAME = "symmerge.checkpoint"
FORMAT_VERSION = 2
HEADER_KEY = "symmerge"

__all__ = [
    "CheckpointError",
    "build_architecture",
    "FORMAT_VERSION",
    "load_checkpoint",
    "load_state",
    "load_state_dict_file",
    "REFERENCE_FORMS",
    "read_checkpoint_metadata",
    "save_checkpoint",
    "sidecar_path",
]


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (bad metadata, mismatched weights...)."""


#: The model references that name an architecture for a bare state dict (error messages).
REFERENCE_FORMS = (
    "timm:NAME=FILE, torchvision:NAME=FILE, module:package.module:factory=FILE "
    "(or hf:DIRECTORY for a save_pretrained directory)"
)


def sidecar_path(path: str | Path) -> Path:
    """Path of the human-readable JSON copy of a checkpoint's metadata (``<path>.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# --------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------


def _tensors_for_saving(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Make a state dict safetensors can store.

    safetensors refuses tensors that share memory, but tied weights (an embedding reused as
    the output layer, say) appear under several names pointing at one tensor. Exact
    duplicates are stored once and recorded as aliases so loading can restore every name;
    tensors that only partly overlap (views of a bigger buffer) are copied.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    exact: dict[tuple, str] = {}
    seen_storage: set[tuple[str, int]] = set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "only tensor state can be stored in a safetensors checkpoint"
            )
        t = value.detach()
        if t.numel() > 0:
            storage = (str(t.device), t.untyped_storage().data_ptr())
            key = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in exact:
                aliases[name] = exact[key]
                continue
            exact[key] = name
            shares = storage in seen_storage
            seen_storage.add(storage)
        else:
            shares = False
        t = t.to("cpu").contiguous()
        if shares:  # overlaps a tensor stored earlier: store an independent copy
            t = t.clone()
        tensors[name] = t
    return tensors, aliases


def _json_document(config: Mapping[str, Any], metadata: Mapping[str, Any], aliases: dict) -> str:
    """Validate and serialise the metadata document; errors name the offending field."""
    if not isinstance(config, Mapping) or "arch" not in config:
        raise ValueError("config must be a dict with at least an 'arch' key (and 'kwargs')")
    records = {k: dict(config[k]) for k in ("resize", "block_sparse") if config.get(k)}
    config = {"arch": str(config["arch"]), "kwargs": dict(config.get("kwargs") or {}), **records}
    meta = {k: v for k, v in dict(metadata).items() if k != "config"}
    meta.setdefault("symmerge_version", _package_version())
    meta.setdefault("torch_version", torch.__version__)
    meta.setdefault("python_version", platform.python_version())
    meta.setdefault("date", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config,
        "aliases": aliases,
        "metadata": meta,
    }
    for section in ("config", "metadata"):
        for key, value in doc[section].items():
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"checkpoint {section} field {key!r} is not JSON-serialisable: {exc}"
                ) from exc
    return json.dumps(doc, sort_keys=True)


def _package_version() -> str:
    try:
        from symmerge import __version__
    except Exception:  # pragma: no cover - only if the package itself is broken
        return "unknown"
    return __version__


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write ``model``'s weights and metadata to ``path`` (safetensors) and ``<path>.json``.

    ``config`` is the ``{"arch", "kwargs"}`` dict from :func:`symmerge.models.create_model`;
    ``metadata`` is free-form JSON-serialisable information (dataset, classes, seed, epochs,
    test accuracy, ...). Package/torch versions and the date are added when absent.
    Existing files are never replaced silently: pass ``overwrite=True`` to do so.
    ``dtype`` (e.g. ``"bfloat16"``, the inputs' own) stores the floating tensors in that
    dtype; loading casts them back to the model's. Returns the path written.
    """
    path = Path(path)
    side = sidecar_path(path)
    if not overwrite:
        existing = [str(p) for p in (path, side) if p.exists()]
        if existing:
            raise FileExistsError(
                f"refusing to overwrite existing checkpoint file(s): {', '.join(existing)} "
                "(pass overwrite=True, or --overwrite on the command line)"
            )
    from symmerge.blocksparse import block_record
    from symmerge.resize import RECORD

    record = getattr(model, RECORD, None)  # set on a resized model: how to rebuild it
    config = {k: v for k, v in config.items() if k not in ("resize", "block_sparse")}
    if record:
        config["resize"] = record
    config["block_sparse"] = block_record(model)  # {} (dropped) unless it has such layers
    tensors, aliases = _tensors_for_saving(model.state_dict())
    if dtype is not None:
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        tensors = {k: v.to(dt) if v.is_floating_point() else v for k, v in tensors.items()}
    document = _json_document(config, metadata or {}, aliases)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write to temporary names first so an interrupted save never leaves a half file
    tmp = path.with_name(path.name + ".tmp")
    tmp_side = side.with_name(side.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: document})
        tmp_side.write_text(json.dumps(json.loads(document), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        tmp_side.replace(side)
    finally:
        for p in (tmp, tmp_side):
            if p.exists():
                p.unlink()
    return path


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    """Sniff the file: safetensors = u64 header length followed by a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def _parse_document(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"invalid symmerge metadata JSON in {where}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where} does not contain a symmerge checkpoint document")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has checkpoint format_version {version!r}; this symmerge "
            f"({_package_version()}) reads up to {FORMAT_VERSION}. Upgrade symmerge."
        )
    config = doc.get("config")
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("arch"), str)
        or not isinstance(config.get("kwargs", {}), dict)
    ):
        raise CheckpointError(f"{where}: 'config' must be {{'arch': str, 'kwargs': dict}}")
    if not isinstance(doc.get("metadata", {}), dict) or not isinstance(
        doc.get("aliases", {}), dict
    ):
        raise CheckpointError(f"{where}: 'metadata' and 'aliases' must be JSON objects")
    return doc


def _read_document(path: Path) -> dict[str, Any]:
    """The metadata document of a symmerge safetensors checkpoint (header, else sidecar)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if HEADER_KEY in header:
        return _parse_document(header[HEADER_KEY], f"the header of {path}")
    side = sidecar_path(path)
    if side.exists():
        return _parse_document(side.read_text(), str(side))
    raise CheckpointError(
        f"{path} has no symmerge metadata (no '{HEADER_KEY}' header entry and no {side.name}); "
        "the architecture cannot be rebuilt. If it holds a plain state dict, name its "
        f"architecture with a model reference: {REFERENCE_FORMS}; or save with "
        "symmerge.io.save_checkpoint."
    )


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """``model.load_state_dict(state)``, with the model's own state-dict format versions when
    ``state`` records none: safetensors files and dicts built tensor by tensor record none, and
    a module that checks its version on load (torchvision's MNASNet) refuses them. The
    versions come from the modules themselves (no state dict is built: STE reloads per step)."""
    if getattr(state, "_metadata", None) is None:
        state = OrderedDict(state)
        state._metadata = {  # type: ignore[attr-defined]
            name: {"version": mod._version}
            for name, mod in model.named_modules(remove_duplicate=False)
        }
    model.load_state_dict(state, strict=strict)


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of a checkpoint without loading weights; ``{}`` for a torch.save'd module.

    The result is the training metadata plus ``"config"`` (the ``{"arch", "kwargs"}`` dict).
    """
    path = _existing(path)
    if not _is_safetensors(path):
        return {}
    doc = _read_document(path)
    return {**doc.get("metadata", {}), "config": doc["config"]}


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path is a directory, not a file: {path}")
    return path


def _check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Compare before loading so a mismatch reads as a list of differences, not a traceback."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise CheckpointError(
            f"weights in {path} do not match the architecture in its metadata; " + "; ".join(parts)
        )


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", *, trust_pickle: bool = False
) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint; returns ``(model in eval mode, metadata)``.

    For a symmerge safetensors checkpoint the model is rebuilt with
    :func:`symmerge.models.build_model` from the stored config and weights are loaded
    strictly; metadata is the training metadata plus ``"config"``.

    A file that is not safetensors may be a user's own ``torch.save(model, path)`` of a whole
    ``nn.Module`` (``.pt``/``.pth``), returned with metadata ``{}``. Unpickling such a file
    runs code from it, so it is loaded only with ``trust_pickle=True`` (``--trust-pickle``);
    without it, and for a bare state dict (no architecture), a :class:`CheckpointError` says
    what to do instead. Everything else goes through ``torch.load(weights_only=True)``.
    """
    path = _existing(path)
    device = torch.device(device)
    if not _is_safetensors(path):
        return _load_pickled_module(path, device, trust_pickle), {}

    doc = _read_document(path)
    config = doc["config"]
    model = build_architecture(config, path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read tensors from {path}: {exc}") from exc
    for alias, target in doc.get("aliases", {}).items():
        if target not in state:
            raise CheckpointError(f"{path}: tied tensor {alias!r} refers to missing {target!r}")
        state[alias] = state[target]
    _check_state_dict(model, state, path)
    load_state(model, state)
    model.to(device).eval()
    return model, {**doc.get("metadata", {}), "config": config}


def build_architecture(config: Mapping[str, Any], where: str | Path = "config") -> nn.Module:
    """The model a checkpoint config describes, with random weights: the source architecture,
    resized when the config records new widths."""
    arch, kwargs = config["arch"], dict(config.get("kwargs") or {})
    try:
        if arch.startswith("timm:"):
            try:
                import timm
            except ImportError as exc:
                raise CheckpointError(
                    f"{where} holds a timm model ({arch}); rebuilding it needs timm, which is "
                    "not installed here (pip install timm)"
                ) from exc
            model = timm.create_model(arch[5:], pretrained=False, **kwargs)
            if not hasattr(model, "input_shape"):
                model.input_shape = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        elif arch.startswith("torchvision:"):
            model = _torchvision_model(arch, kwargs, where)
        elif arch.startswith("hf:"):
            from symmerge.resolve import hf_from_config  # deferred: transformers is optional

            model = hf_from_config(arch[3:], kwargs.get("config") or {})
        elif arch.startswith("module:"):
            model = _user_module(arch, kwargs, where)
        else:
            from symmerge import models  # deferred: pulls in optional heavy dependencies

            model = models.build_model(arch, **kwargs)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"cannot rebuild architecture {arch!r} from {where}: {exc}") from exc
    resize = config.get("resize")
    if resize:
        model = _resized(model, resize, where)
    return _block_sparse(model, config.get("block_sparse"), where)


def _torchvision_model(arch: str, kwargs: dict[str, Any], where: str | Path) -> nn.Module:
    """``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``
    (and ``weights_backbone=None`` where the builder takes one); an ``input_shape`` kwarg
    (default 3x224x224) is kept on the model for tracing."""
    try:
        import torchvision
    except ImportError as exc:
        raise CheckpointError(
            f"{where} holds a torchvision model ({arch}); rebuilding it needs torchvision, "
            "which is not installed here (pip install torchvision)"
        ) from exc
    import inspect

    shape = tuple(kwargs.pop("input_shape", (3, 224, 224)))
    name = arch[len("torchvision:") :]
    # segmentation, detection and video builders default to a pretrained backbone: downloaded
    # (or failing offline) only to be overwritten by the checkpoint's weights
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs.setdefault("weights_backbone", None)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    model.input_shape = shape
    return model


def _user_module(arch: str, kwargs: dict[str, Any], where: str | Path) -> nn.Module:
    """``module:package.module:factory``: the user's own architecture, built by calling the
    factory (a class or function) with the recorded kwargs."""
    import importlib

    path, _, factory = arch[len("module:") :].partition(":")
    if not path or not factory:
        raise CheckpointError(f"{where}: {arch!r} must read 'module:package.module:factory'")
    try:
        fn = getattr(importlib.import_module(path), factory)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(
            f"{where} holds a model built by {path}.{factory}, which cannot be imported here "
            f"({exc}); install or put on PYTHONPATH the package that defines it"
        ) from exc
    model = fn(**kwargs)
    if "input_shape" in kwargs and not hasattr(model, "input_shape"):
        model.input_shape = tuple(kwargs["input_shape"])
    return model


def _resized(model: nn.Module, record: Mapping[str, Any], where: str | Path) -> nn.Module:
    from symmerge.resize import ResizeError, resize
    from symmerge.spec import trace

    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise CheckpointError(f"{where}: a resized model needs its source's input_shape")
    inputs = (torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)),)
    try:
        spec = trace(model.eval(), inputs)
        num_outputs = record.get("num_outputs")
        return resize(
            model, spec, {k: int(v) for k, v in (record.get("widths") or {}).items()},
            blocks={k: int(v) for k, v in (record.get("blocks") or {}).items()},
            num_outputs=None if num_outputs is None else int(num_outputs),
            example_inputs=inputs,
        )  # fmt: skip
    except (ResizeError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot rebuild the resized model of {where}: {exc}") from exc


def _block_sparse(model: nn.Module, record: Any, where: str | Path) -> nn.Module:
    """Rewrite the layers a ``block_sparse`` record names with its block structure."""
    if not record:
        return model
    from symmerge.blocksparse import apply_block_record

    if not isinstance(record, Mapping):
        raise CheckpointError(f"{where}: 'block_sparse' must map layer names to row classes")
    try:
        return apply_block_record(model, record)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot rebuild the block-sparse layers of {where}: {exc}") from exc


def _load_pickled_module(path: Path, device: torch.device, trust_pickle: bool) -> nn.Module:
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.to(device).eval()
    if isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__} (a state_dict?), not a whole model, and a "
            "state_dict does not say which architecture to build: name it with a model "
            f"reference, {REFERENCE_FORMS}."
        )
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected an nn.Module")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` on the CPU: weights-only first; full unpickling only when trusted,
    since it runs code from the file."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise CheckpointError(_pickle_refusal(path, exc)) from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} is neither a safetensors checkpoint nor a torch.save'd file: {exc}"
        ) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot unpickle {path}: {exc}") from exc


def _pickle_refusal(path: Path, exc: Exception) -> str:
    """Why a file that needs full unpickling is refused, and the two ways forward."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" (it needs {found.group(1)})" if found else ""
    return (
        f"{path} holds pickled Python objects{what}, probably a whole nn.Module saved with "
        "torch.save. Unpickling runs code from the file, so symmerge does not do it unasked: "
        "pass --trust-pickle (trust_pickle=True in Python) if you trust where the file comes "
        "from, or save model.state_dict() instead and name its architecture with a model "
        f"reference: {REFERENCE_FORMS}."
    )


#: Keys under which training scripts commonly nest the state dict in a saved dict.
_NESTED_STATE = ("state_dict", "model", "model_state_dict")


def load_state_dict_file(
    path: str | Path, *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file, for an architecture named elsewhere.

    safetensors (a symmerge checkpoint's tied-tensor aliases are restored) or a ``.pt``/
    ``.pth`` read with ``weights_only=True``; a dict nesting the state dict under
    ``state_dict``/``model``/``model_state_dict`` is unwrapped. A file that needs full
    unpickling (a whole module, a dict holding Python objects) is refused unless
    ``trust_pickle``; a whole module then gives its ``state_dict()``.
    """
    path = _existing(path)
    if _is_safetensors(path):
        try:
            state = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
        except Exception as exc:
            raise CheckpointError(f"cannot read tensors from {path}: {exc}") from exc
        if HEADER_KEY in header:
            doc = _parse_document(header[HEADER_KEY], f"the header of {path}")
            state.update({a: state[t] for a, t in doc.get("aliases", {}).items() if t in state})
        return state
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        obj = next((obj[k] for k in _NESTED_STATE if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping) or not _all_tensors(obj):
        kind = type(obj).__name__
        if isinstance(obj, Mapping):
            kind += f" with keys {', '.join(map(str, list(obj)[:5]))}"
        raise CheckpointError(f"{path} holds a {kind}, not a state dict (tensor names -> tensors)")
    return dict(obj)


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
