"""Peer run: the official ZipIt! code (gstoica27/ZipIt) vs symmerge's ``zip`` on the same
checkpoints and data.

The two CIFAR-10 ResNet-20x1 reference checkpoints trained on classes 0-4 and 5-9
(in ``$SYMMERGE_CHECKPOINTS``, or ``--checkpoints A,B``) are converted into the official
repository's ResNet-20
(``models/resnets.py``; the conversion is checked on a batch of test images: converted logits
vs ours, max abs difference), zipped with its own ``ModelMerge`` + ``ResNetGraph`` +
``match_tensors_zipit`` (metrics ``covariance`` and ``mean`` as its ``cifar5_resnet20`` config,
full zip: ``stop_at=None``) and BatchNorm-reset with its ``reset_bn_stats``, as its evaluation
scripts do. symmerge's ``merge([a, b], "zip", data=..., renorm="reset-bn", heads=...)`` runs in the
same invocation on the same checkpoints and the same merge data (a seeded subset of CIFAR-10
training images, unaugmented, labels unused). Everything is evaluated on the full CIFAR-10
test set with both evaluators: symmerge's ``task_accuracy`` (joint = argmax over both tasks'
own-class logits) and the peer's ``evaluate_logits_alltasks`` (joint = argmax over per-task
softmax probabilities; per task = argmax over the task's own classes, as symmerge's).

Heads. The peer's full zip leaves one shared head (the two models' heads, each reading the
zipped features through its own unmerge, averaged); that is its native output. Its per-task
heads (each model's transformed head on the zipped features, which is what symmerge's
``heads="per-task"`` builds) are taken from the peer's own transformed models
(``Merge.graphs[i].model.linear``); the script checks that their mean equals the native head.

Configurations (``--configs``, ``--sources``): (alpha, beta) = the peer function's defaults
(0.3, 0.125) and the paper's / symmerge's defaults (0.5, 1.0); sources as loaded ("raw") or with
BatchNorm statistics first reset on the merge data with the peer's ``reset_bn_stats`` ("reset",
the peer's protocol: its scripts reset the base models before zipping). Both implementations get
the same source models in each configuration. A diagnostic symmerge run (``--no-diagnostic``
skips it) takes each group's statistics only where the peer's graph observes it.

Only Python-level shims are applied to the peer code, at run time (nothing in its files is
edited): import stubs for packages its merge path never calls (``clip``, ``fvcore``,
``sklearn``, ``einops`` when missing), ``device="cpu"`` for ``ModelMerge``, and its
``torch.cuda.amp.autocast`` warnings silenced (CUDA is absent, so autocast is disabled and
everything runs in float32). The results files list the stubs that were used.

The peer repository must be cloned (git-ignored) into ``--peer-dir``
(default ``benchmarks/.pkgs/ZipIt``), e.g. from a mirror of github.com/gstoica27/ZipIt.

    OMP_NUM_THREADS=1 SYMMERGE_DATA=DATA SYMMERGE_CHECKPOINTS=CKPTS \\
        .venv/bin/python benchmarks/zipit_peer.py
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import (
    HERE,
    add_common_args,
    display_path,
    md_table,
    provenance,
    provenance_md,
    subset,
    write_json,
)
from torch import nn

TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
OWN_TASKS = [{"classes": c, "logits": [10 * k, 10 * (k + 1)]} for k, c in enumerate(TASKS)]
SHARED_TASKS = [{"classes": c, "logits": [0, 10]} for c in TASKS]
CHECKPOINT_NAMES = ("resnet20-cifar10-c0-4-s0.safetensors", "resnet20-cifar10-c5-9-s1.safetensors")
PEER_URL = "https://github.com/gstoica27/ZipIt"


# ---------------------------------------------------------------------------------------------
# the peer code: import shims
# ---------------------------------------------------------------------------------------------


def _unavailable(name: str) -> Any:
    def fn(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{name} is an import stub of zipit_peer.py (not needed by the zip)")

    return fn


def _stub(module: str, attrs: list[str]) -> bool:
    """Register an import stub for ``module`` (and its parents) when it is not installed."""
    top = module.split(".")[0]
    ours = getattr(sys.modules.get(top), "_zipit_peer_stub", False)
    if not ours and importlib.util.find_spec(top) is not None:
        return False
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = []  # a package, so submodules import
            mod._zipit_peer_stub = True  # type: ignore[attr-defined]
            # a spec without origin: importlib.util.find_spec (torch._dynamo calls it on
            # sklearn and einops) then sees a module with no files, not a broken one
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            sys.modules[name] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
    for a in attrs:
        setattr(sys.modules[module], a, _unavailable(f"{module}.{a}"))
    return True


def import_peer(peer_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The peer's modules, with import stubs for what its zip path never calls."""
    stubs = {
        "clip": ["tokenize", "load"],  # utils.py: CLIP text heads (eval_type='clip' only)
        "fvcore.nn.flop_count": ["flop_count"],  # model_merger.py: FLOP counting only
        "sklearn.cluster": ["AgglomerativeClustering", "KMeans"],  # match_tensors_kmeans only
        "sklearn.model_selection": ["train_test_split"],  # utils.create_heldout_split only
        "einops": ["repeat"],  # utils.vector_gather only
    }
    used = [m for m, attrs in stubs.items() if _stub(m, attrs)]
    if not (peer_dir / "model_merger.py").exists():
        raise FileNotFoundError(f"no ZipIt checkout at {peer_dir} (clone {PEER_URL} there)")
    sys.path.insert(0, str(peer_dir))
    import graphs.resnet_graph as resnet_graph
    import matching_functions
    import metric_calculators
    import model_merger
    import models.resnets as resnets
    import utils as peer_utils

    mods = {
        "resnets": resnets, "resnet_graph": resnet_graph, "model_merger": model_merger,
        "matching": matching_functions, "metrics": metric_calculators, "utils": peer_utils,
    }  # fmt: skip
    return mods, used


