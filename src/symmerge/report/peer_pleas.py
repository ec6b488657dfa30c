"""The official PLeaS code on our checkpoints, a peer beside our ``pleas``.

The authors' repository (SewoongLab/PLeaS-Merging) is unpacked into the peer folder
(``folder/src``, with its package ``pleas``; the repository's commit in ``folder/COMMIT``) and
runs in a subprocess of the report's Python, as in :mod:`symmerge.report.peers`; torch,
torchvision, numpy, scipy and tqdm come from our environment, nothing else is installed.

Their code needs almost no conversion of our models: its torch.fx compiler
(``get_permutation_spec``) traces our modules, and their merge keeps our parameter names. Only
our MLP's input ``nn.Flatten`` becomes ``nn.Identity`` with the images flattened beforehand
(:func:`to_pleas_model`, :func:`to_pleas_inputs`): their flatten handler only squeezes unit
axes. The subprocess hands their pipeline the two converted checkpoints and the report's
merge batches (those our runs of the setting and seed got, handed over by the runner), runs
activation matching, the partial merge and their Adam least squares with gradient masks
(:data:`PLEAS_CALL`) and saves the merged state dict in our names; the report's process
evaluates it.

Only the full merge (budget 1x: every group's ratio 0, our ``pleas`` default) is run: their
ratios at other budgets come from a Gurobi QP whose weights are files on the authors' cluster.
What their code needs on this machine is shimmed in the subprocess only (:data:`PLEAS_NOTES`),
never by editing their files.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import io
import json
import re
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
    import_stub,
    load_batches,
    peer_commit,
    peer_env,
    portable_paths,
    probe_source,
    run_worker,
    unavailable,
)
from symmerge.report.settings import Setting

__all__ = [
    "LR",
    "MAX_STEPS",
    "PLEAS_CALL",
    "PLEAS_NOTES",
    "PLEAS_STUBS",
    "from_pleas_state_dict",
    "pleas_install_command",
    "probe_pleas",
    "run_pleas",
    "to_pleas_inputs",
    "to_pleas_model",
]

REPO = "SewoongLab/PLeaS-Merging"
#: Adam steps: their scripts' ``--max_steps`` default (experiments/*/run_*.py), which is also
#: our ``pleas(ls="adam")`` default. Their loop runs batches ``idx = 0 .. MAX_STEPS``, so it
#: gets ``MAX_STEPS + 1`` batches (the last step at lr 0, the end of the cosine schedule).
MAX_STEPS = 400
#: Their ``train``'s default peak learning rate (cosine-annealed to 0 over ``MAX_STEPS``).
LR = 5e-4
#: Fraction of every group kept apart: 0 = the full merge (budget 1x).
RATIO = 0.0
#: The subprocess's time limit, seconds.
DEFAULT_TIMEOUT = 1800.0
#: Modules their ``pleas`` package imports at module level and this run never calls; stubbed
#: in the subprocess when not installed (none of them is in our environment).
PLEAS_STUBS = ("gurobipy", "sklearn.model_selection", "torchmetrics")
PLEAS_CALL = (
    "spec = get_permutation_spec(model_a, ((2, *input_shape),)); perm, costs = "
    "activation_matching(spec, model_a, model_b, batches, len(batches), output_costs=True) "
    "(defaults: cross_features_cdist, scipy_solve_lsa); model3 = partial_merge(spec, model_a, "
    f"model_b, perm, costs, {RATIO}) (ratio {RATIO} for every group: the full merge, budget "
    "1x); model3 = pleas_merging.train(batches cycled in order to MAX_STEPS + 1, model_a, "
    f"model_b, model3, spec, perm, costs, {RATIO}, False, MAX_STEPS={MAX_STEPS}, None, "
    f"separate_classifier=False, merging='perm_gradmask', num_classes=<head outputs>, lr={LR}) "
    "(Adam, cosine lr, gradient masks; the shared head kept and fitted to the averaged "
    "logits, as in their shared-label-space script); torch seeded with seed; timed, after one "
    "untimed call with matching on the first batch and MAX_STEPS=1; model_a, model_b = our "
    "modules (their fx compiler traces them), our MLP's input nn.Flatten replaced by "
    "nn.Identity and the batches' images flattened (their flatten handler only squeezes unit "
    "axes; parameter names unchanged); batches = the report's merge batches of the setting "
    "and seed"
)
PLEAS_NOTES = (
    "shims (subprocess only, their files unchanged): import stubs for gurobipy (Model raises: "
    "only qp_ratios uses it, not called), sklearn.model_selection (train_test_split raises) "
    "and torchmetrics (Accuracy raises): imported at module level, used only by helpers not "
    "called; torch.Tensor.cuda and torch.nn.Module.cuda return the object itself (their code "
    "calls .cuda() unconditionally; CPU here); environment TQDM_DISABLE=1. Deviations from "
    "their scripts: activation matching (their scripts' --merging default 'pleas_weight' is "
    "weight matching; activation matching, their scripts' other choice, is our pleas default); "
    f"{MAX_STEPS} Adam steps at lr {LR} (their defaults) on the report's batches of 500 cycled "
    "in order (theirs: batches of 32 from a shuffled loader of the full training sets, so "
    "their 401 steps see 12,832 images, these 200,500: the same steps and schedule, larger "
    "batches); matching on the report's batches (theirs: 100 batches of 32); fixed ratios 0 "
    "(theirs: a Gurobi QP over per-layer sensitivities, ResNet-50 .npy files on their "
    "cluster); no BatchNorm reset (our MLPs have none)"
)

_PROBE = "from symmerge.report.peer_pleas import _pleas_probe; _pleas_probe()"
_WORKER = "from symmerge.report.peer_pleas import _pleas_worker; _pleas_worker()"


def pleas_install_command(folder: Path) -> str:
    """How to prepare ``folder`` (never run from here): their repository's tree, no packages."""
    return (
        f"fetch github:{REPO} as a bare mirror MIRROR, then: mkdir -p {folder}/src && "
        f"git --git-dir=MIRROR archive HEAD | tar -x -C {folder}/src && "
        f"git --git-dir=MIRROR rev-parse HEAD > {folder}/COMMIT (nothing to pip-install: "
        f"{', '.join(PLEAS_STUBS)} are stubbed)"
    )


