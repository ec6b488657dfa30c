"""The official C2M3 code on our MLP checkpoints, a peer beside our ``c2m3``.

The authors' repository (crisostomi/cycle-consistent-model-merging) is no package: its
``src`` tree and a few small pure-Python packages it imports live in the peer folder
(``folder/src``, ``folder/site``, the repository's commit in ``folder/COMMIT``) and run in
a subprocess of the report's Python, as in :mod:`symmerge.report.peers`; torch, numpy, scipy
and matplotlib come from our environment. Missing or failing, the peer is recorded as
``"not run"`` or ``"failed"`` with the reason, never raised.

The subprocess converts our MLP state dicts to their ``layer{k}`` names, runs their N-model
merger (``FrankWolfeSynchronizedMerger.merge_models``: Frank-Wolfe synchronised matching into
a universe, then the average of the models mapped there) with the repository's MLP defaults,
converts the merged state dict back and saves it; the report's process evaluates it.

Their code targets Python 3.9 / torch 1.13 / a GPU; what it needs on ours is shimmed in the
subprocess only (:data:`C2M3_NOTES`), never by editing their files.
"""

from __future__ import annotations

import functools
import json
import random
import string
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.report.checkpoints import file_sha256
from symmerge.report.peers import (
    default_peer_root,
    peer_commit,
    peer_env,
    portable_paths,
    probe_source,
    run_worker,
)

__all__ = [
    "C2M3_CALL",
    "C2M3_NOTES",
    "C2M3_PACKAGES",
    "c2m3_install_command",
    "from_c2m3_state_dict",
    "probe_c2m3",
    "run_c2m3",
    "to_c2m3_state_dict",
]

REPO = "crisostomi/cycle-consistent-model-merging"
#: What their modules import next to torch/numpy/scipy/matplotlib/tqdm/rich (``--no-deps``;
#: backports.strenum declares Python < 3.11 but is a plain ``StrEnum``, hence
#: ``--ignore-requires-python``).
C2M3_PACKAGES = (
    "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3", "hydra-core==1.3.2",
    "pytorch-lightning==2.6.6", "lightning-utilities==0.15.3", "torchmetrics==1.9.0",
    "nn-template-core==0.2.2", "GitPython==3.2.1", "gitdb==4.0.12", "smmap==5.0.3",
    "python-dotenv==1.2.4", "graphviz==0.21", "torchviz==0.0.3", "einops==0.8.2",
    "backports.strenum==1.3.1",
)  # fmt: skip
#: The subprocess's time limit, seconds: their Frank-Wolfe matching of five zoo MLPs ran
#: past half an hour on this 2-core CPU under load (three: about 7 minutes).
TIMEOUT = 5400.0
#: Their merger's settings for MLPs (conf/matching/merger/frank_wolfe_to_universe.yaml).
MAX_ITER = 200
INIT = "sinkhorn"
C2M3_CALL = (
    "FrankWolfeSynchronizedMerger('frank_wolfe', MLPPermutationSpecBuilder(num_hidden_layers="
    f"<hidden layers>).create_permutation_spec(), initialization_method={INIT!r}, "
    f"max_iter={MAX_ITER}, average_in_universe=True, keep_soft_perms=False, device='cpu')"
    ".merge_models({'a': model_0, 'b': model_1, ...}) (conf/matching/merger/"
    "frank_wolfe_to_universe.yaml; their REPAIR step is skipped: it only renormalises conv "
    "nets), random/numpy/torch seeded with seed; timed, after one untimed call with "
    "max_iter=1 on the same models; merged = the models' average in the universe"
)
#: The shims the subprocess installs before importing their code, and why.
C2M3_NOTES = (
    "shims (subprocess only, their files unchanged): a stub 'wandb' module with a no-op log "
    "(their timeit decorator on merge_models calls wandb.log, which would need wandb.init; "
    "no wandb is installed); "
    "scipy.misc.derivative as a stub that raises (imported by ccmm.utils.utils, removed from "
    "scipy; the merge never calls it); pytorch_lightning.loggers.LightningLoggerBase = Logger "
    "(nn-template-core 0.2.2 imports the pre-1.9 name); CPU: the merger's call of "
    "frank_wolfe_synchronized_matching gets device='cpu' (the merger does not pass its device "
    "on; the default is 'cuda'), the sinkhorn init's initialize_perturbed_uniform gets "
    "device='cpu' (default 'cuda'), torch.Tensor.cuda returns the tensor itself "
    "(update_perm_matrices_sync calls .cuda()); environment TQDM_DISABLE=1 and "
    "GIT_PYTHON_REFRESH=quiet, run in a temporary folder (nn-template-core reads .env and "
    "the git root of the working folder at import)"
)

