"""Peak memory and time of weight matching two Llama-style checkpoints from the command line.

Two ``save_pretrained`` directories (float32, random init, seed 0): model A, and model B =
A with every hidden unit, head and MLP neuron randomly permuted (so the merge is known: weight
matching must find the permutation back and the merged model is A, which the run checks
tensor by tensor). Each mode runs in a fresh process, measured with ``wait4`` (peak resident
set of the child):

- ``lazy``: ``symmerge merge hf:A hf:B -m weight -o OUT`` as a user types it (the command
  merges from disk tensor by tensor, :mod:`symmerge.lazy`);
- ``memory``: the same merge through the in-memory API (``resolve_model`` both models,
  ``merge(..., "weight")``, ``save_hf_directory``): what the command did before;
- ``interpreter``: a process that imports torch, transformers and symmerge and exits (the
  floor every mode pays).

Sizes: ``402m`` (hidden 1024, 24 layers, 16 heads / 4 KV heads, MLP 3712, vocab 32000:
402.1M parameters, 1.61 GB per model) and ``1.1b`` (TinyLlama's shape: hidden 2048, 22 layers,
32 / 4 heads, MLP 5632: 1.10B parameters, 4.40 GB per model). The goal (issue 17): the lazy peak
under 2x one model's size above the interpreter, and the 1.1B case within 16 GB.

    .venv/bin/python benchmarks/lazy_memory.py --size 402m
    .venv/bin/python benchmarks/lazy_memory.py --size 1.1b --modes lazy --max-sweeps 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import CACHE, RESULTS, md_table, provenance, provenance_md, write_json

SIZES = {
    "402m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=3712,
    ),
    "1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
    ),
}
COMMON = dict(
    vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False
)
PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def make_inputs(size: str, work: Path) -> dict:
    """A and its permuted copy B, saved once (skipped when present with the same config)."""
    stamp = work / "inputs.json"
    want = {"size": size, **SIZES[size], **COMMON, "seed": 0, "dtype": "float32"}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return want
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from symmerge.resolve import HFModel
from symmerge.spec import trace
torch.manual_seed(0)
cfg = LlamaConfig(**{dict(SIZES[size], **COMMON)!r})
a = LlamaForCausalLM(cfg).eval()
a.save_pretrained({str(work / "a")!r})
w = HFModel(a)
spec = trace(w, (torch.randint(0, 32000, (2, 8)),))
state = spec.permute_state_dict(w.state_dict(), spec.random_permutations(seed=1))
a.load_state_dict({{k[len("model."):]: v for k, v in state.items()}})
a.save_pretrained({str(work / "b")!r})
"""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run([PYTHON, "-c", code], check=True)
    stamp.write_text(json.dumps(want))
    return want


def run_measured(cmd: list[str], threads: int) -> dict:
    """Run ``cmd`` in a fresh process; wall seconds and its peak RSS (wait4's ru_maxrss)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    return {"exit": code, "seconds": round(wall, 1), "peak_rss_gb": usage.ru_maxrss / 2**20}


def memory_merge_code(a: Path, b: Path, out: Path, max_sweeps: int | None) -> str:
    kwargs = "" if max_sweeps is None else f", max_sweeps={max_sweeps}"
    return f"""