def _flattens_input(model: nn.Module) -> bool:
    layers = getattr(model, "layers", None)
    return isinstance(layers, nn.Sequential) and isinstance(layers[0], nn.Flatten)


def to_pleas_model(model: nn.Module) -> nn.Module:
    """What their pipeline gets for one of our models: a copy in eval mode, our MLP's input
    ``nn.Flatten`` replaced by ``nn.Identity`` (their compiler's flatten handler only squeezes
    unit axes, not 1x28x28 images), so it takes :func:`to_pleas_inputs`; the parameter names
    stay ours (``layers.1.weight``, ...). Other models go as they are."""
    out = copy.deepcopy(model).eval()
    if _flattens_input(out):
        out.layers[0] = nn.Identity()
    return out


def to_pleas_inputs(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` as :func:`to_pleas_model` of ``model`` takes it: flattened for our MLPs."""
    return x.flatten(1) if _flattens_input(model) else x


def from_pleas_state_dict(
    state: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Their merged model's state dict in our names, checked against ``reference`` (checkpoint
    0's state dict: the architecture the report loads it into).

    Their ``partial_merge`` swaps new ``nn.Parameter`` tensors into a copy of model A, so the
    names are ours; at ratio 0 every shape is A's. Raises ``ValueError`` on other names or
    shapes (a partial merge, or another model)."""
    if sorted(state) != sorted(reference):
        extra, missing = sorted(set(state) - set(reference)), sorted(set(reference) - set(state))
        raise ValueError(f"not our model's parameter names: extra {extra}, missing {missing}")
    wrong = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in reference.items()
             if state[k].shape != v.shape}  # fmt: skip
    if wrong:
        raise ValueError(f"shapes differ from checkpoint 0's (theirs, ours): {wrong}")
    return {k: state[k].detach().to(reference[k].dtype).contiguous() for k in reference}


def probe_pleas(folder: Path) -> tuple[str | None, str | None, str | None]:
    """``(commit, imported_from, None)`` when their package imports in the peer's environment
    (with the shims), else ``(None, None, reason)`` (:func:`symmerge.report.peers.probe_source`)."""
    return probe_source(folder, "PLeaS", "pleas", _PROBE)


def _budgets_reason(setting: Setting) -> str | None:
    """Why the peer does not run on ``setting`` (``None`` when it does): only the full merge."""
    if not setting.budgets:
        return None
    return (f"the official PLeaS runs the full merge (1x) only; {setting.name!r} merges at "
            f"budgets {list(setting.budgets)} (their ratios come from a Gurobi QP over weights "
            "on their cluster)")  # fmt: skip


@portable_paths
def run_pleas(
    checkpoints: Sequence[Path],
    evaluate: Callable[[nn.Module], dict[str, Any]],
    *,
    seed: int,
    setting: Setting,
    data: tuple[Sequence[tuple[Tensor, Tensor]], dict[str, Any]],
    folder: Path | None = None,
    threads: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Merge two checkpoints with the official PLeaS code in a subprocess, on the merge
    batches our runs of ``setting`` at ``seed`` got; a peer that is missing or fails is recorded in
    the entry, never raised.

    Args:
        checkpoints: the two source files (our safetensors), model A first.
        evaluate: scores the merged model here (the report's own evaluation and test data).
        seed: the report seed (the subprocess's torch seed).
        setting: the report setting (a setting with budgets is not run).
        data: the setting's merge batches and their record (the runner's, as our runs').
        folder: the peer folder (default ``default_peer_root() / "pleas"``).
        threads: torch threads of the subprocess (default: this process's).
        timeout: seconds before the subprocess is stopped (recorded as failed).

    Returns the peer entry: ``status`` ``"ok"``, ``"not run"`` (not importable, or a setting
    at other budgets: ``reason``, and ``install``) or ``"failed"`` (``reason``).
    """
    folder = Path(folder) if folder is not None else default_peer_root() / "pleas"
    threads = threads or torch.get_num_threads()
    commit = peer_commit(folder)
    entry: dict[str, Any] = {
        "peer": "pleas-official", "package": f"{REPO}@{commit or 'unknown commit'}",
        "version": commit, "status": "not run", "reason": None,
        "install": pleas_install_command(folder), "folder": str(folder), "imported_from": None,
        "call": PLEAS_CALL, "notes": PLEAS_NOTES, "stubs": list(PLEAS_STUBS), "data": None,
        "checkpoints": [file_sha256(Path(p)) for p in checkpoints], "threads": threads,
        "metrics": None, "seconds": None, "timings": None, "adam_steps": None, "loss": None,
        "conversion": None, "merged_weights_sha256": None,
    }  # fmt: skip
    reason = _budgets_reason(setting)
    if reason is not None:
        return {**entry, "reason": reason}
    version, source, reason = probe_pleas(folder)
    if reason is not None:
        return {**entry, "reason": reason}
    entry.update(version=version, imported_from=source)
    batches, entry["data"] = data
    job = {"checkpoints": [str(Path(p).resolve()) for p in checkpoints],
           "sha256": entry["checkpoints"], "seed": seed, "threads": threads}  # fmt: skip
    fields, result = run_worker(_WORKER, job, peer_env(folder, threads), checkpoints[0],
                                evaluate, timeout=timeout, data=batches)  # fmt: skip
    if result is None:
        return {**entry, **fields}
    return {**entry, **fields, "adam_steps": result["adam_steps"], "loss": result["loss"],
            "conversion": result["conversion"], "stubs": result["stubs"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the subprocess
# ---------------------------------------------------------------------------------------------


def _install_shims() -> list[str]:
    """The shims of :data:`PLEAS_NOTES` (subprocess only); the modules stubbed."""
    grb = types.SimpleNamespace(CONTINUOUS="C", MAXIMIZE=-1)
    attrs = {
        "gurobipy": {"Model": unavailable("gurobipy.Model"), "GRB": grb},
        "sklearn.model_selection": {"train_test_split": unavailable("train_test_split")},
        "torchmetrics": {"Accuracy": unavailable("torchmetrics.Accuracy")},
    }
    stubbed = [m for m in PLEAS_STUBS if import_stub(m, attrs[m])]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    return stubbed


def _import_pleas() -> tuple[dict[str, Any], list[str]]:
    """Their modules (with the shims installed) and the modules stubbed."""
    stubbed = _install_shims()
    names = {"compiler": "pleas.core.compiler", "utils": "pleas.core.utils",
             "am": "pleas.methods.activation_matching", "pm": "pleas.methods.partial_matching",
             "train": "pleas.methods.pleas_merging"}  # fmt: skip
    # modules, not the same-named functions pleas/methods/__init__.py re-exports
    return {k: importlib.import_module(v) for k, v in names.items()}, stubbed


def _pleas_probe() -> None:
    """Probe subprocess: import with the shims, print where ``pleas`` came from."""
    mods, _ = _import_pleas()
    print(Path(mods["train"].__file__).parents[2])


def _cycled(data: Sequence[Any], n: int) -> list[Any]:
    """``n`` batches of ``data`` in order, from the start again when it runs out."""
    return [data[i % len(data)] for i in range(n)]


def _logits_gap(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _pleas_worker() -> None:
    """The peer subprocess (``sys.argv[1]``: the job file): our modules and the report's
    batches in, their pipeline timed, the merged state dict out in our names."""
    from safetensors.torch import save_file

    from symmerge.io import load_checkpoint

    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    for path, sha in zip(job["checkpoints"], job["sha256"], strict=True):
        if file_sha256(Path(path)) != sha:
            raise SystemExit(f"{path} changed: its sha256 is not the report's {sha}")
    mods, stubbed = _import_pleas()
    sources = [load_checkpoint(p)[0].eval() for p in job["checkpoints"]]
    if len(sources) != 2:
        raise SystemExit(f"PLeaS merges 2 models, got {len(sources)}")
    batches = load_batches(job["data"])
    data = [(to_pleas_inputs(sources[0], bx), by) for bx, by in batches]
    x = data[0][0]
    with torch.no_grad():
        num_classes = int(sources[0](batches[0][0][:1]).shape[-1])

    def pipeline(batches: list[Any], steps: int) -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(int(job["seed"]))
        a, b = (to_pleas_model(m) for m in sources)
        log = io.StringIO()
        t: dict[str, float] = {}
        with contextlib.redirect_stdout(log):
            t0 = time.perf_counter()
            spec = mods["compiler"].get_permutation_spec(a, ((2, *x.shape[1:]),))
            t1 = time.perf_counter()
            perm, costs = mods["am"].activation_matching(spec, a, b, batches, len(batches),
                                                         output_costs=True)  # fmt: skip
            t2 = time.perf_counter()
            model3 = mods["pm"].partial_merge(spec, a, b, perm, costs, RATIO)
            t3 = time.perf_counter()
            model3 = mods["train"].train(
                _cycled(data, steps + 1), a, b, model3, spec, perm, costs, RATIO, False, steps,
                None, separate_classifier=False, merging="perm_gradmask",
                num_classes=num_classes, lr=LR,
            )  # fmt: skip
            t4 = time.perf_counter()
        t.update(total_s=t4 - t0, spec_s=t1 - t0, matching_s=t2 - t1, partial_merge_s=t3 - t2,
                 adam_s=t4 - t3)  # fmt: skip
        losses = [float(v) for v in re.findall(r"Loss: ([0-9.eE+-]+)", log.getvalue())]
        return model3.eval(), {"spec": spec, "perm": perm, "timings": t, "losses": losses}

    # untimed first call (matching on one batch, MAX_STEPS=1: every code path once)
    w0 = time.perf_counter()
    pipeline(data[:1], 1)
    first = time.perf_counter() - w0
    merged, info = pipeline(data, MAX_STEPS)
    state = from_pleas_state_dict(merged.state_dict(), sources[0].state_dict())
    save_file(state, job["merged"])
    Path(job["result"]).write_text(json.dumps({
        "timings": {**info["timings"], "first_call_s": first}, "adam_steps": MAX_STEPS + 1,
        "loss": {"every_20_steps": info["losses"]},
        "conversion": _conversion_checks(mods, sources, info["spec"], info["perm"],
                                         batches[0][0]),
        "stubs": stubbed,
    }))  # fmt: skip


def _conversion_checks(
    mods: dict[str, Any], sources: list[nn.Module], spec: dict, perm: dict, x: Tensor
) -> dict[str, Any]:
    """Our models in their pipeline, checked on the first merge batch ``x`` (untimed, after
    the run), each as the max |logit difference|: the converted models (:func:`to_pleas_model`
    on :func:`to_pleas_inputs`) against ours; their partial merge of converted A with itself
    (identity permutation, ratio 0) against it; converted B with their matched permutation
    applied (their ``apply_perm``) against it. And their groups (one per hidden layer)."""
    a, b = (to_pleas_model(m) for m in sources)
    xp = to_pleas_inputs(sources[0], x)
    with torch.no_grad():
        converted = max(float((m(x) - c(xp)).abs().max())
                        for m, c in zip(sources, (a, b), strict=True))  # fmt: skip
    identity = mods["utils"].make_identity_perm(spec)
    zeros = {k: torch.zeros(len(p), len(p)) for k, p in identity.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        self_merge = mods["pm"].partial_merge(spec, a, copy.deepcopy(a), identity, zeros, 0.0)
    permuted = mods["utils"].apply_perm(perm, spec, copy.deepcopy(b), inplace=True)
    return {
        "converted_vs_ours_max_abs_logit_diff": converted,
        "self_merge_vs_model_a_max_abs_logit_diff": _logits_gap(self_merge.eval(), a, xp),
        "permuted_model_b_vs_model_b_max_abs_logit_diff": _logits_gap(permuted.eval(), b, xp),
        "groups": {str(k): pg.size for k, pg in spec.items()},
        "examples": len(x),
    }
