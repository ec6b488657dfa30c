"""The official ZipIt! code on our CIFAR-10 ResNet-20 checkpoints, a peer beside our ``zip``.

The authors' repository (gstoica27/ZipIt) is no package: its tree lives in the peer folder
(``folder/src``, the repository's commit in ``folder/COMMIT``; pure-Python packages it would
need beyond ours in ``folder/site``, none so far) and runs in a subprocess of the report's
Python, as in :mod:`symmerge.report.peers`; torch, numpy, scipy, networkx, matplotlib, yaml and
tqdm come from our environment. Missing or failing, the peer is recorded as ``"not run"`` or
``"failed"`` with the reason, never raised.

The subprocess converts our ResNet-20 (BatchNorm) into theirs (``models/resnets.py``: their
projection shortcut is a 3x3 conv, stride 2, padding 1; ours is 1x1, stride 2, so our kernel
goes to its centre tap and the other taps are zero: the same function), zips the models with
their ``ModelMerge`` + ``ResNetGraph`` + ``match_tensors_zipit`` (full zip) on the report's
merge batches, resets the merged model's BatchNorm statistics on the same batches with their
``reset_bn_stats`` (as their evaluation scripts do), takes each model's own head on the merged
features from their transformed models (what our ``heads="per-task"`` builds) and converts the
merged model back to our names; the report's process evaluates it.

Their code targets a GPU and imports packages its zip never calls; what it needs here is shimmed
in the subprocess only (:data:`ZIPIT_NOTES`), never by editing their files.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symmerge.report.checkpoints import file_sha256
from symmerge.report.peers import (
    DEFAULT_TIMEOUT,
    default_peer_root,
    import_stub,
    peer_commit,
    peer_env,
    portable_paths,
    probe_source,
    run_worker,
    unavailable,
)
from symmerge.report.settings import Setting

__all__ = [
    "ALPHA",
    "BETA",
    "ZIPIT_CALL",
    "ZIPIT_NOTES",
    "ZIPIT_STUBS",
    "from_zipit_state_dict",
    "probe_zipit",
    "run_zipit",
    "to_zipit_state_dict",
    "zipit_install_command",
]

REPO = "gstoica27/ZipIt"
#: ZipIt!'s alpha and beta as the paper and our ``zip`` default them (their
#: ``match_tensors_zipit`` defaults to 0.3 and 0.125).
ALPHA, BETA = 0.5, 1.0
#: Their metrics for CIFAR ResNet-20 (``configs/cifar5_resnet20.py``: ``merging_metrics``).
METRICS = ("covariance", "mean")
ZIPIT_CALL = (
    "graphs = [graphs.resnet_graph.resnet20(copy.deepcopy(m)).graphify() for m in (model_a, "
    "model_b)] (their models.resnets.resnet20(w=width, num_classes=outputs), converted from "
    "ours, BatchNorm statistics as loaded); merge = model_merger.ModelMerge(*graphs, "
    "device='cpu'); merge.transform(models.resnets.resnet20(w=width, num_classes=outputs), "
    "[batches], transform_fn=matching_functions.match_tensors_zipit, metric_classes="
    f"metric_calculators.get_metric_fns({list(METRICS)}), stop_at=None, a={ALPHA}, b={BETA}) "
    "(full zip); utils.reset_bn_stats(merge, batches) (theirs, as "
    "evaluation_scripts/zipit_concept_merging.py; momentum None: the average over the "
    "batches); batches = the report's merge batches in order (a one-element list of loaders "
    "for transform); torch seeded with seed; timed from the graphs to the reset, after one "
    "untimed call of the same steps on the first batch only; merged = merge.merged_model with "
    "per-task heads: each model's own transformed head (merge.graphs[i].model.linear) on the "
    "merged features, model A's outputs first"
)
#: Modules their files import that the zip never calls: import stubs when not installed.
ZIPIT_STUBS: dict[str, tuple[str, ...]] = {
    "clip": ("tokenize", "load"),  # utils.py: CLIP text heads (eval_type='clip')
    "fvcore.nn.flop_count": ("flop_count",),  # model_merger.py: FLOP counting
    "sklearn.cluster": ("AgglomerativeClustering", "KMeans"),  # k-means matching only
    "sklearn.model_selection": ("train_test_split",),  # utils.create_heldout_split only
    "einops": ("repeat",),  # utils.vector_gather only
}
ZIPIT_NOTES = (
    "shims (subprocess only, their files unchanged): import stubs, only for modules not "
    "installed, whose functions raise if called: clip (CLIP text heads), fvcore.nn.flop_count "
    "(FLOP counting), sklearn.cluster and sklearn.model_selection (k-means matching, held-out "
    "splits), einops (utils.vector_gather), none of them on the zip path; ModelMerge gets "
    "device='cpu' (its default is CUDA device 0); their torch.cuda.amp.autocast() in "
    "reset_bn_stats is disabled by torch without CUDA (float32) and its warning silenced; "
    "environment TQDM_DISABLE=1, MPLBACKEND=Agg. Conversion: our 1x1 stride-2 projection "
    "shortcut goes to the centre tap of their 3x3 stride-2 padding-1 shortcut conv, the other "
    "taps zero (the same function); back, those taps must still be exactly zero. Not their "
    "CIFAR protocol: their scripts also reset the source models' BatchNorm statistics first, "
    "on the augmented, shuffled training loader, and score CLIP text heads; here the sources "
    "are as loaded, the data are the report's merge batches, the heads each model's own"
)

#: The subprocess's environment beside :func:`symmerge.report.peers.peer_env`'s.
ENV = {"MPLBACKEND": "Agg"}
_PROBE = "from symmerge.report.peer_zipit import _zipit_probe; _zipit_probe()"
_WORKER = "from symmerge.report.peer_zipit import _zipit_worker; _zipit_worker()"
#: Our ResNet-20's parameter and buffer names (BatchNorm); anything else is not converted.
_OURS = re.compile(
    r"(conv1\.weight|norm1\.\w+|layer[1-3]\.\d+\.(conv[12]\.weight|norm[12]\.\w+|"
    r"shortcut\.[01]\.\w+)|fc\.(weight|bias))"
)
_THEIRS = re.compile(
    r"(conv1\.weight|bn1\.\w+|layer[1-3]\.\d+\.(conv[12]\.weight|bn[12]\.\w+|"
    r"shortcut\.[01]\.\w+)|linear\.(weight|bias))"
)
_SHORTCUT = re.compile(r"layer[1-3]\.\d+\.shortcut\.0\.weight")


def zipit_install_command(folder: Path) -> str:
    """How to prepare ``folder`` (never run from here)."""
    return (
        f"fetch github:{REPO} as a bare mirror MIRROR, then: mkdir -p {folder}/src && "
        f"git --git-dir=MIRROR archive HEAD | tar -x -C {folder}/src && "
        f"git --git-dir=MIRROR rev-parse HEAD > {folder}/COMMIT"
    )


def to_zipit_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our ResNet-20 (BatchNorm) state dict in their ``models/resnets.py`` names: ``normN`` ->
    ``bnN``, ``fc`` -> ``linear``, and each 1x1 projection shortcut kernel at the centre tap
    of a 3x3 kernel, zeros elsewhere (their shortcut conv is 3x3, padding 1: the same map)."""
    bad = [k for k in state if not _OURS.fullmatch(k)]
    if bad or not state:
        raise ValueError(f"not a symmerge BatchNorm ResNet state dict: unexpected {bad[:5]}")
    out = {}
    for key, value in state.items():
        new = re.sub(r"(^|\.)norm([12])\.", r"\1bn\2.", key)
        new = "linear." + new[3:] if new.startswith("fc.") else new
        if _SHORTCUT.fullmatch(key):
            if value.shape[2:] != (1, 1):
                raise ValueError(f"{key}: a 1x1 shortcut kernel expected, got {tuple(value.shape)}")
            wide = value.new_zeros(*value.shape[:2], 3, 3)
            wide[:, :, 1, 1] = value[:, :, 0, 0]
            value = wide
        out[new] = value.clone()
    return out


