"""Teacher, scratch student and distilled student over several seeds, as a Markdown table.

    python benchmarks/seeds.py digits --seeds 10
    python benchmarks/seeds.py digits --seeds 10 --first 10 --per-seed
    python benchmarks/seeds.py mnist_cnn --seeds 3 --set train.epochs=15

Each seed is a full run (teacher trained anew, students from the same init as each other); the data split
is fixed (data.split_seed), models are selected on validation, and the test split is read once per model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from distill import Recipe, run_seeds
from distill.evaluate import format_table
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py


def markdown(summary: dict, recipe: Recipe, command: str, wall_s: float) -> str:
    rows = [("teacher", "teacher"), ("student_scratch", "student, no distillation"), ("student", "student, distilled")]
    cols = [("accuracy", "test accuracy %", 100, ".2f"), ("macro_f1", "macro-F1 %", 100, ".2f"),
            ("params", "params", 1, ",.0f"), ("size_bytes", "size KB", 1 / 1024, ",.1f"),
            ("latency_ms", "ms / sample (batch 1, 1 thread)", 1, ".4f"), ("train_time_s", "train s", 1, ".1f")]
    lines = [f"`{command}`", "",
             "| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in rows:
        cells = []
        for name, _, scale, fmt in cols:
            ms = summary[key][name]
            cells.append(f"{ms['mean'] * scale:{fmt}}" + (f" ± {ms['std'] * scale:{fmt}}" if name in
                                                           ("accuracy", "macro_f1") and ms["std"] is not None else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    t, s, b = (summary[k]["accuracy"]["mean"] * 100 for k in ("teacher", "student", "student_scratch"))
    ratio = summary["teacher"]["params"]["mean"] / summary["student"]["params"]["mean"]
    epochs = {r: recipe[r]["train"]["epochs"] for r in ("teacher", "student")}
    lines += ["", f"Seeds {summary['seeds']}; epochs: teacher {epochs['teacher']}, students {epochs['student']}; "
                  f"teacher/student parameters {ratio:.1f}x; distilled - scratch {s - b:+.2f} points; "
                  f"teacher - distilled {t - s:+.2f} points; wall time {wall_s / 60:.1f} min on "
                  f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, torch {torch.__version__})."]
    return "\n".join(lines)


def per_seed(out: str, seeds: list) -> str:
    """A row per seed (test accuracy %, from each seed's metrics.json), and how many seeds meet each of the
    default demo's criteria: teacher above scratch, distilled above scratch, distilled at most 1 point below the
    teacher."""
    lines = ["| seed | teacher | student, no distillation | student, distilled | distilled - scratch | "
             "teacher - distilled |", "|---|---|---|---|---|---|"]
    met = {"teacher > scratch": 0, "distilled > scratch": 0, "distilled at most 1 point below the teacher": 0}
    for s in seeds:
        with open(os.path.join(out, f"seed_{s}", "metrics.json"), encoding="utf-8") as fh:
            m = json.load(fh)
        t, b, d = (100 * m[k]["accuracy"] for k in ("teacher", "student_scratch", "student"))
        met["teacher > scratch"] += t > b
        met["distilled > scratch"] += d > b
        met["distilled at most 1 point below the teacher"] += t - d <= 1.0
        lines.append(f"| {s} | {t:.2f} | {b:.2f} | {d:.2f} | {d - b:+.2f} | {t - d:+.2f} |")
    return "\n".join(lines + ["", "; ".join(f"{k}: {v} of {len(seeds)} seeds" for k, v in met.items())])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--first", type=int, default=0, help="the first seed (seeds first .. first + seeds - 1)")
    p.add_argument("--per-seed", action="store_true", help="also a row per seed and the demo's criteria")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    skip_without_data(args.recipe, sets=args.overrides)
    recipe = Recipe.load(args.recipe, args.overrides)
    out = args.out or os.path.join("runs", "bench", recipe["name"])
    t0 = time.perf_counter()
    seeds = list(range(args.first, args.first + args.seeds))
    summary = run_seeds(recipe, seeds, out, echo=lambda m: print(m, file=sys.stderr))
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(format_table(summary), file=sys.stderr)
    print(markdown(summary, recipe, command, time.perf_counter() - t0))
    if args.per_seed:
        print("\n" + per_seed(out, seeds))
    return 0


if __name__ == "__main__":
    run_main(main)