def peer_commit(peer_dir: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(peer_dir), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# conversion: symmerge ResNet-20 -> the peer's ResNet-20
# ---------------------------------------------------------------------------------------------


def to_peer_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """symmerge names/shapes -> the peer's: normN -> bnN, fc -> linear, and the 1x1 projection
    shortcut (stride 2, no padding) -> the peer's 3x3 shortcut (stride 2, padding 1) with the
    1x1 kernel at the centre tap and zeros elsewhere (the same function)."""
    out = {}
    for key, value in sd.items():
        new = key.replace("norm1", "bn1").replace("norm2", "bn2")
        new = "linear." + new[3:] if new.startswith("fc.") else new
        if key.endswith("shortcut.0.weight"):
            o, i, kh, kw = value.shape
            assert (kh, kw) == (1, 1), key
            w = value.new_zeros(o, i, 3, 3)
            w[:, :, 1, 1] = value[:, :, 0, 0]
            value = w
        out[new] = value.clone()
    return out


def convert(model: nn.Module, resnets: Any) -> nn.Module:
    peer = resnets.resnet20(w=1, num_classes=10)
    peer.load_state_dict(to_peer_state(model.state_dict()), strict=True)
    return peer.eval()


@torch.no_grad()
def max_logit_diff(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> float:
    ours.eval(), theirs.eval()
    return float((ours(x) - theirs(x)).abs().max())


# ---------------------------------------------------------------------------------------------
# evaluation: one forward pass per model, both evaluators read its logits
# ---------------------------------------------------------------------------------------------


def _key(x: torch.Tensor) -> bytes:
    return hashlib.blake2b(x.contiguous().numpy().tobytes(), digest_size=16).digest()


class Replay(nn.Module):
    """Returns precomputed logits for inputs that are a contiguous run of ``x_all`` (checked
    sample for sample with ``torch.equal``), so one forward pass serves several evaluators.
    ``cols`` picks output columns; ``split`` returns them as a list of chunks (multi-head)."""

    def __init__(self, index: dict[bytes, list[int]], x_all: torch.Tensor, logits: torch.Tensor,
                 cols: slice = slice(None), split: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # evaluators look up the model's device
        self.index, self.x_all, self.logits = index, x_all, logits
        self.cols, self.split = cols, split

    def forward(self, x: torch.Tensor) -> Any:
        x = x.detach().cpu().float()
        for off in self.index.get(_key(x[0]), []):
            if off + len(x) <= len(self.x_all) and torch.equal(x, self.x_all[off : off + len(x)]):
                out = self.logits[off : off + len(x), self.cols].clone()
                return list(out.split(self.split, dim=1)) if self.split else out
        raise RuntimeError("Replay: inputs are not a contiguous run of the test set")


@torch.no_grad()
def forward_all(fn: Any, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def evaluate_logits(logits: torch.Tensor, layout: str, test: dict[str, Any],
                    peer: dict[str, Any], root: str | None) -> dict[str, Any]:  # fmt: skip
    """Both evaluators on one model's test logits.

    ``layout``: "per-task" (20 columns: task A's 10-way head, then task B's) or "shared"
    (10 columns, one head)."""
    from symmerge.evaluate import task_accuracy

    x, index, loader = test["x"], test["index"], test["loader"]
    tasks = OWN_TASKS if layout == "per-task" else SHARED_TASKS
    ours = task_accuracy(Replay(index, x, logits), "cifar10", tasks, data_root=root)
    split = 10 if layout == "per-task" else None
    theirs = peer["utils"].evaluate_logits_alltasks(
        Replay(index, x, logits, split=split), loader, splits=TASKS, num_classes=10
    )
    return {
        "symmerge_eval": {
            "joint": ours["joint"]["accuracy"],
            "per_task": [t["accuracy"] for t in ours["tasks"]],
            "mean_task": ours["mean_task_accuracy"],
        },
        "zipit_eval": {"joint": theirs[0], "per_task": list(theirs[2]), "mean_task": theirs[1]},
    }


# ---------------------------------------------------------------------------------------------
# the two merges
# ---------------------------------------------------------------------------------------------


def _partition(labels: torch.Tensor) -> set[frozenset[int]]:
    return {frozenset(torch.nonzero(labels == c).flatten().tolist()) for c in labels.unique()}


def _masked_min_zip() -> Any:
    """symmerge's ``greedy_zip`` with one line changed: a merged cluster's similarity is the
    ``alpha * min`` of its members' rows of the *masked* matrix (as the peer's code does), not
    of the unmasked one. None when that line is no longer in the source."""
    import inspect

    import symmerge.solvers.zipit as solver

    src = inspect.getsource(solver.greedy_zip)
    line = "new = alpha * np.minimum(raw[a], raw[b])"
    if line not in src:
        return None
    ns = dict(vars(solver))
    exec(src.replace(line, "new = alpha * np.minimum(s[a], s[b])"), ns)  # noqa: S102
    return ns["greedy_zip"]


def solver_agreement(merger: Any, alpha: float, beta: float, peer: dict[str, Any]) -> dict:
    """On the peer's own statistics of every merge point: does symmerge's greedy zip
    (``symmerge.solvers.zipit.greedy_zip``) give the same clusters as the peer's
    ``match_tensors_zipit``? Also for the masked-min variant (:func:`_masked_min_zip`)."""
    from symmerge.solvers.zipit import greedy_zip

    variant = _masked_min_zip()
    same = same_variant = 0
    for metric in merger.metrics.values():
        cov = metric["covariance"]
        _, unmerge = peer["matching"].match_tensors_zipit(dict(metric), r=0.5, a=alpha, b=beta)
        theirs = _partition(unmerge.argmax(1))
        corr = peer["matching"].compute_correlation(cov).double().numpy()
        n = cov.shape[0] // 2
        same += _partition(greedy_zip(corr, [n, n], alpha=alpha, beta=beta).labels) == theirs
        if variant is not None:
            lab = variant(corr, [n, n], alpha=alpha, beta=beta).labels
            same_variant += _partition(lab) == theirs
    return {
        "merge_points": len(merger.metrics),
        "same_clusters": int(same),
        "same_clusters_masked_min_variant": None if variant is None else int(same_variant),
    }


def run_peer(sources: list[nn.Module], loader: Any, alpha: float, beta: float,
             peer: dict[str, Any], x_test: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """The peer's full zip + BN reset, timed; returns shared-head and per-task-head logits."""
    resnets, graph_mod, mm = peer["resnets"], peer["resnet_graph"], peer["model_merger"]
    bases = [convert(m, resnets) for m in sources]
    new_model = resnets.resnet20(w=1, num_classes=10)  # as utils.prepare_resnets' 'new'
    metric_fns = peer["metrics"].get_metric_fns(["covariance", "mean"])  # cifar5_resnet20 config
    t0 = time.perf_counter()
    graphs = [graph_mod.resnet20(copy.deepcopy(b)).graphify() for b in bases]
    merger = mm.ModelMerge(*graphs, device="cpu")
    merger.transform(copy.deepcopy(new_model), loader,
                     transform_fn=peer["matching"].match_tensors_zipit,
                     metric_classes=metric_fns, stop_at=None, a=alpha, b=beta)  # fmt: skip
    peer["utils"].reset_bn_stats(merger, loader)
    seconds = time.perf_counter() - t0
    agreement = solver_agreement(merger, alpha, beta, peer)
    merger.eval()
    merged = merger.merged_model
    heads = [g.model.linear for g in merger.graphs]  # each model's head after its unmerge
    feats: list[torch.Tensor] = []
    hook = merged.linear.register_forward_pre_hook(lambda m, a: feats.append(a[0]))

    def both(x: torch.Tensor) -> torch.Tensor:
        feats.clear()
        shared = merger(x)  # ModelMerge.forward: the merged model (full zip)
        z = feats[0]
        return torch.cat([shared, *(h(z) for h in heads)], dim=1)

    try:
        logits = forward_all(both, x_test)
    finally:
        hook.remove()
    shared, per_task = logits[:, :10], logits[:, 10:]
    mean_gap = float((shared - 0.5 * (per_task[:, :10] + per_task[:, 10:])).abs().max())
    zipped = len(merger.merges)
    off_centre = 0.0  # our 1x1 shortcuts live at the centre tap; the rest must stay 0
    for n, w in merged.state_dict().items():
        if n.endswith("shortcut.0.weight"):
            w = w.clone()
            w[:, :, 1, 1] = 0
            off_centre = max(off_centre, float(w.abs().max()))
    return {
        "merge_s": seconds,
        "transform_s": merger.compute_transform_time,
        "merge_points": zipped,
        "params": sum(p.numel() for p in merged.parameters()),
        "shared_logits": shared,
        "per_task_logits": per_task,
        "shared_vs_mean_of_heads_max_abs": mean_gap,
        "shortcut_off_centre_max_abs": off_centre,
        "solver_agreement": agreement,
    }


def peer_sites(group: Any) -> list[Any]:
    """Each group's last post-activation site only: where the peer's graph observes it (the
    input of the module after its PREFIX node). symmerge's default concatenates every
    post-activation site of a residual stream (stem and every block of the stage)."""
    from symmerge.stats import default_sites

    return default_sites(group)[-1:]


def run_symmerge(sources: list[nn.Module], data: list[tuple[torch.Tensor, torch.Tensor]],
                 heads: str, alpha: float, beta: float, x_test: torch.Tensor,
                 sites: str = "default") -> dict[str, Any]:  # fmt: skip
    import functools

    from symmerge.merging import merge
    from symmerge.stats import collect_statistics

    extra = {}
    if sites == "peer":
        extra["collect"] = functools.partial(collect_statistics, sites=peer_sites)
    t0 = time.perf_counter()
    merged, _ = merge(sources, "zip", data=data, renorm="reset-bn", heads=heads,
                      alpha=alpha, beta=beta, **extra)  # fmt: skip
    seconds = time.perf_counter() - t0
    merged.eval()
    return {
        "model": merged,
        "merge_s": seconds,
        "params": sum(p.numel() for p in merged.parameters()),
        "logits": forward_all(merged, x_test),
    }


# ---------------------------------------------------------------------------------------------


def symmerge_tree() -> dict[str, Any]:
    """The symmerge source this run imported: commit, files differing from it (src/), and a
    hash of that diff (others edit src/ concurrently; the numbers belong to this state)."""
    repo = HERE.parent

    def git(*a: str) -> str:
        out = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True)
        return out.stdout

    diff = git("diff", "HEAD", "--", "src")
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "src_changes": [ln[3:] for ln in git("status", "--porcelain", "--", "src").splitlines()],
        "src_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    folder = os.environ.get("SYMMERGE_CHECKPOINTS")  # the reference checkpoints' folder
    parser.add_argument("--checkpoints", required=folder is None,
                        default=None if folder is None else ",".join(
                            str(Path(folder) / n) for n in CHECKPOINT_NAMES),
                        help="A,B: the source checkpoints (classes 0-4, classes 5-9); default: "
                        "the reference ones in $SYMMERGE_CHECKPOINTS")  # fmt: skip
    parser.add_argument("--peer-dir", default=str(HERE / ".pkgs" / "ZipIt"),
                        help="clone of gstoica27/ZipIt")  # fmt: skip
    parser.add_argument("--samples", type=int, default=5000, help="train images to merge on")
    parser.add_argument("--batch-size", type=int, default=500, help="batch size of that data")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the sample draw")
    parser.add_argument("--configs", default="0.3:0.125,0.5:1.0",
                        help="alpha:beta pairs; 0.3:0.125 = the peer's match_tensors_zipit "
                             "defaults, 0.5:1.0 = symmerge's (the paper's)")  # fmt: skip
    parser.add_argument("--sources", default="reset,raw",
                        help="source states: 'reset' (BN reset first, the peer's protocol), "
                             "'raw' (as loaded)")  # fmt: skip
    parser.add_argument(
        "--no-diagnostic",
        dest="diagnostic",
        action="store_false",
        help="skip the symmerge run with statistics at the peer's sites",
    )
    parser.add_argument("--tag", default="", help="suffix of the results file names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.autocast.*")
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    os.environ.setdefault("TQDM_DISABLE", "1")

    # import everything symmerge needs now, while the recorded source state holds
    import symmerge.merging
    import symmerge.methods.zipit
    import symmerge.renorm
    import symmerge.stats  # noqa: F401
    from symmerge.data import get_dataset
    from symmerge.evaluate import task_accuracy
    from symmerge.io import load_checkpoint

    tree = symmerge_tree()

    peer_dir = Path(args.peer_dir)
    peer, stubs = import_peer(peer_dir)
    commit = peer_commit(peer_dir)
    configs = [tuple(float(v) for v in c.split(":")) for c in args.configs.split(",")]
    states = args.sources.split(",")
    meta = provenance({"data": args.data_seed, "torch_manual_seed": 0,
                       "models": "checkpoints (seeds 0 and 1)"})  # fmt: skip
    print(f"peer ZipIt commit {commit}; stubs {stubs}", flush=True)

    # data: the merge subset (both implementations) and the test set
    x, y = get_dataset("cifar10", "train", root=args.data_root).tensors
    xs, ys = subset(x, y, args.samples, args.data_seed)
    data = [(xs[i : i + args.batch_size], ys[i : i + args.batch_size])
            for i in range(0, len(xs), args.batch_size)]  # fmt: skip
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys),
                                         batch_size=args.batch_size, shuffle=False)  # fmt: skip
    x_test, y_test = get_dataset("cifar10", "test", root=args.data_root).tensors
    index: dict[bytes, list[int]] = {}
    for i in range(len(x_test)):
        index.setdefault(_key(x_test[i]), []).append(i)
    test = {
        "x": x_test, "index": index,
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test),
                                              batch_size=500, shuffle=False),
    }  # fmt: skip

    # sources, their conversion check, and their BN-reset versions (the peer's reset_bn_stats)
    paths = [Path(p) for p in args.checkpoints.split(",")]
    raw = [load_checkpoint(p)[0].eval() for p in paths]
    reset = [peer["utils"].reset_bn_stats(copy.deepcopy(m), loader).eval() for m in raw]
    batch = x_test[:500]
    sources_info = []
    for k, (p, m, r) in enumerate(zip(paths, raw, reset, strict=True)):
        own = [{"classes": TASKS[k], "logits": [0, 10]}]
        sources_info.append({
            "path": display_path(p), "sha256": sha256(p), "classes": TASKS[k],
            "own_task_accuracy": task_accuracy(m, "cifar10", own, data_root=args.data_root)
            ["tasks"][0]["accuracy"],
            "own_task_accuracy_bn_reset": task_accuracy(r, "cifar10", own,
                                                        data_root=args.data_root)
            ["tasks"][0]["accuracy"],
            "conversion_max_abs_logit_diff": max_logit_diff(m, convert(m, peer["resnets"]),
                                                            batch),
            "conversion_max_abs_logit_diff_bn_reset": max_logit_diff(
                r, convert(r, peer["resnets"]), batch),
        })  # fmt: skip
        print("source", sources_info[-1], flush=True)
    source_sets = {"raw": raw, "reset": reset}

    rows: list[dict[str, Any]] = []
    direct_check: dict[str, Any] = {}
    for state in states:
        srcs = source_sets[state]
        for alpha, beta in configs:
            common = {"sources": state, "alpha": alpha, "beta": beta}
            p = run_peer(srcs, loader, alpha, beta, peer, x_test)
            for layout, key in (("shared", "shared_logits"), ("per-task", "per_task_logits")):
                rows.append({
                    "impl": "ZipIt! official", "heads": layout, **common,
                    "merge_s": p["merge_s"], "transform_s": p["transform_s"],
                    "params": p["params"], "merge_points": p["merge_points"],
                    "shared_vs_mean_of_heads_max_abs": p["shared_vs_mean_of_heads_max_abs"],
                    "shortcut_off_centre_max_abs": p["shortcut_off_centre_max_abs"],
                    "solver_agreement": p["solver_agreement"],
                    **evaluate_logits(p[key], layout, test, peer, args.data_root),
                })  # fmt: skip
                print(rows[-1], flush=True)
            runs = [("symmerge", "shared", "default"), ("symmerge", "per-task", "default")]
            if args.diagnostic:
                runs.append(("symmerge, peer's sites", "per-task", "peer"))
            for impl, layout, sites in runs:
                s = run_symmerge(srcs, data, layout, alpha, beta, x_test, sites)
                same = p["per_task_logits"] if layout == "per-task" else p["shared_logits"]
                gap = float((s["logits"] - same).abs().max())
                rows.append({
                    "impl": impl, "heads": layout, **common, "merge_s": s["merge_s"],
                    "max_abs_logit_diff_to_peer": gap,
                    "params": s["params"],
                    **evaluate_logits(s["logits"], layout, test, peer, args.data_root),
                })  # fmt: skip
                print({k: v for k, v in rows[-1].items()}, flush=True)
                if (impl, layout, state, alpha, beta) == ("symmerge", "per-task", "raw", 0.5,
                                                          1.0):  # fmt: skip
                    # the brief's call, evaluated on the model itself (not through Replay)
                    res = task_accuracy(s["model"], "cifar10", OWN_TASKS,
                                        data_root=args.data_root)  # fmt: skip
                    direct_check = {
                        "joint": res["joint"]["accuracy"],
                        "per_task": [t["accuracy"] for t in res["tasks"]],
                        "equal_to_replay": res["joint"]["accuracy"]
                        == rows[-1]["symmerge_eval"]["joint"]
                        and [t["accuracy"] for t in res["tasks"]]
                        == rows[-1]["symmerge_eval"]["per_task"],
                    }  # fmt: skip
                    print("direct task_accuracy check", direct_check, flush=True)

    meta.update({
        "peer": {"repository": PEER_URL, "commit": commit, "path": display_path(peer_dir),
                 "import_stubs": stubs},
        "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "SYMMERGE_DATA")
                        if os.environ.get(k)},
        "symmerge_tree": tree, "sources": sources_info, "samples": args.samples,
        "batch_size": args.batch_size,
        "configs": configs, "source_states": states, "direct_task_accuracy_check": direct_check,
    })  # fmt: skip
    name = f"zipit_peer{args.tag}"
    out = Path(args.out)
    write_json(out / f"{name}.json", {"meta": meta, "rows": rows})
    write_md(out / f"{name}.md", meta, rows, args)
    print(f"wrote {out / name}.json and .md")


