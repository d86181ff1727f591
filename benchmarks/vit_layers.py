"""Which layer should a CAM read in a vision transformer?  Pointing rates on the synthetic detection task.

    python benchmarks/vit_layers.py [--seeds 0 1 2] [--depth 3] [--pool token] [--methods grad_cam ...]

Trains the tiny ViT of ``tests/transformers/synthetic.py`` (class 1: a small pattern in one patch of a non-square
3x5 patch grid; class 0: none) and explains class 1 on 200 held-out class-1 images with every CAM at every
candidate layer: each block's ``norm1`` (the input of its attention), ``norm2`` (the input of its MLP) and output,
plus ``patch_embed`` and the final ``norm``.  A map points correctly when its patch-pooled maximum lies in the
pattern's patch (chance: 1/15 = 0.07).  Prints a markdown table per seed and the mean over seeds; the numbers in
docs/transformers.md come from this script.  On a shared CPU, export OMP_WAIT_POLICY=PASSIVE.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import attribution as A

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "transformers"))
from synthetic import pointing_rate, train_task, transposed  # noqa: E402

CAMS = ["grad_cam", "hires_cam", "grad_cam_elementwise", "grad_cam_plusplus", "xgrad_cam", "layer_cam", "bag_cam",
        "eigen_cam", "eigen_grad_cam", "kpca_cam", "score_cam", "ss_cam", "is_cam", "ablation_cam"]
#: options that keep the run short (SS-CAM with fewer samples than its default 35)
OPTIONS = {"ss_cam": {"samples": 8, "generator": None}, "is_cam": {"steps": 10}}


def candidate_layers(model) -> list:
    names = ["patch_embed"]
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.norm1", f"blocks.{i}.norm2", f"blocks.{i}"]
    return names + ["norm"]


def table(title: str, layers: list, rows: dict) -> None:
    """A markdown table: one row of cells per method, one column per layer."""
    print(f"\n### {title}\n")
    print("| method | " + " | ".join(layers) + " |")
    print("|---" * (len(layers) + 1) + "|")
    for method, cells in rows.items():
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--pool", default="token", help="timm global_pool: token (class token) or avg")
    parser.add_argument("--methods", nargs="+", default=CAMS)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    totals: dict = {}
    for seed in args.seeds:
        start = time.time()
        task = train_task(seed=seed, depth=args.depth, global_pool=args.pool)
        images, patches = task.images[:args.images], task.patches[:args.images]
        layers = candidate_layers(task.model)
        trained = time.time() - start
        rows = {}
        for method in args.methods:
            rates = []
            for layer in layers:
                options = dict(OPTIONS.get(method, {}))
                if method == "ss_cam":
                    options["generator"] = torch.Generator().manual_seed(0)
                maps = A.create(method, task.model, target_layer=layer, **options)(images, 1)
                rate, wrong = pointing_rate(maps, patches), pointing_rate(transposed(maps), patches)
                rates.append(f"{rate:.2f}")
                totals.setdefault((method, layer), []).append((rate, wrong))
            rows[method] = rates
        table(f"seed {seed}, depth {args.depth}, pool {args.pool} (trained in {trained:.0f} s)", layers, rows)
    if len(args.seeds) > 1:
        means = {}
        for method in args.methods:
            values = [totals[(method, layer)] for layer in layers]
            means[method] = [f"{sum(v[0] for v in vs) / len(vs):.2f} ({sum(v[1] for v in vs) / len(vs):.2f})"
                             for vs in values]
        table(f"mean over seeds {args.seeds} (transposed maps in brackets)", layers, means)


if __name__ == "__main__":
    main()
