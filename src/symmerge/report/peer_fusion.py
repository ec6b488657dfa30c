"""The official "Model Fusion via Neuron Interpolation" code on our MLP checkpoints, a peer
beside our ``kf-linear``.

The authors' repository (AndrewSpano/neuron-interpolation-model-fusion) is no package: its
tree lives in the peer folder (``folder/src``, the repository's commit in ``folder/COMMIT``)
and runs in a subprocess of the report's Python, as in :mod:`symmerge.report.peers`; torch,
numpy and scipy (and captum, when installed) come from our environment. Missing or failing,
the peer is recorded as ``"not run"`` or ``"failed"`` with the reason, never raised.

What runs is their KF-Linear: ``fusion_algorithms/hf_kf.py``'s ``LSFusion(models).fuse(X, y,
fusion_method="k_means", ...)`` with the arguments of their driver ``fuse_kf_func``
(``main_scripts/experiments_code/fusion/fuse_all_utils.py``) at uniform importance, on the
exact merge batches our runs of the setting and seed got (the runner hands them over),
concatenated into one tensor as their interface wants.

Converter. Their models are subclasses of their ``models.base_model.BaseModel`` whose *class*
names the layers that are fused; their only MLP (``models/mlp.py: MLPNet``) has one hidden
layer and cannot hold ours. The subprocess builds :func:`peer_mlp_class`, a minimal
``BaseModel`` subclass mirroring our ``nn.Sequential`` (Flatten, [Linear, ReLU] x depth,
Linear; the same parameter names), loads our weights into it, and checks that its logits equal
ours; the fused model's state dict is ours by name (:func:`from_peer_state_dict` checks it)
and is scored by the report's evaluation in the report's process.

Head: their head is fitted to the parents' averaged logits (identity class map, uniform
importance); our ``kf-linear`` in the report runs ``head="auto"`` with the checkpoints'
``class_counts``, i.e. ``"class-share"``, which weights each class's logit by each parent's
share of that class's training data. The entry records which head ours used
(``ours_head``, and in ``notes``), so the table is read correctly.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
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
    "FUSION_CALL",
    "FUSION_KWARGS",
    "FUSION_NOTES",
    "PEER_NAME",
    "PEER_SEED",
    "SUBFOLDER",
    "TIMEOUT",
    "from_peer_state_dict",
    "fusion_install_command",
    "mlp_sizes",
    "ours_head",
    "peer_mlp_class",
    "probe_fusion",
    "run_fusion",
    "to_peer_model",
]

REPO = "AndrewSpano/neuron-interpolation-model-fusion"
PEER_NAME = "neuron-interpolation-official"
#: The peer's folder under the peer root.
SUBFOLDER = "neuron-interpolation"
#: The parts of their tree unpacked: ``git archive HEAD`` of the whole tree fails on a mirror
#: without their large ``example-base-models/`` files (Git LFS), which are never used here.
SOURCE_PATHS = ("fusion_algorithms", "models", "utils", "main_scripts", "requirements.txt",
                "LICENSE", "README.md")  # fmt: skip
#: ``set_seed`` before the fusion: the ``--seed`` default of their ``run_hf_kf.py`` (their
#: K-means draws its first centroid of every try from ``np.random``). The report's seed picks
#: the checkpoints and the merge data.
PEER_SEED = 42
#: ``fuse_kf_func``'s arguments at uniform importance (``fuse()``'s default importance too;
#: with uniform scores on equal widths ``norm_neuron_importance`` changes nothing).
FUSION_KWARGS: dict[str, Any] = {
    "fusion_method": "k_means", "neuron_importance_method": "uniform", "norm_acts": False,
    "norm_neuron_importance": True,
}  # fmt: skip
#: The subprocess's time limit, seconds: their KF-Linear of two zoo MLPs took 799 s on this
#: 2-core CPU under load with one thread (benchmarks/results/fusion_peer.md), nearly all of it
#: their k-means++-style initialisation (10 tries, 511 added centroids, 3 hidden layers); the
#: report's cpu non-iid seed 0 took 569 s (one thread).
TIMEOUT = 3600.0
#: The untimed first call: the same fusion on two random PeerMLPs of this width (same depth)
#: and this many of the merge images (seconds; a full untimed call would double the run).
WARMUP_WIDTH = 16
WARMUP_IMAGES = 64
#: Images on which our models and their conversions are compared.
CHECK_IMAGES = 256

FUSION_CALL = (
    f"utils.general_utils.set_seed({PEER_SEED}) (run_hf_kf.py's --seed default); "
    "LSFusion([A, B]).fuse(X, y, fusion_method='k_means', neuron_importance_method='uniform', "
    "norm_acts=False, norm_neuron_importance=True) (fuse_all_utils.py fuse_kf_func's "
    "arguments at uniform importance) on PeerMLP copies of the two checkpoints (a minimal "
    "subclass of their BaseModel mirroring our MLP: trainable layers = its Linear layers in "
    "order); X, y = the setting's merge batches concatenated into one tensor (their "
    "interface; y is unused at uniform importance); timed, after one untimed call of the same "
    f"on two random width-{WARMUP_WIDTH} PeerMLPs and {WARMUP_IMAGES} of the images (a full "
    "untimed call would double a run of 10-13 minutes on a 2-core CPU); merged = the fused "
    "PeerMLP's state dict (our parameter names); their head target: the parents' averaged "
    "logits (identity class map, uniform importance)"
)
#: How their code was run, and what the subprocess does around it.
FUSION_NOTES = (
    "no file of theirs edited and no shim of their code; their models/mlp.py MLPNet has one "
    "hidden layer, so the converter is PeerMLP (built in the subprocess from their BaseModel, "
    "WeightRepresentation and LevelRepresentation; levels = Linear+ReLU as in MLPNet, unused "
    "by LSFusion); their prints are captured (their per-layer time.time() splits are kept as "
    "peer_reported_*); CPU, their torch.cuda.empty_cache() calls are no-ops; captum (imported "
    "at module level by their utils/neuron_importance.py, only called for non-uniform "
    "importance) is stubbed only when not installed (import_stubs)"
)

_PROBE = "from symmerge.report.peer_fusion import _fusion_probe; _fusion_probe()"
_WORKER = "from symmerge.report.peer_fusion import _fusion_worker; _fusion_worker()"
_PARAMS = ("weight", "bias")
_CAPTUM = ("captum.attr", ("LayerConductance", "LayerDeepLift", "LayerFeatureAblation"))


def fusion_install_command(folder: Path) -> str:
    """How to prepare ``folder`` (never run from here)."""
    return (
        f"fetch github:{REPO} as a bare mirror MIRROR, then: mkdir -p {folder}/src && "
        f"git --git-dir=MIRROR archive HEAD {' '.join(SOURCE_PATHS)} | tar -x -C {folder}/src && "
        f"git --git-dir=MIRROR rev-parse HEAD > {folder}/COMMIT"
    )


# ---------------------------------------------------------------------------------------------
# the converter: our MLP <-> their BaseModel
# ---------------------------------------------------------------------------------------------


def mlp_sizes(state: Mapping[str, Tensor]) -> list[int]:
    """``[inputs, hidden..., outputs]`` of our ``mlp`` state dict (``layers`` = Flatten, then
    Linear/ReLU pairs, then Linear: its Linears are ``layers.1``, ``layers.3``, ...)."""
    n = len(state) // 2
    ours = [f"layers.{2 * k + 1}.{p}" for k in range(n) for p in _PARAMS]
    if n < 1 or sorted(state) != sorted(ours):
        raise ValueError(f"not a symmerge MLP state dict (Linear layers only): {sorted(state)}")
    weights = [state[f"layers.{2 * k + 1}.weight"] for k in range(n)]
    sizes = [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights]
    for k, w in enumerate(weights):
        bias = tuple(state[f"layers.{2 * k + 1}.bias"].shape)
        if tuple(w.shape) != (sizes[k + 1], sizes[k]) or bias != (sizes[k + 1],):
            raise ValueError(f"layer {k} of the MLP state dict does not chain: {tuple(w.shape)}")
    return sizes


def peer_mlp_class(base: type, weight_repr: Callable[..., Any], level_repr: Callable[..., Any]
                   ) -> type:  # fmt: skip
    """A minimal subclass of their ``BaseModel`` (``base``) mirroring our MLP's ``layers``
    Sequential, so that its state dict is ours by name; ``weight_repr``/``level_repr`` are
    their ``WeightRepresentation``/``LevelRepresentation`` (what its properties return)."""

    class PeerMLP(base):  # type: ignore[misc, valid-type]
        def __init__(self, sizes: Sequence[int]) -> None:
            super().__init__(None, None)  # no train/val indices: not theirs to record
            self.sizes = [int(s) for s in sizes]
            mods: list[nn.Module] = [nn.Flatten(start_dim=1)]
            for i in range(len(self.sizes) - 1):
                mods.append(nn.Linear(self.sizes[i], self.sizes[i + 1]))
                if i < len(self.sizes) - 2:
                    mods.append(nn.ReLU())
            self.layers = nn.Sequential(*mods)

        def forward(self, x: Tensor) -> Tensor:
            return self.layers(x)

        def _linear_idx(self) -> list[int]:
            return [i for i, m in enumerate(self.layers) if isinstance(m, nn.Linear)]

        @property
        def get_ordered_trainable_named_layers(self) -> list[Any]:
            return [weight_repr(name=f"layers.{i}", weight=self.layers[i].weight,
                                layer=self.layers[i]) for i in self._linear_idx()]  # fmt: skip

        @property
        def get_ordered_trainable_named_levels(self) -> list[Any]:
            idx = self._linear_idx()
            return [level_repr(name=f"level{k}", output_width=self.layers[i].out_features,
                               network=self.layers[i : i + 2 if k < len(idx) - 1 else i + 1])
                    for k, i in enumerate(idx)]  # fmt: skip

        def forward_until_level(self, x: Tensor, level_idx: int = -1) -> Tensor:
            idx = self._linear_idx()
            last = level_idx == -1 or level_idx >= len(idx) - 1
            return self.layers[: len(self.layers) if last else idx[level_idx] + 2](x)

        def copy_model(self) -> PeerMLP:
            twin = type(self)(self.sizes)
            twin.load_state_dict(self.state_dict())
            return twin.to(next(self.parameters()).device)

    return PeerMLP


def to_peer_model(cls: type, model: nn.Module) -> nn.Module:
    """Our MLP's weights in a ``cls`` (:func:`peer_mlp_class`) model, in eval mode."""
    state = model.state_dict()
    peer = cls(mlp_sizes(state))
    peer.load_state_dict(state)
    return peer.eval()


