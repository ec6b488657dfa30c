"""STE step time: the authors' per-step weight matching vs symmerge's matchers (issue 6).

Yamada et al.'s STE loop redoes a complete, warm-started Git Re-Basin weight matching at
every optimizer step. On two 784-512-512-512-10 MLPs (A trained on MNIST with seed 0, B on
Fashion-MNIST with seed 1, 10 epochs of symmerge's recipe, trained into
``benchmarks/.cache`` on first use) this script times STE steps, split into matching and
the rest (midpoint, forward, backward, optimizer), for

(a) ``authors``: a self-contained re-implementation of the authors' per-step loop, written
    here from the algorithm description (algorithms.md sections 0.3 and 1): every step runs
    weight matching from the previous permutation, every sweep recomputes every similarity
    and solves every group with scipy's LAP, until a sweep improves no group (or 100 sweeps);
(b) ``full``: ``ste_refine(matcher="full")``, symmerge's complete weight matching each step;
(c) ``warm``: ``ste_refine(matcher="warm")``, the matcher called "fast" before issue 6
    (similarities once per step, warm-started assignments, at most 3 sweeps);
(d) ``fast``: ``ste_refine(matcher="fast")``, the default since issue 6 (similarities kept
    across steps: bound certificates instead of products after a proxy step, low-rank
    updates after a neighbour's permutation moved); ``fast:K`` sets ``max_sweeps=K``
    (default 3; 100 runs every step to convergence, as the authors).

Every variant sees the same batches, the same initial permutations (weight matching of B to
A), the same optimizer (SGD, momentum 0.9, weight decay 1e-4) and seeds. Two data settings:
``full`` (batches of 500 from the union of the MNIST and Fashion-MNIST training sets, lr
0.05, the authors' full-data setting) and ``coreset`` (10 random images per class of each
training set, 200 images in one batch, lr 0.5, the authors' coreset setting). After the
steps, the midpoint ``(A + pi(B)) / 2`` is evaluated on both test sets (mean of the two
accuracies), with the permutations of the lowest-loss step (the authors' choice) and of
the last step.

The authors' loop runs interleaved with one symmerge variant (``--interleave``, default
``fast``): step k of the authors, then step k of symmerge, and so on, so the slow phases of a
shared machine hit both and their ratio is steady; the other variants run on their own.

Writes ``<out>/ste_speed.{json,md}``. Times are wall-clock seconds with ``--threads`` torch
threads (default 1) on a shared machine; compare ratios measured in one run.

    .venv/bin/python benchmarks/ste_speed.py [--steps full=100,coreset=200] [--time-steps 50]
"""

from __future__ import annotations

import argparse
import cProfile
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    add_common_args,
    display_path,
    fmt,
    load_or_train,
    md_table,
    provenance,
    provenance_md,
    write_json,
)
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call

NAME = "ste_speed"
VARIANTS = ("authors", "full", "warm", "fast", "fast:1", "fast:2", "fast:100")
SETTINGS = {  # data setting -> (learning rate, description)
    "full": (0.05, "batches of 500 from MNIST train + Fashion-MNIST train (120k images)"),
    "coreset": (0.5, "10 random images per class of each training set (200), one batch"),
}


# ---------------------------------------------------------------------------------------
# (a) the authors' loop, re-implemented from the algorithm description
# ---------------------------------------------------------------------------------------


