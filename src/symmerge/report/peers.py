"""Peers' own code on the report's checkpoints, beside our runs.

A peer runs in a subprocess (the report's Python with ``PYTHONPATH`` set to the peer's own
package folder), so its packages never enter the report's process and a missing or broken
peer cannot break the report: it is recorded as ``"not run"`` or ``"failed"`` with the exact
reason. Packages are never installed from here; the reason names the install command.

Peers (:data:`PEERS`, by setting, each against our run of the same method on the same
files): the PyPI ``rebasin`` package (weight matching) on same-task; the official C2M3
code (:mod:`symmerge.report.peer_c2m3`) on n-models and n-models-5; the official PLeaS code
(:mod:`symmerge.report.peer_pleas`) on cross-dataset and resnet20-disjoint; the official
neuron-interpolation fusion code (:mod:`symmerge.report.peer_fusion`) on non-iid; the
official ZipIt! code (:mod:`symmerge.report.peer_zipit`) on resnet20-disjoint. Each
subprocess loads our safetensors with :func:`symmerge.io.load_checkpoint` (converted to the
peer's model where it has its own), merges with the peer's code (the data-reading ones on the
merge batches the runner drew for our runs, handed over in a file), and saves the merged
state dict in our names to a temporary file; the report's process evaluates that model with
the same function and test data as our runs.

Where peer packages live: ``peer_root`` (argument), else ``$SYMMERGE_PEERS``, else
``~/.cache/symmerge/peers``; each peer in its own subfolder (``rebasin/``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.report.checkpoints import file_sha256

__all__ = [
    "PEERS",
    "PEERS_REASON",
    "Peer",
    "PEERS_ENV",
    "REBASIN_CALL",
    "default_peer_root",
    "portable_entry",
    "portable_paths",
    "install_command",
    "probe_rebasin",
    "run_rebasin",
    "run_worker",
    "import_stub",
    "load_batches",
    "peer_commit",
    "peer_env",
    "probe_source",
    "unavailable",
    "save_batches",
]

#: Environment variable naming the folder of peer packages.
PEERS_ENV = "SYMMERGE_PEERS"
#: The packages the rebasin peer needs next to torch (``--no-deps``: torch is never pulled).
REBASIN_PACKAGES = ("rebasin", "torchview", "graphviz")
#: What the peer subprocess calls, as recorded.
REBASIN_CALL = (
    "torch.manual_seed(seed); x = torch.randn(8, *model_a.input_shape) (traced only, weight "
    "matching reads no data); PermutationCoordinateDescent(model_a, model_b, x).rebasin() "
    "(timed; after one untimed call on copies); merged = average of model_a's and the "
    "aligned model_b's state dicts"
)
#: Inputs passed to rebasin for tracing the graph (it only needs their shape).
TRACE_EXAMPLES = 8
#: The subprocess's time limit, seconds.
DEFAULT_TIMEOUT = 1800.0

_PROBE = (
    "import importlib.metadata as m, pathlib, rebasin; "
    "print(m.version('rebasin')); print(pathlib.Path(rebasin.__file__).parent.parent)"
)
_WORKER = "from symmerge.report.peers import _rebasin_worker; _rebasin_worker()"


def default_peer_root() -> Path:
    """``$SYMMERGE_PEERS``, else ``~/.cache/symmerge/peers`` (outside the repository, so
    peer packages are never committed)."""
    env = os.environ.get(PEERS_ENV)
    return Path(env) if env else Path.home() / ".cache" / "symmerge" / "peers"


def install_command(folder: Path) -> str:
    """The command that installs the rebasin peer into ``folder`` (never run from here)."""
    return (f"{sys.executable} -m pip install --no-deps --target {folder} "
            + " ".join(REBASIN_PACKAGES))  # fmt: skip


def _env(folder: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _tail(text: str, n: int = 6) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[:1000]


def peer_commit(folder: Path) -> str | None:
    """The peer repository's commit, recorded in ``folder/COMMIT`` when it was unpacked."""
    try:
        return (folder / "COMMIT").read_text().strip() or None
    except OSError:
        return None


def peer_env(folder: Path, threads: int, **variables: str) -> dict[str, str]:
    """The environment of a peer repository's subprocess: its extra packages
    (``folder/site``, when there) and its tree (``folder/src``) on ``PYTHONPATH``, ``threads``
    torch threads, no progress bars, a traceback on a crash, and ``variables``."""
    env = _env(folder / "src", threads)
    if (folder / "site").is_dir():
        env["PYTHONPATH"] = os.pathsep.join((str(folder / "site"), env["PYTHONPATH"]))
    env.update(TQDM_DISABLE="1", PYTHONFAULTHANDLER="1", **variables)
    return env


