"""Progressive layer reduction from the teacher (6 -> 5 -> 4 -> 3 -> 2 layers, the layer to drop chosen by
validation loss, each step distilled from the model before it) against the one-shot students (layers copied
from the teacher, then distilled once), per seed, as a Markdown table.

    python benchmarks/progressive.py trec_minilm --seeds 3 --to 2

Needs the run folders of benchmarks/compress.py (runs/bench/compress/<recipe>/seed_<s>): each is copied to
runs/bench/progressive/<recipe>/seed_<s> and its teacher is compressed there, so both approaches start from
the same fine-tuned teacher. The 2-layer one-shot students are read from benchmarks/text.py's runs
(runs/bench/<recipe>/L2_seed<s>) when they exist (accuracy only: their latency was measured in another run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from distill import Recipe
from distill.compress.bench import bench
from distill.compress.pipeline import compress
from distill.io import read_json
from distill.pipeline.rundir import RunDir
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py


def stat(values, fmt=".2f") -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():{fmt}}" + (f" ± {a.std(ddof=1):{fmt}}" if len(a) > 1 else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--to", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1, help="distillation epochs after each dropped layer")
    args = p.parse_args()
    skip_without_data(args.recipe)
    os.environ.setdefault("DISTILL_QUIET", "1")
    name = Recipe.load(args.recipe)["name"]
    t0 = time.perf_counter()
    results, oneshot = [], []
    for seed in range(args.seeds):
        source = os.path.join("runs", "bench", "compress", name, f"seed_{seed}")
        if not os.path.isfile(os.path.join(source, "metrics.json")):
            print(f"{source}: missing; run benchmarks/compress.py {args.recipe} first", file=sys.stderr)
            return 2
        out = os.path.join("runs", "bench", "progressive", name, f"seed_{seed}")
        if not os.path.isdir(out):
            shutil.copytree(source, out, ignore=shutil.ignore_patterns("compress", "bench", "export"))
        print(f"seed {seed} -> {out}", file=sys.stderr, flush=True)
        cfg = Recipe.load(os.path.join(out, "recipe.yaml")).cfg
        cfg["compress"].update(source="teacher", steps=["layers"])
        cfg["compress"]["layers"].update(to=args.to, step=1, epochs=args.epochs, teacher="previous")
        cfg["bench"]["variants"] = ["fp32"]
        recipe = Recipe(cfg, os.path.join(out, "recipe.yaml"))
        compress(RunDir(recipe, out, echo=lambda m: None))
        results.append({(r["model"], r["variant"]): r for r in bench(recipe, out, echo=lambda m: None)["results"]})
        l2 = os.path.join("runs", "bench", name, f"L2_seed{seed}", "metrics.json")
        oneshot.append(read_json(l2, {}).get("student", {}).get("accuracy"))
    wall = time.perf_counter() - t0
    models = [k[0] for k in results[0] if k[0].startswith("compress/")]
    head = ["model", "layers", "test accuracy %", "params", "p50 ms (batch 1)", "speed-up vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    rows = [("teacher", "teacher (fine-tuned)", 6), ("student", "one-shot: layers [0, 2, 4] copied, distilled", 3)]
    rows += [(m, f"progressive from the teacher ({m.split('/')[1]})", int(m.rsplit("layers", 1)[1])) for m in models]
    for key, label, n in rows:
        per = [r[(key, "fp32")] for r in results]
        teacher = [r[("teacher", "fp32")]["p50_ms"] for r in results]
        lines.append(f"| {label} | {n} | {stat([x['accuracy'] * 100 for x in per])} | {per[0]['params']:,} | "
                     f"{stat([x['p50_ms'] for x in per], '.3f')} | "
                     f"{stat([t / x['p50_ms'] for t, x in zip(teacher, per)])} |")
    if all(a is not None for a in oneshot):
        lines.append(f"| one-shot: layers [0, 3] copied, distilled (benchmarks/text.py) | 2 | "
                     f"{stat([a * 100 for a in oneshot])} | | | |")
    print(f"`python benchmarks/progressive.py {' '.join(sys.argv[1:])}`\n")
    print("\n".join(lines))
    print(f"\nSeeds {list(range(args.seeds))}; {args.epochs} distillation epoch(s) after each dropped layer, each from "
          f"the model before the drop; wall time {wall / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    run_main(main)
