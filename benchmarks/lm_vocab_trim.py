"""Does a causal LM's trimmed vocabulary (`distill compress RUN --set 'compress.steps=[vocab]'`) change what
it writes? Greedy completions of the run's test prompts by the distilled student and by compress/vocab, side
by side: how many are token for token the same, the exact match of each, and the test tokens outside the
kept vocabulary.

    python benchmarks/lm_vocab_trim.py RUN_DIR      (after distill compress RUN_DIR --set 'compress.steps=[vocab]')
"""
from __future__ import annotations

import argparse
import json
import os
import time

import yaml

from distill.data import load_data
from distill.models.hf import load_tokenizer
from distill.pipeline.artifacts import load_model_at, require_run_folder, require_saved
from distill.tasks.causal_lm import greedy_completions, prompts_and_answers, score_completions
from needs_data import run_main  # benchmarks/needs_data.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    a = p.parse_args()
    require_run_folder(a.run)
    cfg = yaml.safe_load(open(os.path.join(a.run, "recipe.yaml")))
    data = load_data(cfg["data"])
    tok = load_tokenizer(cfg["data"]["tokenizer"], "data.tokenizer")
    em = cfg["evaluate"]["exact_match"]
    prompts, answers = prompts_and_answers(data.x_test[:em["rows"]], data.y_test[:em["rows"]])
    result = {}
    for name in ("student", "compress/vocab"):
        model = load_model_at(require_saved(a.run, name), name)
        t0 = time.perf_counter()
        outs = greedy_completions(model, prompts, em["max_new_tokens"])
        result[name] = {"completions": outs, "decode_tokens_per_s": sum(map(len, outs)) / (time.perf_counter() - t0),
                        "exact_match": score_completions(tok, prompts, outs, answers, em)["exact_match"]}
    same = sum(a == b for a, b in zip(result["student"]["completions"], result["compress/vocab"]["completions"]))
    step = json.load(open(os.path.join(a.run, "compress", "compress.json")))["models"][-1]
    print(f"test prompts: {len(prompts)}; greedy completions token for token the same: {same}")
    for name, r in result.items():
        print(f"{name}: exact match {r['exact_match']:.4f}, {r['decode_tokens_per_s']:.1f} tokens/s (batch 8, "
              f"this script's own loop)")
    print(f"vocabulary {step['vocab_before']:,} -> {step['vocab_after']:,}; test tokens outside it: "
          f"{step.get('test_tokens_outside', 'not recorded')}")


if __name__ == "__main__":
    run_main(main)