class AuthorsSTE:
    """One STE step as the authors' code does it, with nothing cached between steps.

    The permutation spec is the authors' kind: for every tensor, the permutation group of
    each axis (or None), and for every group the (tensor, axis) pairs it acts on.
    """

    def __init__(
        self,
        spec: Any,
        model: nn.Module,
        state_b: Mapping[str, Tensor],
        init: Mapping[str, Tensor],
        lr: float,
        lam: float = 0.5,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> None:
        self.model, self.lam, self.seed = model, lam, seed
        self.state_a = {k: v.detach() for k, v in model.state_dict().items()}
        self.state_b = {k: v.detach() for k, v in state_b.items()}
        self.axes: dict[str, list[str | None]] = {
            k: [None] * v.dim() for k, v in self.state_a.items()
        }
        self.groups: dict[str, list[tuple[str, int]]] = {g: [] for g in spec.groups}
        for m in spec.members():
            if not m.is_plain:
                raise ValueError(f"the authors' loop handles plain axes only, not {m}")
            g = m.segments[0].factors[0].group
            self.axes[m.tensor][m.axis] = g
            if not m.tensor.endswith(("running_mean", "running_var")):
                self.groups[g].append((m.tensor, m.axis))
        self.names = list(self.groups)
        self.perms = {g: torch.as_tensor(init[g]).clone() for g in self.names}
        # the proxy: a copy of all of A's floating-point parameters, as the authors' model copy
        self.proxy = {
            k: v.clone().requires_grad_(True)
            for k, v in self.state_a.items()
            if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))
        }
        self.opt = torch.optim.SGD(
            list(self.proxy.values()), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        self.step_count = 0

    def permuted(self, key: str, perms: Mapping[str, Tensor], skip: int | None = None) -> Tensor:
        w = self.state_b[key]
        for axis, g in enumerate(self.axes[key]):
            if g is not None and axis != skip:
                w = torch.index_select(w, axis, perms[g])
        return w

    def weight_matching(self, params_a: Mapping[str, Tensor], gen: torch.Generator) -> int:
        """Coordinate descent from the current permutations; returns the number of sweeps."""
        perms = self.perms
        for sweep in range(1, 101):
            progress = False
            for i in torch.randperm(len(self.names), generator=gen).tolist():
                g = self.names[i]
                n = len(perms[g])
                sim = torch.zeros(n, n)
                for key, axis in self.groups[g]:
                    wa = torch.movedim(params_a[key], axis, 0).reshape(n, -1)
                    wb = torch.movedim(self.permuted(key, perms, skip=axis), axis, 0)
                    sim += wa @ wb.reshape(n, -1).T
                rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
                old = float(sim[torch.arange(n), perms[g]].sum())
                new = float(sim[torch.from_numpy(rows), torch.from_numpy(cols)].sum())
                progress = progress or new > old + 1e-12
                perms[g] = torch.from_numpy(cols).long()
            if not progress:
                return sweep
        return 100

    def step(self, x: Tensor, y: Tensor) -> tuple[float, float, float, int]:
        """One step: (loss, matching seconds, rest seconds, sweeps)."""
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_count + 1)
        detached = {k: v.detach() for k, v in self.proxy.items()}
        sweeps = self.weight_matching(detached, gen)
        t1 = time.perf_counter()
        aligned = {k: self.permuted(k, self.perms) for k in self.state_b}
        mid = {}
        for k, a in self.state_a.items():
            if k in self.proxy:
                p = self.proxy[k]
                ste = aligned[k].detach() + (p - p.detach())
                mid[k] = (1 - self.lam) * a + self.lam * ste
            elif a.is_floating_point():
                mid[k] = (1 - self.lam) * a + self.lam * aligned[k]
            else:
                mid[k] = a
        out = functional_call(self.model, mid, (x,))
        loss = F.nll_loss(F.log_softmax(out, dim=1), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        value = float(loss.detach())
        self.step_count += 1
        return value, t1 - t0, time.perf_counter() - t1, sweeps


class AuthorsRun:
    """The authors' loop, one step per call, recording what ``run_symmerge`` records."""

    def __init__(
        self,
        spec: Any,
        model: nn.Module,
        state_b: Mapping[str, Tensor],
        init: Mapping[str, Tensor],
        lr: float,
        seed: int,
    ) -> None:
        self.ste = AuthorsSTE(spec, model, state_b, init, lr, seed=seed)
        self.rec: dict[str, Any] = {
            "losses": [], "match": [], "rest": [], "sweeps": [], "changed": []
        }  # fmt: skip
        self.best, self.best_perms, self.best_step = math.inf, None, 0

    def __call__(self, step: int, x: Tensor, y: Tensor) -> None:
        ste, rec = self.ste, self.rec
        before = {g: p.clone() for g, p in ste.perms.items()}
        loss, tm, tr, sweeps = ste.step(x, y)
        rec["losses"].append(loss)
        rec["match"].append(tm)
        rec["rest"].append(tr)
        rec["sweeps"].append(sweeps)
        rec["changed"].append(sum(int((ste.perms[g] != before[g]).sum()) for g in before))
        if loss < self.best:
            self.best, self.best_step = loss, step
            self.best_perms = {g: p.clone() for g, p in ste.perms.items()}

    def result(self) -> dict[str, Any]:
        return {
            **self.rec,
            "perms": self.best_perms,
            "last_perms": self.ste.perms,
            "best_step": self.best_step,
        }


def run_authors(
    spec: Any,
    model: nn.Module,
    state_b: Mapping[str, Tensor],
    data: Sequence[tuple[Tensor, Tensor]],
    init: Mapping[str, Tensor],
    lr: float,
    seed: int,
) -> dict[str, Any]:
    run = AuthorsRun(spec, model, state_b, init, lr, seed)
    for step, (x, y) in enumerate(data):
        run(step, x, y)
    return run.result()


class Interleaved:
    """Batches that run ``before(k, x, y)`` (an authors' step) just before batch ``k`` goes
    to the symmerge loop: the two loops' step ``k`` are timed side by side, so a slow phase of
    a shared machine hits both, and their ratio is steadier than that of two runs in a row.
    """

    def __init__(self, data: Sequence[tuple[Tensor, Tensor]], before: Any) -> None:
        self.data, self.before = data, before

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Any:
        for k, (x, y) in enumerate(self.data):
            self.before(k, x, y)
            yield x, y


# ---------------------------------------------------------------------------------------
# (b)-(d) symmerge
# ---------------------------------------------------------------------------------------


def run_symmerge(
    spec: Any,
    model: nn.Module,
    state_b: Mapping[str, Tensor],
    data: Sequence[tuple[Tensor, Tensor]],
    init: Mapping[str, Tensor],
    lr: float,
    seed: int,
    variant: str,
    profile: cProfile.Profile | None = None,
) -> dict[str, Any]:
    """``variant``: a matcher name, optionally with ``:max_sweeps`` (``fast:1``)."""
    from symmerge.refine import ste_refine

    matcher, _, sweeps = variant.partition(":")
    if profile is not None:
        profile.enable()
    res = ste_refine(
        spec, model, state_b, data, init=init, steps=len(data), lr=lr, seed=seed,
        matcher=matcher, max_sweeps=int(sweeps or 3), log_every=0,
    )  # fmt: skip
    if profile is not None:
        profile.disable()
    return {
        "losses": res.losses,
        "match": res.match_seconds,
        "rest": res.train_seconds,
        "sweeps": res.sweeps,
        "changed": res.changed,
        "solves": res.solves,
        "certified": res.certified,
        "repaired": res.repaired,
        "bounded": res.bounded,
        "reused": res.reused,
        "perms": res.perms,
        "last_perms": res.last_perms,
        "best_step": res.best_step,
    }


# ---------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------


def midpoint_accuracy(
    spec: Any,
    model: nn.Module,
    state_b: Mapping[str, Tensor],
    perms: Mapping[str, Tensor],
    tests: Mapping[str, tuple[Tensor, Tensor]],
    lam: float = 0.5,
) -> dict[str, float]:
    sa = model.state_dict()
    aligned = spec.permute_state_dict(state_b, perms)
    mid = {
        k: (1 - lam) * v + lam * aligned[k] if v.is_floating_point() else v for k, v in sa.items()
    }
    out = {}
    with torch.no_grad():
        for name, (x, y) in tests.items():
            correct = 0
            for i in range(0, len(x), 5000):
                logits = functional_call(model, mid, (x[i : i + 5000],))
                correct += int((logits.argmax(1) == y[i : i + 5000]).sum())
            out[name] = correct / len(x)
    out["mean"] = sum(out[k] for k in tests) / len(tests)
    return out


def _coreset(x: Tensor, y: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    i = torch.cat(idx)
    return x[i], y[i]


def make_batches(
    setting: str, trains: Sequence[tuple[Tensor, Tensor]], steps: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    if setting == "coreset":
        parts = [_coreset(x, y, 10, seed + k) for k, (x, y) in enumerate(trains)]
        xb, yb = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return [(xb, yb)] * steps
    x = torch.cat([t[0] for t in trains])
    y = torch.cat([t[1] for t in trains])
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    need = steps * 500
    while len(order) < need:
        order = torch.cat([order, torch.randperm(len(x), generator=g)])
    return [(x[order[i : i + 500]], y[order[i : i + 500]]) for i in range(0, need, 500)]


def _summary(rec: dict[str, Any], lo: int, hi: int) -> dict[str, float]:
    """Means over steps ``lo..hi-1``."""
    m, r = rec["match"][lo:hi], rec["rest"][lo:hi]
    steps = [a + b for a, b in zip(m, r, strict=True)]
    return {
        "steps": f"{lo}-{hi - 1}",
        "match_mean": statistics.fmean(m),
        "rest_mean": statistics.fmean(r),
        "step_mean": statistics.fmean(steps),
        "step_median": statistics.median(steps),
        "match_fraction": sum(m) / sum(steps),
        "sweeps_mean": statistics.fmean(rec["sweeps"][lo:hi]),
        "changed_total": int(sum(rec["changed"][lo:hi])),
        "bounded_total": int(sum(rec.get("bounded", [])[lo:hi])),
        "reused_steps": int(sum(rec.get("reused", [])[lo:hi])),
    }


WINDOWS = ("first", "all", "second_half")


def _top(prof: cProfile.Profile, k: int) -> list[dict[str, Any]]:
    import pstats

    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        rows.append(
            {"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "self_s": tt, "cum_s": ct}
        )
    rows.sort(key=lambda r: -r["self_s"])
    return rows[:k]


def _compile_solvers() -> None:
    """Compile (or load from numba's cache) the warm assignment solver before any timed step,
    so no variant's first step pays for it."""
    import numpy as np

    from symmerge.solvers.lap import centre_prices, warm_lap

    c = np.arange(16.0).reshape(4, 4) % 5
    x, v, _ = warm_lap(c, np.arange(4))
    centre_prices(c, x, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--steps", default="full=100,coreset=200", help="STE steps per variant, per setting"
    )
    parser.add_argument("--time-steps", type=int, default=50, help="steps the timing covers")
    parser.add_argument("--data", default="full,coreset", help="settings: full, coreset")
    parser.add_argument(
        "--variants",
        default="full=" + "+".join(VARIANTS) + ",coreset=" + "+".join(VARIANTS[:-1]),
        help="variants per setting ('+'-separated): authors, full, warm, fast, fast:K",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of A and B")
    parser.add_argument("--seed-a", type=int, default=0, help="training seed of A (MNIST)")
    parser.add_argument(
        "--seed-b",
        type=int,
        default=1,
        help="training seed of B (Fashion-MNIST); the same seed as A gives both models one "
        "initialisation, and weight matching then keeps the identity",
    )
    parser.add_argument("--seed", type=int, default=0, help="STE seed (order, shuffling)")
    parser.add_argument(
        "--interleave",
        default="fast",
        help="the variant whose steps alternate with the authors' steps ('': none)",
    )
    parser.add_argument(
        "--profile", default="fast", help="variant to cProfile apart, 40 coreset steps ('': none)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _compile_solvers()

    import symmerge
    from symmerge.data import get_dataset
    from symmerge.solvers.coordinate import weight_matching

    a, _, path_a = load_or_train(
        "mlp", "mnist", args.seed_a, args.epochs, args.cache, args.data_root
    )
    b, _, path_b = load_or_train(
        "mlp", "fashion-mnist", args.seed_b, args.epochs, args.cache, args.data_root
    )
    a, b = a.eval(), b.eval()
    names = ("mnist", "fashion-mnist")
    trains = [get_dataset(n, "train", root=args.data_root).tensors for n in names]
    tests = {n: get_dataset(n, "test", root=args.data_root).tensors for n in names}
    spec = symmerge.trace(a, (trains[0][0][:2],))
    sa, sb = a.state_dict(), b.state_dict()
    t0 = time.perf_counter()
    init = weight_matching(spec, sa, sb, max_sweeps=100, seed=args.seed).perms
    t_init = time.perf_counter() - t0
    ident = spec.identity_permutations()
    reference = {
        "A_alone": midpoint_accuracy(spec, a, sa, ident, tests, lam=0.0),
        "B_alone": midpoint_accuracy(spec, a, sb, ident, tests, lam=1.0),
        "naive_midpoint": midpoint_accuracy(spec, a, sb, ident, tests),
        "weight_matching_midpoint": midpoint_accuracy(spec, a, sb, init, tests),
    }
    print("reference", reference, flush=True)

    steps_of = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    variants_of = {k: v.split("+") for k, v in (kv.split("=") for kv in args.variants.split(","))}
    settings = {}
    profile_top = None
    for setting in [s for s in args.data.split(",") if s]:
        lr, what = SETTINGS[setting]
        data = make_batches(setting, trains, steps_of[setting], args.seed)
        variants = variants_of[setting]
        runs: dict[str, Any] = {}
        records: dict[str, tuple[dict[str, Any], float]] = {}
        paired = "authors" in variants and args.interleave in variants
        for v in variants:
            if v in records or (paired and v == "authors"):
                continue  # run beside its partner
            t0 = time.perf_counter()
            if paired and v == args.interleave:
                authors = AuthorsRun(spec, a, sb, init, lr, args.seed)
                both = Interleaved(data, authors)
                rec = run_symmerge(spec, a, sb, both, init, lr, args.seed, v)
                records["authors"] = (authors.result(), time.perf_counter() - t0)
            elif v == "authors":
                rec = run_authors(spec, a, sb, data, init, lr, args.seed)
            else:
                rec = run_symmerge(spec, a, sb, data, init, lr, args.seed, v)
            records[v] = (rec, time.perf_counter() - t0)
        for v in variants:
            rec, wall = records[v]
            partner = {"authors": args.interleave, args.interleave: "authors"}.get(v)
            row = {
                "wall_seconds": wall,
                "interleaved_with": partner if paired else None,
                "first": _summary(rec, 0, min(args.time_steps, len(data))),
                "all": _summary(rec, 0, len(data)),
                "second_half": _summary(rec, len(data) // 2, len(data)),
                "best_step": rec["best_step"],
                "best_loss": rec["losses"][rec["best_step"]],
                "last_loss": rec["losses"][-1],
                "accuracy_best": midpoint_accuracy(spec, a, sb, rec["perms"], tests),
                "accuracy_last": midpoint_accuracy(spec, a, sb, rec["last_perms"], tests),
                "losses": rec["losses"],
                "match_seconds": rec["match"],
                "rest_seconds": rec["rest"],
                "sweeps": rec["sweeps"],
                "changed": rec["changed"],
                **{
                    k: rec[k]
                    for k in ("solves", "certified", "repaired", "bounded", "reused")
                    if k in rec
                },
            }
            row["_last_perms"] = rec["last_perms"]
            runs[v] = row
            t = row["all"]
            print(
                f"[{setting}] {v}: step {t['step_mean']:.4f} s (match {t['match_mean']:.4f}, "
                f"rest {t['rest_mean']:.4f}), acc best {row['accuracy_best']['mean']:.4f} "
                f"last {row['accuracy_last']['mean']:.4f}, wall {wall:.1f} s",
                flush=True,
            )
        base = runs.get("authors") or runs.get("full")
        for row in runs.values():
            for w in WINDOWS:
                row[w]["speedup_vs_authors"] = (
                    base[w]["step_mean"] / row[w]["step_mean"] if base else None
                )
                row[w]["matching_speedup_vs_authors"] = (
                    base[w]["match_mean"] / row[w]["match_mean"] if base else None
                )
            if base is not None:
                row["max_abs_loss_diff_vs_authors"] = max(
                    abs(p - q) for p, q in zip(row["losses"], base["losses"], strict=True)
                )
                row["last_perms_equal_authors"] = all(
                    torch.equal(row["_last_perms"][g], base["_last_perms"][g]) for g in spec.groups
                )
        for row in runs.values():
            del row["_last_perms"]
        settings[setting] = {"lr": lr, "data": what, "batches": len(data), "runs": runs}
        if args.profile and setting == "coreset":  # a separate, untimed run under cProfile
            prof = cProfile.Profile()
            run_symmerge(spec, a, sb, data[:40], init, lr, args.seed, args.profile, prof)
            profile_top = _top(prof, 15)

    meta = provenance(
        {
            "ste_seed": args.seed,
            "model_A": f"mnist seed {args.seed_a}",
            "model_B": f"fashion-mnist seed {args.seed_b}",
            "batches": f"shuffled / coreset drawn with seed {args.seed}",
        },
        {
            "models": {
                "A": display_path(path_a),
                "B": display_path(path_b),
                "architecture": "mlp 784-512-512-512-10 (ReLU), symmerge recipe, "
                f"{args.epochs} epochs",
            },
            "steps": steps_of,
            "profiled": args.profile,
            "threads": args.threads,
            "interleave": args.interleave,
            "time_steps": args.time_steps,
            "optimizer": "SGD momentum 0.9, weight decay 1e-4; lam 0.5; keep best (lowest "
            "minibatch loss)",
            "init": f"weight matching of B to A (100 sweeps max), {t_init:.2f} s, shared by all",
        },
    )
    result = {
        "meta": meta,
        "reference_accuracy": reference,
        "settings": settings,
        "profile_fast_top": profile_top,
    }
    out = Path(args.out)
    write_json(out / f"{NAME}.json", result)
    write_md(out / f"{NAME}.md", result)
    print(f"wrote {out / NAME}.{{json,md}}", flush=True)


def write_md(path: Path, result: dict[str, Any]) -> None:
    meta = result["meta"]
    lines = [
        "# STE step time: authors' per-step weight matching vs symmerge",
        "",
        *provenance_md(meta),
        f"- Models: A = {meta['models']['A']}, B = {meta['models']['B']} "
        f"({meta['models']['architecture']})",
        f"- {meta['optimizer']}; {meta['init']}",
        f"- Steps per variant: {meta['steps']}; per-step times are means over a window of "
        f"steps (matching + the rest), {meta.get('threads', 1)} torch thread(s); 'x authors' = "
        "the authors' mean step time over the same window divided by the variant's",
        f"- Interleaved: {meta.get('interleave') or 'none'} (step k of the authors' loop, then "
        "step k of this variant, so both are timed in the same phases of the shared machine; "
        "the other variants ran on their own)",
        "",
        "Variants: **authors** = the authors' loop re-implemented in this script (a full "
        "weight matching each step: every sweep recomputes all similarities and solves every "
        "group with scipy's LAP, until a sweep improves nothing); **full** = "
        "`ste_refine(matcher='full')` (symmerge's full weight matching each step); **warm** = "
        "`ste_refine(matcher='warm')` (the matcher called 'fast' before issue 6: similarities "
        "once per step, assignments re-solved from the last step's prices by a compiled "
        "Jonker-Volgenant warm start (`symmerge.solvers.warm_lap`), 3 sweeps at most; it "
        "shares issue 6's solver, so it is faster than that matcher was); **fast** = "
        "`ste_refine(matcher='fast')` (warm, plus kept similarities: bound certificates "
        "instead of products after a proxy step, low-rank updates after a neighbour's move); "
        "`:k` = `max_sweeps=k` (default 3; 100 = until a sweep improves nothing, as the "
        "authors). Every symmerge variant also skips the forward/backward pass of a step "
        "whose batch and permutations equal the previous step's (same loss and gradient).",
        "",
        "Midpoint accuracy: mean of MNIST and Fashion-MNIST test accuracy of (A + pi(B)) / 2. "
        "Reference: "
        + ", ".join(
            f"{k.replace('_', ' ')} {v['mean']:.4f}"
            for k, v in result["reference_accuracy"].items()
        )
        + ".",
    ]
    for setting, block in result["settings"].items():
        runs = block["runs"]
        lines += ["", f"## {setting}: {block['data']}, lr {block['lr']}", ""]
        names = {"first": "first steps", "all": "all steps", "second_half": "second half"}
        header = ["variant"]
        for w in WINDOWS:
            header += [f"step s, {names[w]}", "x authors"]
        header += [
            "match s (all)",
            "rest s (all)",
            "sweeps/step",
            "units moved",
            "bounded",
            "reused steps",
            "acc best",
            "acc last",
            "max abs loss diff vs authors",
            "last perms = authors'",
        ]
        rows = []
        for v, r in runs.items():
            row = [v]
            for w in WINDOWS:
                row += [fmt(r[w]["step_mean"]), fmt(r[w]["speedup_vs_authors"], 2)]
            al = r["all"]
            row += [
                fmt(al["match_mean"]),
                fmt(al["rest_mean"]),
                fmt(al["sweeps_mean"], 2),
                al["changed_total"],
                al["bounded_total"],
                al["reused_steps"],
                fmt(r["accuracy_best"]["mean"]),
                fmt(r["accuracy_last"]["mean"]),
                fmt(r.get("max_abs_loss_diff_vs_authors"), 4),
                r.get("last_perms_equal_authors", "—"),
            ]
            rows.append(row)
        windows = ", ".join(
            f"{names[w]} = steps {runs[next(iter(runs))][w]['steps']}" for w in WINDOWS
        )
        lines += md_table(header, rows) + ["", f"Windows: {windows}."]
    if result.get("profile_fast_top"):
        lines += [
            "",
            f"## Where a '{meta['profiled']}' step goes (cProfile of 40 coreset steps, self "
            "time; a separate run, not the timed one)",
            "",
        ]
        lines += md_table(
            ["function", "calls", "self s", "cum s"],
            [
                [r["function"], r["calls"], fmt(r["self_s"], 3), fmt(r["cum_s"], 3)]
                for r in result["profile_fast_top"]
            ],
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
