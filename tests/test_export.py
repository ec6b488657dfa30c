"""Bring your own model: every reference kind merged from the command line with a permuted
copy of itself comes back as the original, written the way it came in (a save_pretrained
directory, a state dict its library loads) and in its dtype; Hugging Face directories merge
from disk tensor by tensor exactly as in memory; bad input is a clean error that writes
nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from symmerge import merge, trace
from symmerge.cli import main
from symmerge.lazy import SafetensorsState, merge_pretrained, write_safetensors
from symmerge.resolve import resolve_model
from symmerge.similarity import WeightSimilarity

transformers = pytest.importorskip("transformers")

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, use_cache=False),
    "llama-gqa": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=32, use_cache=False),
    "bert-cls": lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32, num_labels=3),
}  # fmt: skip
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama-gqa": "LlamaForCausalLM",
              "bert-cls": "BertForSequenceClassification"}  # fmt: skip


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug: bad input must be a clean error
    return result.exit_code, result.output


def _jitter(model: nn.Module, seed: int) -> None:
    """Distinct values everywhere (norm weights and biases too), so a wrong permutation shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _permuted(model: nn.Module, example: tuple, seed: int) -> nn.Module:
    """A copy of ``model`` with every hidden unit permuted (the same function)."""
    spec = trace(model, example)
    out = copy.deepcopy(model)
    out.load_state_dict(spec.permute_state_dict(model.state_dict(), spec.random_permutations(seed)))
    return out


def _hf_pair(tmp_path: Path, kind: str, dtype: torch.dtype) -> tuple[Path, Path, nn.Module]:
    """A save_pretrained directory with a tokenizer file, and a permuted copy of it."""
    torch.manual_seed(0)
    model = getattr(transformers, HF_CLASSES[kind])(HF_CONFIGS[kind]()).eval()
    _jitter(model, 0)
    a, b = tmp_path / f"{kind}-a", tmp_path / f"{kind}-b"
    model.to(dtype).save_pretrained(a)
    wrapped = resolve_model(f"hf:{a}")  # float32, wrapped to take token ids
    other = _permuted(wrapped.model, wrapped.example_inputs, seed=3)
    other.model.to(dtype).save_pretrained(b, max_shard_size="40KB")  # sharded, with an index
    for d in (a, b):
        (d / "tokenizer.json").write_text('{"the": "same tokenizer"}')
    return a, b, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_hf_directories_merge_back_to_the_original_from_disk_and_in_memory(
    tmp_path: Path, kind: str, dtype: torch.dtype
) -> None:
    a, b, original = _hf_pair(tmp_path, kind, dtype)
    outs = {"disk": tmp_path / "disk", "memory": tmp_path / "memory"}
    code, text = _run("merge", f"hf:{a}", f"hf:{b}", "-m", "weight", "-o", outs["disk"])
    assert code == 0 and "from disk" in text, text
    # a keyword only the in-memory recipe takes: the same merge, the models loaded whole
    code, text = _run("merge", f"hf:{a}", f"hf:{b}", "-m", "weight", "-p", "backend=scipy",
                      "-o", outs["memory"])  # fmt: skip
    assert code == 0 and "save_pretrained directory" in text, text
    expected = original.state_dict()
    for how, out in outs.items():
        reloaded = getattr(transformers, HF_CLASSES[kind]).from_pretrained(out).eval()
        assert reloaded.dtype == dtype, how
        state = reloaded.state_dict()
        for key, value in expected.items():  # the permutation found back exactly
            assert torch.equal(state[key], value), (how, key)
        assert (out / "tokenizer.json").read_text() == (a / "tokenizer.json").read_text()
        card = (out / "README.md").read_text()
        assert "method: `weight`" in card and str(a) in card and str(b) in card
    ids = torch.randint(0, 100, (2, 8))
    cls = getattr(transformers, HF_CLASSES[kind])
    with torch.no_grad():  # both reloaded by the library (a non-persistent buffer's dtype too)
        want = cls.from_pretrained(a).eval()(input_ids=ids).logits
        got = cls.from_pretrained(outs["disk"]).eval()(input_ids=ids).logits
    assert torch.equal(got, want)


def test_disk_merge_equals_the_in_memory_merge_of_unrelated_models(tmp_path: Path) -> None:
    """Two independent inits (a non-trivial matching): same permutations, same tensors."""
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(HF_CONFIGS["llama-gqa"]()).eval()
        _jitter(model, seed)
        dirs.append(tmp_path / f"m{seed}")
        model.save_pretrained(dirs[-1], max_shard_size="60KB")
    res = merge_pretrained(dirs, tmp_path / "disk", method="weight", lam=0.3)
    assert res.iterations >= 1 and any(
        not torch.equal(p, torch.arange(len(p))) for p in res.perms[1].values()
    )
    ra, rb = resolve_model(f"hf:{dirs[0]}"), resolve_model(f"hf:{dirs[1]}")
    merged, result = merge(
        [ra.model, rb.model], "weight", lam=0.3, example_inputs=ra.example_inputs
    )
    on_disk = SafetensorsState(tmp_path / "disk")
    state = merged.model.state_dict()
    assert set(on_disk) <= set(state)
    for key in on_disk:
        torch.testing.assert_close(on_disk[key], state[key], rtol=1e-6, atol=1e-7)