def off_centre(weight: Tensor) -> float:
    """The largest |tap| of a 3x3 kernel outside its centre."""
    rest = weight.detach().clone()
    rest[:, :, 1, 1] = 0
    return float(rest.abs().max()) if rest.numel() else 0.0


def from_zipit_state_dict(
    state: Mapping[str, Tensor], heads: Sequence[tuple[Tensor, Tensor]] | None = None
) -> dict[str, Tensor]:
    """The inverse of :func:`to_zipit_state_dict`; ``heads`` (``(weight, bias)`` of each
    model's head, in order) replace their one head by the heads stacked along the output axis
    (our ``heads="per-task"`` layout). Raises ``ValueError`` when a shortcut kernel has a
    non-zero off-centre tap: our 1x1 shortcut cannot hold it."""
    bad = [k for k in state if not _THEIRS.fullmatch(k)]
    if bad or not state:
        raise ValueError(f"not a ZipIt ResNet state dict: unexpected {bad[:5]}")
    out = {}
    for key, value in state.items():
        new = re.sub(r"(^|\.)bn([12])\.", r"\1norm\2.", key)
        new = "fc." + new[7:] if new.startswith("linear.") else new
        if _SHORTCUT.fullmatch(key):
            if value.shape[2:] != (3, 3):
                raise ValueError(f"{key}: a 3x3 shortcut kernel expected, got {tuple(value.shape)}")
            if (gap := off_centre(value)) != 0.0:
                raise ValueError(f"{key} has off-centre taps up to {gap:.3g}; our 1x1 "
                                 "shortcut cannot hold them")  # fmt: skip
            value = value[:, :, 1:2, 1:2]
        out[new] = value.detach().clone().contiguous()
    if heads is not None:
        out["fc.weight"] = torch.cat([w.detach() for w, _ in heads]).contiguous()
        out["fc.bias"] = torch.cat([b.detach() for _, b in heads]).contiguous()
    return out


