"""Speed of the alignment pipeline (issue 5, item 9), in four parts:

(a) weight matching of two random-init ResNet-20xK (default K=16): total time split into LAP
    solves and the rest (goal: rest < half of LAP), plus where the rest goes (cProfile);
(b) activation statistics (``collect_statistics`` on N=2 models) vs plain forward passes of
    the same two models on the same batches (goal: >= 70% of the forward throughput);
(c) two zoo MNIST MLPs (seeds 0 and 1) merged by our weight matching and by the
    PyPI package ``rebasin`` (installed only for this benchmark:
    ``.venv/bin/pip install --no-deps --target benchmarks/.rebasin-pkgs rebasin torchview
    graphviz``): time and midpoint test accuracy;
(d) scipy's ``linear_sum_assignment`` vs ``lapx`` (``.venv/bin/pip install --no-deps --target
    benchmarks/.pkgs lapx``) on random and on real similarity matrices of size 512-2048.

Writes ``<out>/speed.{json,md}``. Times are wall-clock seconds with one torch thread on a
shared machine: compare ratios, not absolute numbers.

    .venv/bin/python benchmarks/speed.py [--parts a,b,c,d] [--wm-width 16]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    HERE,
    add_common_args,
    batches,
    fmt,
    load_or_train,
    md_table,
    provenance,
    provenance_md,
    subset,
    write_json,
)

NAME = "speed"


def _pair(arch: str, seeds: tuple[int, int] = (0, 1)) -> list[torch.nn.Module]:
    from symmerge.models import create_model

    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(create_model(arch)[0].eval())
    return out


def _top(prof: cProfile.Profile, k: int | None) -> list[dict[str, Any]]:
    """The functions with the most self time in a profile."""
    rows = []
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    for (file, line, fn), (_cc, nc, tt, ct, _) in stats.items():
        rows.append(
            {"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "self_s": tt, "cum_s": ct}
        )
    rows.sort(key=lambda r: -r["self_s"])
    return rows if k is None else rows[:k]


# --------------------------------------------------------------------------------------- (a)


def part_a(args: argparse.Namespace, shared: dict[str, Any]) -> dict[str, Any]:
    import symmerge
    from symmerge.solvers.coordinate import weight_matching

    arch = f"resnet20x{args.wm_width}"
    t0 = time.perf_counter()
    a, b = _pair(arch)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = symmerge.trace(a, (torch.randn(2, *a.input_shape),))
    t_trace = time.perf_counter() - t0
    sa, sb = a.state_dict(), b.state_dict()
    shared["wm"] = (arch, spec, sa, sb)
    runs = []
    for _ in range(args.wm_repeats):
        t0 = time.perf_counter()
        res = weight_matching(spec, sa, sb, seed=args.seed)
        total = time.perf_counter() - t0
        runs.append(
            {
                "total": total,
                "lap": res.lap_seconds,
                "other": res.other_seconds,
                "sweeps": res.iterations,
                "converged": res.converged,
            }
        )
        print("(a)", runs[-1], flush=True)
    # where "other" goes: one more run under cProfile (self time of the hot functions), and
    # one under torch's FLOP counter (the similarity matmuls are the only large torch ops)
    from torch.utils.flop_counter import FlopCounterMode

    prof = cProfile.Profile()
    prof.enable()
    weight_matching(spec, sa, sb, seed=args.seed)
    prof.disable()
    with FlopCounterMode(display=False) as fc:  # a separate run: the counter costs time
        weight_matching(spec, sa, sb, seed=args.seed)
    flops = fc.get_total_flops()
    # this machine's fp32 matmul speed on the largest similarity shape (n x 9n @ 9n x n)
    n = max(grp.size for grp in spec.groups.values())
    x, y = torch.randn(n, 9 * n), torch.randn(9 * n, n)
    mm = []
    for _ in range(3):
        t0 = time.perf_counter()
        x @ y
        mm.append(time.perf_counter() - t0)
    matmul_gflops = 2 * n * 9 * n * n / min(mm) / 1e9
    rows = _top(prof, None)
    profiled_total = sum(r["self_s"] for r in rows)
    best = min(runs, key=lambda r: r["total"])
    return {
        "torch_flops_per_matching": flops,
        "matmul_gflops_per_s": matmul_gflops,
        "rest_lower_bound_s": flops / (matmul_gflops * 1e9),
        "model": arch,
        "groups": {g: grp.size for g, grp in spec.groups.items()},
        "parameters_per_model": sum(t.numel() for t in sa.values() if t.is_floating_point()),
        "build_seconds": t_build,
        "trace_seconds": t_trace,
        "runs": runs,
        "best": best,
        "rest_over_lap": best["other"] / best["lap"] if best["lap"] else None,
        "goal_met": best["other"] < 0.5 * best["lap"],
        "profile_top": rows[:10],
        "profile_total_self_s": profiled_total,
    }


# --------------------------------------------------------------------------------------- (b)


def part_b(args: argparse.Namespace, shared: dict[str, Any]) -> list[dict[str, Any]]:
    import symmerge
    from symmerge.data import get_dataset
    from symmerge.stats import collect_statistics

    out = []
    for arch in args.stats_models.split(","):
        dataset = "mnist" if arch.startswith("mlp") else "cifar10"
        x, y = get_dataset(dataset, "train", root=args.data_root).tensors
        n, bs = (args.stats_images_mlp, 500) if dataset == "mnist" else (args.stats_images, 128)
        data = batches(*subset(x, y, n, args.seed), bs)
        models = _pair(arch)
        spec = symmerge.trace(models[0], (torch.randn(2, *models[0].input_shape),))

        def forward(models: list[torch.nn.Module] = models, data: list = data) -> None:
            with torch.no_grad():
                for xb, _ in data:
                    for m in models:
                        m(xb)

        def stats(
            models: list[torch.nn.Module] = models, data: list = data, spec: Any = spec
        ) -> None:
            collect_statistics(spec, models, data)

        from torch.utils.flop_counter import FlopCounterMode

        counts = []
        for fn in (forward, stats):  # also the warm-up (allocator, first-call costs)
            with FlopCounterMode(display=False) as fc:
                fn()
            counts.append(fc.get_total_flops())
        t_fwd, t_st = [], []
        for _ in range(args.stats_repeats):  # interleaved, so load changes hit both
            t0 = time.perf_counter()
            forward()
            t_fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stats()
            t_st.append(time.perf_counter() - t0)
        f, s = min(t_fwd), min(t_st)
        prof = cProfile.Profile()  # where the statistics' extra time goes
        prof.enable()
        stats()
        prof.disable()
        row = {
            "profile_top": _top(prof, 8),
            "model": arch,
            "dataset": dataset,
            "images": n,
            "batch_size": bs,
            "groups_observed": len(spec.groups),
            "forward_s": t_fwd,
            "stats_s": t_st,
            "best_forward_s": f,
            "best_stats_s": s,
            "forward_images_per_s": 2 * n / f,
            "stats_images_per_s": 2 * n / s,
            "throughput_ratio": f / s,
            "goal_met": f / s >= 0.7,
            "forward_flops": counts[0],
            "stats_flops": counts[1],
            "forward_over_stats_flops": counts[0] / counts[1] if counts[1] else None,
        }
        out.append(row)
        print("(b)", arch, f"ratio {f / s:.3f}", flush=True)
    return out


# --------------------------------------------------------------------------------------- (c)


def _version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "unknown"


def _inner(sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor]) -> float:
    return float(sum((sa[k].double() * sb[k].double()).sum() for k in sa))


def part_c(args: argparse.Namespace, shared: dict[str, Any]) -> dict[str, Any]:
    import symmerge
    from symmerge.data import get_dataset
    from symmerge.evaluate import evaluate, interpolate_state_dicts
    from symmerge.merging import merge

    models = [
        load_or_train("mlp", "mnist", s, args.mlp_epochs, args.cache, args.data_root)[0]
        for s in (0, 1)
    ]
    a, b = (m.eval() for m in models)
    test = get_dataset("mnist", "test", root=args.data_root).tensors
    sa, sb = a.state_dict(), b.state_dict()
    out: dict[str, Any] = {
        "models": f"mlp (784-512-512-512-10), MNIST, seeds 0/1, {args.mlp_epochs} epochs",
        "endpoint_test_accuracy": [evaluate(m, test)["accuracy"] for m in (a, b)],
        "inner_product_unaligned": _inner(sa, sb),
    }

    # ours: the public API; the trace is timed apart (the first torch.export of a process
    # also pays one-off warm-up costs, reported separately)
    t0 = time.perf_counter()
    symmerge.trace(a, (torch.randn(2, *a.input_shape),))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = symmerge.trace(a, (torch.randn(2, *a.input_shape),))
    t_trace = time.perf_counter() - t0
    ours = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        merged, res = merge([a, b], "weight", seed=args.seed, spec=spec)
        ours.append(
            {
                "merge": time.perf_counter() - t0,
                "lap": res.lap_seconds,
                "other": res.other_seconds,
                "sweeps": res.iterations,
            }
        )
    aligned_ours = spec.permute_state_dict(sb, res.perms(1))
    med = statistics.median(r["merge"] for r in ours)
    out["symmerge"] = {
        "runs": ours,
        "first_trace_s": t_first,
        "trace_s": t_trace,
        "median_merge_s": med,
        "median_total_s": med + t_trace,
        "midpoint_test_accuracy": evaluate(merged, test)["accuracy"],
        "midpoint_test_loss": evaluate(merged, test)["loss"],
        "inner_product_aligned": _inner(sa, aligned_ours),
        "call": "spec = symmerge.trace(a, x); merge([a, b], 'weight', seed=0, spec=spec)",
    }

    # rebasin (PyPI), from a git-ignored folder, never a dependency
    sys.path.insert(0, str(Path(args.rebasin_path).resolve()))
    try:
        from rebasin import PermutationCoordinateDescent
    except ImportError as e:
        out["rebasin"] = {
            "status": f"not run: cannot import rebasin ({e}); install it with "
            "pip install --no-deps --target benchmarks/.rebasin-pkgs rebasin "
            "torchview graphviz"
        }
        return out
    theirs = []
    for rep in range(args.repeats):
        b2 = copy.deepcopy(b)
        torch.manual_seed(args.seed + rep)  # rebasin draws its visiting order from torch's RNG
        t0 = time.perf_counter()
        pcd = PermutationCoordinateDescent(a, b2, test[0][:8])
        t1 = time.perf_counter()
        pcd.rebasin()
        t2 = time.perf_counter()
        theirs.append({"total": t2 - t0, "graph_init": t1 - t0, "coordinate_descent": t2 - t1})
        if rep == 0:  # the result evaluated: torch seed = --seed
            b_rebasin, n_perms = b2, len(pcd.pinit.model_graph.permutation_to_info)
    b2 = b_rebasin
    aligned_theirs = {k: v.detach() for k, v in b2.state_dict().items()}
    mid = copy.deepcopy(a)
    mid.load_state_dict(interpolate_state_dicts(sa, aligned_theirs, 0.5))
    ev = evaluate(mid, test)
    same = {k: bool(torch.equal(aligned_theirs[k], aligned_ours[k])) for k in sa}
    out["rebasin"] = {
        "version": _version("rebasin"),
        "runs": theirs,
        "median_total_s": statistics.median(r["total"] for r in theirs),
        "midpoint_test_accuracy": ev["accuracy"],
        "midpoint_test_loss": ev["loss"],
        "inner_product_aligned": _inner(sa, aligned_theirs),
        "same_aligned_weights_as_symmerge": same,
        "call": "PermutationCoordinateDescent(a, b_copy, x[:8]).rebasin(); "
        "midpoint = average of the state dicts",
        "permutations_found": n_perms,
    }
    out["speedup_symmerge_vs_rebasin"] = (
        out["rebasin"]["median_total_s"] / out["symmerge"]["median_total_s"]
    )
    print("(c)", out["symmerge"]["median_total_s"], out["rebasin"]["median_total_s"], flush=True)
    shared["mlp"] = (a, b, spec)
    return out


# --------------------------------------------------------------------------------------- (d)


def _matrices(args: argparse.Namespace, shared: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    import symmerge
    from symmerge.data import get_dataset
    from symmerge.similarity import WeightSimilarity, activation_similarity
    from symmerge.stats import collect_statistics

    mats: list[tuple[str, np.ndarray]] = []
    rng = np.random.default_rng(args.seed)
    for n in args.lap_sizes:
        mats.append((f"random uniform [0,1) {n}x{n}", rng.random((n, n))))
    for n in args.lap_sizes:
        mats.append(
            (
                f"random Gaussian Gram A·Bᵀ (k=4n) {n}x{n}",
                rng.standard_normal((n, 4 * n)) @ rng.standard_normal((4 * n, n)),
            )
        )
    # trained MNIST MLPs: weight similarity at the start of matching and activation correlation
    if "mlp" in shared:
        a, b, spec = shared["mlp"]
    else:
        a, b = (
            load_or_train("mlp", "mnist", s, args.mlp_epochs, args.cache, args.data_root)[0]
            for s in (0, 1)
        )
        spec = symmerge.trace(a, (torch.randn(2, *a.input_shape),))
    ws = WeightSimilarity(spec, a.state_dict(), b.state_dict())
    x, y = get_dataset("mnist", "train", root=args.data_root).tensors
    st = collect_statistics(spec, [a, b], batches(*subset(x, y, 2000, args.seed), 500))
    for g in spec.groups:
        mats.append((f"trained MLP, weight sim. {g} (512)", ws(g).double().numpy()))
        mats.append(
            (
                f"trained MLP, activation corr. {g} (512)",
                activation_similarity(st, g, 0, 1, num_models=2).double().numpy(),
            )
        )
    # random-init networks: what weight matching sees on its first sweep
    if "wm" in shared:
        arch, spec16, sa, sb = shared["wm"]
    else:
        arch = f"resnet20x{args.wm_width}"
        m16 = _pair(arch)
        spec16 = symmerge.trace(m16[0], (torch.randn(2, *m16[0].input_shape),))
        sa, sb = m16[0].state_dict(), m16[1].state_dict()
    sizes = {}
    for g, grp in spec16.groups.items():
        sizes.setdefault(grp.size, g)  # first group of each size
    ws16 = WeightSimilarity(spec16, sa, sb, groups=[g for s, g in sizes.items() if s >= 512])
    for s, g in sizes.items():
        if s >= 512:
            mats.append((f"random-init {arch}, weight sim. {g} ({s})", ws16(g).double().numpy()))
    if max(args.lap_sizes) >= 2048:
        from symmerge.models import create_model

        pair = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            pair.append(create_model("mlp", width=2048)[0])
        spec_w = symmerge.trace(pair[0], (torch.randn(2, 1, 28, 28),))
        g = next(iter(spec_w.groups))
        w = WeightSimilarity(spec_w, pair[0].state_dict(), pair[1].state_dict(), groups=[g])
        mats.append((f"random-init MLP-2048, weight sim. {g} (2048)", w(g).double().numpy()))
    return mats


def part_d(args: argparse.Namespace, shared: dict[str, Any]) -> dict[str, Any]:
    from scipy.optimize import linear_sum_assignment

    sys.path.insert(0, str(Path(args.lapx_path).resolve()))
    try:
        import lap
    except ImportError as e:
        return {
            "status": f"not run: cannot import lapx ({e}); pip install --no-deps --target "
            "benchmarks/.pkgs lapx"
        }
    rows = []
    for name, C in _matrices(args, shared):
        C = np.ascontiguousarray(C, dtype=np.float64)
        n = C.shape[0]
        ts, tl = [], []
        for _ in range(args.lap_repeats):
            t0 = time.perf_counter()
            r, c = linear_sum_assignment(C, maximize=True)
            ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, x, _ = lap.lapjv(-C)
            tl.append(time.perf_counter() - t0)
        p_s = np.empty(n, dtype=np.int64)
        p_s[r] = c
        p_l = np.asarray(x, dtype=np.int64)
        obj_s, obj_l = C[np.arange(n), p_s].sum(), C[np.arange(n), p_l].sum()
        rows.append(
            {
                "matrix": name,
                "n": n,
                "scipy_s": min(ts),
                "lapx_s": min(tl),
                "lapx_speedup": min(ts) / min(tl),
                "same_assignment": bool(np.array_equal(p_s, p_l)),
                "objective_scipy": float(obj_s),
                "objective_lapx": float(obj_l),
                "objective_rel_diff": float(abs(obj_s - obj_l) / max(1e-300, abs(obj_s))),
                "lapx_is_permutation": bool(np.array_equal(np.sort(p_l), np.arange(n))),
                "zero_rows": int((np.abs(C).max(1) == 0).sum()),
                "zero_cols": int((np.abs(C).max(0) == 0).sum()),
            }
        )
        print(
            "(d)",
            {k: rows[-1][k] for k in ("matrix", "scipy_s", "lapx_s", "same_assignment")},
            flush=True,
        )
    import scipy

    return {"lapx_version": _version("lapx"), "scipy_version": scipy.__version__, "rows": rows}


# --------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--parts", default="a,b,c,d")
    parser.add_argument("--seed", type=int, default=0, help="matching/visiting-order seed")
    parser.add_argument("--wm-repeats", type=int, default=2, help="repeats of (a)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of (c)")
    parser.add_argument("--wm-width", type=int, default=16, help="K of resnet20xK in (a)")
    parser.add_argument("--stats-models", default="mlp,resnet20x1,resnet20x4")
    parser.add_argument("--stats-images", type=int, default=256, help="CIFAR images in (b)")
    parser.add_argument("--stats-images-mlp", type=int, default=5000, help="MNIST images (b)")
    parser.add_argument("--stats-repeats", type=int, default=3)
    parser.add_argument("--mlp-epochs", type=int, default=10, help="MLP checkpoints, (c)/(d)")
    parser.add_argument("--rebasin-path", default=str(HERE / ".rebasin-pkgs"))
    parser.add_argument("--lapx-path", default=str(HERE / ".pkgs"))
    parser.add_argument("--lap-sizes", default="512,1024,2048")
    parser.add_argument("--lap-repeats", type=int, default=3)
    args = parser.parse_args()
    args.lap_sizes = [int(s) for s in args.lap_sizes.split(",")]
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))

    shared: dict[str, Any] = {}
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "c" in parts:  # first: (d) reuses its models
        result["c_rebasin"] = part_c(args, shared)
    if "a" in parts:
        result["a_weight_matching"] = part_a(args, shared)
    if "b" in parts:
        result["b_statistics"] = part_b(args, shared)
    if "d" in parts:
        result["d_lap"] = part_d(args, shared)
    meta = provenance(
        {
            "random_init_models": [0, 1],
            "training": [0, 1],
            "matching": args.seed,
            "data_subsets": args.seed,
            "random_matrices": args.seed,
        },
        {"total_seconds": round(time.perf_counter() - t0, 1)},
    )
    out = Path(args.out)
    write_json(out / f"{NAME}.json", {"meta": meta, **result})
    write_md(out / f"{NAME}.md", meta, result)


def write_md(path: Path, meta: dict, r: dict) -> None:
    lines = [
        "# Speed of the alignment pipeline",
        "",
        *provenance_md(meta),
        "- One torch thread, 2 shared cores: absolute times are noisy (other jobs ran "
        "concurrently); the ratios are the point.",
        "",
    ]
    if "a_weight_matching" in r:
        a = r["a_weight_matching"]
        b = a["best"]
        lines += [
            f"## (a) Weight matching, two random-init {a['model']}",
            "",
            f"{a['parameters_per_model'] / 1e6:.1f} M parameters per model; groups "
            f"{sorted(set(a['groups'].values()))} units; trace {a['trace_seconds']:.1f} s "
            "(not in the totals below).",
            "",
        ]
        lines += md_table(
            ["run", "total s", "LAP s", "rest s", "rest / LAP", "sweeps"],
            [
                [
                    i + 1,
                    fmt(x["total"], 2),
                    fmt(x["lap"], 2),
                    fmt(x["other"], 2),
                    fmt(x["other"] / x["lap"], 1),
                    x["sweeps"],
                ]
                for i, x in enumerate(a["runs"])
            ],
        )
        lines += [
            "",
            f"Torch counted {a['torch_flops_per_matching'] / 1e9:.0f} GFLOP per matching (the "
            "a·P(b)ᵀ similarity products); at this machine's measured fp32 matmul speed "
            f"({a['matmul_gflops_per_s']:.1f} GFLOP/s on one {max(a['groups'].values())}×"
            f"{9 * max(a['groups'].values())} @ {9 * max(a['groups'].values())}×"
            f"{max(a['groups'].values())} product, 1 thread) they alone need "
            f"≥ {a['rest_lower_bound_s']:.2f} s, i.e. "
            f"{a['rest_lower_bound_s'] / b['lap']:.1f}× the LAP time.",
            "",
            f"Goal rest < 0.5 × LAP: **{'met' if a['goal_met'] else 'NOT met'}** "
            f"(rest/LAP = {a['rest_over_lap']:.1f} in the fastest run, {fmt(b['total'], 2)} s).",
            "",
            "Where the time goes (one more run under cProfile, self time):",
            "",
        ]
        lines += md_table(
            ["function", "calls", "self s", "cumulative s"],
            [
                [p["function"], p["calls"], fmt(p["self_s"], 3), fmt(p["cum_s"], 3)]
                for p in a["profile_top"][:8]
            ],
        )
        lines.append("")
    if "b_statistics" in r:
        lines += [
            "## (b) Activation statistics vs plain forward passes (N = 2 models)",
            "",
            "`collect_statistics(spec, [a, b], batches)` vs running both models on the "
            "same batches under `no_grad`; best of the interleaved repeats.",
            "",
        ]
        lines += md_table(
            [
                "model",
                "images",
                "forward s",
                "statistics s",
                "forward img/s",
                "stats img/s",
                "stats / forward throughput",
                "goal ≥ 0.70",
                "counted GFLOP forward / stats",
                "FLOP ratio forward / stats",
            ],
            [
                [
                    x["model"],
                    x["images"],
                    fmt(x["best_forward_s"], 3),
                    fmt(x["best_stats_s"], 3),
                    fmt(x["forward_images_per_s"], 0),
                    fmt(x["stats_images_per_s"], 0),
                    fmt(x["throughput_ratio"], 3),
                    "met" if x["goal_met"] else "NOT met",
                    f"{x['forward_flops'] / 1e9:.1f} / {x['stats_flops'] / 1e9:.1f}",
                    fmt(x["forward_over_stats_flops"], 3),
                ]
                for x in r["b_statistics"]
            ],
        )
        lines += [
            "",
            "The FLOP ratio is the throughput ratio the statistics could reach if their extra "
            "work (the per-site Gram products of the 2n concatenated units) ran as fast as the "
            "forward pass's own matmuls/convolutions; where it is below 0.70 the goal cannot be "
            "met by this design on this machine, whatever the implementation overheads.",
        ]
        for x in r["b_statistics"]:
            lines += ["", f"`collect_statistics` on {x['model']} under cProfile (self time):", ""]
            lines += md_table(
                ["function", "calls", "self s"],
                [[p["function"], p["calls"], fmt(p["self_s"], 3)] for p in x["profile_top"][:6]],
            )
        lines.append("")
    if "c_rebasin" in r:
        c = r["c_rebasin"]
        lines += [
            "## (c) MNIST MLPs: symmerge weight matching vs PyPI `rebasin`",
            "",
            f"{c['models']}; endpoint test accuracy "
            f"{' / '.join(fmt(x) for x in c['endpoint_test_accuracy'])}.",
            "",
        ]
        if "status" in c.get("rebasin", {}):
            lines += [f"rebasin: {c['rebasin']['status']}", ""]
        else:
            s, t = c["symmerge"], c["rebasin"]
            same = t["same_aligned_weights_as_symmerge"]
            rs, rt = s["runs"], t["runs"]
            lines += md_table(
                [
                    "implementation",
                    "graph/trace s",
                    "matching + merge s",
                    "of which LAP s",
                    "sweeps",
                    "total s",
                    "midpoint test acc",
                    "midpoint test loss",
                    "Σ⟨W_A, P(W_B)⟩",
                ],
                [
                    [
                        "symmerge",
                        fmt(s["trace_s"], 3),
                        fmt(s["median_merge_s"], 3),
                        fmt(statistics.median(x["lap"] for x in rs), 3),
                        rs[0]["sweeps"],
                        fmt(s["median_total_s"], 3),
                        fmt(s["midpoint_test_accuracy"]),
                        fmt(s["midpoint_test_loss"]),
                        fmt(s["inner_product_aligned"], 2),
                    ],
                    [
                        f"rebasin {t['version']}",
                        fmt(statistics.median(x["graph_init"] for x in rt), 3),
                        fmt(statistics.median(x["coordinate_descent"] for x in rt), 3),
                        "—",
                        "—",
                        fmt(t["median_total_s"], 3),
                        fmt(t["midpoint_test_accuracy"]),
                        fmt(t["midpoint_test_loss"]),
                        fmt(t["inner_product_aligned"], 2),
                    ],
                ],
            )
            lines += [
                "",
                f"- symmerge: `{s['call']}`; rebasin: `{t['call']}`. Medians of "
                f"{len(rs)} run(s) each (rebasin's visiting order seeded with torch seeds "
                "0, 1, ...; accuracy and Σ from the seed-0 run); the rebasin merge itself "
                "(an average of two state dicts) is not timed.",
                f"- Total time ratio rebasin / symmerge = {c['speedup_symmerge_vs_rebasin']:.2f}"
                " (> 1: symmerge faster). symmerge's first torch.export in the process took "
                f"{s['first_trace_s']:.2f} s (one-off warm-up; not in the table).",
                f"- Unaligned Σ⟨W_A, W_B⟩ = {c['inner_product_unaligned']:.2f}; same aligned "
                f"weights as symmerge in {sum(same.values())} of {len(same)} tensors.",
                "",
            ]
    if "d_lap" in r:
        d = r["d_lap"]
        lines += ["## (d) scipy `linear_sum_assignment` vs `lapx` (`lap.lapjv`)", ""]
        if "status" in d:
            lines += [d["status"], ""]
        else:
            lines += [
                f"scipy {d['scipy_version']}, lapx {d['lapx_version']}; maximizing "
                "(lapx gets −C); best of the repeats.",
                "",
            ]
            lines += md_table(
                [
                    "matrix",
                    "n",
                    "scipy s",
                    "lapx s",
                    "lapx speed-up",
                    "same assignment",
                    "objective rel. diff",
                    "all-zero rows / cols",
                ],
                [
                    [
                        x["matrix"],
                        x["n"],
                        fmt(x["scipy_s"], 4),
                        fmt(x["lapx_s"], 4),
                        fmt(x["lapx_speedup"], 2),
                        "yes" if x["same_assignment"] else "no",
                        f"{x['objective_rel_diff']:.1e}",
                        f"{x['zero_rows']} / {x['zero_cols']}",
                    ]
                    for x in d["rows"]
                ],
            )
            lines += [
                "",
                "'same assignment: no' with a zero objective difference is a tie: both "
                "solvers found an optimal assignment, not the same one (units that are dead on "
                "the data have all-zero correlations: the all-zero rows / cols column).",
                "",
            ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
