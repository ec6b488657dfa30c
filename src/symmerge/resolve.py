"""Turn a model reference from the command line into a model and an example input.

One parser for every command that takes models (``merge``, ``interpolate``, ``eval``,
``check-symmetry``) and for Python. A reference is one of:

- a zoo name (``resnet20x4-ln``): random init;
- ``timm:NAME=FILE``: timm's architecture (``timm.create_model(NAME, pretrained=False)``, with
  ``num_classes`` taken from the state dict's head when it differs) plus a state dict;
  ``timm:NAME`` alone is a random init (timm is an optional dependency);
- ``torchvision:NAME=FILE``: ``torchvision.models.get_model(NAME, weights=None)`` likewise;
- ``module:package.module:factory=FILE``: the user's own architecture, ``factory()``, plus a
  state dict (``module:package.module:factory`` alone: its random init);
- ``hf:PATH``: a Hugging Face ``save_pretrained`` directory (sharded or not) or a hub id
  already in the local cache, loaded with the class its config names; when PATH is neither,
  ``hf:TYPE`` is a small random model of that model type;
- a path: a symmerge checkpoint, or a whole module pickled with ``torch.save`` (only with
  ``trust_pickle``: unpickling runs code from the file).

FILE is safetensors or a ``.pt``/``.pth`` read with ``torch.load(weights_only=True)``
(:func:`symmerge.io.load_state_dict_file`). Models loaded from a reference carry metadata
with a ``config`` (:func:`symmerge.io.build_architecture`), so a merge of them can be saved
as a symmerge checkpoint and reloaded.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symmerge.export import stored_dtype

__all__ = [
    "HF_SMALL",
    "LoadedModel",
    "Reference",
    "ResolvedModel",
    "example_input",
    "hf_from_config",
    "hf_small_config",
    "load_model",
    "parse_reference",
    "reference_files",
    "resolve_model",
]

#: Reference kinds written ``KIND:NAME[=FILE]`` (an architecture, optionally with weights).
ARCH_KINDS = ("timm", "torchvision", "module")

#: The accepted forms, for error messages.
FORMS = (
    "a checkpoint path, a zoo name, timm:NAME[=FILE], torchvision:NAME[=FILE], "
    "module:package.module:factory[=FILE] or hf:DIRECTORY (hf:TYPE: a small random model)"
)


@dataclass(frozen=True)
class Reference:
    """A parsed model reference: ``kind`` is timm, torchvision, module, hf, path or zoo."""

    kind: str
    name: str
    file: Path | None = None


@dataclass
class LoadedModel:
    model: nn.Module
    metadata: dict[str, Any]  # a checkpoint's metadata; "config" when it can be rebuilt
    description: str
    files: tuple[Path, ...] = ()  # what the reference reads (an output must not replace it)


@dataclass
class ResolvedModel:
    model: nn.Module
    example_inputs: tuple[Any, ...]
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()


def parse_reference(ref: str) -> Reference:
    """Split ``ref`` into its kind, name and weights file; a malformed one is a ValueError.

    ``KIND:NAME=FILE`` splits at the first ``=`` (names never contain one); ``hf:`` keeps
    the rest whole. A string without a known prefix is a path when such a file exists, else
    a zoo name.
    """
    kind, sep, rest = ref.partition(":")
    if sep and kind in ARCH_KINDS:
        name, eq, file = rest.partition("=")
        form = "module:package.module:factory" if kind == "module" else f"{kind}:NAME"
        bad = not name or bool(eq and not file)
        if kind == "module":
            module, _, factory = name.partition(":")
            bad = bad or not module or not factory or ":" in factory
        if bad:
            raise ValueError(f"model reference {ref!r} must read {form}=FILE (or {form})")
        return Reference(kind, name, Path(file).expanduser() if eq else None)
    if sep and kind == "hf":
        if not rest:
            raise ValueError("model reference 'hf:' needs a directory or model type: hf:PATH")
        return Reference("hf", rest)
    if Path(ref).expanduser().exists():
        return Reference("path", ref, Path(ref).expanduser())
    return Reference("zoo", ref)


def reference_files(ref: str) -> tuple[Path, ...]:
    """The files (or ``hf:`` directory) a reference reads, known before loading (so an output
    never replaces one)."""
    parsed = parse_reference(ref)
    if parsed.kind == "hf" and Path(parsed.name).expanduser().is_dir():
        return (Path(parsed.name).expanduser(),)
    return () if parsed.file is None else (parsed.file,)


def example_input(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=gen)


def resolve_model(
    ref: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    trust_pickle: bool = False,
) -> ResolvedModel:
    """Build or load the model that ``ref`` names, with a batch of 2 example inputs.

    Image models get ``input_shape`` (else the model's own: timm's ``pretrained_cfg``,
    torchvision's 3x224x224, a checkpoint's record); Hugging Face models a batch of token
    ids from their vocabulary, or of pixel values for an image model. Raises ValueError with
    the accepted forms when ``ref`` is none of them, and
    :class:`symmerge.io.CheckpointError` (a ValueError) for a file that cannot be used as
    asked.
    """
    loaded = load_model(ref, trust_pickle=trust_pickle, input_shape=input_shape, seed=seed)
    inputs = _example_inputs(ref, loaded, input_shape, seed)
    return ResolvedModel(loaded.model, inputs, loaded.description, loaded.metadata, loaded.files)


def load_model(
    ref: str,
    *,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """The model ``ref`` names, in eval mode on the CPU, with its metadata (no inputs made).

    ``trust_pickle`` allows full unpickling of a ``.pt``/``.pth`` file (a whole module);
    without it such files are refused, since unpickling runs code from the file.
    ``input_shape`` is recorded for torchvision models (their config keeps it).
    """
    parsed = parse_reference(ref)
    torch.manual_seed(seed)
    if parsed.kind in ARCH_KINDS:
        return _with_weights(parsed, ref, trust_pickle, input_shape)
    if parsed.kind == "hf":
        return _hf(parsed.name, seed)
    if parsed.kind == "path":
        from symmerge.io import load_checkpoint

        assert parsed.file is not None
        model, meta = load_checkpoint(parsed.file, trust_pickle=trust_pickle)
        return LoadedModel(model.eval(), meta, f"checkpoint {ref}", (parsed.file,))
    from symmerge.models import create_model

    try:
        model, config = create_model(ref)
    except ValueError as e:
        raise ValueError(f"{e}\nA MODEL is {FORMS} (no file named '{ref}' exists).") from e
    return LoadedModel(model.eval(), {"config": config}, f"zoo {ref}")


def _example_inputs(
    ref: str, loaded: LoadedModel, input_shape: tuple[int, ...] | None, seed: int
) -> tuple[Any, ...]:
    model = loaded.model
    if isinstance(model, HFModel):
        return (hf_example_input(model, seed),)
    shape = input_shape or getattr(model, "input_shape", None)
    if shape is None:
        shape = (loaded.metadata.get("config", {}).get("kwargs", {}) or {}).get("input_shape")
    if shape is None:
        raise ValueError(f"cannot tell the input shape of {ref}; pass --input-shape C,H,W")
    return (example_input(tuple(shape), seed=seed),)


# --------------------------------------------------------------------------------------
# an architecture plus a state dict: timm:, torchvision:, module:
# --------------------------------------------------------------------------------------


def _with_weights(
    parsed: Reference, ref: str, trust_pickle: bool, input_shape: tuple[int, ...] | None
) -> LoadedModel:
    from symmerge.io import load_state_dict_file

    state = None
    if parsed.file is not None:
        state = load_state_dict_file(parsed.file, trust_pickle=trust_pickle)
    model, config = _architecture(parsed, state, input_shape, ref)
    label = f"{parsed.kind} {parsed.name}"
    if state is None:
        return LoadedModel(model.eval(), {"config": config}, f"{label} (random init)")
    _load_weights(model, state, parsed.file, f"{parsed.kind}:{parsed.name}")  # as float32
    meta = {"config": config, "source": ref, "dtype": _dtype_name(stored_dtype(state))}
    return LoadedModel(model.eval(), meta, f"{label} with {parsed.file}", (parsed.file,))


def _architecture(
    parsed: Reference,
    state: Mapping[str, torch.Tensor] | None,
    input_shape: tuple[int, ...] | None,
    where: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """The named architecture and its checkpoint config; timm and torchvision heads get the
    state dict's class count when it differs from the default (a fine-tuned head)."""
    from symmerge.io import build_architecture

    config: dict[str, Any] = {"arch": f"{parsed.kind}:{parsed.name}", "kwargs": {}}
    if parsed.kind == "torchvision" and input_shape:
        config["kwargs"]["input_shape"] = list(input_shape)
    model = build_architecture(config, where)
    if parsed.kind != "module":
        head = getattr(model, "pretrained_cfg", {}).get("classifier")  # timm names its head
        classes = _head_width(model, state, head if isinstance(head, str) else None)
        if classes is not None:
            config["kwargs"]["num_classes"] = classes
            model = build_architecture(config, where)
    return model, config


