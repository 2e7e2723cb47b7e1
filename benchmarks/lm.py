"""Token-level distillation of a character GPT, every divergence side by side at equal steps.

    python benchmarks/lm.py shakespeare_gpt --seeds 3

The teacher is trained once (`distill train-teacher`); then each arm trains the same student from the same
initialisation for the same steps, from a copy of that folder: the student without distillation (cross-
entropy only); distilled with forward KL, reverse KL and JSD(0.5) (alpha 0.5, T = 1, the teacher's logits
from the cache); and sequence-level KD: trained with cross-entropy alone on as many windows as the training
text has, each written by the teacher (temperature 1) after the first 8 characters of a training window; and
the two combined (Kim & Rush's sequence- plus word-level KD): the same teacher-written windows, cross-entropy
on the teacher's tokens and forward KL to its logits there, alpha 0.5; and TRL's `seq_kd` (GKDTrainer: the
teacher writes the sequences, the student learns them by the generalized JSD alone, beta 0.5, TRL's default),
the same windows with JSD(0.5) and no cross-entropy. Each model keeps its epoch of lowest
validation loss; the test split is read once. `--arms 0,5` runs only those arms (0, the scratch student, is
always run: the others are compared with it; it is trained in the same run as arm 1, forward KL).
Prints a Markdown table (test bits per character, perplexity, next-character accuracy, parameters, train
time) and a sample of each model's text (the same prompt, temperature 0.8, the same seed). Bits per character
score a model on the real text; the last two columns score what it writes: each model continues the first 8
characters of 256 test windows by 120 characters at temperature 1, and the teacher's bits per character on
that text, minus the model's own (its entropy), estimate the sequence-level reverse KL from the model to the
teacher per character (what MiniLLM minimises): how far what the model writes is from what the teacher would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

from distill import Recipe
from distill.data import load_data
from distill.io import load_meta
from distill.pipeline.artifacts import load_model_at
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py

ARMS = (("student, no distillation", "student_scratch", []), ("forward KL", "student", ["distill.method=forward_kl"]),
        ("reverse KL", "student", ["distill.method=reverse_kl"]),
        ("JSD(0.5)", "student", ["distill.method=jsd", "distill.jsd.beta=0.5"]),
        ("seq-KD: trained on teacher-written text", "student", ["distill.alpha=0", "distill.sequence_kd.windows=WINDOWS"]),
        ("seq-KD + forward KL on the teacher-written text", "student",
         ["distill.method=forward_kl", "distill.alpha=0.5", "distill.sequence_kd.windows=WINDOWS"]),
        ("seq-KD the TRL way: JSD(0.5) alone on the teacher-written text", "student",
         ["distill.method=jsd", "distill.jsd.beta=0.5", "distill.alpha=1", "distill.sequence_kd.windows=WINDOWS"]))
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


def written(teacher, model, prompts: torch.Tensor, n: int = 120) -> tuple:
    """(The teacher's bits/char, the model's own bits/char) on `n` characters the model writes at temperature 1
    after each of `prompts`; their difference estimates KL(model || teacher) per character. (Fewer characters
    when the models' context is shorter than the prompt and `n`: both read the text whole.)"""
    n = min(n, min(teacher.context, model.context) - prompts.shape[1])
    ids = model.generate(prompts, n, 1.0, torch.Generator().manual_seed(0))
    k = prompts.shape[1]
    with torch.no_grad():
        bits = [torch.nn.functional.cross_entropy(m(ids)[:, k - 1:-1].flatten(0, 1).float(), ids[:, k:].flatten())
                .item() / math.log(2) for m in (teacher, model)]
    return bits[0], bits[1]


def arms(args, base: str, root: str, seed: int, windows: str) -> list:
    """Every arm once for this student seed: [(label, metrics, folder, model name)]. The scratch arm's run also
    trains the forward-KL student beside it (the scratch stage does not read distill.*), which is arm 1."""
    out, runs = [], {}
    for i in args.arms:
        label, model, _ = ARMS[i]
        run = 1 if i in (0, 1) else i
        extra = [e.replace("WINDOWS", windows) for e in ARMS[run][2]] + [f"student.train.seed={seed}"]
        work = os.path.join(root, f"arm_{run}_seed{seed}")
        if run not in runs:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(base, work)
            baseline = [] if run == 1 else ["--no-baseline"]  # (arm 0 is always run: its student_scratch)
            distill("train-student", work, "--overwrite", *baseline, *sets([*args.sets, *extra]))
            distill("evaluate", work, "--overwrite", *baseline, *sets([*args.sets, *extra]))
            runs[run] = json.load(open(os.path.join(work, "metrics.json")))
        metrics = runs[run]
        student = load_model_at(os.path.join(work, f"{model}.safetensors"), model).eval()
        metrics[model]["judged"], metrics[model]["own"] = written(args.teacher, student, args.prompts)
        out.append((label, metrics[model], work, model, metrics["teacher"]))
        print(f"seed {seed} {label}: {metrics[model]['bpc']:.4f} bits/char", file=sys.stderr)
    return out


def mean_std(values: list) -> str:
    return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, default=1, help="student seeds 0..N-1 (the teacher is trained once)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--root", default=os.path.join("runs", "bench", "lm"))
    p.add_argument("--arms", default=",".join(map(str, range(len(ARMS)))),
                   help="comma-separated arm numbers (0: no distillation, always run)")
    args = p.parse_args()
    skip_without_data(args.recipe, sets=args.sets)
    try:
        args.arms = sorted({0, *(int(a) for a in args.arms.split(","))})
    except ValueError:
        p.error(f"--arms: comma-separated numbers, not {args.arms!r}")
    if not all(0 <= a < len(ARMS) for a in args.arms):
        p.error(f"--arms: numbers from 0 to {len(ARMS) - 1}")
    root, t0 = os.path.join(args.root, args.recipe), time.perf_counter()
    base = os.path.join(root, "teacher_run")
    distill("train-teacher", args.recipe, "--out", base, *sets(args.sets))
    data = load_data(Recipe.load(args.recipe, args.sets).cfg["data"])
    windows = str(len(data.x_train))  # seq-KD: equal steps
    args.prompts = data.x_test[torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(0))[:256], :8]
    args.teacher = load_model_at(os.path.join(base, "teacher.safetensors"), "teacher").eval()
    runs = {s: arms(args, base, root, s, windows) for s in range(args.seeds)}
    teacher = runs[0][0][4]
    teacher["judged"], teacher["own"] = written(args.teacher, args.teacher, args.prompts)
    print(f"`python benchmarks/lm.py {' '.join(sys.argv[1:])}`\n")
    print("| model | test bits/char | perplexity | next-char accuracy % | params | train s | below scratch | "
          "its text: teacher's bits/char | its text: KL to the teacher, bits/char |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| teacher | {teacher['bpc']:.4f} | {teacher['perplexity']:.3f} | {teacher['accuracy'] * 100:.2f} | "
          f"{teacher['params']:,} | {teacher.get('train_time_s', 0):.0f} | | {teacher['judged']:.4f} | 0 |")
    for j, i in enumerate(args.arms):
        label, ms = ARMS[i][0], [runs[s][j][1] for s in runs]
        below = sum(runs[s][j][1]["bpc"] < runs[s][0][1]["bpc"] for s in runs)
        print(f"| {label} | {mean_std([m['bpc'] for m in ms])} | {mean_std([m['perplexity'] for m in ms])} | "
              f"{mean_std([m['accuracy'] * 100 for m in ms])} | {ms[0]['params']:,} | "
              f"{statistics.mean(m.get('train_time_s', 0) for m in ms):.0f} | "
              f"{'' if i == 0 else f'{below}/{len(ms)}'} | {mean_std([m['judged'] for m in ms])} | "
              f"{mean_std([m['judged'] - m['own'] for m in ms])} |")
    print(f"\nWall time {(time.perf_counter() - t0) / 60:.1f} min on {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__}); student seeds "
          f"{list(runs)}, mean ± std; the teacher trained once (seed 0).\n")
    print(f"**teacher** (prompt `ROMEO:`, temperature 0.8, seed 0):\n\n```\n{sample(base, 'teacher')}\n```\n")
    for label, _m, work, model, _t in runs[0]:
        print(f"**{label}** (student seed 0):\n\n```\n{sample(work, model)}\n```\n")


if __name__ == "__main__":
    run_main(main)
