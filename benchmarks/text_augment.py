"""What each data-distillation technique adds: one student size, one low-resource training set, several seeds.

    python benchmarks/text_augment.py trec_minilm --seeds 3 --layers 2 --train-subset 1000

The teacher is fine-tuned once on the labelled subset; every variant then distils the same student from it,
adding one technique at a time to plain logit KD: token masking (noise injection), copies with words swapped
for neighbours in the teacher's embedding space, copies by random deletion and swap, and the whole training
file's texts, labels dropped, as unlabeled text for the teacher to pseudo-label. One augmented copy doubles
the steps of an epoch, so a control gives plain KD twice the epochs. Per seed, the variants share
one run folder, so the teacher and the no-distillation baseline are trained once and reused (stage reuse);
only the distilled student is retrained.
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
from distill.data.text import read_texts
from distill.pipeline.plan import with_seed
from text import KEEP  # benchmarks/text.py: the teacher layers a student of each depth keeps
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py



def held_out_removed(recipe: Recipe) -> list:
    """The training file's texts, less those that are validation texts of the labelled subset or test texts
    (TREC's training file repeats some test questions): the student must not learn the teacher's labels of
    the texts that pick its epoch or score it (distill refuses such a file)."""
    from distill.data import load_data
    from distill.data.augment_text import held_out_rows
    from distill.data.text import tokenize_file
    from distill.models.hf import load_tokenizer
    cfg = recipe["data"]
    texts, _ = read_texts(cfg["path"], cfg["text_column"], None)
    ids = tokenize_file(cfg["path"], cfg, load_tokenizer(cfg["tokenizer"], "data.tokenizer"), labelled=False)[0]
    held = set(held_out_rows(ids, load_data(cfg)))
    kept = [t for i, t in enumerate(texts) if i not in held]
    print(f"unlabeled texts: {len(kept)} of the {len(texts)} training texts ({len(texts) - len(kept)} are validation "
          f"or test texts)", file=sys.stderr)
    return kept


def variants(unlabeled: str, epochs: int) -> dict:
    return {"logit KD only": [],
            "+ token masking 15%": ["distill.data.mask=true"],
            "+ neighbour substitution (1 copy)": ["distill.data.substitute=1"],
            "+ deletion / swap (1 copy)": ["distill.data.eda=1"],
            "+ unlabeled texts, teacher pseudo-labels": [f"distill.data.unlabeled={unlabeled}"],
            # control: one augmented copy doubles the steps per epoch; this gives plain KD as many steps
            "logit KD only, twice the epochs (control)": [f"student.train.epochs={2 * epochs}"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--layers", type=int, default=2, choices=sorted(KEEP))
    p.add_argument("--train-subset", type=int, default=1000)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    skip_without_data(args.recipe)
    os.environ.setdefault("DISTILL_QUIET", "1")
    base_sets = [f"data.train_subset={args.train_subset}", f"student.from_teacher.layers={KEEP[args.layers]}",
                 *args.overrides]
    recipe = Recipe.load(args.recipe, base_sets)
    base = args.out or os.path.join("runs", "bench", recipe["name"] + "_augment")
    os.makedirs(base, exist_ok=True)
    unlabeled = os.path.join(base, "unlabeled.txt")  # the training file's texts, labels dropped, held-out ones left out
    texts = held_out_removed(recipe)
    with open(unlabeled, "w", encoding="utf-8") as fh:
        fh.write("\n".join(" ".join(t.split()) for t in texts) + "\n")
    t0 = time.perf_counter()
    seeds, teacher = list(range(args.seeds)), None
    acc: dict = {}
    scratch, teacher_acc, times = [], [], {}
    for seed in seeds:
        out = os.path.join(base, f"seed{seed}")
        for name, sets in variants(unlabeled, recipe["student"]["train"]["epochs"]).items():
            print(f"seed {seed}: {name}", file=sys.stderr, flush=True)
            extra = [f"teacher.hf={teacher}", "teacher.finetuned=true"] if teacher else []
            r = with_seed(Recipe.load(args.recipe, base_sets + sets + extra), seed)
            m = run(r, out, echo=lambda msg: None, overwrite=True)
            acc.setdefault(name, []).append(m["student"]["accuracy"])
            times.setdefault(name, []).append(m["student"]["train_time_s"])
            if not sets:  # the no-distillation baseline with the recipe's epochs
                scratch.append(m["student_scratch"]["accuracy"])
                teacher_acc.append(m["teacher"]["accuracy"])
        teacher = teacher or os.path.join(out, "teacher")
    wall = time.perf_counter() - t0

    def ms(v: list) -> str:
        a = 100 * np.asarray(v)
        return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"
    print(f"`python benchmarks/text_augment.py {' '.join(sys.argv[1:])}`\n")
    print("| student trained with | test accuracy % | vs logit KD only (points) | student train s |")
    print("|---|---|---|---|")
    print(f"| teacher (6 layers, for reference) | {ms(teacher_acc)} | | |")
    print(f"| no distillation (labelled subset only) | {ms(scratch)} | "
          f"{100 * (np.mean(scratch) - np.mean(acc['logit KD only'])):+.2f} | |")
    for name, v in acc.items():
        print(f"| {name} | {ms(v)} | {100 * (np.mean(v) - np.mean(acc['logit KD only'])):+.2f} | "
              f"{np.mean(times[name]):.0f} |")
    print(f"\n{args.layers}-layer student (teacher layers {KEEP[args.layers]}), {args.train_subset} labelled "
          f"training texts (stratified subset, of which 10% validation); seeds {seeds}; wall time {wall / 60:.1f} min "
          f"on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, torch {torch.__version__}).")
    return 0


if __name__ == "__main__":
    run_main(main)
