"""Fidelity of each quantization scheme to the FP32 tower (ViT-B-32, seeded random weights, with and
without planted outlier channels). Prints the markdown table kept in docs/quantization.md.

    python scripts/fidelity_table.py [--images 32]
"""

import argparse
import copy

import torch
import torch.nn.functional as F

from lra_ee.synthetic import plant_outlier_channels, random_tower
from lra_kernels import QuantEarlyExitViT

SCHEMES = {
    "paper (quantize_dynamic emulation)": dict(act_quant="paper"),
    "per_token (default: INT8 patch embedding)": dict(),
    "per_token, float patch embedding": dict(int8_patch_embed=False),
    "per_token + SmoothQuant 0.5": dict(smooth_alpha=0.5, calibrate=True),
    "per_tensor_static (max)": dict(act_quant="per_tensor_static", calibrate=True),
    "per_tensor_static + SmoothQuant 0.5": dict(act_quant="per_tensor_static", smooth_alpha=0.5, calibrate=True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--model", default="ViT-B-32")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(1)
    towers = {"random": random_tower(args.model, 0)}
    towers["outliers"] = copy.deepcopy(towers["random"])
    plan = plant_outlier_channels(towers["outliers"], seed=0)
    h, w = towers["random"].image_size
    images = torch.randn(args.images, 3, h, w, generator=gen)
    calib = torch.randn(32, 3, h, w, generator=gen)
    print(f"{args.model}, seeded random weights; outlier tower: channels {plan.ln_channels} (LayerNorm gain) and "
          f"{plan.residual_channels} (residual offset), {plan.ratio:.0f}x the rest; {args.images} random images\n")
    print("| scheme | tower | cosine mean | cosine min | SQNR (dB) |\n|---|---|---|---|---|")
    for tname, tower in towers.items():
        with torch.no_grad():
            ref = tower(images)
        for sname, kw in SCHEMES.items():
            kw = dict(kw)
            if kw.pop("calibrate", False):
                kw["calibration_images"] = calib
            out = QuantEarlyExitViT.from_open_clip(tower, compile_blocks=False, **kw)(images)
            cos = F.cosine_similarity(out, ref, dim=-1)
            sqnr = 10 * torch.log10(ref.double().pow(2).sum() / (ref.double() - out.double()).pow(2).sum())
            print(f"| {sname} | {tname} | {cos.mean():.5f} | {cos.min():.5f} | {sqnr:.1f} |")


if __name__ == "__main__":
    main()
