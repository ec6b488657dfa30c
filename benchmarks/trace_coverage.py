"""Trace coverage: run the symmetry tracer + invariance check over the zoo, many timm models and
torchvision's segmentation models.

For every model: number of groups, free units, share of hidden units left free, max |diff|
between the model and a randomly permuted copy (float64, jittered weights), the output scale
and the time taken. Writes ``benchmarks/results/trace_coverage.{json,md}``.

    python benchmarks/trace_coverage.py [--models a,b,c] [--size 96]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import symmerge
from symmerge.models import ZOO_NAMES, create_model

TIMM_MODELS = [
    "resnet18", "resnet50", "resnext26ts", "wide_resnet50_2", "convnext_atto", "convnextv2_atto",
    "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv2_050", "ghostnet_100",
    "regnetx_002", "regnety_002", "densenet121", "dla34", "dpn48b", "cspresnet50",
    "repvgg_a0", "nf_resnet26", "inception_v3", "hrnet_w18_small", "mixer_s16_224",
    "resmlp_12_224", "convmixer_768_32", "efficientformer_l1", "levit_128s", "coatnet_nano_rw_224",
    "maxvit_nano_rw_256", "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "beit_base_patch16_224", "poolformer_s12", "rexnet_100",
    "hardcorenas_a", "mnasnet_050", "fbnetc_100", "tinynet_e", "lcnet_050", "vgg11_bn",
    "res2net50_14w_8s", "skresnet18", "selecsls42b", "xception41",
]  # fmt: skip
#: torchvision segmentation models: their heads upsample back to the input size.
TORCHVISION_MODELS = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]


def run_one(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    try:
        spec = symmerge.trace(model, (x,))
        t1 = time.perf_counter()
        res = spec.check(model, x)
        diff, scale = res.max_abs_diff, res.output_scale
        return {
            "model": name, "ok": res.ok, "groups": len(spec.groups),
            "free_units": spec.num_free_units, "free_fraction": round(spec.free_fraction(), 3),
            "max_abs_diff": diff, "output_scale": scale, "trace_s": round(t1 - t0, 2),
            "verify_s": round(time.perf_counter() - t1, 2), "input": list(x.shape),
        }  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a coverage report records failures
        return {"model": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=None, help="comma-separated timm names")
    parser.add_argument("--size", type=int, default=96, help="input size for CNNs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import timm

    torch.manual_seed(0)
    rows = []
    for name in ZOO_NAMES:
        model, _ = create_model(name)
        rows.append(run_one(name, model.eval(), torch.randn(2, *model.input_shape)))
        print(rows[-1], flush=True)
    for name in args.models.split(",") if args.models else TIMM_MODELS:
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        fixed = any(
            k in name
            for k in (
                "vit",
                "deit",
                "beit",
                "mixer",
                "resmlp",
                "swin",
                "levit",
                "coat",
                "maxvit",
                "former",
            )
        )
        hw = size[1:] if fixed else (args.size, args.size)
        rows.append(run_one(f"timm:{name}", model, torch.randn(2, size[0], *hw)))
        print(rows[-1], flush=True)
    if not args.models:
        import torchvision

        for name in TORCHVISION_MODELS:
            model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
            x = torch.randn(2, 3, args.size, args.size)
            rows.append(run_one(f"torchvision:{name}", model.eval(), x))
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python " + " ".join(sys.argv), "date": dt.date.today().isoformat(),
        "hardware": f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads, CPU only",
        "torch": torch.__version__, "timm": timm.__version__, "seed": 0,
    }  # fmt: skip
    (out / "trace_coverage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Symmetry tracer coverage", "",
        f"Command: `{meta['command']}`; date {meta['date']}; {meta['hardware']}; "
        f"torch {meta['torch']}, timm {meta['timm']}; seed 0; random-init weights, jittered.",
        "", "`ok` means max |diff| <= 1e-6 x max(1, output scale), in float64.", "",
        "| model | ok | groups | free units | free fraction | max abs diff | output scale | "
        "trace s |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | no | | | | {r['error'][:120]} | | |")
        else:
            lines.append(
                f"| {r['model']} | {'yes' if r['ok'] else 'NO'} | {r['groups']} | "
                f"{r['free_units']} | {r['free_fraction']:.2f} | {r['max_abs_diff']:.1e} | "
                f"{r['output_scale']:.1e} | {r['trace_s']} |"
            )
    n_ok = sum(bool(r.get("ok")) for r in rows)
    lines += ["", f"{n_ok} of {len(rows)} models pass."]
    (out / "trace_coverage.md").write_text("\n".join(lines) + "\n")
    print(f"{n_ok}/{len(rows)} ok")


if __name__ == "__main__":
    main()