def write_md(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], args: Any) -> None:
    peer, tree = meta["peer"], meta["symmerge_tree"]
    lines = ["# Peer run: official ZipIt! code vs symmerge `zip`, CIFAR-10 ResNet-20x1, "
             "classes 0-4 + 5-9", ""]  # fmt: skip
    lines += provenance_md(meta)
    env = meta.get("environment", {})
    lines += [f"- Environment: {', '.join(f'{k}={v}' for k, v in env.items())}"] if env else []
    lines += [
        f"- Peer: {peer['repository']} at commit `{peer['commit']}` (clone in "
        f"`{peer['path']}`, git-ignored); import stubs used: "
        f"{', '.join(f'`{s}`' for s in peer['import_stubs']) or 'none'}",
        f"- symmerge: commit `{tree['commit'][:12]}` plus uncommitted changes in "
        f"{', '.join(f'`{c}`' for c in tree['src_changes']) or 'none'} (sha256 of "
        f"`git diff HEAD -- src`: {(tree['src_diff_sha256'] or '-')[:16]}), as imported at start",
        f"- Merge data: {meta['samples']} CIFAR-10 training images drawn with seed "
        f"{meta['seeds']['data']} (`_common.subset`), unaugmented, batches of "
        f"{meta['batch_size']}, the same batches for both implementations (statistics and "
        "BatchNorm reset); evaluation: the full CIFAR-10 test set (10,000 images)",
        "",
        "Sources (own task: its 5 classes, argmax over them); conversion check = max |logit "
        "difference| between our model and its conversion into the peer's ResNet-20 on 500 "
        "test images:",
        "",
    ]
    for s in meta["sources"]:
        lines.append(
            f"- `{s['path']}` (sha256 {s['sha256'][:12]}), classes {s['classes']}: "
            f"{pct(s['own_task_accuracy'])}%, after BN reset "
            f"{pct(s['own_task_accuracy_bn_reset'])}%; conversion max diff "
            f"{s['conversion_max_abs_logit_diff']:.2e} (BN-reset: "
            f"{s['conversion_max_abs_logit_diff_bn_reset']:.2e})"
        )
    head_row = next((r for r in rows if r["impl"] == "ZipIt! official" and r["heads"] == "shared"
                     and r["sources"] == "reset" and (r["alpha"], r["beta"]) == (0.3, 0.125)),
                    None)  # fmt: skip
    ours_row = next((r for r in rows if r["impl"] == "symmerge" and r["heads"] == "per-task"
                     and r["sources"] == "raw" and (r["alpha"], r["beta"]) == (0.5, 1.0)),
                    None)  # fmt: skip
    lines += ["", "## Headline", ""]
    if head_row and ours_row:
        hdr = ["run", "joint (symmerge eval)", "joint (ZipIt eval)", "task A", "task B",
               "mean", "merge s"]  # fmt: skip
        tab = []
        for label, r in (
            ("ZipIt! official: its defaults (a=0.3, b=0.125), full zip, sources BN-reset, "
             "native shared head", head_row),
            ('symmerge `merge([a, b], "zip", renorm="reset-bn", heads="per-task")` '
             "(alpha=0.5, beta=1), sources as loaded", ours_row),
        ):  # fmt: skip
            tab.append([label, pct(r["symmerge_eval"]["joint"]), pct(r["zipit_eval"]["joint"]),
                        *(pct(v) for v in r["symmerge_eval"]["per_task"]),
                        pct(r["symmerge_eval"]["mean_task"]), f"{r['merge_s']:.1f}"])  # fmt: skip
        lines += md_table(hdr, tab)
        lines += ["", "These two rows differ in heads, (alpha, beta) and source BN state; the "
                  "matched comparisons are in the full table.", ""]  # fmt: skip
    dc = meta.get("direct_task_accuracy_check") or {}
    if dc:
        lines += [f"symmerge's per-task row (raw sources, alpha 0.5, beta 1) evaluated directly "
                  f"with `task_accuracy` on the merged model: joint {pct(dc['joint'])}%, tasks "
                  f"{', '.join(pct(v) for v in dc['per_task'])}% (identical to the replayed "
                  f"logits: {dc['equal_to_replay']}).", ""]  # fmt: skip
    lines += [
        "## All runs",
        "",
        "Accuracy (%) on the CIFAR-10 test set. *joint S* = symmerge's `task_accuracy` joint "
        "(argmax over both tasks' own-class logits, raw logits); *joint Z* = the peer's "
        "`evaluate_logits_alltasks` joint (softmax within each task's classes, then argmax over "
        "all ten; for per-task heads each head's own classes). Per-task accuracy (A = classes "
        "0-4, B = 5-9; argmax over the task's own classes in its own head) is the same in both "
        "evaluators (both columns are given: S / Z). *heads*: `shared` = one 10-way head (the "
        "peer's native full-zip output: its two transformed heads averaged; symmerge "
        '`heads="shared"`), `per-task` = each model\'s head reading the zipped features '
        "(20 logits). *sources*: `reset` = BatchNorm statistics of both sources first reset on "
        "the merge data with the peer's `reset_bn_stats` (its protocol), `raw` = as loaded. "
        "Merge seconds: end to end (graph/trace, statistics, matching, weights, BN reset of the "
        "merged model; not the source reset), one run each on a shared 2-core CPU, one torch "
        "thread; *match s* = the peer's own `compute_transform_time` (matching only). "
        "*symmerge, peer's sites* (diagnostic): symmerge's zip with each group's statistics "
        "taken only where the peer's graph observes it (a residual stream at its last "
        "post-activation: the input of the next stage or of the pool), instead of symmerge's "
        "default (every post-activation site of the stream, stem and each block, concatenated). "
        "The peer's parameter count includes its 3x3 shortcut kernels (20,480 more weights than "
        "our 1x1 shortcuts; the off-centre taps stay zero through the zip). *max |Δlogit| vs "
        "peer*: largest difference over the test set between a symmerge model's logits and the "
        "peer's (same configuration, same heads).",
        "",
    ]
    hdr = ["impl", "heads", "sources", "alpha", "beta", "joint S", "joint Z", "A (S/Z)",
           "B (S/Z)", "mean", "params", "merge s", "match s",
           "max |Δlogit| vs peer"]  # fmt: skip
    tab = []
    for r in rows:
        s, z = r["symmerge_eval"], r["zipit_eval"]
        tab.append([
            r["impl"], r["heads"], r["sources"], r["alpha"], r["beta"], pct(s["joint"]),
            pct(z["joint"]),
            *(f"{pct(a)} / {pct(b)}" for a, b in zip(s["per_task"], z["per_task"], strict=True)),
            pct(s["mean_task"]), f"{r['params']:,}", f"{r['merge_s']:.1f}",
            f"{r['transform_s']:.1f}" if "transform_s" in r else "—",
            f"{r['max_abs_logit_diff_to_peer']:.1e}" if "max_abs_logit_diff_to_peer" in r
            else "—",
        ])  # fmt: skip
    lines += md_table(hdr, tab)
    gaps = [r["shared_vs_mean_of_heads_max_abs"] for r in rows if "shared_vs_mean_of_heads_max_abs"
            in r]  # fmt: skip
    offc = [r["shortcut_off_centre_max_abs"] for r in rows if "shortcut_off_centre_max_abs" in r]
    agree = [r for r in rows if "solver_agreement" in r and r["heads"] == "shared"]
    if agree:
        lines += [
            "",
            "## Solver check",
            "",
            "At each of the peer's merge points, on the peer's own statistics of that run: does "
            "symmerge's greedy zip (`symmerge.solvers.zipit.greedy_zip`, on the peer's "
            "correlation) give the same clusters as the peer's `match_tensors_zipit`? *variant*: "
            "the same solver with one line changed, a merged cluster's similarity taken as "
            "`alpha * min` of its members' rows of the masked matrix (`s`) instead of the "
            "unmasked one (`raw`), which is what the peer does: once a model's within-model "
            "budget is spent, the peer's merged clusters inherit that model's masks (a cluster "
            "holding a unit of a spent model can no longer take another of its units), "
            "symmerge's only re-mask the pairs of the cluster's own model.",
            "",
        ]
        lines += md_table(
            ["sources", "alpha", "beta", "same clusters (symmerge solver)", "same (variant)"],
            [[r["sources"], r["alpha"], r["beta"],
              f"{r['solver_agreement']['same_clusters']} / {r['solver_agreement']['merge_points']}",
              "—" if r["solver_agreement"]["same_clusters_masked_min_variant"] is None
              else f"{r['solver_agreement']['same_clusters_masked_min_variant']} / "
                   f"{r['solver_agreement']['merge_points']}"]
             for r in agree],
        )  # fmt: skip
    lines += [
        "",
        "## How the peer was run",
        "",
        "- Model: its `models/resnets.py` `resnet20(w=1, num_classes=10)`. Conversion: "
        "`normN`->`bnN`, `fc`->`linear`; our 1x1 stride-2 projection shortcut becomes its 3x3 "
        "stride-2 padding-1 shortcut conv with the 1x1 kernel at the centre tap (same function).",
        "- Merge: `graphs.resnet_graph.resnet20(model).graphify()` for each source, "
        "`ModelMerge(*graphs, device='cpu').transform(new_model, loader, "
        "transform_fn=match_tensors_zipit, metric_classes={covariance, mean}, stop_at=None, "
        "a=alpha, b=beta)` (full zip; `new_model` a fresh `resnet20`, as `utils.prepare_resnets` "
        "makes it), then `utils.reset_bn_stats(merge, loader)`, as "
        "`evaluation_scripts/zipit_concept_merging.py` does; the loader is a `DataLoader` over "
        "the merge subset (batch size as above, no shuffle).",
        "- Per-task heads of the peer: `merge.graphs[i].model.linear` (each source head after "
        "its unmerge) applied to the merged model's pooled features; max |native head - mean "
        f"of the two| over the test set: {max(gaps):.2e}; max |off-centre tap| of its "
        f"merged shortcut kernels: {max(offc):.1e}."
        if gaps
        else "",
        "- Evaluation: `utils.evaluate_logits_alltasks` (list output for per-task heads, "
        "tensor for the shared head) and symmerge's `task_accuracy`, both reading one forward "
        "pass of each merged model over the test set (a replay module checks that every batch "
        "it is given equals the test images the logits were computed on).",
        "- Run-time shims, nothing in the peer's files edited: import stubs for modules its zip "
        "never calls (listed above: `clip` = CLIP text heads, `fvcore` = FLOP counting, "
        "`sklearn` = k-means matching and held-out splits, `einops` = `vector_gather`), only "
        "when not installed; `device='cpu'` for `ModelMerge` (its default is CUDA device 0); "
        "its `torch.cuda.amp.autocast()` contexts are disabled by torch without CUDA "
        "(float32), and their warnings are silenced.",
        "- Differences from the peer's own CIFAR protocol: its scripts compute statistics and "
        "reset BatchNorm on the full augmented (random crop + flip), shuffled training loader "
        "(all classes) and use CLIP-text heads (`eval_type='clip'`) for cifar5; here both "
        "implementations use the same unaugmented seeded subset and our 10-way logit heads "
        "(the peer's `eval_type='logits'` path).",
        "",
    ]
    path.write_text("\n".join(line for line in lines) + "\n")


if __name__ == "__main__":
    main()