def _head_width(
    model: nn.Module, state: Mapping[str, torch.Tensor] | None, head: str | None
) -> int | None:
    """Output width of the state dict's classifier when it differs from the model's (the
    classifier is ``head``, else the model's last Linear; a model whose classifiers are convs,
    as torchvision's segmentation heads, is read from the tensors that differ only in their
    first axis, all from the model's class count to one other); None when it does not."""
    if state is None:
        return None
    own_state = model.state_dict()
    if head is None:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is not None:
        own, theirs = own_state.get(f"{head}.weight"), state.get(f"{head}.weight")
        if own is not None and theirs is not None and theirs.ndim and theirs.shape != own.shape:
            return int(theirs.shape[0])
    differ = [(tuple(own_state[k].shape), tuple(t.shape)) for k, t in state.items()
              if k in own_state and tuple(own_state[k].shape) != tuple(t.shape)]  # fmt: skip
    if differ and all(len(a) == len(b) >= 1 and a[1:] == b[1:] for a, b in differ):
        widths = {(a[0], b[0]) for a, b in differ}
        if len(widths) == 1:
            return int(next(iter(widths))[1])
    return None


def _load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], file: Path | None, arch: str
) -> None:
    """Load strictly; a misfit names the first missing and unexpected keys and shapes, so
    the user sees whether the file or the architecture is wrong."""
    from symmerge.io import CheckpointError, load_state

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):  # fmt: skip
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(
            f"the state dict in {file} does not fit {arch}: "
            + "; ".join(parts)
            + ". Check that the reference names the architecture the weights were saved from."
        )
    load_state(model, state)


