"""The official PLeaS code on our checkpoints, a peer beside our ``pleas``.

The authors' repository (SewoongLab/PLeaS-Merging) is unpacked into the peer folder
(``folder/src``, with its package ``pleas``; the repository's commit in ``folder/COMMIT``) and
runs in a subprocess of the report's Python, as in :mod:`symmerge.report.peers`; torch,
torchvision, numpy, scipy and tqdm come from our environment, nothing else is installed.

Their code needs almost no conversion of our models: its torch.fx compiler
(``get_permutation_spec``) traces our modules, and their merge keeps our parameter names. Two
of our models are run (:func:`model_kind`; any other is not run, with the reason): our MLP,
whose input ``nn.Flatten`` becomes ``nn.Identity`` with the images flattened beforehand
(:func:`to_pleas_model`, :func:`to_pleas_inputs`: their flatten handler only squeezes unit
axes), and our BatchNorm ResNet, traced as it is (their compiler has handlers for its convs,
BatchNorms, residual additions, pooling and flatten). The subprocess hands their pipeline the
two converted checkpoints and the report's merge batches (those our runs of the setting and
seed got, handed over by the runner), runs activation matching, the partial merge and their
Adam least squares with gradient masks (:data:`PLEAS_CALL`) and saves the merged state dict in
our names; the report's process evaluates it.

A setting with a head per task (``heads="per-task"``, e.g. resnet20-disjoint) gets each
model's own head reading the merged features through their ``permute_final_features`` (how
their ``eval_perm_model`` scores a source's classifier on a merged model), stacked along the
output axis as our ``heads="per-task"`` does (:data:`PLEAS_PER_TASK_CALL`). A setting that
resets BatchNorm statistics after merging (``reset_bn``) has the merged model's statistics
recomputed on the same merge batches with our ``reset_bn``, as our runs' are (their package
has no such utility; :data:`PLEAS_RESET_CALL`).

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
    "BN_NOTES",
    "LR",
    "MAX_STEPS",
    "PER_TASK_NOTE",
    "PLEAS_CALL",
    "PLEAS_NOTES",
    "PLEAS_PER_TASK_CALL",
    "PLEAS_RESET_CALL",
    "PLEAS_STUBS",
    "RESNET_ENV",
    "RESNET_NOTE",
    "from_pleas_state_dict",
    "head_name",
    "model_kind",
    "pleas_call",
    "pleas_install_command",
    "pleas_notes",
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
#: The subprocess's time limit, seconds: the resnet20-disjoint run (401 Adam steps on batches
#: of 500 CIFAR-10 images, every conv's least squares) took 3,575 s on one thread of a busy
#: 2-core CPU (8.7 s a step).
DEFAULT_TIMEOUT = 7200.0
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
    "cluster)"
)
#: What the entry's call adds for a setting with a head per task.
PLEAS_PER_TASK_CALL = (
    "; heads per task (the setting's heads='per-task'): fc_perm = their get_blocks(spec, "
    f"perm, costs, {RATIO})[group] of the group holding the head's input axis (what their "
    "get_fc_perm returns for a head named fc); head_i = model i's own head (as trained) "
    "reading their permute_final_features(features, fc_perm, i) (their eval_perm_model's "
    "scoring of a source's classifier on the merged model), one Linear per model (weight "
    "W_i @ permute_final_features(eye, fc_perm, i).T, bias b_i) stacked along the output "
    "axis, model A's outputs first, as our heads='per-task'; model3's own head (fitted to the "
    "averaged logits) is dropped; timed"
)
#: What the entry's call adds for a setting that resets BatchNorm statistics after merging.
PLEAS_RESET_CALL = (
    "; then symmerge.renorm.reset_bn(model3, batches) (the setting's reset_bn, as our runs': "
    "statistics reset, then the cumulative average over the merge batches), timed"
)
#: The notes on BatchNorm, by whether the setting resets the statistics after merging.
BN_NOTES = {
    None: "no BatchNorm reset (our MLPs have none)",
    True: (
        "BatchNorm: their partial_merge averages the matched units' running statistics (it "
        "makes them nn.Parameters); they are recomputed on the report's merge batches with "
        "our symmerge.renorm.reset_bn, as our runs of the setting are (their package has no "
        "such utility: pleas.core.utils.reset_running_stats only zeroes the statistics, and "
        "their scripts then run model3.train() over 102 shuffled training batches at "
        "momentum 0.1, run_domainnet.py after that reset, run_torchvision.py without it)"
    ),
    False: (
        "BatchNorm statistics as their partial_merge leaves them (the matched units' "
        "averages): the setting does not reset them"
    ),
}
#: The environment of a ResNet run's subprocess beside :func:`symmerge.report.peers.peer_env`'s:
#: glibc's heap otherwise grows by most of a GB every Adam step (their least squares allocates
#: and frees hundreds of 33 MB activation tensors per step at batch 500; freed, they are not
#: reused) until the process is killed (18 GB after about 20 of its 401 steps); mmapped from
#: 1 MiB up (with PyTorch's huge pages for large tensors), the memory stays flat (2.5 GB at
#: most on resnet20-disjoint) and a step takes about 1.5x as long.
RESNET_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "THP_MEM_ALLOC_ENABLE": "1"}
#: The note on a ResNet run (our model as it is; its subprocess's allocator settings).
RESNET_NOTE = (
    "ResNet: our module goes to their pipeline as it is (their fx compiler traces it: its "
    "convs, BatchNorms, residual additions, average pool and nn.Flatten of C x 1 x 1 "
    "features); environment MALLOC_MMAP_THRESHOLD_=1048576 and THP_MEM_ALLOC_ENABLE=1 "
    "(glibc's heap otherwise grows by most of a GB every Adam step at batch 500 until the "
    "process is killed; mmapped, the memory stays flat and a step takes about 1.5x as long)"
)
#: The note on a setting with a head per task.
PER_TASK_NOTE = (
    "heads per task: their different-label-space script drops the classifiers "
    "(separate_classifier=True) and scores the merged features by linear probes trained for "
    "50 epochs; here the models keep their heads through their pipeline (the head's least "
    "squares fits the averaged logits, as in the shared case, and is dropped) and each model's "
    "own head reads the merged features through their permute_final_features, as their "
    "eval_perm_model does and as our pleas's heads='per-task' run is scored"
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


def model_kind(model: nn.Module) -> str | None:
    """Which of the models this driver runs ``model`` is: ``"mlp"`` (our MLP, its input
    flattened by an ``nn.Flatten``), ``"resnet"`` (our ResNet with BatchNorm, which their
    compiler traces as it is), else ``None``."""
    from symmerge.models.mlp import MLP
    from symmerge.models.resnet import ResNet

    if isinstance(model, MLP) and _flattens_input(model):
        return "mlp"
    if isinstance(model, ResNet) and getattr(model, "norm", None) == "bn":
        return "resnet"
    return None


def _describe(model: nn.Module) -> str:
    norm = getattr(model, "norm", None)
    return type(model).__name__ + (f" (norm {norm!r})" if isinstance(norm, str) else "")


def head_name(model: nn.Module) -> str:
    """The module name of ``model``'s head: its last ``nn.Linear`` (``fc`` in our ResNet,
    ``layers.N`` in our MLP)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear head")
    return names[-1]


