"""The method zoo side by side: scratch, KD, every logit and feature method, and KD + the best feature method.

    python benchmarks/methods.py --seeds 3 --epochs 30

One teacher for every method and seed, trained once (the recipe's, with its augmentation) and then loaded
from its checkpoint, as mdistiller and RepDistiller do. Every student gets the same architecture, epochs,
optimizer and data; augmentation is off for the students, so that the teacher's logits *and* features come
from the soft-label cache (the teacher is not run while students train). Feature methods are trained with
cross-entropy plus their term (alpha 0, RepDistiller's `-a 0`), logit methods with alpha 0.9 and T 4.
"KD + best feature" adds the feature method with the best mean *validation* accuracy to KD. Test accuracy is
read once per model, mean ± std over the seeds. The published column is the CIFAR-100 resnet32x4 -> resnet8x4
row of RepDistiller's and mdistiller's READMEs, a reference for the ranking, not a claim of reproduction.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

from distill import Recipe, run
from distill.pipeline.plan import execute, with_seed
from distill.pipeline.rundir import RunDir
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py

# CIFAR-100 resnet32x4 -> resnet8x4: RepDistiller README (student, KD, FitNet, AT, SP, RKD, PKT, CRD) and
# mdistiller README (DKD). DIST and logit standardisation are in neither table.
PUBLISHED = {"scratch": 72.50, "KD": 73.33, "FitNet (mse)": 73.50, "AT": 73.44, "SP": 72.94, "RKD": 71.90,
             "PKT": 73.64, "CRD": 75.51, "DKD": 76.32}


def feature(student: str, teacher: str, loss: str, weight: float, **extra: str) -> List[str]:
    entry = ", ".join([f"student: {student}", f"teacher: {teacher}", f"loss: {loss}", f"weight: {weight}",
                       *(f"{k}: {v}" for k, v in extra.items())])
    return [f"distill.features=[{{{entry}}}]"]


def methods(epochs: int, batch: int) -> Dict[str, List[str]]:
    """Overrides per method. Layers of the seed CNN pair: body.5 is the last conv block's output (student
    32x8x8, teacher 64x8x8), body.8 the penultimate vector (256, 512). Weights: RepDistiller's, converted where
    our formula's scale differs (PKT: theirs averages over the b x b pairs, ours sums over one anchor's; AT:
    theirs is the squared difference per element over four layer pairs, ours the per-sample norm of one)."""
    warm = max(1, round(20 * epochs / 240))  # DKD's 20-of-240-epoch warm-up, at this length
    dkd = ["distill.method=dkd", f"distill.dkd.warmup_epochs={warm}"]
    alone = ["distill.alpha=0"]
    return {
        "KD": [],
        "DKD": dkd,
        "DIST": ["distill.method=dist", "distill.dist.beta=2", "distill.dist.gamma=2"],
        "KD + logit std": ["distill.logit_standardize=true"],
        "DKD + logit std": dkd + ["distill.logit_standardize=true"],
        "FitNet (mse)": alone + feature("body.5", "body.5", "mse", 100),
        "AT": alone + feature("body.5", "body.5", "at", 10),
        "PKT": alone + feature("body.8", "body.8", "pkt", round(30000 / batch, 1)),
        "RKD": alone + feature("body.8", "body.8", "rkd", 25),
        "SP": alone + feature("body.5", "body.5", "sp", 3000),
        "CRD": alone + feature("body.8", "body.8", "crd", 0.8),
    }


FEATURE_METHODS = ("FitNet (mse)", "AT", "PKT", "RKD", "SP", "CRD")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="cifar10_cnn")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30, help="student epochs (every method)")
    p.add_argument("--out", default=os.path.join("runs", "bench", "methods"))
    args = p.parse_args()
    skip_without_data(args.recipe)
    t_start = time.perf_counter()
    base = Recipe.load(args.recipe)
    teacher_dir = os.path.join(args.out, "teacher")
    execute(RunDir(base, teacher_dir, echo=lambda m: None, resume=True), ["teacher"])
    with open(os.path.join(teacher_dir, "stages.json"), encoding="utf-8") as fh:
        teacher_s = json.load(fh)["teacher"]["train_time_s"]  # (when it was trained: a re-run reuses it)
    common = [f"teacher.checkpoint={os.path.join(teacher_dir, 'teacher.safetensors')}",
              "data.transforms.random_crop=0", "data.transforms.hflip=false", f"train.epochs={args.epochs}",
              "distill.teacher_outputs=cached", "monitor=off"]
    batch = base["data"]["batch_size"]
    table = methods(args.epochs, batch)
    results: Dict[str, List[Dict[str, float]]] = {}

    def trial(name: str, overrides: List[str], seed: int) -> None:
        recipe = with_seed(Recipe.load(args.recipe, common + overrides + ([] if name == "KD" else
                                                                          ["baseline=false"])), seed)
        folder = os.path.join(args.out, name.replace(" ", "_").replace("(", "").replace(")", ""), f"seed_{seed}")
        t0 = time.perf_counter()
        metrics = run(recipe, folder, echo=lambda m: None, resume=True)
        with open(os.path.join(folder, "stages.json"), encoding="utf-8") as fh:
            stages = json.load(fh)
        rows = [("teacher", "teacher"), ("scratch", "student_scratch")] if name == "KD" else []
        for label, key in rows + [(name, "student")]:
            info = stages.get(key, {})
            results.setdefault(label, []).append({"test": 100 * metrics[key]["accuracy"],
                                                  "val": 100 * info.get("val_accuracy", float("nan")),
                                                  "train_s": info.get("train_time_s", float("nan"))})
        print(f"{name} seed {seed}: test {100 * metrics['student']['accuracy']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    for seed in range(args.seeds):
        for name, overrides in table.items():
            trial(name, overrides, seed)
    best = max(FEATURE_METHODS, key=lambda m: statistics.mean(r["val"] for r in results[m]))
    combined = f"KD + {best}"
    for seed in range(args.seeds):
        trial(combined, [o for o in table[best] if o != "distill.alpha=0"], seed)

    def ms(name: str, key: str) -> str:
        v = [r[key] for r in results[name]]
        if any(x != x for x in v):  # NaN: not recorded (the loaded teacher's stage has no validation)
            return "-"
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"
    order = ["teacher"] + sorted((m for m in results if m != "teacher"),
                                 key=lambda m: -statistics.mean(r["test"] for r in results[m]))
    pub = sorted(PUBLISHED, key=lambda m: -PUBLISHED[m])
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"`{command}` (teacher: {base['teacher'].get('model') or 'the recipe teacher'}, trained once, "
          f"{teacher_s:.0f} s; {args.seeds} seeds; student epochs {args.epochs}; wall time of this invocation "
          f"{(time.perf_counter() - t_start) / 60:.1f} min, finished stages of an earlier one reused)\n")
    print("| rank | method | test accuracy % | validation accuracy % | train s | published rank "
          "(CIFAR-100, resnet32x4 -> resnet8x4) |\n|---|---|---|---|---|---|")
    for i, name in enumerate(order):
        ref = name if name in PUBLISHED else None
        published = f"{pub.index(ref) + 1} of {len(pub)} ({PUBLISHED[ref]:.2f})" if ref else "not in the tables"
        train_s = f"{teacher_s:.1f}" if name == "teacher" else ms(name, "train_s").split(" ")[0]
        rank = i if name != "teacher" else "-"
        print(f"| {rank} | {name} | {ms(name, 'test')} | {ms(name, 'val')} | {train_s} | {published} |")
    shared = [m for m in order if m in PUBLISHED]  # Spearman's rho between the two orders of the shared ones
    ours = {m: i for i, m in enumerate(shared)}
    theirs = {m: i for i, m in enumerate(sorted(shared, key=lambda m: -PUBLISHED[m]))}
    n = len(shared)
    rho = 1 - 6 * sum((ours[m] - theirs[m]) ** 2 for m in shared) / (n * (n * n - 1))
    print(f"\nbest feature method on validation: {best}; rank correlation (Spearman) with the published order "
          f"over the {n} methods in both: {rho:.2f}")
    return 0


if __name__ == "__main__":
    run_main(main)