# --------------------------------------------------------------------------------------
# Hugging Face: hf:PATH (save_pretrained directory or cached hub id) and hf:TYPE
# --------------------------------------------------------------------------------------


def _hf(name: str, seed: int) -> LoadedModel:
    path = Path(name).expanduser()
    if path.is_dir():
        return _hf_pretrained(str(path), f"hf:{name}", (path,))
    if "/" in name or path.exists():  # a hub id (org/name) or a path, never a model type
        return _hf_pretrained(name, f"hf:{name}", ())
    model = _hf_model(name, seed)
    try:
        meta = {"config": _hf_checkpoint_config(model.model)}
    except (TypeError, ValueError):  # an exotic config: usable, but a merge cannot be saved
        meta = {}
    return LoadedModel(model, meta, f"hf {name} (small random init)")


def _hf_pretrained(source: str, where: str, files: tuple[Path, ...]) -> LoadedModel:
    """``from_pretrained`` with the class the directory's config names (any head)."""
    transformers = _transformers(where)
    from symmerge.io import CheckpointError
    from symmerge.lazy import SafetensorsState

    try:  # what the directory stores, so a merge is written back the same way
        stored_dtypes = {k: e.dtype for k, e in SafetensorsState(source).entries.items()}
    except (ValueError, OSError):  # a hub id, or .bin weights: from_pretrained reads them
        stored_dtypes = {}

    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{where} is not a Hugging Face model: neither a save_pretrained directory with "
            f"a config.json nor a model id in the local cache ({exc})"
        ) from None
    arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(
            f"{where}: its config names the class {arch}, which transformers "
            f"{transformers.__version__} does not have (upgrade transformers)"
        )
    try:
        try:
            model, info = cls.from_pretrained(
                source, local_files_only=True, output_loading_info=True,
                attn_implementation="sdpa", dtype=torch.float32,
            )  # fmt: skip
        except ValueError as exc:  # a model without an sdpa path keeps its own attention
            if "sdpa" not in str(exc).lower():
                raise
            model, info = cls.from_pretrained(
                source, local_files_only=True, output_loading_info=True, dtype=torch.float32
            )
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the weights of {where}: {exc}") from None
    missing, unexpected = list(info.get("missing_keys", [])), list(info.get("unexpected_keys", []))
    if missing or unexpected:
        parts = [f"{label}: {', '.join(keys[:5])}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected)) if keys]  # fmt: skip
        raise CheckpointError(f"the weights in {where} do not fit {arch}: " + "; ".join(parts))
    model.eval()
    dtype = _dtype_name(stored_dtype(list(stored_dtypes.values()))) if stored_dtypes else None
    meta = {"config": _hf_checkpoint_config(model), "source": where, "dtype": dtype}
    return LoadedModel(HFModel(model), meta, f"hf {type(model).__name__} from {source}", files)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hf_checkpoint_config(model: nn.Module) -> dict[str, Any]:
    """A symmerge checkpoint config that rebuilds ``model`` (:func:`hf_from_config`)."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    return {"arch": f"hf:{type(model).__name__}", "kwargs": {"config": config}}


def hf_from_config(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    """``transformers.<class_name>`` built from a config dict (random weights), wrapped as
    :func:`resolve_model` wraps it; rebuilds an ``hf:`` checkpoint."""
    transformers = _transformers(f"hf:{class_name}")
    cls = getattr(transformers, class_name, None)
    if cls is None or "model_type" not in config:
        raise ValueError(
            f"cannot rebuild hf:{class_name}: transformers {transformers.__version__} has no "
            "such class, or the config has no model_type"
        )
    cfg = transformers.AutoConfig.for_model(**config, attn_implementation="sdpa")
    try:
        model = cls(cfg)
    except ValueError:  # no sdpa path: the model's own attention
        cfg._attn_implementation = None
        model = cls(cfg)
    return HFModel(model.eval())


def hf_example_input(model: HFModel, seed: int) -> torch.Tensor:
    """A batch of 2 of what ``model`` takes: pixel values (its ``input_shape``) or token ids."""
    if hasattr(model, "input_shape"):
        return example_input(model.input_shape, seed=seed)
    return _token_ids(model.model.config, seed)


def _token_ids(config: Any, seed: int) -> torch.Tensor:
    """A batch of 2 x 8 token ids from the model's vocabulary (fewer if positions are few)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not vocab:
        raise ValueError(f"cannot make example token ids: {type(config).__name__} has no vocab")
    length = min(8, getattr(text, "max_position_embeddings", None) or 8)
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def _transformers(where: str) -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ValueError(f"{where} needs transformers: pip install 'symmerge[hf]'") from e
    from symmerge.progress import is_terminal, progress_mode

    mode = progress_mode()  # transformers' own bars follow symmerge's progress setting
    if mode in ("off", "plain") or (mode == "auto" and not is_terminal()):
        transformers.utils.logging.disable_progress_bar()
    else:
        transformers.utils.logging.enable_progress_bar()
    return transformers


#: Small sizes for random-init Hugging Face models (names as in most configs; a config's
#: attribute_map translates them, e.g. n_embd for GPT-2).
HF_SMALL = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64,
    "num_key_value_heads": 2, "head_dim": 16, "use_cache": False, "image_size": 32,
}  # fmt: skip