#: The subprocess's environment beside :func:`symmerge.report.peers.peer_env`'s.
ENV = {"GIT_PYTHON_REFRESH": "quiet"}
_PROBE = "from symmerge.report.peer_c2m3 import _c2m3_probe; _c2m3_probe()"
_WORKER = "from symmerge.report.peer_c2m3 import _c2m3_worker; _c2m3_worker()"
_PARAMS = ("weight", "bias")


def c2m3_install_command(folder: Path) -> str:
    """How to prepare ``folder`` (never run from here)."""
    return (
        f"fetch github:{REPO} as a bare mirror MIRROR, then: mkdir -p {folder} && "
        f"git --git-dir=MIRROR archive HEAD src | tar -x -C {folder} && "
        f"git --git-dir=MIRROR rev-parse HEAD > {folder}/COMMIT && "
        f"{sys.executable} -m pip install --no-deps --ignore-requires-python "
        f"--target {folder}/site " + " ".join(C2M3_PACKAGES)
    )


def to_c2m3_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our ``mlp`` (``layers`` = Flatten, then Linear/ReLU pairs, then Linear: its Linears are
    ``layers.1``, ``layers.3``, ...) in their MLP names ``layer0``, ``layer1``, ..."""
    n = len(state) // 2
    ours = [f"layers.{2 * k + 1}.{p}" for k in range(n) for p in _PARAMS]
    if n < 2 or sorted(state) != sorted(ours):
        raise ValueError(f"not a symmerge MLP state dict (Linear layers only): {sorted(state)}")
    return {f"layer{k}.{p}": state[f"layers.{2 * k + 1}.{p}"] for k in range(n) for p in _PARAMS}


def from_c2m3_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`to_c2m3_state_dict`."""
    n = len(state) // 2
    theirs = [f"layer{k}.{p}" for k in range(n) for p in _PARAMS]
    if n < 2 or sorted(state) != sorted(theirs):
        raise ValueError(f"not a C2M3 MLP state dict (layer0, layer1, ...): {sorted(state)}")
    return {f"layers.{2 * k + 1}.{p}": state[f"layer{k}.{p}"] for k in range(n) for p in _PARAMS}


def probe_c2m3(folder: Path) -> tuple[str | None, str | None, str | None]:
    """``(commit, imported_from, None)`` when their merger imports in the peer's environment
    (with the shims), else ``(None, None, reason)`` (:func:`symmerge.report.peers.probe_source`)."""
    return probe_source(folder, "C2M3", "ccmm", _PROBE, **ENV)


