"""Time to build a merged model whose widths differ from its inputs', against the same-width
build, on timm ResNet-50 and ViT-B/16 (random init).

Both go through :func:`symmerge.merging.build_model`, as ``merge()`` does after a method:
``build_state_dict`` over two models, then the model. Same width: identity maps, the model is a
copy of model 0 holding the merged tensors. Resized: maps of a larger merged width, the model is
model 0 resized (:func:`symmerge.resize.resize`, which also runs it once on a 1 x 3 x 224 x 224
input to check every width). Widths: 1.25x (a partial merge keeping a quarter of model 1's units
apart, index maps: its parameter count grows about 1.5x) and 2x (the side-by-side ensemble:
about 4x the parameters). Attention heads keep their width. Tracing is done once beforehand and
not timed (every merge traces anyway). Each timing is the median of ``--repeats`` runs,
alternating same-width and resized runs so machine noise hits both.

    .venv/bin/python benchmarks/resize_speed.py            # writes results/resize_speed.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, md_table, provenance, provenance_md, write_json
from torch import nn

from symmerge.groupmap import GroupMap, build_state_dict
from symmerge.merging import build_model
from symmerge.spec import trace

MODELS = {
    "resnet50": {"input": (3, 224, 224)},
    "vit_base_patch16_224": {"input": (3, 224, 224)},
}


def partial_map(n: int, extra: int) -> GroupMap:
    """n merged units averaged from both models, then ``extra`` units of model 1 kept apart."""
    units, apart = torch.arange(n), torch.arange(extra)
    none = torch.full((extra,), -1)
    i0, i1 = torch.cat([units, none]), torch.cat([units, apart])
    v0 = torch.cat([torch.full((n,), 0.5), torch.zeros(extra)])
    v1 = torch.cat([torch.full((n,), 0.5), torch.ones(extra)])
    return GroupMap.from_indices([i0, i1], [v0, v1], [n, n], weights=[0.5, 0.5])


def maps_for(spec, kind: str) -> dict[str, GroupMap]:
    out = {}
    for name, g in spec.groups.items():
        if not g.members or g.block_group is not None or g.blocks:
            continue  # heads and their head dims keep their width here
        if kind == "same":
            out[name] = GroupMap.identity(g.size, 2)
        elif kind == "1.25x":
            out[name] = partial_map(g.size, g.size // 4)
        else:
            out[name] = GroupMap.side_by_side([g.size, g.size])
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(timm, name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    models = [timm.create_model(name, pretrained=False).eval() for _ in range(2)]
    x = (torch.randn(1, *MODELS[name]["input"]),)
    spec = trace(models[0], x)
    states = [m.state_dict() for m in models]

    def same() -> None:
        maps = maps_for(spec, "same")
        build_model(models[0], spec, maps, build_state_dict(spec, states, maps))

    def resized(kind: str) -> nn.Module:
        maps = maps_for(spec, kind)
        state = build_state_dict(spec, states, maps)
        return build_model(models[0], spec, maps, state, example_inputs=x)

    merged_params = {
        kind: sum(p.numel() for p in resized(kind).parameters()) for kind in ("1.25x", "2x")
    }

    times: dict[str, list[float]] = {"same": [], "1.25x": [], "2x": []}
    for _ in range(repeats):
        times["same"].append(timed(same))
        times["1.25x"].append(timed(lambda: resized("1.25x")))
        times["2x"].append(timed(lambda: resized("2x")))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": f"timm:{name}",
        "params": sum(p.numel() for p in models[0].parameters()),
        "merged_params": merged_params,
        "seconds": times,
        "median": med,
        "ratio_1.25x": med["1.25x"] / med["same"],
        "ratio_2x": med["2x"] / med["same"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    rows, records = [], []
    for name in args.models.split(","):
        record = bench(timm, name, args.repeats)
        med = record["median"]
        records.append(record)
        grown = {k: v / record["params"] for k, v in record["merged_params"].items()}
        rows.append([record["model"], f"{record['params'] / 1e6:.1f}M", f"{med['same']:.2f}",
                     f"{med['1.25x']:.2f}", f"{grown['1.25x']:.2f}x",
                     f"{record['ratio_1.25x']:.2f}", f"{med['2x']:.2f}", f"{grown['2x']:.2f}x",
                     f"{record['ratio_2x']:.2f}"])  # fmt: skip
        print(rows[-1], flush=True)
    meta = provenance({"torch": 0}, {"threads": args.threads, "repeats": args.repeats})
    out = Path(args.out)
    write_json(out / "resize_speed.json", {"meta": meta, "runs": records})
    lines = ["# Building resized merged models vs the same-width build", ""]
    lines += provenance_md(meta)
    lines += ["", "Median seconds over the repeats (`build_state_dict` + `build_model`; tracing "
              "not timed).", ""]  # fmt: skip
    lines += md_table(["model", "params", "same width s", "1.25x s", "1.25x params",
                       "1.25x / same", "2x s", "2x params", "2x / same"], rows)  # fmt: skip
    lines += ["", "The resized build also builds more weights (the params columns: the merged "
              "model's parameter count over one input's), so part of each ratio is the larger "
              "result itself, not the resizing."]  # fmt: skip
    (out / "resize_speed.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'resize_speed.md'}")


if __name__ == "__main__":
    main()