def probe_zipit(folder: Path) -> tuple[str | None, str | None, str | None]:
    """``(commit, imported_from, None)`` when their modules imports in the peer's environment
    (with the shims), else ``(None, None, reason)`` (:func:`symmerge.report.peers.probe_source`)."""
    return probe_source(folder, "ZipIt!", "model_merger.py", _PROBE, **ENV)


def _outputs(path: Path) -> int:
    """The output count of a checkpoint's model (its last Linear)."""
    from symmerge.io import load_checkpoint

    linears = [m for m in load_checkpoint(path)[0].modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features)


@portable_paths
def run_zipit(
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
    """Zip two ResNet-20 checkpoints with the official ZipIt! code in a subprocess, on the
    merge batches our runs of ``setting`` at ``seed`` got; a peer that is missing or
    fails is recorded in the entry, never raised.

    Args:
        checkpoints: the two source files (our safetensors ResNet-20, BatchNorm), model A
            first; the merged model has their heads side by side (A's outputs first).
        evaluate: scores the merged model here (the report's own evaluation and test data).
        seed: the report seed (it picked the merge data) and the torch seed of the
            subprocess (their zip draws nothing random).
        setting: the report setting; one with per-task heads (ZipIt!'s disjoint tasks).
        data: the setting's merge batches and their record (the runner's, as our runs').
        folder: the peer folder (default ``default_peer_root() / "zipit"``).
        threads: torch threads of the subprocess (default: this process's).
        timeout: seconds before the subprocess is stopped (recorded as failed).

    Returns the peer entry: ``status`` ``"ok"``, ``"not run"`` (not importable: ``reason``
    and ``install``) or ``"failed"`` (``reason``).
    """
    folder = Path(folder) if folder is not None else default_peer_root() / "zipit"
    threads = threads or torch.get_num_threads()
    commit = peer_commit(folder)
    entry: dict[str, Any] = {
        "peer": "zipit-official", "package": f"{REPO}@{commit or 'unknown commit'}",
        "version": commit, "status": "not run", "reason": None,
        "install": zipit_install_command(folder), "folder": str(folder), "imported_from": None,
        "call": ZIPIT_CALL, "notes": ZIPIT_NOTES, "params": {"alpha": ALPHA, "beta": BETA},
        "heads": "per-task", "renorm": "reset-bn (theirs: utils.reset_bn_stats)",
        "checkpoints": [file_sha256(Path(p)) for p in checkpoints], "threads": threads,
        "data": None, "metrics": None, "seconds": None, "timings": None, "stubs": None,
        "conversion_max_abs_logit_diff": None, "shortcut_off_centre_max_abs": None,
        "merge_points": None, "checks": None, "merged_weights_sha256": None,
    }  # fmt: skip
    if setting.heads != "per-task":
        return {**entry, "reason": f"the zipit-official run keeps a head per task; "
                                   f"{setting.name!r} has one shared head"}  # fmt: skip
    version, source, reason = probe_zipit(folder)
    if reason is not None:
        return {**entry, "reason": reason}
    entry.update(version=version, imported_from=source)
    batches, entry["data"] = data
    try:
        outputs = _outputs(Path(checkpoints[0]))
    except Exception as exc:  # recorded, never raised
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:1000]
        return {**entry, "status": "failed", "reason": f"reading the checkpoint: {message}"}
    job = {"checkpoints": [str(Path(p).resolve()) for p in checkpoints],
           "sha256": entry["checkpoints"], "seed": seed, "threads": threads}  # fmt: skip
    fields, result = run_worker(_WORKER, job, peer_env(folder, threads, **ENV), checkpoints[0],
                                evaluate, timeout=timeout, data=batches,
                                num_outputs=outputs * len(checkpoints))  # fmt: skip
    if result is None:
        return {**entry, **fields}
    return {**entry, **fields, **{k: result[k] for k in (
        "stubs", "conversion_max_abs_logit_diff", "shortcut_off_centre_max_abs",
        "merge_points", "checks")}}  # fmt: skip