def to_pleas_model(model: nn.Module) -> nn.Module:
    """What their pipeline gets for one of our models: a copy in eval mode, our MLP's input
    ``nn.Flatten`` replaced by ``nn.Identity`` (their compiler's flatten handler only squeezes
    unit axes, not 1x28x28 images), so it takes :func:`to_pleas_inputs`; the parameter names
    stay ours (``layers.1.weight``, ...). Other models (our ResNet: its ``nn.Flatten`` sees
    pooled ``C x 1 x 1`` features, which their handler squeezes) go as they are."""
    out = copy.deepcopy(model).eval()
    if _flattens_input(out):
        out.layers[0] = nn.Identity()
    return out


def to_pleas_inputs(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` as :func:`to_pleas_model` of ``model`` takes it: flattened for our MLPs."""
    return x.flatten(1) if _flattens_input(model) else x


def from_pleas_state_dict(
    state: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    heads: Sequence[tuple[Tensor, Tensor | None]] | None = None,
    head: str = "fc",
) -> dict[str, Tensor]:
    """Their merged model's state dict in our names, checked against ``reference`` (checkpoint
    0's state dict: the architecture the report loads it into); ``heads`` (``(weight, bias)``
    of each model's head reading the merged features, in order) replace the head ``head``'s
    tensors by the heads stacked along the output axis (our ``heads="per-task"`` layout).

    Their ``partial_merge`` swaps new ``nn.Parameter`` tensors into a copy of model A, so the
    names are ours (BatchNorm statistics included: they become parameters there); at ratio 0
    every shape is A's. Raises ``ValueError`` on other names or shapes (a partial merge, or
    another model), or heads that do not read the merged features."""
    if sorted(state) != sorted(reference):
        extra, missing = sorted(set(state) - set(reference)), sorted(set(reference) - set(state))
        raise ValueError(f"not our model's parameter names: extra {extra}, missing {missing}")
    wrong = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in reference.items()
             if state[k].shape != v.shape}  # fmt: skip
    if wrong:
        raise ValueError(f"shapes differ from checkpoint 0's (theirs, ours): {wrong}")
    out = {k: state[k].detach().to(reference[k].dtype).contiguous() for k in reference}
    if heads is not None:
        weight, bias = f"{head}.weight", f"{head}.bias"
        if weight not in reference:
            raise ValueError(f"no head {head!r} in checkpoint 0's state dict")
        bad = [tuple(w.shape) for w, _ in heads if w.shape[1:] != reference[weight].shape[1:]]
        if bad or not heads:
            raise ValueError(f"heads {bad} do not read the merged features "
                             f"{tuple(reference[weight].shape[1:])}")  # fmt: skip
        dtype = reference[weight].dtype
        out[weight] = torch.cat([w.detach() for w, _ in heads]).to(dtype).contiguous()
        if bias in reference:
            if any(b is None for _, b in heads):
                raise ValueError(f"{bias} is in checkpoint 0's state dict, not in every head")
            out[bias] = torch.cat([b.detach() for _, b in heads if b is not None])
            out[bias] = out[bias].to(dtype).contiguous()
    return out


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


def _models_reason(checkpoints: Sequence[Path]) -> tuple[str | None, list[int], str | None]:
    """``(kind, outputs, reason)`` of the checkpoints' models: :func:`model_kind` of checkpoint
    0 and every model's output count, with why the peer does not run on them (``None`` when
    it does). Raises what loading a checkpoint raises."""
    from symmerge.io import load_checkpoint

    models = [load_checkpoint(Path(p))[0] for p in checkpoints]
    kind = model_kind(models[0])
    if kind is None:
        return None, [], (f"the pleas-official driver runs our MLP and our BatchNorm ResNet; "
                          f"checkpoint 0 is a {_describe(models[0])}")  # fmt: skip
    kinds = [model_kind(m) for m in models]
    if len(set(kinds)) != 1:
        return kind, [], f"the checkpoints hold different kinds of models: {kinds}"
    outputs = [int(m.get_submodule(head_name(m)).out_features) for m in models]
    if len(set(outputs)) != 1:
        return kind, outputs, ("their least squares fits one head to the models' averaged "
                               f"logits; the outputs differ in size: {outputs}")  # fmt: skip
    return kind, outputs, None


def pleas_call(heads: str, reset_bn: bool) -> str:
    """The entry's ``call`` for a setting with ``heads`` and a BatchNorm reset or not."""
    return (PLEAS_CALL + (PLEAS_PER_TASK_CALL if heads == "per-task" else "")
            + (PLEAS_RESET_CALL if reset_bn else ""))  # fmt: skip


def pleas_notes(kind: str | None, heads: str, reset_bn: bool) -> str:
    """The entry's ``notes`` for a model kind (:func:`model_kind`), ``heads`` and a BatchNorm
    reset or not."""
    bn = BN_NOTES[None] if kind != "resnet" else BN_NOTES[reset_bn]
    return "; ".join([PLEAS_NOTES, bn] + ([RESNET_NOTE] if kind == "resnet" else [])
                     + ([PER_TASK_NOTE] if heads == "per-task" else []))  # fmt: skip


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
        checkpoints: the two source files (our safetensors: MLPs or BatchNorm ResNets), model
            A first; with the setting's per-task heads the merged model has both models' heads
            side by side (A's outputs first).
        evaluate: scores the merged model here (the report's own evaluation and test data).
        seed: the report seed (the subprocess's torch seed).
        setting: the report setting (a setting with budgets is not run; its ``heads`` and
            ``reset_bn`` say how the merged model's heads and BatchNorm statistics are made).
        data: the setting's merge batches and their record (the runner's, as our runs').
        folder: the peer folder (default ``default_peer_root() / "pleas"``).
        threads: torch threads of the subprocess (default: this process's).
        timeout: seconds before the subprocess is stopped (recorded as failed).

    Returns the peer entry: ``status`` ``"ok"``, ``"not run"`` (not importable, a setting at
    other budgets, or models this driver does not run: ``reason``, and ``install``) or
    ``"failed"`` (``reason``).
    """
    folder = Path(folder) if folder is not None else default_peer_root() / "pleas"
    threads = threads or torch.get_num_threads()
    commit = peer_commit(folder)
    heads = setting.heads
    entry: dict[str, Any] = {
        "peer": "pleas-official", "package": f"{REPO}@{commit or 'unknown commit'}",
        "version": commit, "status": "not run", "reason": None,
        "install": pleas_install_command(folder), "folder": str(folder), "imported_from": None,
        "call": pleas_call(heads, False), "notes": pleas_notes(None, heads, False),
        "stubs": list(PLEAS_STUBS), "model": None, "heads": heads, "renorm": None,
        "data": None, "checkpoints": [file_sha256(Path(p)) for p in checkpoints],
        "threads": threads, "metrics": None, "seconds": None, "timings": None,
        "adam_steps": None, "loss": None, "conversion": None, "bn_reset": None,
        "environment": None, "merged_weights_sha256": None,
    }  # fmt: skip
    reason = _budgets_reason(setting)
    if reason is not None:
        return {**entry, "reason": reason}
    try:
        kind, outputs, reason = _models_reason(checkpoints)
    except Exception as exc:  # recorded, never raised
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:1000]
        return {**entry, "status": "failed", "reason": f"reading the checkpoints: {message}"}
    reset = bool(setting.reset_bn) and kind == "resnet"
    variables = RESNET_ENV if kind == "resnet" else {}
    entry.update(model=kind, environment=dict(variables), call=pleas_call(heads, reset),
                 notes=pleas_notes(kind, heads, reset),
                 renorm="reset-bn (ours: symmerge.renorm.reset_bn on the merge batches)"
                 if reset else None)  # fmt: skip
    if reason is not None:
        return {**entry, "reason": reason}
    version, source, reason = probe_pleas(folder)
    if reason is not None:
        return {**entry, "reason": reason}
    entry.update(version=version, imported_from=source)
    batches, entry["data"] = data
    job = {"checkpoints": [str(Path(p).resolve()) for p in checkpoints],
           "sha256": entry["checkpoints"], "seed": seed, "threads": threads, "heads": heads,
           "reset_bn": reset}  # fmt: skip
    per_task = outputs[0] * len(checkpoints) if heads == "per-task" else None
    env = peer_env(folder, threads, **variables)
    fields, result = run_worker(_WORKER, job, env, checkpoints[0], evaluate, timeout=timeout,
                                data=batches, num_outputs=per_task)  # fmt: skip
    if result is None:
        return {**entry, **fields}
    return {**entry, **fields, "adam_steps": result["adam_steps"], "loss": result["loss"],
            "conversion": result["conversion"], "stubs": result["stubs"],
            "bn_reset": result["bn_reset"]}  # fmt: skip


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


def _per_task_heads(
    mods: dict[str, Any], spec: dict, perm: dict, costs: dict, sources: Sequence[nn.Module],
    head: str,
) -> tuple[tuple[Tensor, ...], list[tuple[Tensor, Tensor | None]]]:  # fmt: skip
    """Their blocks of the group holding the head's input axis (``fc_perm``: what their
    ``get_fc_perm`` returns for a head named ``fc``) and every source's own head reading the
    merged features through their ``permute_final_features`` (:data:`PLEAS_PER_TASK_CALL`):
    ``(W_i @ permute_final_features(eye, fc_perm, i).T, b_i)``, in order."""
    key = mods["utils"].Axis(f"{head}.weight", 1)
    groups = [k for k, pg in spec.items() if key in pg.state]
    if len(groups) != 1:
        raise ValueError(f"the head's input axis {key} is in {len(groups)} of their groups")
    fc_perm = mods["pm"].get_blocks(spec, perm, costs, RATIO, False)[groups[0]]
    eye = torch.eye(len(fc_perm[0]) + 2 * len(fc_perm[2]))
    heads = []
    for i, source in enumerate(sources):
        linear = source.get_submodule(head)
        select = mods["train"].permute_final_features(eye, fc_perm, i)  # merged -> model i
        bias = None if linear.bias is None else linear.bias.detach().clone()
        heads.append((linear.weight.detach() @ select.T, bias))
    return fc_perm, heads


def _pleas_worker() -> None:
    """The peer subprocess (``sys.argv[1]``: the job file): our modules and the report's
    batches in, their pipeline timed (with the per-task heads and the BatchNorm reset the job
    asks for), the merged state dict out in our names."""
    from safetensors.torch import save_file

    from symmerge.io import load_checkpoint
    from symmerge.renorm import reset_bn

    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    for path, sha in zip(job["checkpoints"], job["sha256"], strict=True):
        if file_sha256(Path(path)) != sha:
            raise SystemExit(f"{path} changed: its sha256 is not the report's {sha}")
    mods, stubbed = _import_pleas()
    sources = [load_checkpoint(p)[0].eval() for p in job["checkpoints"]]
    if len(sources) != 2:
        raise SystemExit(f"PLeaS merges 2 models, got {len(sources)}")
    if model_kind(sources[0]) is None:
        raise SystemExit(f"not a model this driver runs: {_describe(sources[0])}")
    per_task, reset = job.get("heads") == "per-task", bool(job.get("reset_bn"))
    head = head_name(sources[0])
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
        fc_perm, heads = None, None
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
            if reset:  # the merge batches of this call, as our runs' reset
                reset_bn(model3, batches)
            t5 = time.perf_counter()
            if per_task:
                fc_perm, heads = _per_task_heads(mods, spec, perm, costs, sources, head)
            t6 = time.perf_counter()
        t.update(total_s=t6 - t0, spec_s=t1 - t0, matching_s=t2 - t1, partial_merge_s=t3 - t2,
                 adam_s=t4 - t3)  # fmt: skip
        t.update({"bn_reset_s": t5 - t4} if reset else {})
        t.update({"heads_s": t6 - t5} if per_task else {})
        losses = [float(v) for v in re.findall(r"Loss: ([0-9.eE+-]+)", log.getvalue())]
        return model3.eval(), {"spec": spec, "perm": perm, "timings": t, "losses": losses,
                               "fc_perm": fc_perm, "heads": heads}  # fmt: skip

    # untimed first call (matching on one batch, MAX_STEPS=1: every code path once)
    w0 = time.perf_counter()
    pipeline(data[:1], 1)
    first = time.perf_counter() - w0
    merged, info = pipeline(data, MAX_STEPS)
    state = from_pleas_state_dict(merged.state_dict(), sources[0].state_dict(), info["heads"],
                                  head)  # fmt: skip
    save_file(state, job["merged"])
    conversion = _conversion_checks(mods, sources, info["spec"], info["perm"], batches[0][0])
    conversion["merged_vs_their_model_max_abs_logit_diff"] = _ours_vs_theirs(
        mods, merged, state, job["checkpoints"][0], sources, head, info["fc_perm"],
        batches[0][0])  # fmt: skip
    bns = [m for m in merged.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    Path(job["result"]).write_text(json.dumps({
        "timings": {**info["timings"], "first_call_s": first}, "adam_steps": MAX_STEPS + 1,
        "loss": {"every_20_steps": info["losses"]}, "conversion": conversion,
        "stubs": stubbed,
        "bn_reset": {"batchnorms": len(bns), "batches": len(data),
                     "examples": sum(len(bx) for bx, _ in data),
                     "by": "symmerge.renorm.reset_bn"} if reset else None,
    }))  # fmt: skip


def _ours_vs_theirs(
    mods: dict[str, Any], merged: nn.Module, state: Mapping[str, Tensor], path: str,
    sources: Sequence[nn.Module], head: str, fc_perm: tuple[Tensor, ...] | None, x: Tensor,
) -> float:  # fmt: skip
    """Max |logit difference| on ``x`` between the merged model as the report loads it
    (checkpoint 0's architecture, its outputs resized for per-task heads, ``state``) and
    their merged model scored their way: ``merged`` itself, or with per-task heads
    (``fc_perm`` given) every source's own head on their ``permute_final_features`` of
    ``merged``'s features (their ``eval_perm_model``), concatenated."""
    from symmerge.io import load_checkpoint

    ours, _ = load_checkpoint(path)
    if fc_perm is not None:
        from symmerge.merging import trace_model
        from symmerge.resize import resize

        outputs = int(state[f"{head}.weight"].shape[0])
        ours = resize(ours, trace_model(ours), {}, num_outputs=outputs)
    ours.load_state_dict(state)
    ours.eval()
    xp = to_pleas_inputs(sources[0], x)
    with torch.no_grad():
        if fc_perm is None:
            theirs = merged(xp)
        else:
            body = copy.deepcopy(merged).eval()
            parent, _, leaf = head.rpartition(".")
            setattr(body.get_submodule(parent) if parent else body, leaf, nn.Identity())
            features = body(xp)
            pff = mods["train"].permute_final_features
            theirs = torch.cat([s.get_submodule(head)(pff(features, fc_perm, i))
                                for i, s in enumerate(sources)], dim=1)  # fmt: skip
        return float((ours(x) - theirs).abs().max())


def _conversion_checks(
    mods: dict[str, Any], sources: list[nn.Module], spec: dict, perm: dict, x: Tensor
) -> dict[str, Any]:
    """Our models in their pipeline, checked on the first merge batch ``x`` (untimed, after
    the run), each as the max |logit difference|: the converted models (:func:`to_pleas_model`
    on :func:`to_pleas_inputs`) against ours; their partial merge of converted A with itself
    (identity permutation, ratio 0) against it; converted B with their matched permutation
    applied (their ``apply_perm``) against it. And their groups (one per hidden layer of an
    MLP; a ResNet's residual streams and block insides). The worker adds the merged model as
    the report loads it against theirs (:func:`_ours_vs_theirs`)."""
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