def from_peer_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A PeerMLP's state dict in our MLP's names (the same names, checked), detached."""
    mlp_sizes(state)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _max_logit_diff(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


# ---------------------------------------------------------------------------------------------
# the report's side
# ---------------------------------------------------------------------------------------------


def probe_fusion(folder: Path) -> tuple[str | None, str | None, str | None]:
    """``(commit, imported_from, None)`` when their ``LSFusion`` imports in the peer's environment
    (with the shims), else ``(None, None, reason)`` (:func:`symmerge.report.peers.probe_source`)."""
    return probe_source(folder, "neuron-interpolation code", "fusion_algorithms/hf_kf.py", _PROBE)


def ours_head(params: Mapping[str, Any], class_counts: Sequence[Any]) -> str:
    """The head target our ``kf-linear`` uses in the report: its ``head`` parameter (default
    ``"auto"``), where ``"auto"`` is ``"class-share"`` when every checkpoint records its
    ``class_counts`` (the runner passes them), else ``"mean"``."""
    head = str(params.get("head", "auto"))
    if head != "auto":
        return head
    return "class-share" if class_counts and all(c is not None for c in class_counts) else "mean"


@portable_paths
def run_fusion(
    checkpoints: Sequence[Path],
    evaluate: Callable[[nn.Module], dict[str, Any]],
    *,
    seed: int,
    setting: Setting,
    data: tuple[Sequence[tuple[Tensor, Tensor]], dict[str, Any]],
    folder: Path | None = None,
    threads: int | None = None,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """Fuse two MLP checkpoints with the official KF-Linear in a subprocess, on the merge
    batches our runs of ``setting`` at ``seed`` get; a peer that is missing or fails is
    recorded in the entry, never raised.

    Args:
        checkpoints: the two source files (our safetensors ``mlp`` checkpoints), model A first.
        evaluate: scores the merged model here (the report's own evaluation and test data).
        seed: the report seed (it picked the merge data; their own seed is :data:`PEER_SEED`).
        setting: the report setting (its ``kf-linear`` keywords name our head target).
        data: the setting's merge batches and their record (the runner's, as our runs').
        folder: the peer folder (default ``default_peer_root() / SUBFOLDER``).
        threads: torch threads of the subprocess (default: this process's).
        timeout: seconds before the subprocess is stopped (recorded as failed).

    Returns the peer entry: ``status`` ``"ok"``, ``"not run"`` (not importable: ``reason``
    and ``install``) or ``"failed"`` (``reason``).
    """
    from symmerge.io import read_checkpoint_metadata

    folder = Path(folder) if folder is not None else default_peer_root() / SUBFOLDER
    threads = threads or torch.get_num_threads()
    commit = peer_commit(folder)
    metas = [read_checkpoint_metadata(p) for p in checkpoints]
    head = ours_head(setting.params.get("kf-linear", {}), [m.get("class_counts") for m in metas])
    notes = FUSION_NOTES + (
        "; same head target as our kf-linear ('mean')" if head == "mean" else
        f"; NOT the head target of our kf-linear in this report ('{head}': head='auto' with the "
        "checkpoints' class_counts weights each class's logit by each parent's share of that "
        "class's training data), so the two rows differ in the head as well")  # fmt: skip
    entry: dict[str, Any] = {
        "peer": PEER_NAME, "package": f"{REPO}@{commit or 'unknown commit'}", "version": commit,
        "status": "not run", "reason": None, "install": fusion_install_command(folder),
        "folder": str(folder), "imported_from": None, "call": FUSION_CALL, "notes": notes,
        "peer_head": "mean", "ours_head": head, "peer_seed": PEER_SEED, "data": None,
        "checkpoints": [file_sha256(Path(p)) for p in checkpoints], "threads": threads,
        "metrics": None, "seconds": None, "timings": None, "conversion": None,
        "import_stubs": None, "kmeans_early_stops": None, "merged_weights_sha256": None,
    }  # fmt: skip
    if len(checkpoints) != 2:
        return {
            **entry,
            "status": "failed",
            "reason": f"LSFusion's KF-Linear is run on 2 models here, got {len(checkpoints)}",
        }
    version, source, reason = probe_fusion(folder)
    if reason is not None:
        return {**entry, "reason": reason}
    entry.update(version=version, imported_from=source)
    batches, entry["data"] = data
    job = {"checkpoints": [str(Path(p).resolve()) for p in checkpoints],
           "sha256": entry["checkpoints"], "threads": threads,
           "source": str((folder / "src").resolve())}  # fmt: skip
    fields, result = run_worker(_WORKER, job, peer_env(folder, threads), checkpoints[0],
                                evaluate, timeout=timeout, data=batches)  # fmt: skip
    if result is None:
        return {**entry, **fields}
    return {**entry, **fields, "conversion": result["conversion"],
            "import_stubs": result["import_stubs"],
            "kmeans_early_stops": result["kmeans_early_stops"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the subprocess
# ---------------------------------------------------------------------------------------------


def _import_peer(source: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Their ``LSFusion``, ``BaseModel``, representations and ``set_seed`` (their top-level
    packages ``fusion_algorithms``, ``models``, ``utils``, from ``PYTHONPATH``), and the import
    stubs used. With ``source``, the modules must come from there (not from namesakes)."""
    stubs = (
        [f"{_CAPTUM[0]} ({', '.join(_CAPTUM[1])})"]
        if import_stub(_CAPTUM[0], {a: unavailable(f"{_CAPTUM[0]}.{a}") for a in _CAPTUM[1]})
        else []
    )
    from fusion_algorithms import hf_kf  # type: ignore[import-not-found]
    from models import base_model  # type: ignore[import-not-found]
    from utils import general_utils  # type: ignore[import-not-found]

    if source is not None:
        for mod in (hf_kf, base_model, general_utils):
            if not Path(mod.__file__).resolve().is_relative_to(Path(source).resolve()):
                raise ImportError(f"{mod.__name__} came from {mod.__file__}, not {source}")
    return {"LSFusion": hf_kf.LSFusion, "BaseModel": base_model.BaseModel,
            "WeightRepresentation": base_model.WeightRepresentation,
            "LevelRepresentation": base_model.LevelRepresentation,
            "set_seed": general_utils.set_seed, "file": hf_kf.__file__}, stubs  # fmt: skip


def _fusion_probe() -> None:
    """Probe subprocess: import their code, print the folder it came from."""
    pm, _ = _import_peer()
    print(Path(pm["file"]).resolve().parents[1])


def _sum_prints(pattern: str, text: str) -> float:
    return sum(float(v) for v in re.findall(pattern, text))


def _fusion_worker() -> None:
    """The peer subprocess (``sys.argv[1]``: the job file): our checkpoints converted to
    PeerMLPs, their KF-Linear timed on the report's batches, the fused state dict out in our
    names."""
    from safetensors.torch import save_file

    from symmerge.io import load_checkpoint

    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    for path, sha in zip(job["checkpoints"], job["sha256"], strict=True):
        if file_sha256(Path(path)) != sha:
            raise SystemExit(f"{path} changed: its sha256 is not the report's {sha}")
    pm, stubs = _import_peer(job["source"])
    cls = peer_mlp_class(pm["BaseModel"], pm["WeightRepresentation"], pm["LevelRepresentation"])
    batches = load_batches(job["data"])
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    ours = [load_checkpoint(p)[0].eval() for p in job["checkpoints"]]
    parents = [to_peer_model(cls, m) for m in ours]
    check = x[:CHECK_IMAGES]
    diffs = [_max_logit_diff(p, m, check) for p, m in zip(parents, ours, strict=True)]
    if max(diffs) > 1e-5:
        raise SystemExit(f"the PeerMLP conversion changes the logits: max |diff| {diffs}")

    # untimed first call (every code path once, on tiny random models): one-off costs are not
    # theirs, and a full untimed call would double a run of 10-13 minutes
    sizes = mlp_sizes(ours[0].state_dict())
    tiny = [cls([sizes[0], *[WARMUP_WIDTH] * (len(sizes) - 2), sizes[-1]]).eval() for _ in ours]
    w0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        pm["LSFusion"](tiny).fuse(x[:WARMUP_IMAGES], y[:WARMUP_IMAGES], **FUSION_KWARGS)
    first = time.perf_counter() - w0

    pm["set_seed"](PEER_SEED)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        fused = pm["LSFusion"](parents).fuse(x, y, **FUSION_KWARGS)
    total = time.perf_counter() - t0
    state = from_peer_state_dict(fused.state_dict())
    back = load_checkpoint(job["checkpoints"][0])[0].eval()
    back.load_state_dict(state)
    merged_diff = _max_logit_diff(back, fused.eval(), check)
    save_file(state, job["merged"])
    text = log.getvalue()
    Path(job["result"]).write_text(json.dumps({
        "timings": {
            "total_s": total, "first_call_s": first,
            "peer_reported_importance_s": _sum_prints(r"Neuron Importance Score Time: ([\d.e-]+)",
                                                      text),
            "peer_reported_pinv_s": _sum_prints(r"Pseudo-inverse time: ([\d.e-]+)", text),
            "peer_reported_kmeans_s": _sum_prints(r"K-means time: ([\d.e-]+)", text),
        },
        "conversion": {"images": len(check), "max_abs_logit_diff": diffs,
                       "merged_max_abs_logit_diff": merged_diff},
        "import_stubs": stubs,
        "kmeans_early_stops": len(re.findall(r"K-means Early Stopping", text)),
    }))  # fmt: skip
