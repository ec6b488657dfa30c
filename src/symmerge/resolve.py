"""Turn a model reference from the command line into a model and an example input.

A reference is a zoo name (``resnet20x4-ln``), ``timm:NAME`` (random init; timm is an
optional dependency), or a path to a checkpoint (safetensors + metadata written by
``symmerge train``, or a pickled ``nn.Module``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class ResolvedModel:
    model: nn.Module
    example_inputs: tuple[Any, ...]
    description: str


def example_input(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=gen)


def resolve_model(
    ref: str, *, input_shape: tuple[int, ...] | None = None, seed: int = 0
) -> ResolvedModel:
    """Build or load the model that ``ref`` names, with a batch of 2 example inputs.

    Raises ValueError with the accepted forms when ``ref`` is none of them.
    """
    torch.manual_seed(seed)
    if ref.startswith("timm:"):
        return _timm_model(ref[5:], input_shape, seed)
    if ref.startswith("hf:"):
        return _hf_model(ref[3:], seed)
    path = Path(ref)
    if path.exists():
        from symmerge.io import load_checkpoint

        model, meta = load_checkpoint(path)
        shape = input_shape or getattr(model, "input_shape", None)
        if shape is None:
            shape = (meta.get("config", {}).get("kwargs", {}) or {}).get("input_shape")
        if shape is None:
            raise ValueError(f"cannot tell the input shape of {ref}; pass --input-shape C,H,W")
        return ResolvedModel(
            model.eval(), (example_input(tuple(shape), seed=seed),), f"checkpoint {ref}"
        )
    from symmerge.models import create_model

    try:
        model, _ = create_model(ref)
    except ValueError as e:
        raise ValueError(
            f"{e}\nA MODEL is a zoo name, timm:NAME or a checkpoint path "
            f"(no file named '{ref}' exists)."
        ) from e
    shape = input_shape or model.input_shape
    return ResolvedModel(model.eval(), (example_input(tuple(shape), seed=seed),), f"zoo {ref}")


def _timm_model(name: str, input_shape: tuple[int, ...] | None, seed: int) -> ResolvedModel:
    try:
        import timm
    except ImportError as e:
        raise ValueError("timm:NAME needs timm: pip install 'symmerge[timm]'") from e
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise ValueError(f"timm has no model '{name}': {e}") from e
    shape = input_shape or tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return ResolvedModel(model.eval(), (example_input(tuple(shape), seed=seed),), f"timm {name}")


#: Small sizes for random-init Hugging Face models (names as in most configs; a config's
#: attribute_map translates them, e.g. n_embd for GPT-2).
HF_SMALL = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64,
    "num_key_value_heads": 2, "head_dim": 16, "use_cache": False,
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
        raise ValueError(f"transformers has no model type '{model_type}': {e}") from e
    optional = {"num_key_value_heads", "head_dim"}  # set only where the config has them
    for key, value in {**HF_SMALL, **overrides}.items():
        if key not in optional or hasattr(config, key):
            setattr(config, key, value)
    if getattr(config, "is_encoder_decoder", False) and (
        getattr(config, "decoder_start_token_id", None) is None
    ):
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0  # T5 needs one
    return config


def _hf_model(model_type: str, seed: int) -> ResolvedModel:
    import transformers

    config = hf_small_config(model_type)
    torch.manual_seed(seed)
    model = None
    # a model with its head, so the residual stream is hidden (logits are the output)
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM",
                 "AutoModelForSequenceClassification", "AutoModel"):  # fmt: skip
        try:
            model = getattr(transformers, auto).from_config(config, attn_implementation="sdpa")
            break
        except ValueError:
            continue
    assert model is not None
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=gen)
    return ResolvedModel(_IdsOnly(model), (ids,), f"hf {model_type} (small random init)")


class _IdsOnly(nn.Module):
    """Calls a Hugging Face model on token ids alone, with caches off, returning tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, use_cache=False, return_dict=True)
        if torch.is_tensor(out.get("logits")):
            return (out["logits"],)
        return tuple(v for v in out.values() if torch.is_tensor(v))