def hf_small_config(model_type: str, **overrides: Any) -> Any:
    """A small random-init config of a Hugging Face model type (few layers, small widths)."""
    try:
        from transformers import AutoConfig
    except ImportError as e:
        raise ValueError("hf:TYPE needs transformers: pip install 'symmerge[hf]'") from e
    try:
        config = AutoConfig.for_model(model_type)
    except ValueError as e:
        raise ValueError(
            f"transformers has no model type '{model_type}' (and no directory of that name "
            f"exists; hf:PATH loads a save_pretrained directory): {e}"
        ) from e
    optional = {"num_key_value_heads", "head_dim", "image_size"}  # only where the config has them
    staged = hasattr(config, "depths")  # sizes per stage (Swin, ConvNeXt): the type's own
    for key, value in {**HF_SMALL, **overrides}.items():
        if staged and key not in overrides:
            continue
        if key == "vocab_size" and (getattr(config, "pad_token_id", None) or 0) >= value:
            continue  # its padding token would fall outside a small vocabulary (Whisper's)
        if key not in optional or hasattr(config, key):
            setattr(config, key, value)
    if getattr(config, "is_encoder_decoder", False) and (
        getattr(config, "decoder_start_token_id", None) is None
    ):
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0  # T5 needs one
    return config


def _hf_model(model_type: str, seed: int) -> HFModel:
    import transformers

    config = hf_small_config(model_type)
    torch.manual_seed(seed)
    model = None
    # a model with its head, so the residual stream is hidden (logits are the output)
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
                 "AutoModelForImageClassification", "AutoModelForSequenceClassification",
                 "AutoModel"):  # fmt: skip
        for attention in ({"attn_implementation": "sdpa"}, {}):  # sdpa, else the model's own
            try:
                fresh = copy.deepcopy(config)  # a failed try may leave its attention set
                model = getattr(transformers, auto).from_config(fresh, **attention)
                break
            except (ValueError, TypeError):  # no such head (or attention) for this type
                continue
        if model is not None:
            break
    if model is None:
        raise ValueError(f"cannot build a random hf:{model_type} model with transformers")
    return HFModel(model.eval())


