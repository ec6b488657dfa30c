"""Peer run: the official PLeaS code (SewoongLab/PLeaS-Merging) vs symmerge's ``pleas`` on the
same checkpoints, merge data and evaluation.

The two CIFAR-10 ResNet-20x1 reference checkpoints trained on classes 0-4 and 5-9
(``$SYMMERGE_CHECKPOINTS``, or ``--checkpoints A,B``) are merged at compute budgets 1.0x and
1.5x (``--budgets``) by

* symmerge: ``merge([a, b], "pleas", data=batches, budget=B, ls="closed" | "adam",
  renorm="reset-bn")`` (activation matching, score allocator, its defaults otherwise);
* the peer, run on *our module itself* (its fx compiler traces symmerge's ResNet-20 as it is:
  no conversion): ``get_permutation_spec`` -> ``activation_matching`` (cdist costs, SciPy LSA)
  -> ``partial_merge`` (fixed ratios, see below) -> ``pleas_merging.train`` (Adam least squares
  with gradient masks, ``merging='perm_gradmask'``, the shared 10-way head kept in the model:
  ``separate_classifier=False, num_classes=10``), then the BatchNorm reset symmerge uses.

Ratios. The peer chooses ratios with a Gurobi QP (``qp_ratios``; without Gurobi it silently
returns ``random.random()`` per group) whose objective weights come from ``.npy`` files on the
authors' cluster (ResNet-50 only). Neither is available, so the peer gets fixed ratios: all 0
at 1.0x, and at other budgets exactly the ratios symmerge's allocator chose for that budget
(mapped group by group: a peer group is keyed by the first tensor axis of its state, which is
one of our group's members). Both sides therefore merge at the same ratios, each with its own
matching.

Everything runs on the same seeded subset of CIFAR-10 training images (all classes, labels
unused, unaugmented) in the same batches: the peer's activation matching iterates them once,
both Adam runs cycle through them in the same order, and every merged model's BatchNorm
statistics are reset on them (``symmerge.renorm.reset_bn``). Evaluation: the CIFAR-10 test set,
the merged 10-way head (joint = argmax over all 10 logits; per task = argmax over its own 5
classes on its own images; ``symmerge.evaluate.task_accuracy``).

Compute. symmerge: its formula (``details["macs"]``) and ``count_compute`` on the block-sparse
export (``block_sparse`` with the supports of the merge); the peer: ``count_compute`` on its
dense model (what it computes) and its own formula (``partial_merge_flops`` on the terms of
``count_linear_flops``); the structural zero blocks of the peer's model are checked after its
Adam (how many entries are no longer zero).

Shims (nothing in the peer's files is edited): import stubs for ``gurobipy`` (``Model`` raises,
so ``qp_ratios`` would fall into its random branch; it is never called here),
``sklearn.model_selection`` and ``torchmetrics`` (imported at module level, used only by
functions this run does not call); ``Tensor.cuda`` / ``Module.cuda`` are identity functions
while peer code runs (its code calls ``.cuda()`` unconditionally; this machine has no GPU).
``wandb`` is never imported by the ``pleas`` package (only by its experiment scripts);
``train`` gets ``WANDB=False, wandb_run=None``.

The peer repository must be unpacked (git-ignored) into ``--peer-dir`` (default
``benchmarks/.pkgs/PLeaS-Merging``, with its commit hash in a file ``COMMIT`` there, or a git
checkout), e.g.
``git --git-dir=MIRROR archive HEAD | tar -x -C benchmarks/.pkgs/PLeaS-Merging``.

    OMP_NUM_THREADS=1 SYMMERGE_DATA=DATA SYMMERGE_CHECKPOINTS=CKPTS \\
        .venv/bin/python benchmarks/pleas_peer.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import importlib
import importlib.machinery
import importlib.util
import io
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _common import (
    HERE,
    add_common_args,
    batches,
    display_path,
    md_table,
    portable,
    provenance,
    provenance_md,
    subset,
    write_json,
)
from torch import nn

TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
CHECKPOINT_NAMES = ("resnet20-cifar10-c0-4-s0.safetensors", "resnet20-cifar10-c5-9-s1.safetensors")
PEER_URL = "https://github.com/SewoongLab/PLeaS-Merging"
PEER_DEFAULTS = {  # experiments/different_label_space/run_torchvision.py and pleas_merging.train
    "max_steps": 400, "lr": 5e-4, "batch_size": 32, "matching_batches": 100,
    "merging": "perm_gradmask", "ratios": "Gurobi QP (qp_ratios) or --use_zip_ratios",
    "bn_reset": "model3.train(); 102 forward batches of the train loader, momentum 0.1, "
                "statistics not reset first",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the peer code: import shims
# ---------------------------------------------------------------------------------------------


def _unavailable(name: str) -> Any:
    def fn(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{name} is an import stub of pleas_peer.py")

    return fn


def _stub(module: str, attrs: dict[str, Any]) -> bool:
    """Register an import stub for ``module`` (and its parents) when it is not installed."""
    top = module.split(".")[0]
    ours = getattr(sys.modules.get(top), "_pleas_peer_stub", False)
    if not ours and importlib.util.find_spec(top) is not None:
        return False
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = []  # a package, so submodules import
            mod._pleas_peer_stub = True  # type: ignore[attr-defined]
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            sys.modules[name] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
    for a, v in attrs.items():
        setattr(sys.modules[module], a, v)
    return True


def import_peer(peer_dir: Path) -> tuple[dict[str, Any], list[str]]:
    grb = types.SimpleNamespace(CONTINUOUS="C", MAXIMIZE=-1)
    stubs = {
        # partial_matching.py: the budget QP (qp_ratios); Model() raising sends qp_ratios to
        # its except branch (random ratios), which this run never calls
        "gurobipy": {"Model": _unavailable("gurobipy.Model"), "GRB": grb},
        "sklearn.model_selection": {"train_test_split": _unavailable("train_test_split")},
        "torchmetrics": {"Accuracy": _unavailable("torchmetrics.Accuracy")},  # eval helpers only
    }
    used = [m for m, attrs in stubs.items() if _stub(m, attrs)]
    if not (peer_dir / "pleas" / "methods" / "pleas_merging.py").exists():
        raise FileNotFoundError(f"no PLeaS-Merging tree at {peer_dir} (unpack {PEER_URL} there)")
    sys.path.insert(0, str(peer_dir))
    names = {"compiler": "pleas.core.compiler", "utils": "pleas.core.utils",
             "am": "pleas.methods.activation_matching", "pm": "pleas.methods.partial_matching",
             "pleas": "pleas.methods.pleas_merging"}  # fmt: skip
    # modules, not the same-named functions that pleas/methods/__init__.py re-exports
    mods = {k: importlib.import_module(v) for k, v in names.items()}
    import tqdm.auto as tqdm_auto  # its progress bars, off (tqdm reads TQDM_DISABLE at import)

    quiet = types.SimpleNamespace(
        tqdm=functools.partial(tqdm_auto.tqdm, disable=True),
        trange=functools.partial(tqdm_auto.trange, disable=True),
    )
    for k in ("am", "pleas"):
        mods[k].tqdm = quiet
    return mods, used


def peer_commit(peer_dir: Path) -> str:
    f = peer_dir / "COMMIT"
    if f.exists():
        return f.read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(peer_dir), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peer_tree_hash(peer_dir: Path) -> str:
    """sha256 over the peer's ``pleas/`` sources (path and content), to pin what ran."""
    h = hashlib.sha256()
    for p in sorted((peer_dir / "pleas").rglob("*.py")):
        h.update(str(p.relative_to(peer_dir)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def no_cuda() -> Iterator[None]:
    """``.cuda()`` as the identity while peer code runs (it calls it unconditionally)."""
    tensor_cuda, module_cuda = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = tensor_cuda, module_cuda  # type: ignore[method-assign]


class Tee(io.TextIOBase):
    """Collects what the peer prints (its loss log) and passes it on."""

    def __init__(self, out: Any) -> None:
        self.out, self.buf = out, io.StringIO()

    def write(self, s: str) -> int:
        self.buf.write(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


# ---------------------------------------------------------------------------------------------
# ratios: symmerge group -> the peer's group key
# ---------------------------------------------------------------------------------------------


def group_map(our_spec: Any, peer_spec: dict) -> dict[Any, str]:
    """The symmerge group of every peer group: the one holding its tensor axes (checked: the
    axes of each peer group belong to exactly one symmerge group)."""
    owner = {(m.tensor, m.axis): g for g, grp in our_spec.groups.items() for m in grp.members}
    out = {}
    for key, pg in peer_spec.items():
        ours = {owner.get((ax.key, ax.axis)) for ax in pg.state} - {None}
        if len(ours) != 1:
            raise RuntimeError(f"peer group {key} spans symmerge groups {ours}")
        out[key] = ours.pop()
    return out


def peer_ratios(our_spec: Any, peer_spec: dict, ratios: dict[str, float]) -> dict[Any, float]:
    """The peer's ratio of every group: the ratio of the symmerge coordinate of its group."""
    from symmerge.solvers.coordinate import coordinates

    coord_of = {g: c[0] for c in coordinates(our_spec) for g in c}
    groups = group_map(our_spec, peer_spec)
    return {k: float(ratios.get(coord_of[g], 0.0)) for k, g in groups.items()}


# ---------------------------------------------------------------------------------------------
# compute
# ---------------------------------------------------------------------------------------------


def fix_attributes(model: nn.Module) -> nn.Module:
    """The peer's merged model is model A with its tensors swapped for wider ones; its modules'
    size attributes (which ``count_compute`` reads) still say A's. Set them from the weights."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.BatchNorm2d) and mod.weight is not None:
            mod.num_features = mod.weight.shape[0]
    return model


def peer_zero_blocks(pm: Any, spec: dict, blocks: dict, model: nn.Module) -> dict[str, Any]:
    """Structural zero blocks of the peer's partial merge (``W[A-private out, B-private in]``
    and ``W[B-private out, A-private in]``, which ``build_partial_merge_model`` leaves at 0),
    the entries of them that are non-zero after its Adam, and whether its gradient masks
    (``get_gradient_mask``) cover exactly those blocks."""
    per_tensor = dict(blocks)
    for axis, pg in spec.items():
        for ax in pg.state:
            per_tensor[ax] = blocks[axis]
    sd = model.state_dict()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    peer_masks = pm_masks(pm, per_tensor, layers)
    total = nonzero = 0
    mismatched = []
    Axis = pm["utils"].Axis
    for name, pmask in zip(layers, peer_masks, strict=True):
        w = sd[f"{name}.weight"]
        zero = torch.zeros(w.shape[:2], dtype=torch.bool)
        bi = per_tensor.get(Axis(f"{name}.weight", 1))
        bo = per_tensor.get(Axis(f"{name}.weight", 0))
        if bi is not None and bo is not None:
            ni, mi, no, mo = len(bi[0]), len(bi[2]), len(bo[0]), len(bo[2])
            zero[no : no + mo, ni + mi : ni + 2 * mi] = True  # A-private out <- B-private in
            zero[no + mo : no + 2 * mo, ni : ni + mi] = True  # B-private out <- A-private in
        total += int(zero.sum()) * (w[0, 0].numel())
        nonzero += int((w.reshape(*w.shape[:2], -1).abs().amax(-1) > 0)[zero].sum())
        masked = pmask.reshape(*pmask.shape[:2], -1)[..., 0] == 0
        if not torch.equal(masked, zero):
            mismatched.append(name)
    return {"zero_block_entries": total, "zero_block_kernels_nonzero_after_adam": nonzero,
            "layers_where_gradient_mask_differs_from_zero_blocks": mismatched}  # fmt: skip


def pm_masks(pm: Any, per_tensor: dict, layers: dict[str, nn.Module]) -> list[torch.Tensor]:
    """The peer's own gradient masks of the weights (its ``get_gradient_mask``)."""
    masks = pm["pleas"].get_gradient_mask(per_tensor, layers)
    out, k = [], 0
    for mod in layers.values():
        params = list(mod.parameters())
        out.append(masks[k])  # weight first
        k += len(params)
    return out


def gradient_mask_check(pm: dict[str, Any], sources: list[nn.Module], data: list[Any],
                        x1: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """The peer's gradient masks vs its structural zero blocks at ratios where a layer's input
    and output splits differ (0.5 and 0.25 alternating over its groups; partial merge only, no
    training): the run's own ratios have no zero blocks, so this is where the masks matter."""
    a, b = (copy.deepcopy(s).eval() for s in sources)
    with no_cuda(), contextlib.redirect_stdout(io.StringIO()):
        spec = pm["compiler"].get_permutation_spec(a, ((2, *x1.shape[1:]),), verbose=False)
        perm, costs = pm["am"].activation_matching(spec, a, b, data[:1], 1, output_costs=True)
        ratios = {k: 0.5 if i % 2 == 0 else 0.25 for i, k in enumerate(spec)}
        model3, blocks = pm["pm"].partial_merge(spec, a, b, perm, costs, ratios,
                                                return_blocks=True)  # fmt: skip
        layers = [n for n, m in model3.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        return {"ratios": "0.5 / 0.25 alternating over the peer's groups", "layers": len(layers),
                **peer_zero_blocks(pm, spec, blocks, model3)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the two implementations
# ---------------------------------------------------------------------------------------------


def cycled(data: list[Any], n: int) -> list[Any]:
    return [data[i % len(data)] for i in range(n)]


def run_ours(sources: list[nn.Module], data: list[Any], budget: float, ls: str, steps: int,
             lr: float, spec: Any, x1: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    from symmerge.blocksparse import block_sparse
    from symmerge.flops import count_compute
    from symmerge.groupmap import merged_support as support
    from symmerge.merging import merge

    torch.manual_seed(0)
    extra = {"steps": steps, "lr": lr} if ls == "adam" else {}
    t0 = time.perf_counter()
    merged, res = merge(sources, "pleas", data=data, budget=budget, ls=ls, renorm="reset-bn",
                        **extra)  # fmt: skip
    seconds = time.perf_counter() - t0
    merged.eval()
    layers = [n for n, m in merged.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    keys = [f"{n}.weight" for n in layers]
    sds = [s.state_dict() for s in sources]
    masks = support(spec, sds, res.maps, keys)
    by_layer = {k[: -len(".weight")]: v for k, v in masks.items()}
    sparse = block_sparse(copy.deepcopy(merged), by_layer)
    with torch.no_grad():
        gap = float((sparse(x1) - merged(x1)).abs().max())
    d = res.details
    widths = {g: gm.n_out for g, gm in res.maps.items()}
    pairs = {}
    for g, gm in res.maps.items():  # merged pairs (A unit, B unit), for the agreement check
        sel = [getattr(m, "index", None) for m in gm.merges]  # index maps (_Select)
        if len(sel) == 2 and all(i is not None for i in sel):
            ia, ib = sel
            both = (ia >= 0) & (ib >= 0)
            pairs[g] = set(zip(ia[both].tolist(), ib[both].tolist(), strict=True))
    return {
        "model": merged, "merge_s": seconds, "timings": dict(res.timings),
        "ratios": dict(d["ratios"]), "budget_reached": d["budget"],
        "macs_formula": d["macs"], "macs_one_model": d["macs_one_model"],
        "macs_measured_block_sparse": count_compute(sparse, (x1,)).macs,
        "macs_measured_dense": count_compute(merged, (x1,)).macs,
        "block_sparse_vs_dense_max_abs": gap,
        "params": sum(p.numel() for p in merged.parameters()),
        "widths": widths, "pairs": pairs,
        "ls_loss_sum_last": sum(d["ls_loss"].values()) if d.get("ls_loss") else None,
    }  # fmt: skip


def run_peer(pm: dict[str, Any], sources: list[nn.Module], data: list[Any],
             ratios_ours: dict[str, float], our_spec: Any, steps: int, lr: float,
             x1: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    from symmerge.flops import count_compute
    from symmerge.renorm import reset_bn

    a, b = (copy.deepcopy(s).eval() for s in sources)
    torch.manual_seed(0)
    tee = Tee(sys.stdout)
    timings = {}
    with no_cuda(), contextlib.redirect_stdout(tee):
        t0 = time.perf_counter()
        spec = pm["compiler"].get_permutation_spec(a, ((2, *x1.shape[1:]),), verbose=False)
        timings["spec"] = time.perf_counter() - t0
        t = time.perf_counter()
        perm, costs = pm["am"].activation_matching(spec, a, b, data, len(data),
                                                   output_costs=True)  # fmt: skip
        timings["matching"] = time.perf_counter() - t
        ratios = peer_ratios(our_spec, spec, ratios_ours)
        t = time.perf_counter()
        model3, blocks = pm["pm"].partial_merge(spec, a, b, perm, costs, ratios,
                                                return_blocks=True)  # fmt: skip
        timings["partial_merge"] = time.perf_counter() - t
        t = time.perf_counter()
        # its loop runs batches idx 0..MAX_STEPS (MAX_STEPS + 1 steps; the last at lr 0)
        model3 = pm["pleas"].train(cycled(data, steps + 1), a, b, model3, spec, perm, costs,
                                   ratios, False, steps, None, separate_classifier=False,
                                   merging="perm_gradmask", num_classes=10, lr=lr)  # fmt: skip
        timings["adam"] = time.perf_counter() - t
        t = time.perf_counter()
        reset_bn(model3, data)
        timings["bn_reset"] = time.perf_counter() - t
        seconds = time.perf_counter() - t0
    model3.eval()
    losses = [float(v) for v in re.findall(r"Loss: ([0-9.eE+-]+)", tee.buf.getvalue())]
    _, terms = pm["utils"].count_linear_flops(spec, a, ((1, *x1.shape[1:]),))
    formula = float(pm["pm"].partial_merge_flops(spec, terms, ratios))
    base = float(pm["pm"].partial_merge_flops(spec, terms, 0.0))
    counted = fix_attributes(copy.deepcopy(model3))
    zb = peer_zero_blocks(pm, spec, blocks, model3)
    ours_of = group_map(our_spec, spec)  # keyed by the symmerge group from here on
    widths = {ours_of[k]: len(v[0]) + 2 * len(v[2]) for k, v in blocks.items()}
    kept = {ours_of[k]: len(v[2]) for k, v in blocks.items()}
    pairs = {
        ours_of[k]: set(zip(v[0].tolist(), v[1].tolist(), strict=True)) for k, v in blocks.items()
    }  # merged (A unit, B unit) pairs
    return {
        "model": model3, "merge_s": seconds, "timings": timings,
        "ratios": {ours_of[k]: v for k, v in ratios.items()}, "kept": kept, "widths": widths,
        "macs_formula": formula, "macs_one_model_formula": base,
        "macs_measured_dense": count_compute(counted, (x1,)).macs,
        "params": sum(p.numel() for n, p in model3.named_parameters()
                      if "running_" not in n),  # its BN statistics became Parameters
        "zero_blocks": zb, "loss_log_every_20": losses, "pairs": pairs,
        "group_keys": {ours_of[k]: str(k) for k in spec},
    }  # fmt: skip


def agreement(ours: dict[str, set], peer: dict[str, set]) -> dict[str, float]:
    """Per group, the merged (A unit, B unit) pairs both implementations share, over the larger
    of the two sets (at 1.0x every unit is merged: how often both matchings pick the same B
    unit for an A unit)."""
    return {g: len(ours[g] & pp) / max(len(ours[g]), len(pp), 1)
            for g, pp in peer.items() if g in ours}  # fmt: skip


# ---------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def mmacs(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e6:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    folder = os.environ.get("SYMMERGE_CHECKPOINTS")
    parser.add_argument("--checkpoints", required=folder is None and "--render" not in sys.argv,
                        default=None if folder is None else ",".join(
                            str(Path(folder) / n) for n in CHECKPOINT_NAMES),
                        help="A,B: the source checkpoints (classes 0-4, classes 5-9); default: "
                        "the reference ones in $SYMMERGE_CHECKPOINTS")  # fmt: skip
    parser.add_argument("--peer-dir", default=str(HERE / ".pkgs" / "PLeaS-Merging"),
                        help="unpacked SewoongLab/PLeaS-Merging tree")  # fmt: skip
    parser.add_argument("--samples", type=int, default=2000, help="train images to merge on")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of that data")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the sample draw")
    parser.add_argument("--budgets", default="1.0,1.5", help="compute budgets")
    parser.add_argument("--steps", type=int, default=200,
                        help="Adam steps, both sides (defaults of both: 400; 200 x 64 images = "
                             "the peer's 400 x 32)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam peak lr, both sides")
    parser.add_argument("--limit-test", type=int, default=None, help="test images per task")
    parser.add_argument("--tag", default="", help="suffix of the results file names")
    parser.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="only rewrite the .md beside JSON from its contents (no run)",
    )
    args = parser.parse_args()
    if args.render:
        import json

        saved = json.loads(Path(args.render).read_text())
        write_md(Path(args.render).with_suffix(".md"), saved["meta"], saved["rows"])
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    # import everything symmerge needs now, while the recorded source state holds
    import symmerge
    import symmerge.blocksparse
    import symmerge.flops
    import symmerge.merging
    import symmerge.methods.pleas
    import symmerge.refine.lstsq
    import symmerge.renorm  # noqa: F401
    from symmerge.data import get_dataset
    from symmerge.evaluate import task_accuracy, tasks_from_classes
    from symmerge.io import load_checkpoint

    meta = provenance({"data": args.data_seed, "torch_manual_seed": 0,
                       "models": "checkpoints (seeds 0 and 1)"})  # fmt: skip
    peer_dir = Path(args.peer_dir)
    pm, stubs = import_peer(peer_dir)
    commit = peer_commit(peer_dir)
    print(f"peer PLeaS-Merging commit {commit}; stubs {stubs}", flush=True)

    x, y = get_dataset("cifar10", "train", root=args.data_root).tensors
    data = batches(*subset(x, y, args.samples, args.data_seed), args.batch_size)
    x1 = data[0][0][:1]
    shared = tasks_from_classes(TASKS, 10)

    def evaluate(model: nn.Module) -> dict[str, Any]:
        res = task_accuracy(model, "cifar10", shared, data_root=args.data_root,
                            limit=args.limit_test)  # fmt: skip
        return {"joint": res["joint"]["accuracy"],
                "per_task": [t["accuracy"] for t in res["tasks"]],
                "mean_task": res["mean_task_accuracy"]}  # fmt: skip

    paths = [Path(p) for p in args.checkpoints.split(",")]
    sources = [load_checkpoint(p)[0].eval() for p in paths]
    spec = symmerge.trace(sources[0], (data[0][0][:2],))
    sources_info = []
    for k, (p, m) in enumerate(zip(paths, sources, strict=True)):
        ev = evaluate(m)  # its own task: argmax over its 5 classes on their images
        both = {f"shared_eval_{k2}": v for k2, v in ev.items()}
        sources_info.append({"path": display_path(p), "sha256": sha256(p), "classes": TASKS[k],
                             "own_task_accuracy": ev["per_task"][k], **both})  # fmt: skip
        print("source", sources_info[-1], flush=True)

    mask_check = gradient_mask_check(pm, sources, data, x1)
    print("gradient mask check", mask_check, flush=True)
    rows: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    for budget in [float(b) for b in args.budgets.split(",")]:
        runs: dict[str, dict[str, Any]] = {}
        for ls in ("closed", "adam"):
            r = run_ours(sources, data, budget, ls, args.steps, args.lr, spec, x1)
            r.update(evaluate(r["model"]))
            runs[ls] = r
            print(f"ours {ls} {budget}x: joint {pct(r['joint'])}, tasks "
                  f"{[pct(v) for v in r['per_task']]}, {r['merge_s']:.1f}s, budget "
                  f"{r['budget_reached']:.4f}, ratios {r['ratios']}", flush=True)  # fmt: skip
        same_ratios = runs["closed"]["ratios"] == runs["adam"]["ratios"]
        p = run_peer(pm, sources, data, runs["closed"]["ratios"], spec, args.steps, args.lr, x1)
        p.update(evaluate(p["model"]))
        print(f"peer adam {budget}x: joint {pct(p['joint'])}, tasks "
              f"{[pct(v) for v in p['per_task']]}, {p['merge_s']:.1f}s", flush=True)  # fmt: skip
        checks[str(budget)] = {
            "ours_closed_and_adam_same_ratios": same_ratios,
            "matching_agreement_per_group": agreement(runs["closed"]["pairs"], p["pairs"]),
            "peer_zero_blocks": p["zero_blocks"],
            "ours_block_sparse_vs_dense_max_abs": {
                ls: runs[ls]["block_sparse_vs_dense_max_abs"] for ls in runs},
            "widths_ours": runs["closed"]["widths"], "widths_peer": p["widths"],
            "peer_kept_apart_units": p["kept"],
        }  # fmt: skip
        for ls, r in runs.items():
            rows.append({
                "impl": "symmerge", "ls": ls, "budget": budget,
                "budget_reached_formula": r["budget_reached"],
                "joint": r["joint"], "per_task": r["per_task"], "mean_task": r["mean_task"],
                "macs_measured": r["macs_measured_block_sparse"],
                "macs_measured_dense": r["macs_measured_dense"],
                "macs_formula": r["macs_formula"], "macs_one_model": r["macs_one_model"],
                "params": r["params"], "merge_s": r["merge_s"], "timings": r["timings"],
                "ratios": r["ratios"], "ls_loss_sum_last_step": r["ls_loss_sum_last"],
            })  # fmt: skip
        rows.append({
            "impl": "PLeaS official", "ls": "adam", "budget": budget,
            "budget_reached_formula": p["macs_formula"] / p["macs_one_model_formula"],
            "joint": p["joint"], "per_task": p["per_task"], "mean_task": p["mean_task"],
            "macs_measured": p["macs_measured_dense"],
            "macs_measured_dense": p["macs_measured_dense"],
            "macs_formula": p["macs_formula"], "macs_one_model": p["macs_one_model_formula"],
            "params": p["params"], "merge_s": p["merge_s"], "timings": p["timings"],
            "ratios": p["ratios"], "loss_log_every_20": p["loss_log_every_20"],
        })  # fmt: skip
        for r in list(runs.values()) + [p]:
            r.pop("model", None)

    meta.update({
        "peer": {"repository": PEER_URL, "commit": commit, "path": display_path(peer_dir),
                 "pleas_sources_sha256": peer_tree_hash(peer_dir), "import_stubs": stubs,
                 "defaults": PEER_DEFAULTS},
        "environment": {k: portable(os.environ[k]) for k in ("OMP_NUM_THREADS", "SYMMERGE_DATA",
                                                       "SYMMERGE_CHECKPOINTS")
                        if os.environ.get(k)},
        "sources": sources_info, "samples": args.samples, "batch_size": args.batch_size,
        "steps": args.steps, "lr": args.lr, "limit_test": args.limit_test,
        "checks": checks, "gradient_mask_check": mask_check,
        "total_s": time.perf_counter() - t_start,
    })  # fmt: skip
    name = f"pleas_peer{args.tag}"
    out = Path(args.out)
    write_json(out / f"{name}.json", {"meta": meta, "rows": rows})
    write_md(out / f"{name}.md", meta, rows)
    print(f"wrote {out / name}.json and .md ({meta['total_s']:.0f} s)")


def write_md(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    peer = meta["peer"]
    lim = meta["limit_test"]
    test = "the full CIFAR-10 test set (10,000 images)" if lim is None else \
        f"the first {lim} CIFAR-10 test images of each task"  # fmt: skip
    lines = ["# Peer run: official PLeaS code vs symmerge `pleas`, CIFAR-10 ResNet-20x1, "
             "classes 0-4 + 5-9", ""]  # fmt: skip
    lines += provenance_md(meta)
    env = meta.get("environment", {})
    lines += [f"- Environment: {', '.join(f'{k}={v}' for k, v in env.items())}"] if env else []
    lines += [
        f"- Peer: {peer['repository']} at commit `{peer['commit']}` (unpacked in "
        f"`{peer['path']}`, git-ignored; sha256 of its `pleas/*.py`: "
        f"{peer['pleas_sources_sha256'][:16]}); import stubs: "
        f"{', '.join(f'`{s}`' for s in peer['import_stubs']) or 'none'}",
        f"- Merge data: {meta['samples']} CIFAR-10 training images (all classes, labels unused, "
        f"unaugmented) drawn with seed {meta['seeds']['data']} (`_common.subset`), batches of "
        f"{meta['batch_size']}; the same batches for both implementations (matching statistics, "
        f"least squares, BatchNorm reset). Adam: {meta['steps']} steps, peak lr {meta['lr']}, "
        "cosine to 0, both sides. Evaluation: " + test + ", the merged 10-way head.",
        f"- Whole run: {meta['total_s']:.0f} s",
        "",
        "Sources (as loaded; own task = argmax over its 5 classes on its images; joint = the "
        "source's 10-way head on all test images):",
        "",
    ]
    for s in meta["sources"]:
        lines.append(f"- `{s['path']}` (sha256 {s['sha256'][:12]}), classes {s['classes']}: own "
                     f"task {pct(s['own_task_accuracy'])}%, joint "
                     f"{pct(s['shared_eval_joint'])}%")  # fmt: skip
    lines += [
        "",
        "## Results",
        "",
        "Accuracy (%) of the merged model's 10-way head: *joint* = argmax over all 10 logits "
        "on all test images; *A*, *B* = argmax over the task's own 5 classes on its own images. "
        "*MACs*: multiply-adds per image (millions) of the Linear/Conv layers, "
        "`symmerge.flops.count_compute`: symmerge's on the block-sparse export "
        "(`block_sparse` with the masks of `merged_support`), the peer's on its dense model "
        "(what it "
        "computes); *formula*: symmerge's `details['macs']` / the peer's `partial_merge_flops`. "
        "*budget* = formula / one model's. *merge s*: wall clock of the whole merge including "
        "the BatchNorm reset (symmerge: `merge(...)`; peer: its spec, matching, partial merge, "
        "Adam, then the same `reset_bn`), one torch thread on a shared 2-core CPU, one run "
        "each.",
        "",
    ]
    hdr = ["impl", "least squares", "budget asked", "budget (formula)", "joint", "A", "B",
           "MACs measured (M)", "MACs formula (M)", "params", "merge s"]  # fmt: skip
    tab = []
    for r in rows:
        tab.append([r["impl"], r["ls"], f"{r['budget']:.1f}x",
                    f"{r['budget_reached_formula']:.4f}x", pct(r["joint"]),
                    *(pct(v) for v in r["per_task"]), mmacs(r["macs_measured"]),
                    mmacs(r["macs_formula"]), f"{r['params']:,}",
                    f"{r['merge_s']:.1f}"])  # fmt: skip
    lines += md_table(hdr, tab)
    lines += ["", "Time split (s):", ""]
    for r in rows:
        t = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
        lines.append(f"- {r['impl']} {r['ls']} {r['budget']:.1f}x: {t}")
    lines += ["", "## Checks", ""]
    for b, c in meta["checks"].items():
        zb = c["peer_zero_blocks"]
        gaps = c["ours_block_sparse_vs_dense_max_abs"]
        ratios = next(r["ratios"] for r in rows if r["impl"] == "symmerge"
                      and r["ls"] == "closed" and r["budget"] == float(b))  # fmt: skip
        # groups kept wholly apart have no matched pair on symmerge's side (one identity
        # pair on the peer's, see below): left out of the mean
        ag = {g: v for g, v in c["matching_agreement_per_group"].items() if ratios.get(g, 0) < 1}
        mean_ag = sum(ag.values()) / len(ag) if ag else float("nan")
        lines += [
            f"- {b}x: symmerge closed and adam chose the same ratios: "
            f"{c['ours_closed_and_adam_same_ratios']}; symmerge block-sparse export vs dense "
            f"max |Δ|: {', '.join(f'{k} {v:.1e}' for k, v in gaps.items())}; "
            f"peer structural zero-block entries {zb['zero_block_entries']:,}, kernels non-zero "
            f"after its Adam {zb['zero_block_kernels_nonzero_after_adam']}, layers whose peer "
            f"gradient mask differs from the zero blocks: "
            f"{zb['layers_where_gradient_mask_differs_from_zero_blocks'] or 'none'}; "
            f"merged (A, B) pairs shared by both matchings, mean over the {len(ag)} groups not "
            f"kept wholly apart: {100 * mean_ag:.1f}% (per group: "
            f"{', '.join(f'{g} {100 * v:.0f}%' for g, v in ag.items())})",
        ]  # fmt: skip
        diff = {g: (c["widths_ours"].get(g), w) for g, w in c["widths_peer"].items()
                if c["widths_ours"].get(g) != w}  # fmt: skip
        if diff:
            lines.append(f"  - widths that differ (symmerge, peer): {diff}")
    lines += ["", "Ratios (fraction of each group kept apart; the peer got symmerge's):", ""]
    for r in rows:
        if r["impl"] == "symmerge" and r["ls"] == "closed":
            nz = {g: v for g, v in r["ratios"].items() if v}
            lines.append(f"- {r['budget']:.1f}x: {nz or 'all 0'}")
    lines += [
        "",
        "## How the peer was run, and every deviation from its defaults",
        "",
        "- Model: symmerge's own ResNet-20 module (no conversion): the peer's "
        "`get_permutation_spec` (torch.fx) traces it as it is and finds the same 12 groups as "
        "symmerge (each peer group's key axis is a member of one symmerge group; the run "
        "checks this).",
        "- Calls: `get_permutation_spec(a, ((2, 3, 32, 32),))`; `activation_matching(spec, a, "
        "b, batches, len(batches), output_costs=True)` (its defaults: `cross_features_cdist`, "
        "`scipy_solve_lsa`); `partial_merge(spec, a, b, perm, costs, ratios)`; "
        "`pleas_merging.train(batches, a, b, model3, spec, perm, costs, ratios, WANDB=False, "
        "MAX_STEPS=steps, wandb_run=None, separate_classifier=False, merging='perm_gradmask', "
        "num_classes=10, lr=lr)`; then `symmerge.renorm.reset_bn(model3, batches)`.",
        "- Ratios: the peer's experiments get them from a Gurobi QP (`qp_ratios`, whose "
        "objective weights are ResNet-50 `.npy` files on the authors' cluster) or from "
        "`--use_zip_ratios` (whole torchvision `layerN` stages). Neither applies here, and "
        "without Gurobi `qp_ratios` silently returns `random.random()` per group; so the peer "
        "gets symmerge's ratios for the same budget (all 0 at 1.0x).",
        f"- Steps / batch / lr: {meta['steps']} Adam steps of {meta['batch_size']} images "
        f"(peer default {PEER_DEFAULTS['max_steps']} steps of {PEER_DEFAULTS['batch_size']}"
        + (
            ": the same number of images"
            if meta["steps"] * meta["batch_size"]
            == PEER_DEFAULTS["max_steps"] * PEER_DEFAULTS["batch_size"]
            else ""
        )
        + "), lr "
        f"{meta['lr']} (its default). Its loop runs batches `idx = 0 .. MAX_STEPS` "
        "(MAX_STEPS + 1 steps, the last at lr 0 after the cosine schedule), so it is given "
        "MAX_STEPS + 1 batches of the cycled merge data, the first MAX_STEPS being the ones "
        "symmerge's Adam sees. Its loader in the paper's scripts is a shuffled loader over the "
        "full training sets; here the merge subset cycles in order.",
        f"- Matching data: the {meta['samples']} merge images in "
        f"{meta['samples'] // meta['batch_size'] + (meta['samples'] % meta['batch_size'] > 0)} "
        f"batches (its scripts: {PEER_DEFAULTS['matching_batches']} batches of "
        f"{PEER_DEFAULTS['batch_size']} from the shuffled training loader).",
        "- Head: the peer's different-label-space scripts drop the classifier "
        "(`separate_classifier=True`) and evaluate by linear probes; here the shared 10-way "
        "head stays in the model and is fitted like every other layer (its "
        "`separate_classifier=False` path: targets = the two models' averaged logits, as "
        "symmerge's).",
        "- BatchNorm: its scripts run the merged model in train mode over 102 batches with "
        "momentum 0.1 without resetting the statistics first; here both sides use "
        "`symmerge.renorm.reset_bn` (statistics reset, cumulative average over the merge "
        "batches).",
        "- Run-time shims only: `.cuda()` is the identity on tensors and modules while peer "
        "code runs (no GPU; its code calls `.cuda()` unconditionally); import stubs as listed "
        "(`gurobipy`: only `qp_ratios`, not called; `sklearn.model_selection`, `torchmetrics`: "
        "imported at module level, used only by helpers not called); its `tqdm` progress bars "
        "disabled. `wandb` is never imported by the `pleas` package.",
        "- Compute counting of the peer's model: its `build_partial_merge_model` swaps wider "
        "tensors into a copy of model A without updating the modules' size attributes "
        "(`in_channels`, ...), which `count_compute` reads, so they are set from the weights "
        "on a copy before counting. Its BatchNorm running statistics become `nn.Parameter`s "
        "(`set_attr` with a Parameter); its parameter count above leaves them out.",
        "",
        "## Peer behaviours found while reading and running it",
        "",
        "- `get_blocks` at ratio 1.0 (a group kept wholly apart) replaces the permutation by "
        "the identity and keeps `c >= quantile(c, 1.0)` merged, i.e. one pair (A unit i with "
        "B unit i, not a matched pair) stays merged: widths `2n - 1`, not `2n`. Its "
        "`partial_merge_flops` formula still counts `2n`, so its measured compute is a little "
        "under its formula at budgets that keep whole groups apart.",
        "- `get_gradient_mask` indexes the weight as `mask[in_slice, out_slice]` on "
        "`(out, in, ...)` weights (`mask[si1, so2] = 0; mask[si2, so1] = 0`): it masks the "
        "structural zero blocks only where a layer's input and output splits coincide. When "
        "both sides of a layer are partly kept apart with different splits, Adam updates "
        "entries of the zero blocks (the partial merge is then no longer block-sparse) and "
        "leaves others frozen. At the ratios used here (every residual-stream group merged "
        "fully), no layer has zero blocks, so this does not affect these numbers; the check "
        "above says so per budget." + _mask_sentence(meta.get("gradient_mask_check")),
        "- `build_partial_merge_model` for a tensor with only its input axis permuted (the "
        "head) copies the private columns of both models unhalved, and the head's bias is "
        "model A's (it is not in any group): only Adam's starting point.",
        "- `qp_ratios` without Gurobi prints 'Gurobi not available' and returns random ratios; "
        "its scripts read objective weights from absolute cluster paths.",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")


def _mask_sentence(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    bad = c["layers_where_gradient_mask_differs_from_zero_blocks"]
    return (f" Checked on its partial merge of these models at ratios {c['ratios']} (no "
            f"training): its masks differ from the zero blocks in {len(bad)} of {c['layers']} "
            f"layers ({', '.join(f'`{n}`' for n in bad) or 'none'}).")  # fmt: skip


if __name__ == "__main__":
    main()
