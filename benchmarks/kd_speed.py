"""Cost of distillation per epoch, as ratios measured side by side in one process.

    python benchmarks/kd_speed.py mnist_cnn --repeats 3

Times one training epoch (validation excluded) of: the student alone (cross-entropy), the student with
cached soft labels, and the student with the teacher run online; and one teacher inference pass over the
same batches. Configurations are interleaved and each repeated, and medians are compared, so that a noisy
machine moves all of them alike. Targets: cached <= 1.15x student-only; online <= 1.10x (student-only +
teacher pass).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from distill import Recipe, RunDir
from distill.runner import teacher_source, build_role, train_teacher
from distill.softlabels import teacher_forward
from distill.train import Objective, batches, fit


def epoch_time(rd: RunDir, objective: Objective) -> float:
    tcfg = {**rd.cfg["student"]["train"], "epochs": 1}
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as fh:
        log = fh.name
    try:
        fit("bench", objective, rd.data, rd.cfg["data"], tcfg, log)
        with open(log) as fh:
            return json.loads(fh.readline())["train_time_s"]
    finally:
        os.remove(log)


def teacher_pass(rd: RunDir, teacher: torch.nn.Module) -> float:
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for idx in batches(len(rd.data.y_train), rd.cfg["data"]["batch_size"], gen):
        teacher_forward(teacher, rd.data.x_train[idx])
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    recipe = Recipe.load(args.recipe, args.overrides + ["data.transforms.random_crop=0",
                                                        "data.transforms.hflip=false"])
    rd = RunDir(recipe, os.path.join("runs", "bench", f"speed_{recipe['name']}"), echo=lambda m: None)
    teacher = train_teacher(rd)
    sources = {"cached": teacher_source(rd, teacher, "cached"), "online": teacher_source(rd, teacher, "online")}
    times: dict = {k: [] for k in ("student only", "KD, cached soft labels", "KD, online teacher", "teacher pass")}
    dcfg = rd.cfg["distill"]
    for _ in range(args.repeats):
        times["student only"].append(epoch_time(rd, Objective(build_role(rd, "student"))))
        times["KD, cached soft labels"].append(epoch_time(rd, Objective(build_role(rd, "student"), dcfg,
                                                                        sources["cached"])))
        times["KD, online teacher"].append(epoch_time(rd, Objective(build_role(rd, "student"), dcfg,
                                                                    sources["online"])))
        times["teacher pass"].append(teacher_pass(rd, teacher))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["student only"]
    cached = med["KD, cached soft labels"] / base
    online = med["KD, online teacher"] / (base + med["teacher pass"])
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"`{command}` ({len(rd.data.y_train)} training samples, batch {rd.cfg['data']['batch_size']}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats})\n")
    print("| epoch of | relative to student-only epoch |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v / base:.3f}x |")
    print(f"\ncached KD / student-only = **{cached:.3f}** (target <= 1.15: {'met' if cached <= 1.15 else 'NOT met'}); "
          f"online KD / (student-only + teacher pass) = **{online:.3f}** "
          f"(target <= 1.10: {'met' if online <= 1.10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
