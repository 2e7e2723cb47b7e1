"""Does adapting the distillation strength help? Fixed alpha and T against the monitor's reaction policies,
the alpha / T schedules and per-sample confidence weights, over seeds, as a Markdown table.

    python benchmarks/adaptive.py digits_all_labels --seeds 5

Per seed, the recipe is run once as it is (the fixed baseline; its teacher is trained there), then once per
variant with that same teacher loaded, so every variant distils the same teacher from the same student
initialisation. Test accuracy is read once per model after selection on validation; Δ is taken per seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from distill import Recipe, run
from distill.pipeline.plan import with_seed
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py

VARIANTS = {
    "fixed (the recipe)": [],
    "retention < 0.9 -> lower T (/1.5)": ["monitor.retention_min=0.9", "monitor.action=lower_temperature"],
    "retention < 0.9 -> raise alpha (x1.5)": ["monitor.retention_min=0.9", "monitor.action=raise_alpha"],
    "T cosine 4 -> 1": ["distill.schedule.temperature=cosine", "distill.schedule.temperature_end=1"],
    "alpha linear -> 0.5": ["distill.schedule.alpha=linear", "distill.schedule.alpha_end=0.5"],
    "KD weighted per sample by teacher confidence": ["distill.sample_weight=confidence"],
}


def stat(a, fmt=".2f") -> str:
    a = np.asarray(a, dtype=float)
    return f"{a.mean():{fmt}} ± {a.std(ddof=1):{fmt}}" if len(a) > 1 else f"{a.mean():{fmt}}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    skip_without_data(args.recipe)
    os.environ.setdefault("DISTILL_QUIET", "1")
    recipe = Recipe.load(args.recipe)
    base = os.path.join("runs", "bench", "adaptive", recipe["name"])
    t0 = time.perf_counter()
    acc: dict = {v: [] for v in VARIANTS}
    adjusted: dict = {v: [] for v in VARIANTS}
    for seed in range(args.seeds):
        teacher = None
        for name, sets in VARIANTS.items():
            out = os.path.join(base, f"seed_{seed}", str(list(VARIANTS).index(name)))
            extra = [f"teacher.checkpoint={teacher}"] if teacher else []  # trained once per seed, then loaded
            r = with_seed(Recipe.load(args.recipe, [*sets, *extra]), seed)
            metrics = run(r, out, echo=lambda m: None)
            teacher = teacher or os.path.join(out, "teacher.safetensors")
            acc[name].append(metrics["student"]["accuracy"] * 100)
            lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
            adjusted[name].append(sum(1 for r in lines if r.get("model") == "student" and r.get("adjusted")))
    fixed = np.asarray(acc["fixed (the recipe)"])
    print(f"`python benchmarks/adaptive.py {' '.join(sys.argv[1:])}`\n")
    print("| distillation strength | distilled test accuracy % | Δ vs fixed (points, per seed) | epochs adjusted |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        delta = np.asarray(acc[name]) - fixed
        print(f"| {name} | {stat(acc[name])} | {stat(delta):s} | {stat(adjusted[name], '.1f')} |")
    print(f"\nSeeds {list(range(args.seeds))}; wall time {(time.perf_counter() - t0) / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    run_main(main)