@portable_paths
def run_c2m3(
    checkpoints: Sequence[Path],
    evaluate: Callable[[nn.Module], dict[str, Any]],
    *,
    seed: int,
    folder: Path | None = None,
    threads: int | None = None,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Merge N >= 2 MLP checkpoints with the official C2M3 code in a subprocess; a peer that
    is missing or fails is recorded in the entry, never raised.

    Args:
        checkpoints: the source files (our safetensors ``mlp`` checkpoints), model 0 first.
        evaluate: scores the merged model here (the report's own evaluation and test data).
        seed: random/numpy/torch seed of the subprocess (their sinkhorn init draws from it).
        folder: the peer folder (default ``default_peer_root() / "c2m3"``).
        threads: torch threads of the subprocess (default: this process's).
        timeout: seconds before the subprocess is stopped (recorded as failed).

    Returns the peer entry: ``status`` ``"ok"``, ``"not run"`` (not importable: ``reason``
    and ``install``) or ``"failed"`` (``reason``).
    """
    folder = Path(folder) if folder is not None else default_peer_root() / "c2m3"
    threads = threads or torch.get_num_threads()
    commit = peer_commit(folder)
    entry: dict[str, Any] = {
        "peer": "c2m3-official", "package": f"{REPO}@{commit or 'unknown commit'}",
        "version": commit, "status": "not run", "reason": None,
        "install": c2m3_install_command(folder), "folder": str(folder), "imported_from": None,
        "call": C2M3_CALL, "notes": C2M3_NOTES,
        "checkpoints": [file_sha256(Path(p)) for p in checkpoints], "threads": threads,
        "metrics": None, "seconds": None, "timings": None, "iterations": None,
        "objective": None, "merged_weights_sha256": None,
    }  # fmt: skip
    version, source, reason = probe_c2m3(folder)
    if reason is not None:
        return {**entry, "reason": reason}
    entry.update(version=version, imported_from=source)
    job = {"checkpoints": [str(Path(p).resolve()) for p in checkpoints],
           "sha256": entry["checkpoints"], "seed": seed, "threads": threads}  # fmt: skip
    fields, result = run_worker(_WORKER, job, peer_env(folder, threads, **ENV), checkpoints[0],
                                evaluate, timeout=timeout)  # fmt: skip
    if result is None:
        return {**entry, **fields}
    return {**entry, **fields, "iterations": result["iterations"],
            "objective": result["objective"]}  # fmt: skip


def _import_c2m3() -> tuple[Any, Any, list[tuple[float, dict]]]:
    """Install the shims of :data:`C2M3_NOTES` and import their merger and spec modules.

    Returns ``(merger module, permutation_spec module, calls)``: ``calls`` receives
    ``(seconds, opt_infos)`` for each Frank-Wolfe matching the merger runs."""
    wandb = types.ModuleType("wandb")
    wandb.log = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    sys.modules.setdefault("wandb", wandb)
    import scipy.misc

    if not hasattr(scipy.misc, "derivative"):

        def derivative(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("scipy.misc.derivative is a shim of symmerge's C2M3 peer")

        scipy.misc.derivative = derivative  # type: ignore[attr-defined]
    import pytorch_lightning.loggers as pl_loggers

    if not hasattr(pl_loggers, "LightningLoggerBase"):
        pl_loggers.LightningLoggerBase = pl_loggers.Logger  # type: ignore[attr-defined]
    import ccmm.matching.frank_wolfe_matching as fw
    import ccmm.matching.merger as merger
    import ccmm.matching.permutation_spec as permutation_spec

    fw.initialize_perturbed_uniform = functools.partial(fw.initialize_perturbed_uniform,
                                                        device="cpu")  # fmt: skip
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    calls: list[tuple[float, dict]] = []
    matching = merger.frank_wolfe_synchronized_matching

    def timed_matching(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = matching(*args, **{**kwargs, "device": "cpu"})
        calls.append((time.perf_counter() - t0, out[1]))
        return out

    merger.frank_wolfe_synchronized_matching = timed_matching
    return merger, permutation_spec, calls


def _c2m3_probe() -> None:
    """Probe subprocess: import with the shims, print where ``ccmm`` came from."""
    merger, _, _ = _import_c2m3()
    print(Path(merger.__file__).parents[2])


def _as_module(state: Mapping[str, Tensor]) -> nn.Module:
    """A module whose state dict is ``state`` (their names): their merger only reads and
    loads state dicts, and needs no forward."""
    net = nn.Module()
    for k in range(len(state) // 2):
        out_features, in_features = state[f"layer{k}.weight"].shape
        net.add_module(f"layer{k}", nn.Linear(in_features, out_features))
    net.load_state_dict(state)
    return net


def _seed(seed: int) -> None:
    random.seed(seed)
    import numpy as np

    np.random.seed(seed)
    torch.manual_seed(seed)


def _c2m3_worker() -> None:
    """The peer subprocess (``sys.argv[1]``: the job file): our loader in, their N-model
    merger timed, the merged state dict out in our names."""
    from safetensors.torch import save_file

    from symmerge.io import load_checkpoint

    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    for path, sha in zip(job["checkpoints"], job["sha256"], strict=True):
        if file_sha256(Path(path)) != sha:
            raise SystemExit(f"{path} changed: its sha256 is not the report's {sha}")
    merger, permutation_spec, calls = _import_c2m3()
    states = [to_c2m3_state_dict(load_checkpoint(p)[0].state_dict()) for p in job["checkpoints"]]
    hidden = len(states[0]) // 2 - 1
    spec = permutation_spec.MLPPermutationSpecBuilder(num_hidden_layers=hidden)
    spec = spec.create_permutation_spec()

    def merge(max_iter: int) -> tuple[nn.Module, float]:
        _seed(int(job["seed"]))
        m = merger.FrankWolfeSynchronizedMerger(
            "frank_wolfe", spec, initialization_method=INIT, average_in_universe=True,
            keep_soft_perms=False, max_iter=max_iter, device="cpu",
        )  # fmt: skip
        symbols = string.ascii_lowercase[: len(states)]  # their scripts' a, b, c, ...
        models = {s: _as_module(sd) for s, sd in zip(symbols, states, strict=True)}
        t0 = time.perf_counter()
        merged, _ = m.merge_models(models)
        return merged, time.perf_counter() - t0

    # untimed first call (max_iter=1, every code path once): one-off costs are not theirs
    _, first = merge(1)
    merged, total = merge(MAX_ITER)
    matching_s, infos = calls[-1]
    state = from_c2m3_state_dict(merged.state_dict())
    save_file({k: v.detach().contiguous() for k, v in state.items()}, job["merged"])
    Path(job["result"]).write_text(json.dumps({
        "timings": {"total_s": total, "matching_s": matching_s, "first_call_s": first},
        "iterations": len(infos["obj_values"]),
        "objective": float(infos["obj_values"][-1]) if infos["obj_values"] else None,
    }))  # fmt: skip
