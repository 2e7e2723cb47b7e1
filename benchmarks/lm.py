"""Token-level distillation of a character GPT, every divergence side by side at equal steps.

    python benchmarks/lm.py shakespeare_gpt

The teacher is trained once (`distill train-teacher`); then each arm trains the same student from the same
initialisation for the same steps, from a copy of that folder: the student without distillation (cross-
entropy only), and distilled with forward KL, reverse KL and JSD(0.5) (alpha 0.5, T = 1, the teacher's
logits from the cache). Each model keeps its epoch of lowest validation loss; the test split is read once.
Prints a Markdown table (test bits per character, perplexity, next-character accuracy, parameters, train
time) and a sample of each model's text (the same prompt, temperature 0.8, the same seed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

from distill.io import load_meta
from distill.pipeline.artifacts import load_model_at

ARMS = (("student, no distillation", "student_scratch", []), ("forward KL", "student", ["distill.method=forward_kl"]),
        ("reverse KL", "student", ["distill.method=reverse_kl"]),
        ("JSD(0.5)", "student", ["distill.method=jsd", "distill.jsd.beta=0.5"]))
PROMPT = "ROMEO:\n"


def distill(*args: str) -> None:
    env = {**os.environ, "DISTILL_QUIET": "1"}
    subprocess.run([sys.executable, "-m", "distill", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def sets(values) -> list:
    return [a for v in values for a in ("--set", v)]


def sample(folder: str, name: str, n: int = 200) -> str:
    """`n` characters the model writes after PROMPT (its vocabulary is the class names saved with it)."""
    path = os.path.join(folder, f"{name}.safetensors")
    model, vocab = load_model_at(path, name), load_meta(path)["class_names"]
    ids = torch.tensor([[vocab.index(c) for c in PROMPT]])
    out = model.generate(ids, n, temperature=0.8, generator=torch.Generator().manual_seed(0))
    return "".join(vocab[i] for i in out[0].tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--root", default=os.path.join("runs", "bench", "lm"))
    args = p.parse_args()
    root, t0 = os.path.join(args.root, args.recipe), time.perf_counter()
    base = os.path.join(root, "teacher_run")
    distill("train-teacher", args.recipe, "--out", base, *sets(args.sets))
    rows, samples = [], {"teacher": sample(base, "teacher")}
    for i, (label, model, extra) in enumerate(ARMS):
        work = os.path.join(root, f"arm_{i}")
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work)
        baseline = [] if model == "student_scratch" else ["--no-baseline"]
        distill("train-student", work, "--overwrite", *baseline, *sets([*args.sets, *extra]))
        distill("evaluate", work, "--overwrite", *baseline, *sets([*args.sets, *extra]))
        metrics = json.load(open(os.path.join(work, "metrics.json")))
        if i == 0:
            rows.append(("teacher", metrics["teacher"]))
        rows.append((label, metrics[model]))
        samples[label] = sample(work, model)
        print(f"{label}: {metrics[model]['bpc']:.4f} bits/char", file=sys.stderr)
    print(f"`python benchmarks/lm.py {' '.join(sys.argv[1:])}`\n")
    print("| model | test bits/char | perplexity | next-char accuracy % | params | selected epoch | train s |")
    print("|---|---|---|---|---|---|---|")
    for label, m in rows:
        print(f"| {label} | {m['bpc']:.4f} | {m['perplexity']:.3f} | {m['accuracy'] * 100:.2f} | {m['params']:,} | "
              f"{m.get('selected_epoch', '')} | {m.get('train_time_s', 0):.0f} |")
    print(f"\nWall time {(time.perf_counter() - t0) / 60:.1f} min on {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__}); one seed.\n")
    for label, text in samples.items():
        print(f"**{label}** (prompt `ROMEO:`, temperature 0.8, seed 0):\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