class HFModel(nn.Module):
    """A Hugging Face model called on its main input alone (token ids, or pixel values for an
    image model), caches off, returning tensors; an encoder-decoder's decoder reads the same
    ids. An image model has an ``input_shape`` (C, H, W), as the zoo's models do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.main_input = getattr(model, "main_input_name", "input_ids")
        config = model.config
        if self.main_input == "pixel_values":
            size = getattr(config, "image_size", 224)
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            self.input_shape = (int(getattr(config, "num_channels", 3)), int(h), int(w))
        elif self.main_input != "input_ids":
            raise ValueError(
                f"{type(model).__name__} takes {self.main_input}; symmerge calls Hugging Face "
                "models on token ids or pixel values"
            )
        takes = inspect.signature(model.forward).parameters
        caches = self.main_input == "input_ids" or "use_cache" in takes
        self.fixed = {"return_dict": True, **({"use_cache": False} if caches else {})}
        self.decoder = bool(getattr(config, "is_encoder_decoder", False)) and (
            "decoder_input_ids" in takes
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = {self.main_input: x, **({"decoder_input_ids": x} if self.decoder else {})}
        out = self.model(**inputs, **self.fixed)
        if torch.is_tensor(out.get("logits")):
            return (out["logits"],)
        return tuple(v for v in out.values() if torch.is_tensor(v))
