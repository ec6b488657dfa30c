"""Helpers shared by the benchmark scripts: provenance (command, date, hardware), checkpoints
trained on demand, data subsets and result writing. Not part of the symmerge package."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from symmerge.report.provenance import cpu_name, portable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"  # git-ignored: checkpoints trained by the benchmarks


def display_path(path: str | Path) -> str:
    """A path as results files record it: relative to the repository, never machine-specific."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return path.name


def add_common_args(parser: Any) -> None:
    parser.add_argument(
        "--data-root",
        default=os.environ.get("SYMMERGE_DATA"),
        help="dataset folder (default: $SYMMERGE_DATA, else symmerge's default)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--cache", default=str(CACHE), help="where checkpoints are kept")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: shared machine)"
    )


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], HERE.parent)
    line = " ".join(shlex.quote(a) for a in [".venv/bin/python", script, *sys.argv[1:]])
    return portable(line)


def code_version() -> str:
    """The commit the results come from, with ``+dirty`` and a hash of the uncommitted source
    changes when there are any (a result is valid only for the code that made it)."""
    import hashlib

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=HERE.parent, check=True).stdout  # fmt: skip

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
        paths = ("src", "benchmarks/*.py")  # untracked files count only in the package
        diff = git("diff", "HEAD", "--", *paths) + git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not diff:
        return commit
    return f"{commit}+dirty (sha256 of the diff {hashlib.sha256(diff.encode()).hexdigest()[:12]})"


_CODE_AT_START = code_version()  # the code a script runs is the code it started with


def provenance(seeds: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Command, `date`, hardware, versions and seeds of a run (the code: as the script
    started, wherever in the run this is called)."""
    try:
        date = subprocess.run(["date"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # pragma: no cover
        import datetime as dt

        date = dt.datetime.now().isoformat()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "command": command_line(),
        "code": _CODE_AT_START,
        "date": date,
        "hardware": (
            f"{cpu_name()}; {os.cpu_count()} logical CPUs shared with other jobs; "
            f"torch threads {torch.get_num_threads()}; "
            + (f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU")
        ),
        "load_average_at_start": None if load is None else [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seeds": seeds,
        **(extra or {}),
    }


def provenance_md(meta: dict[str, Any]) -> list[str]:
    lines = [
        f"- Command: `{meta['command']}`",
        f"- Code: {meta.get('code', 'not recorded')}",
        f"- Date (`date`): {meta['date']}",
        f"- Hardware: {meta['hardware']}; load average at start "
        f"{meta.get('load_average_at_start')}",
        f"- Python {meta['python']}, torch {meta['torch']}",
        f"- Seeds: {json.dumps(meta['seeds'])}",
    ]
    return lines


def load_or_train(
    arch: str,
    dataset: str,
    seed: int,
    epochs: int,
    cache: str | Path,
    data_root: str | None,
    limit_train: int | None = None,
    tag: str = "",
) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """A checkpoint from ``cache`` (trained with symmerge's recipe when missing).

    The file name carries everything that defines it; it is the same checkpoint that
    ``symmerge train ARCH --dataset DATASET --seed SEED --epochs EPOCHS -o PATH`` writes.
    """
    from symmerge.io import load_checkpoint, save_checkpoint
    from symmerge.train import train_model

    lim = "" if limit_train is None else f"_n{limit_train}"
    path = Path(cache) / f"{arch}_{dataset}_s{seed}_e{epochs}{lim}{tag}.safetensors"
    if path.exists():
        model, meta = load_checkpoint(path)
        if int(meta.get("seed", -1)) != seed or int(meta.get("epochs", -1)) != epochs:
            raise RuntimeError(f"{path} does not hold seed {seed}, {epochs} epochs: {meta}")
        return model, meta, path
    print(f"training {arch} on {dataset}, seed {seed}, {epochs} epochs -> {path}", flush=True)
    model, info = train_model(
        arch,
        dataset,
        epochs=epochs,
        seed=seed,
        data_root=data_root,
        progress=False,
        limit_train=limit_train,
        device="cpu",
    )
    save_checkpoint(path, model, info["config"], info)
    model, meta = load_checkpoint(path)
    return model, meta, path


def subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` samples drawn without replacement with a seeded generator."""
    n = min(n, len(x))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)
