"""Text distillation benchmark: a fine-tuned MiniLM-L6 teacher and students of 3, 2 and 1 layers copied from
it, each trained with and without distillation over several seeds, as a Markdown table.

    python benchmarks/text.py trec_minilm --seeds 3
    python benchmarks/text.py sst2_minilm --seeds 3

The teacher is fine-tuned once (seed 0) and then loaded, not retrained, by every other run, so all students
distil the same teacher. Each (layers, seed) is one `distill run` folder under runs/bench/<recipe>/; the
no-distillation student and the distilled one start from the same copied weights. Models are selected on the
validation split and the test split is read once per model. Latency (batch 1, one thread, a text of median
length) and throughput (batch 32) of the teacher and students are measured in the same process, so the
speed-ups are same-run ratios.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

from distill import Recipe, run
from distill.pipeline.plan import with_seed
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py

# Which teacher layers a student of each depth keeps (spread over the stack; DistilBERT's initialisation).
KEEP = {3: [0, 2, 4], 2: [0, 3], 1: [0]}


def one(recipe: Recipe, out: str, layers: int, seed: int, teacher: str | None, extra: list) -> dict:
    sets = [f"student.from_teacher.layers={KEEP[layers]}", *extra]
    if teacher:
        sets += [f"teacher.hf={teacher}", "teacher.finetuned=true"]
    r = with_seed(Recipe.load(recipe.source, sets), seed)
    return run(r, out, echo=lambda m: None)


def stat(values: list, scale: float = 1.0, fmt: str = ".2f", std: bool = True) -> str:
    a = np.asarray(values, dtype=float) * scale
    return f"{a.mean():{fmt}}" + (f" ± {a.std(ddof=1):{fmt}}" if std and len(a) > 1 else "")


def table(results: dict, seeds: list) -> str:
    head = ["model", "layers", "test accuracy %", "retention % of teacher", "params", "size MB",
            "ms / text (batch 1)", "speed-up vs teacher", "texts / s (batch 32)", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    first = results[next(iter(results))]
    t_acc = [m["teacher"]["accuracy"] for m in first]
    t = first[0]["teacher"]
    lines.append(f"| teacher (MiniLM-L6, fine-tuned) | 6 | {stat(t_acc, 100)} | 100 | {t['params']:,} | "
                 f"{t['size_bytes'] / 2**20:.1f} | {stat([m['teacher']['latency_ms'] for m in first], fmt='.2f')} | "
                 f"1.00 | {stat([m['teacher']['throughput'] for m in first], fmt=',.0f')} | "
                 f"{t.get('train_time_s', 0):.0f} |")
    for layers, ms in results.items():
        for key, label in (("student_scratch", "student, no distillation"), ("student", "student, distilled")):
            acc = [m[key]["accuracy"] for m in ms]
            keep = [m[key]["accuracy"] / m["teacher"]["accuracy"] for m in ms]
            speed = [m["teacher"]["latency_ms"] / m[key]["latency_ms"] for m in ms]
            s = ms[0][key]
            lines.append(f"| {label} | {layers} | {stat(acc, 100)} | {stat(keep, 100, '.1f')} | {s['params']:,} | "
                         f"{s['size_bytes'] / 2**20:.1f} | {stat([m[key]['latency_ms'] for m in ms])} | "
                         f"{stat(speed, fmt='.2f')} | {stat([m[key]['throughput'] for m in ms], fmt=',.0f')} | "
                         f"{stat([m[key]['train_time_s'] for m in ms], fmt='.0f', std=False)} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 2, 1], choices=sorted(KEEP))
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    skip_without_data(args.recipe, sets=args.overrides)
    os.environ.setdefault("DISTILL_QUIET", "1")
    recipe = Recipe.load(args.recipe, args.overrides)
    base = args.out or os.path.join("runs", "bench", recipe["name"])
    t0 = time.perf_counter()
    seeds = list(range(args.seeds))
    results: dict = {}
    teacher = None
    for layers in args.layers:
        for seed in seeds:
            out = os.path.join(base, f"L{layers}_seed{seed}")
            print(f"{layers} layers, seed {seed} -> {out}", file=sys.stderr, flush=True)
            results.setdefault(layers, []).append(one(recipe, out, layers, seed, teacher, args.overrides))
            teacher = teacher or os.path.join(out, "teacher")  # fine-tuned once, then loaded
    wall = time.perf_counter() - t0
    cmd = "python benchmarks/text.py " + " ".join(sys.argv[1:])
    print(f"`{cmd}`\n")
    print(table(results, seeds))
    print(f"\nSeeds {seeds}; teacher fine-tuned once ({teacher}); wall time {wall / 60:.1f} min on {os.cpu_count()} "
          f"CPU cores ({platform.processor() or platform.machine()}, torch {torch.__version__}).")
    return 0


if __name__ == "__main__":
    run_main(main)
