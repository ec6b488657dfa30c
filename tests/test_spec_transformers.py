"""Attention in the tracer: heads as blocked groups, q/k vs v/o head dims, embeddings, GQA."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import symmerge
from symmerge.cli import main
from symmerge.models import create_model
from symmerge.resolve import resolve_model
from symmerge.spec import Group, SymmetrySpec

pytest.importorskip("transformers", reason="transformers is installed by the test set-up")
pytest.importorskip("timm", reason="timm is installed by the test set-up")


@pytest.mark.parametrize(
    "ref", ["vit-tiny", "timm:vit_tiny_patch16_224", "hf:bert", "hf:gpt2", "hf:vit", "hf:t5"]
)
def test_check_symmetry_on_transformers(ref: str) -> None:
    result = CliRunner().invoke(main, ["check-symmetry", ref, "--show"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("max |diff| = ") and float(lines[-1].split("=")[1]) < 1e-4
    assert " heads x " in result.output, "attention heads must be reported as blocked groups"
    assert "of hidden units free" in lines[1]


def test_llama_gqa_and_rope() -> None:
    resolved = resolve_model("hf:llama")
    spec = symmerge.trace(resolved.model, resolved.example_inputs)
    assert spec.check(resolved.model, *resolved.example_inputs).ok
    reasons = " ".join(r for f in spec.frozen for r in f.reasons)
    # RoPE: the frequencies are a non-persistent buffer, so q/k head dims are frozen (and say why)
    assert "non-persistent buffer" in reasons
    heads = [g for g in spec.groups.values() if g.name.endswith(".heads")]
    assert heads, "key/value heads still permute under RoPE and GQA"


def _vit_spec() -> tuple[nn.Module, torch.Tensor, SymmetrySpec]:
    model, _ = create_model("vit-tiny", depth=2, dim=48, heads=3)
    x = torch.randn(2, 3, 32, 32)
    spec = symmerge.trace(model, x)
    return model.double().eval(), x.double(), spec


def _groups(spec: SymmetrySpec, block: str) -> tuple[Group, Group, Group]:
    g = spec.groups
    return g[f"{block}.heads"], g[f"{block}.qk"], g[f"{block}.vo"]


def _apply_unchecked(spec: SymmetrySpec, model: nn.Module, perms: dict) -> nn.Module:
    """Apply permutations without the block checks (to test what they forbid)."""
    loose = copy.deepcopy(spec)
    for g in loose.groups.values():
        g.blocks, g.block_group = None, None
    return loose.permuted(model, perms)


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_vit_attention_groups() -> None:
    _, _, spec = _vit_spec()
    heads, qk, vo = _groups(spec, "blocks.0.attn.qkv")
    assert heads.size == 3 and qk.size == vo.size == 48
    assert qk.blocks == vo.blocks == 3 and qk.block_group == vo.block_group == heads.name
    roles = {(m.tensor, m.role) for m in vo.members}
    assert ("blocks.0.attn.proj.weight", "in") in roles  # v and the output projection share
    assert all("proj" not in m.tensor for m in qk.members)  # q and k share another one


def test_whole_heads_and_within_head_dims_preserve_the_function() -> None:
    model, x, spec = _vit_spec()
    heads, qk, vo = _groups(spec, "blocks.0.attn.qkv")
    gen = torch.Generator().manual_seed(0)
    swap = torch.tensor([2, 0, 1])
    whole = torch.cat([h * 16 + torch.arange(16) for h in swap])
    only_heads = {heads.name: swap, qk.name: whole, vo.name: whole}
    within = {
        qk.name: qk.random_permutation(gen, torch.arange(3)),
        vo.name: vo.random_permutation(gen, torch.arange(3)),
    }
    both = spec.random_permutations(1)
    ref = _out(model, x)
    for perms in (only_heads, within, both):
        out = _out(spec.permuted(model, perms), x)
        assert (out - ref).abs().max() < 1e-10
    # per-head dims really differ between heads in `within` (a product layout could not)
    per_head = within[qk.name].view(3, 16) % 16
    assert not torch.equal(per_head[0], per_head[1]) or not torch.equal(per_head[1], per_head[2])


def test_forbidden_permutations_change_the_function() -> None:
    model, x, spec = _vit_spec()
    heads, qk, vo = _groups(spec, "blocks.0.attn.qkv")
    ref = _out(model, x)
    cross = torch.arange(48)
    cross[[0, 16]] = cross[[16, 0]]  # one q/k dim of head 0 swapped with one of head 1
    with pytest.raises(ValueError):
        spec.permute_state_dict(model.state_dict(), {qk.name: cross})
    assert (_out(_apply_unchecked(spec, model, {qk.name: cross}), x) - ref).abs().max() > 1e-6
    # q/k moved as whole heads but v/o not: heads must move together
    moved = torch.cat([torch.arange(16, 32), torch.arange(16), torch.arange(32, 48)])
    with pytest.raises(ValueError):
        spec.permute_state_dict(model.state_dict(), {qk.name: moved, heads.name: torch.arange(3)})
    assert (_out(_apply_unchecked(spec, model, {qk.name: moved}), x) - ref).abs().max() > 1e-6


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.out(self.norm(h + a).mean(1))


def test_nn_multihead_attention() -> None:
    model, x = _MHA().eval(), torch.randn(2, 5, 6)
    spec = symmerge.trace(model, x)
    assert spec.check(model, x).ok
    blocked = [g for g in spec.groups.values() if g.block_group]
    assert {g.blocks for g in blocked} == {4}
    assert len(blocked) == 2  # q/k head dims and v/out-proj head dims


def test_embeddings_join_the_residual_stream_and_logits_stay_put() -> None:
    resolved = resolve_model("hf:gpt2")
    spec = symmerge.trace(resolved.model, resolved.example_inputs)
    stream = max(spec.groups.values(), key=lambda g: len(g.members))
    tensors = {m.tensor for m in stream.members}
    tensors |= {a for t in tensors for a in spec.aliases.get(t, [])}
    assert any(t.endswith("wte.weight") for t in tensors)  # token embedding (tied with lm_head)
    assert any(t.endswith("lm_head.weight") for t in tensors)
    assert any(t.endswith("wpe.weight") for t in tensors)  # position embedding
    for f in spec.frozen:  # vocabulary rows: indexed by token ids and producing logits
        if f.tensor.endswith(("wte.weight", "lm_head.weight")):
            assert f.axis == 0 and "model output" in f.reasons


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, tuple) else getattr(out, "logits", out)


@pytest.mark.parametrize("method", ["activation", "zip", "pleas"])
def test_gpt2_copies_merge_back_with_data(method: str) -> None:
    """GPT-2's projections are Hugging Face ``Conv1D`` (weight ``(in, out)``) and it returns
    a ModelOutput: the head dims are observed on ``c_attn``'s output, the compute budget
    counts ``Conv1D`` calls (PLeaS at 1x merges every unit) and least squares refits them, and
    the last residual-stream value is not read off the transformer's structured output."""
    resolved = resolve_model("hf:gpt2")
    a, (x,) = resolved.model.eval(), resolved.example_inputs
    spec = symmerge.trace(a, x)
    b = spec.permuted(a, spec.random_permutations(seed=3)).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, int(x.max()) + 1, (16, x.shape[1]), generator=g) for _ in range(4)]
    kw = {"ridge": 0.0} if method == "pleas" else {}  # least squares: exact, not shrunk
    merged, res = symmerge.merge([a, b], method, data=data, spec=spec, example_inputs=x, **kw)
    torch.testing.assert_close(_logits(merged.eval(), x), _logits(a, x), atol=1e-5, rtol=1e-5)
    if method == "pleas":
        assert set(res.details["ratios"].values()) == {0.0}
        conv1d = [n for n, m in a.named_modules() if type(m).__name__ == "Conv1D"]
        counted = symmerge.flops.count_compute(a, x).per_module
        assert conv1d and set(conv1d) <= set(counted)
        assert any(f"least squares (closed) on {len(conv1d)} layers" in line for line in res.log)


def test_a_hugging_face_model_of_another_modality_is_refused_clearly() -> None:
    """An audio model takes neither token ids nor pixel values: a usage error, no traceback."""
    result = CliRunner().invoke(main, ["check-symmetry", "hf:wav2vec2"])
    assert result.exit_code == 2, result.output
    assert "takes input_values" in result.output and "token ids or pixel values" in result.output