def _import_zipit() -> tuple[dict[str, Any], list[str]]:
    """Install the stubs of :data:`ZIPIT_STUBS` and import their modules (their ``src`` is on
    ``PYTHONPATH``). Returns the modules by role and the stubbed module names."""
    stubbed = [
        m
        for m, attrs in ZIPIT_STUBS.items()
        if import_stub(m, {a: unavailable(f"{m}.{a}") for a in attrs})
    ]
    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.autocast.*")
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    import graphs.resnet_graph as resnet_graph
    import matching_functions
    import metric_calculators
    import model_merger
    import models.resnets as resnets
    import utils

    mods = {
        "resnets": resnets, "graph": resnet_graph, "merger": model_merger,
        "matching": matching_functions, "metrics": metric_calculators, "utils": utils,
    }  # fmt: skip
    return mods, stubbed


def _zipit_probe() -> None:
    """Probe subprocess: import with the stubs, print where their code came from."""
    mods, _ = _import_zipit()
    print(Path(mods["merger"].__file__).parent)


def _zipit(mods: dict[str, Any], bases: Sequence[nn.Module], new: nn.Module,
           batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[Any, dict[str, float]]:  # fmt: skip
    """Their full zip and BatchNorm reset of ``bases`` on ``batches``, timed."""
    t0 = time.perf_counter()
    graphs = [mods["graph"].resnet20(copy.deepcopy(b)).graphify() for b in bases]
    merge = mods["merger"].ModelMerge(*graphs, device="cpu")
    t1 = time.perf_counter()
    merge.transform(copy.deepcopy(new), [batches],
                    transform_fn=mods["matching"].match_tensors_zipit,
                    metric_classes=mods["metrics"].get_metric_fns(list(METRICS)),
                    stop_at=None, a=ALPHA, b=BETA)  # fmt: skip
    t2 = time.perf_counter()
    mods["utils"].reset_bn_stats(merge, batches)
    t3 = time.perf_counter()
    return merge, {"total_s": t3 - t0, "graph_s": t1 - t0, "transform_s": t2 - t1,
                   "matching_s": float(merge.compute_transform_time),
                   "reset_bn_s": t3 - t2}  # fmt: skip


def _zipit_worker() -> None:
    """The peer subprocess (``sys.argv[1]``: the job file): our loader in, their zip and
    BatchNorm reset timed, the merged state dict out in our names with per-task heads."""
    from safetensors.torch import save_file

    from symmerge.io import load_checkpoint
    from symmerge.renorm import reset_bn
    from symmerge.report.peers import load_batches

    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    for path, sha in zip(job["checkpoints"], job["sha256"], strict=True):
        if file_sha256(Path(path)) != sha:
            raise SystemExit(f"{path} changed: its sha256 is not the report's {sha}")
    batches = load_batches(job["data"])
    mods, stubbed = _import_zipit()
    ours = [load_checkpoint(p)[0].eval() for p in job["checkpoints"]]
    width = ours[0].layer1[0].conv1.out_channels / 16
    outputs = int(ours[0].fc.out_features)
    if width != int(width):
        raise SystemExit(f"ResNet-20 width {width} is not whole: their resnet20(w) needs one")

    def theirs(state: Mapping[str, Tensor] | None = None) -> nn.Module:
        net = mods["resnets"].resnet20(w=int(width), num_classes=outputs)
        if state is not None:
            net.load_state_dict(state, strict=True)
        return net.eval()

    bases = [theirs(to_zipit_state_dict(m.state_dict())) for m in ours]
    with torch.no_grad():
        x = batches[0][0]
        conversion = [float((m(x) - b(x)).abs().max()) for m, b in zip(ours, bases, strict=True)]
    torch.manual_seed(int(job["seed"]))
    new = theirs()  # as their utils.prepare_resnets' 'new': every tensor is overwritten
    # an untimed first call on the first batch (every step once): one-off costs are not theirs
    _, first = _zipit(mods, bases, new, batches[:1])
    merge, timings = _zipit(mods, bases, new, batches)
    merge.eval()
    merged = merge.merged_model
    heads = [(g.model.linear.weight, g.model.linear.bias) for g in merge.graphs]
    shortcuts = [w for k, w in merged.state_dict().items() if _SHORTCUT.fullmatch(k)]
    state = from_zipit_state_dict(merged.state_dict(), heads)  # raises on off-centre taps
    save_file(state, job["merged"])
    # checks, after the timing: their one head is the mean of the per-task heads; their
    # BatchNorm reset gives our reset_bn's statistics on the same weights and batches
    with torch.no_grad():
        mean_w = sum(w for w, _ in heads) / len(heads)
        mean_b = sum(b for _, b in heads) / len(heads)
        head_gap = max(float((merged.linear.weight - mean_w).abs().max()),
                       float((merged.linear.bias - mean_b).abs().max()))  # fmt: skip
    again = reset_bn(copy.deepcopy(merged), batches)
    stats = ("running_mean", "running_var")
    bn_gap = max(float((a - b).abs().max()) for (k, a), b in zip(
        merged.state_dict().items(), again.state_dict().values(), strict=True)
        if k.endswith(stats))  # fmt: skip
    Path(job["result"]).write_text(json.dumps({
        "timings": {**timings, "first_call_s": first["total_s"]},
        "stubs": stubbed,
        "conversion_max_abs_logit_diff": conversion,
        "shortcut_off_centre_max_abs": max((off_centre(w) for w in shortcuts), default=0.0),
        "merge_points": len(merge.merges),
        "checks": {"shared_head_vs_mean_of_heads_max_abs": head_gap,
                   "reset_bn_stats_vs_our_reset_bn_max_abs": bn_gap},
    }))  # fmt: skip