from pathlib import Path
from symmerge import merge
from symmerge.export import save_hf_directory
from symmerge.resolve import resolve_model
ra, rb = resolve_model("hf:{a}"), resolve_model("hf:{b}")
merged, res = merge([ra.model, rb.model], "weight", example_inputs=ra.example_inputs{kwargs})
save_hf_directory(merged, Path("{out}"), [Path("{a}"), Path("{b}")], {{"method": "weight"}})
"""


def max_abs_diff(x: Path, y: Path) -> float:
    """Largest |x - y| over every stored tensor, read one at a time."""
    from symmerge.lazy import SafetensorsState

    sx, sy = SafetensorsState(x), SafetensorsState(y)
    if set(sx) != set(sy):
        return float("inf")
    return max(float((sx[k].double() - sy[k].double()).abs().max()) for k in sx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="402m")
    p.add_argument("--modes", default="lazy,memory", help="comma-separated: lazy, memory")
    p.add_argument("--max-sweeps", type=int, default=None, help="weight matching sweeps bound")
    p.add_argument("--work", default=str(CACHE / "lazy_memory"), help="where checkpoints go")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render", default=None, help="rewrite the .md from this results JSON")
    args = p.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(saved))
        return
    torch.set_num_threads(args.threads)
    meta = provenance(
        {"torch": 0, "permutation": 1}, {"size": args.size, "max_sweeps": args.max_sweeps}
    )
    work = Path(args.work) / args.size
    inputs = make_inputs(args.size, work)
    from symmerge.lazy import SafetensorsState

    model_bytes = SafetensorsState(work / "a").nbytes()
    params = sum(e.nbytes // 4 for e in SafetensorsState(work / "a").entries.values())
    rows = {
        "interpreter": run_measured(
            [PYTHON, "-c", "import torch, transformers, symmerge.cli, symmerge.lazy"], args.threads
        )
    }
    sweeps = [] if args.max_sweeps is None else ["-p", f"max_sweeps={args.max_sweeps}"]
    for mode in args.modes.split(","):
        out = work / f"out-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        if mode == "lazy":
            cmd = [
                PYTHON,
                "-m",
                "symmerge.cli",
                "merge",
                f"hf:{work / 'a'}",
                f"hf:{work / 'b'}",
                "-m",
                "weight",
                "-o",
                str(out),
                "--json",
                str(work / "lazy.json"),
                *sweeps,
            ]
        elif mode == "memory":
            cmd = [PYTHON, "-c", memory_merge_code(work / "a", work / "b", out, args.max_sweeps)]
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        print(f"{args.size} {mode}: running", flush=True)
        row = run_measured(cmd, args.threads)
        row["merged_vs_A_max_abs_diff"] = (
            max_abs_diff(out, work / "a") if row["exit"] == 0 else None
        )
        if mode == "lazy" and (work / "lazy.json").is_file():
            summary = json.loads((work / "lazy.json").read_text())
            row["timings"] = summary.get("timings")
            row["sweeps"] = summary.get("iterations")
        rows[mode] = row
        print(f"{args.size} {mode}: {row}", flush=True)
    base = rows["interpreter"]["peak_rss_gb"]
    for row in rows.values():
        row["above_interpreter_gb"] = row["peak_rss_gb"] - base
        row["above_over_model_size"] = row["above_interpreter_gb"] / (model_bytes / 2**30)
    result = {
        "meta": meta,
        "inputs": inputs,
        "params": params,
        "model_gb": model_bytes / 2**30,
        "rows": rows,
    }
    name = f"lazy_memory_{args.size}"
    write_json(Path(args.out) / f"{name}.json", result)
    text = markdown(result)
    (Path(args.out) / f"{name}.md").write_text(text)
    print(text)


def markdown(result: dict) -> str:
    meta, params, rows = result["meta"], result["params"], result["rows"]
    lines = [
        f"# Weight matching two {params / 1e6:.0f}M-parameter Llama-style checkpoints: peak memory",
        "",
        *provenance_md(meta),
        "",
        f"One model: {params:,} parameters, {result['model_gb']:.2f} GiB of float32 weights; "
        "B is a random permutation of A, so the merge must return A (last column).",
        "",
    ]
    table = [
        [
            mode,
            r["exit"],
            f"{r['peak_rss_gb']:.2f}",
            f"{r['above_interpreter_gb']:.2f}",
            f"{r['above_over_model_size']:.2f}",
            r["seconds"],
            r.get("sweeps", ""),
            ""
            if r.get("merged_vs_A_max_abs_diff") is None
            else f"{r['merged_vs_A_max_abs_diff']:.3g}",
        ]
        for mode, r in rows.items()
    ]
    lines += md_table(
        [
            "mode",
            "exit",
            "peak RSS GiB",
            "above interpreter GiB",
            "above / one model",
            "wall s",
            "sweeps",
            "merged vs A max abs diff",
        ],
        table,
    )
    lazy, memory = rows.get("lazy"), rows.get("memory")
    if lazy and lazy["exit"] == 0:
        ratio = lazy["above_over_model_size"]
        verdict = "met" if ratio < 2 else "not met"
        lines += [
            "",
            f"From disk, the peak above the interpreter is {ratio:.2f}x one model's weights "
            f"(goal: under 2x: {verdict}); the whole process peaks at "
            f"{lazy['peak_rss_gb']:.2f} GiB (the 1.1B goal: within 16 GB).",
        ]
        if memory and memory["exit"] == 0:
            peak = memory["peak_rss_gb"] / lazy["peak_rss_gb"]
            slower = lazy["seconds"] / memory["seconds"]
            lines[-1] += (
                f" In memory the same merge peaks at {memory['peak_rss_gb']:.2f} GiB "
                f"({peak:.1f}x the disk run's peak); from disk it takes {slower:.2f}x the "
                "in-memory wall time (nothing is cached between steps: each step reads its "
                "tensors again)."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