def probe_source(
    folder: Path, name: str, marker: str, probe: str, **variables: str
) -> tuple[str | None, str | None, str | None]:
    """``(commit, imported_from, None)`` when the peer repository unpacked in ``folder``
    (``folder/src/marker`` exists) imports in its environment (``probe``, Python code that
    prints where it imported from last), else ``(None, None, reason)``; a subprocess, so
    nothing is imported here. ``commit``: :func:`peer_commit`."""
    if not (folder / "src" / marker).exists():
        return None, None, f"no official {name} source in {folder} (expected {folder}/src/{marker})"
    try:
        with tempfile.TemporaryDirectory(prefix="symmerge-peer-") as tmp:
            proc = subprocess.run([sys.executable, "-c", probe],
                                  env=peer_env(folder, 1, **variables), cwd=tmp,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, None, f"probing the official {name} failed: {type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        return (
            None,
            None,
            f"cannot import the official {name} from {folder}: " + _tail(proc.stderr, 1),
        )
    return peer_commit(folder), proc.stdout.strip().splitlines()[-1], None


def unavailable(name: str) -> Callable[..., Any]:
    """A function of an import stub: it raises if the peer's code ever calls it."""

    def fn(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{name} is an import stub of a symmerge peer run")

    return fn


def import_stub(module: str, attrs: Mapping[str, Any]) -> bool:
    """Register an import stub for ``module`` (and its parent packages) holding ``attrs``,
    when its top package is not installed (in a peer's subprocess: a package its code imports
    and never calls on our path); whether it did."""
    top = module.split(".")[0]
    ours = getattr(sys.modules.get(top), "_symmerge_stub", False)
    if not ours and (top in sys.modules or importlib.util.find_spec(top) is not None):
        return False  # installed: the real module
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = []  # type: ignore[attr-defined]  # a package: submodules import
            # a spec without origin: importlib.util.find_spec (torch._dynamo asks for sklearn
            # and einops) then sees a module with no files, not a broken one
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            mod._symmerge_stub = True  # type: ignore[attr-defined]
            sys.modules[name] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
    for a, v in attrs.items():
        setattr(sys.modules[module], a, v)
    return True


def probe_rebasin(folder: Path) -> tuple[str | None, str | None, str | None]:
    """``(version, imported_from, None)`` when rebasin imports in the peer's environment,
    else ``(None, None, reason)``; a subprocess, so nothing is imported here."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=_env(folder, 1),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, None, f"probing rebasin failed: {type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        where = str(folder) if folder.is_dir() else f"{folder} (no such folder)"
        return None, None, f"cannot import rebasin from {where}: {_tail(proc.stderr, 1)}"
    version, source = (proc.stdout.strip().splitlines() + ["", ""])[:2]
    return version, source, None


def portable_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with this interpreter written ``python`` and the home folder ``~`` in its
    texts (install commands, folders, reasons): a results file names no machine's paths."""

    def whole(path: str) -> re.Pattern[str]:  # the path itself, not a part of another one
        return re.compile(rf"(?<![^\s'\"=(]){re.escape(path)}(?=[/\s'\")]|$)")

    python, home = whole(sys.executable), whole(str(Path.home()))

    def clean(v: Any) -> Any:
        return home.sub("~", python.sub("python", v)) if isinstance(v, str) else v

    return {k: clean(v) for k, v in entry.items()}


def portable_paths(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A peer's ``run_*`` whose entry passes through :func:`portable_entry`."""

    @functools.wraps(run)
    def wrapped(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return portable_entry(run(*args, **kwargs))

    return wrapped


@portable_paths
def run_rebasin(
    checkpoints: Sequence[Path],
    evaluate: Callable[[nn.Module], dict[str, Any]],
    *,
    seed: int,
    folder: Path | None = None,
    threads: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Merge two checkpoints with the PyPI rebasin package in a subprocess; a peer that is
    missing or fails is recorded in the entry, never raised.

    Args:
        checkpoints: the two source files (our safetensors), model A first.
        evaluate: scores the merged model here (the report's own evaluation and test data).
        seed: torch seed of the subprocess (rebasin draws its visiting order from it, and
            the :data:`TRACE_EXAMPLES` random inputs it traces the models with).
        folder: the peer's package folder (default ``default_peer_root() / "rebasin"``).
        threads: torch threads of the subprocess (default: this process's).
        timeout: seconds before the subprocess is stopped (recorded as failed).

    Returns the peer entry without ``setting``/``seed``/``ours``: ``status`` ``"ok"``,
    ``"not run"`` (not importable: ``reason`` and ``install``) or ``"failed"`` (``reason``).
    """
    folder = Path(folder) if folder is not None else default_peer_root() / "rebasin"
    threads = threads or torch.get_num_threads()
    entry: dict[str, Any] = {
        "peer": "rebasin", "package": "rebasin (PyPI)", "version": None, "status": "not run",
        "reason": None, "install": install_command(folder), "folder": str(folder),
        "imported_from": None, "call": REBASIN_CALL,
        "checkpoints": [file_sha256(Path(p)) for p in checkpoints], "threads": threads,
        "metrics": None, "seconds": None, "timings": None, "permutations": None,
        "merged_weights_sha256": None,
    }  # fmt: skip
    version, source, reason = probe_rebasin(folder)
    if reason is not None:
        return {**entry, "reason": reason}
    entry.update(version=version, imported_from=source)
    job = {"checkpoints": [str(Path(p).resolve()) for p in checkpoints],
           "sha256": entry["checkpoints"], "seed": seed, "threads": threads}  # fmt: skip
    fields, result = run_worker(_WORKER, job, _env(folder, threads), checkpoints[0], evaluate,
                                timeout=timeout)  # fmt: skip
    if result is None:
        return {**entry, **fields}
    return {**entry, **fields, "permutations": result["permutations"]}


def save_batches(batches: Sequence[tuple[Tensor, Tensor]], path: Path) -> None:
    """``batches`` in one safetensors file (``x0``, ``y0``, ...) a peer worker reads back
    with :func:`load_batches`."""
    from safetensors.torch import save_file

    tensors = {}
    for k, (x, y) in enumerate(batches):
        tensors[f"x{k}"], tensors[f"y{k}"] = x.contiguous(), y.contiguous()
    save_file(tensors, str(path))


def load_batches(path: str | Path) -> list[tuple[Tensor, Tensor]]:
    """The batches :func:`save_batches` wrote, in order."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return [(tensors[f"x{k}"], tensors[f"y{k}"]) for k in range(len(tensors) // 2)]


def run_worker(
    worker: str,
    job: dict[str, Any],
    env: dict[str, str],
    model_file: Path,
    evaluate: Callable[[nn.Module], dict[str, Any]],
    *,
    timeout: float,
    data: Sequence[tuple[Tensor, Tensor]] | None = None,
    num_outputs: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run a peer's worker (``python -c worker job.json``, in a temporary folder) and score the
    merged state dict it saves with ``evaluate``, on ``model_file``'s architecture (its
    output axis resized to ``num_outputs`` when given: per-task heads side by side).

    The job gets ``merged`` and ``result`` paths (and ``data``, the batches' file, when
    ``data`` is given); the worker writes the merged weights and
    ``{"timings": {"total_s": ..., ...}, ...}`` there. Returns the entry's fields
    (``status``, and ``reason`` or ``metrics``, ``seconds``, ``timings``,
    ``merged_weights_sha256``) and the worker's result (``None`` when it failed: a timeout, a
    non-zero exit, a merge that does not load or evaluate)."""
    from safetensors.torch import load_file

    from symmerge.io import load_checkpoint
    from symmerge.report.checkpoints import weights_sha256

    with tempfile.TemporaryDirectory(prefix="symmerge-peer-") as tmp:
        job = {**job, "merged": str(Path(tmp) / "merged.st"),
               "result": str(Path(tmp) / "result.json")}  # fmt: skip
        if data is not None:
            job["data"] = str(Path(tmp) / "data.st")
            save_batches(data, Path(job["data"]))
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", worker, str(Path(tmp) / "job.json")],
                                  env=env, cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout:g} s"}, None
        wall = time.perf_counter() - t0
        if proc.returncode != 0:  # a signal (OOM killer, crash) leaves no traceback
            why = f"exit status {proc.returncode}: {_tail(proc.stderr)}"
            return {"status": "failed", "reason": f"the peer subprocess failed: {why}"}, None
        result = json.loads(Path(tmp, "result.json").read_text())
        state = load_file(job["merged"])
    model, _ = load_checkpoint(model_file)
    try:
        if num_outputs is not None:
            from symmerge.merging import trace_model
            from symmerge.resize import resize

            model = resize(model, trace_model(model), {}, num_outputs=num_outputs)
        model.load_state_dict(state)
        metrics = evaluate(model.eval())
    except Exception as exc:  # recorded, never raised
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:1000]
        return {"status": "failed", "reason": f"evaluating the peer's merge: {message}"}, None
    timings = {k: round(v, 6) for k, v in result["timings"].items()}
    return {
        "status": "ok", "metrics": metrics, "seconds": timings["total_s"],
        "timings": {**timings, "subprocess_wall_s": round(wall, 6)},
        "merged_weights_sha256": weights_sha256(model),
    }, result  # fmt: skip


def _rebasin_worker() -> None:
    """The peer subprocess (``sys.argv[1]``: the job file): our loader in, rebasin's
    coordinate descent timed, the average of the aligned state dicts out."""
    from rebasin import PermutationCoordinateDescent
    from safetensors.torch import save_file

    from symmerge.evaluate import interpolate_state_dicts
    from symmerge.io import load_checkpoint

    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    for path, sha in zip(job["checkpoints"], job["sha256"], strict=True):
        if file_sha256(Path(path)) != sha:
            raise SystemExit(f"{path} changed: its sha256 is not the report's {sha}")
    a, b = (load_checkpoint(p)[0].eval() for p in job["checkpoints"])
    torch.manual_seed(int(job["seed"]))
    x = torch.randn(TRACE_EXAMPLES, *a.input_shape)
    # an untimed first call on copies: the process's one-off costs (imports, first kernels)
    # are not the peer's matching time; the timed call below starts from the same seed
    torch.manual_seed(int(job["seed"]))
    w0 = time.perf_counter()
    PermutationCoordinateDescent(copy.deepcopy(a), copy.deepcopy(b), x).rebasin()
    first = time.perf_counter() - w0
    torch.manual_seed(int(job["seed"]))
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(a, b, x)
    t1 = time.perf_counter()
    pcd.rebasin()  # permutes b in place
    t2 = time.perf_counter()
    merged = interpolate_state_dicts(a.state_dict(), b.state_dict(), 0.5)
    save_file({k: v.detach().contiguous() for k, v in merged.items()}, job["merged"])
    Path(job["result"]).write_text(json.dumps({
        "timings": {"total_s": t2 - t0, "graph_init_s": t1 - t0,
                    "coordinate_descent_s": t2 - t1, "first_call_s": first},
        "permutations": len(pcd.pinit.model_graph.permutation_to_info),
    }))  # fmt: skip


def _driver(module: str, function: str) -> Callable[..., dict[str, Any]]:
    """``symmerge.report.<module>.<function>``, imported when called (the drivers import
    this module)."""

    def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
        found = getattr(importlib.import_module(f"symmerge.report.{module}"), function)
        return found(*args, **kwargs)

    return run


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer's own code on a setting's checkpoints, beside our run of ``ours``.

    ``run(checkpoints, evaluate, *, seed, folder)`` returns the entry; ``folder`` is the
    peer's subfolder ``subfolder`` of the peer root. A peer that ``reads_data`` also gets
    ``setting`` (the :class:`~symmerge.report.settings.Setting`) and ``data`` (the merge
    batches our runs of that setting and seed got, and their record). ``first_seed_only``
    runs it on the folder's first seed only (where one run takes a quarter of an hour)."""

    name: str
    ours: str
    run: Callable[..., dict[str, Any]]
    subfolder: str
    first_seed_only: bool = False
    reads_data: bool = False


#: The peers, by the setting they run on (several may share one). The official C2M3 code runs
#: on every seed of the five-model setting (the speed and accuracy claim) and the first of the
#: three-model one; the neuron-interpolation code on the first seed only.
C2M3 = Peer("c2m3-official", "c2m3", _driver("peer_c2m3", "run_c2m3"), "c2m3")
PEERS: dict[str, tuple[Peer, ...]] = {
    "same-task": (Peer("rebasin", "weight", run_rebasin, "rebasin"),),
    "n-models": (dataclasses.replace(C2M3, first_seed_only=True),),
    "cross-dataset": (
        Peer("pleas-official", "pleas", _driver("peer_pleas", "run_pleas"), "pleas",
             reads_data=True),
    ),
    "non-iid": (
        Peer("neuron-interpolation-official", "kf-linear", _driver("peer_fusion", "run_fusion"),
             "neuron-interpolation", reads_data=True,
             first_seed_only=True),  # their K-means fusion takes ten minutes on one core
    ),
    "n-models-5": (C2M3,),
    "resnet20-disjoint": (
        Peer("zipit-official", "zip", _driver("peer_zipit", "run_zipit"), "zipit",
             reads_data=True),
        Peer("pleas-official", "pleas", _driver("peer_pleas", "run_pleas"), "pleas",
             reads_data=True, first_seed_only=True),  # Adam on a ResNet: most of an hour
    ),
}  # fmt: skip

#: Why a report has no other peers (the top-level ``peers.reason`` of a report).
PEERS_REASON = "each peer runs on the settings it is registered for (PEERS)"
