"""Does a teacher assistant help? Direct distillation (teacher -> student) against a chain through one
assistant of intermediate size (teacher -> auto TA -> student; Mirzadeh et al. 2020), over seeds, as Markdown.

    python benchmarks/assistants.py --seeds 3

Two setups: (a) the MNIST CNN pair of `mnist_cnn` (a 4x gap), (b) a deliberately large gap: the digits
teacher (87k parameters) and a tiny CNN student (conv4-fc8, 650 parameters). Per seed the recipe is run
once as it is (teacher, scratch student, directly distilled student), then again in the same folder with
`distill.assistants: auto`: the teacher and the scratch student are reused, the assistant is trained from
the teacher and the student from the assistant. Test accuracy is read once per model after selection on
validation; decay per generation comes from the run's chain.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from distill import Recipe, run
from distill.chain import PROBE
from distill.data import load_data
from distill.monitor import linear_cka
from distill.pipeline.artifacts import load_model_at, require_saved
from distill.pipeline.plan import with_seed
from distill.engine.inference import predict
from needs_data import run_main  # benchmarks/needs_data.py

# the per-step gradient-consistency probes only log; turned off to keep the benchmark within its time budget
COMMON = ["monitor.gradients=false"]
SETUPS = {
    "mnist": ("mnist_cnn", ["train.epochs=5"], "MNIST-10k, seed CNN pair (mnist_cnn), 5 epochs each"),
    "gap": ("digits_all_labels", ["student.args={channels: [4], hidden: 8}"],
            "digits, CNN teacher conv32-conv64-fc256 (40 epochs) -> tiny CNN student conv4-fc8 (100 epochs)"),
}


def stat(a, fmt=".2f") -> str:
    a = np.asarray(a, dtype=float)
    return f"{a.mean():{fmt}} ± {a.std(ddof=1):{fmt}}" if len(a) > 1 else f"{a.mean():{fmt}}"


def one_seed(recipe: str, sets: list, seed: int, out: str) -> dict:
    """Direct, then via the auto assistant, in one folder (teacher and scratch student trained once)."""
    quiet = lambda m: None  # noqa: E731
    r = with_seed(Recipe.load(recipe, [*COMMON, *sets]), seed)
    direct = run(r, out, echo=quiet, overwrite=True)
    probe = load_data(r.cfg["data"]).x_val[:PROBE]  # retention of the direct student, as chain.json measures it
    t, s = (predict(load_model_at(require_saved(out, n), n), probe) for n in ("teacher", "student"))
    direct["student"]["retention_cka"] = linear_cka(t, s)
    via = run(with_seed(Recipe.load(recipe, [*COMMON, *sets, "distill.assistants=auto"]), seed), out, echo=quiet,
              overwrite=True)
    with open(os.path.join(out, "chain.json")) as fh:
        chain = json.load(fh)
    return {"teacher": direct["teacher"], "scratch": direct["student_scratch"], "direct": direct["student"],
            "ta": via["assistant_1"], "via": via["student"], "chain": chain}


def table(name: str, rows: list, seeds: list) -> None:
    recipe, _, what = SETUPS[name]
    acc = lambda key: [r[key]["accuracy"] * 100 for r in rows]  # noqa: E731
    print(f"### {what}\n")
    print("| model | params | test accuracy % |")
    print("|---|---|---|")
    for key, label in (("teacher", "teacher"), ("scratch", "student, no distillation"),
                       ("direct", "student, distilled directly"), ("ta", "teacher assistant (auto), distilled"),
                       ("via", "student, distilled via the assistant")):
        print(f"| {label} | {rows[0][key]['params']:,} | {stat(acc(key))} |")
    delta = np.asarray(acc("via")) - np.asarray(acc("direct"))
    print(f"\nvia TA - direct: {stat(delta)} points (per seed: {', '.join(f'{d:+.2f}' for d in delta)}); "
          f"teacher/student parameters {rows[0]['teacher']['params'] / rows[0]['direct']['params']:.1f}x; "
          f"seeds {seeds}.\n")
    print("| chain link | test accuracy drop (points) | decay rate % | retention CKA (logits vs teacher) after |")
    print("|---|---|---|---|")
    for j, link in enumerate(rows[0]["chain"]["decay"]):
        drops = [r["chain"]["decay"][j]["accuracy_drop"] for r in rows]
        rates = [r["chain"]["decay"][j]["decay_rate"] * 100 for r in rows]
        cka = [r["chain"]["generations"][j + 1]["retention_cka"] for r in rows]
        print(f"| {link['from']} -> {link['to']} | {stat(drops)} | {stat(rates)} | {stat(cka, '.3f')} |")
    direct_drop = np.asarray(acc("teacher")) - np.asarray(acc("direct"))
    print(f"| teacher -> student (direct) | {stat(direct_drop)} | "
          f"{stat(direct_drop / np.asarray(acc('teacher')) * 100)} | "
          f"{stat([r['direct']['retention_cka'] for r in rows], '.3f')} |\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = p.parse_args()
    os.environ.setdefault("DISTILL_QUIET", "1")
    t0 = time.perf_counter()
    seeds = list(range(args.seeds))
    print(f"`python benchmarks/assistants.py {' '.join(sys.argv[1:])}`\n")
    for name in args.setups:
        recipe, sets, _ = SETUPS[name]
        rows = [one_seed(recipe, sets, s, os.path.join("runs", "bench", "assistants", name, f"seed_{s}"))
                for s in seeds]
        table(name, rows, seeds)
        sys.stdout.flush()
    print(f"Wall time {(time.perf_counter() - t0) / 60:.1f} min on 2 shared CPU cores; settings for every run: "
          f"{' '.join(COMMON)}.")
    return 0


if __name__ == "__main__":
    run_main(main)