def test_uncached_weight_similarity_equals_the_cached_one() -> None:
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(HF_CONFIGS["llama-gqa"]()).eval()
    b = transformers.LlamaForCausalLM(HF_CONFIGS["llama-gqa"]()).eval()
    spec = trace(a, (torch.randint(0, 100, (2, 8)),), example_kwargs={"use_cache": False})
    perms = spec.random_permutations(seed=2)
    reads: list[str] = []

    class Counting(dict):
        def __getitem__(self, key: str) -> torch.Tensor:
            reads.append(key)
            return super().__getitem__(key)

    sa, sb = a.state_dict(), Counting(b.state_dict())
    cached = WeightSimilarity(spec, sa, sb, kind="corr")
    reads.clear()
    uncached = WeightSimilarity(spec, sa, sb, kind="corr", cache=False)
    for g in spec.groups:
        assert torch.equal(cached(g, perms), uncached(g, perms))
    assert reads  # it read the tensors again


def test_safetensors_state_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=gen), "bf16": torch.randn(5, generator=gen).bfloat16(),
        "f16": torch.randn(2, 2, generator=gen).half(), "i64": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }  # fmt: skip
    save_file(tensors, str(tmp_path / "x.safetensors"))
    state = SafetensorsState(tmp_path / "x.safetensors", prefix="m.")
    assert sorted(state) == sorted(f"m.{k}" for k in tensors)
    for k, v in tensors.items():
        assert state[f"m.{k}"].dtype == v.dtype and torch.equal(state[f"m.{k}"], v)
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_safetensors(tmp_path / "y.safetensors", layout, iter(tensors.items()))
    back = load_file(str(tmp_path / "y.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    wrong = iter([("f32", torch.zeros(4, 3))])  # another shape than announced
    with pytest.raises(ValueError, match="does not match"):
        write_safetensors(tmp_path / "z.safetensors", layout, wrong)
    assert not (tmp_path / "z.safetensors").exists()


class UserNet(nn.Module):
    """The user's own architecture (``module:`` reference), importable from this file."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 3)
        self.input_shape = (12,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _library_model(kind: str) -> tuple[nn.Module, str, list[str]]:
    """A fresh model of ``kind``, its reference name and extra CLI arguments."""
    if kind == "timm":
        timm = pytest.importorskip("timm")
        return timm.create_model("test_resnet", num_classes=5), "timm:test_resnet", []
    if kind == "torchvision":
        tv = pytest.importorskip("torchvision")
        net = tv.models.get_model("resnet18", weights=None, num_classes=4)
        return net, "torchvision:resnet18", ["--input-shape", "3,32,32"]
    return UserNet(), f"module:{__name__}:UserNet", []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["timm", "torchvision", "module"])
def test_state_dicts_merge_to_a_state_dict_their_library_loads_in_their_dtype(
    tmp_path: Path, kind: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    model, name, extra = _library_model(kind)
    model.eval()
    _jitter(model, 0)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    shape = (12,) if kind == "module" else (3, 32, 32)
    other = _permuted(model, (torch.randn(2, *shape),), seed=4)
    files = []
    for label, m in (("a", model), ("b", other)):
        files.append(tmp_path / f"{label}.safetensors")
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in m.state_dict().items()}  # fmt: skip
        save_file(state, str(files[-1]))
    out = tmp_path / "merged.safetensors"
    code, text = _run("merge", f"{name}={files[0]}", f"{name}={files[1]}", "-m", "weight",
                      "-o", out, *extra)  # fmt: skip
    assert code == 0, text
    state = load_file(str(out))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {dtype}
    fresh, _, _ = _library_model(kind)
    fresh.load_state_dict(state)  # the library's own strict loader
    expected = load_file(str(files[0]))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value.to(expected[key].dtype), expected[key]), key


def test_bad_hugging_face_inputs_are_clean_errors_that_write_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gpt = tmp_path / "gpt"
    transformers.GPT2LMHeadModel(HF_CONFIGS["gpt2"]()).save_pretrained(gpt)
    bigger = tmp_path / "gpt-wide"
    cfg = HF_CONFIGS["gpt2"]()
    cfg.n_embd = 64
    transformers.GPT2LMHeadModel(cfg).save_pretrained(bigger)
    llama = tmp_path / "llama"
    transformers.LlamaForCausalLM(HF_CONFIGS["llama-gqa"]()).save_pretrained(llama)
    out = tmp_path / "out"
    for other, words in ((bigger, "differ in n_embd"), (llama, "differ in")):
        code, text = _run("merge", f"hf:{gpt}", f"hf:{other}", "-m", "weight", "-o", out)
        assert code != 0 and words in text, text
        assert not out.exists() and not (tmp_path / ".out.partial").exists()
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    code, text = _run("merge", f"hf:{gpt}", f"hf:{not_a_model}", "-m", "weight", "-o", out)
    assert code != 0 and "config.json" in text and not out.exists(), text
    out.mkdir()
    code, text = _run("merge", f"hf:{gpt}", f"hf:{gpt}", "-m", "weight", "-o", out)
    assert code != 0 and "exists" in text and not any(out.iterdir()), text
    code, text = _run("merge", f"hf:{gpt}", f"hf:{gpt}", "-m", "weight", "-o", gpt / "sub")
    assert code != 0 and "overlaps the input" in text and not (gpt / "sub").exists(), text


def test_directories_without_safetensors_are_merged_in_memory(tmp_path: Path) -> None:
    """A pytorch_model.bin directory cannot be read tensor by tensor: a note, then the
    models are loaded whole, and the merge is the same save_pretrained directory."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(HF_CONFIGS["gpt2"]()).eval()
    folder = tmp_path / "bin"
    model.save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    code, text = _run("merge", f"hf:{folder}", f"hf:{folder}", "-m", "weight", "-o", tmp_path / "o")
    assert code == 0 and "not merging from disk" in text, text
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "o")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value)
