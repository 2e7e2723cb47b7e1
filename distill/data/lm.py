"""Language-modelling data from a plain UTF-8 text file (`data.dataset: text_lm`), character by character.

The tokenizer is the file's sorted set of characters (saved with each model as its class names, so a
checkpoint decodes its own outputs). The text is split in order, never shuffled across the cut: the first
1 - val_fraction - test_fraction for training, then validation, then test (nanoGPT's split of tiny
Shakespeare is the first 90% / last 10%). Each split is cut into windows of `data.max_length` + 1
characters, one window a sample: the input is its first `max_length` characters and the target the same
shifted by one, so the loss at position i scores the prediction of character i + 1 from characters 0..i.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List

import numpy as np
import torch

from ..errors import UserError
from .datasets import BUNDLES, DataBundle, read_text_file


def char_vocabulary(text: str) -> List[str]:
    return sorted(set(text))


def windows(ids: np.ndarray, length: int) -> tuple:
    """(inputs, next-token targets) of every whole window of `length` + 1 ids, windows overlapping by one."""
    n = max((len(ids) - 1) // length, 0)
    x = np.stack([ids[i * length:(i + 1) * length] for i in range(n)]) if n else np.zeros((0, length), np.int64)
    y = np.stack([ids[i * length + 1:(i + 1) * length + 1] for i in range(n)]) if n else x
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))


def load_lm(cfg: Dict[str, Any]) -> DataBundle:
    path, length = cfg["path"], cfg["max_length"]
    if not path:
        raise UserError("data.path: text_lm needs a plain UTF-8 text file, e.g. ../shared/data/tinyshakespeare/input.txt")
    text = read_text_file(path, lambda fh: fh.read())
    vocab = char_vocabulary(text)
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))
    n_val, n_test = int(len(ids) * cfg["val_fraction"]), int(len(ids) * cfg["test_fraction"])
    cut = len(ids) - n_val - n_test
    parts = [windows(a, length) for a in (ids[:cut], ids[cut:cut + n_val], ids[cut + n_val:])]
    for (x, _), name, key in zip(parts, ("training", "validation", "test"), ("", "val_fraction", "test_fraction")):
        if len(x) < (2 if name == "training" else 1) and (name == "training" or cfg[key] > 0):
            raise UserError(f"{path}: the {name} split holds fewer than {'two windows' if name == 'training' else 'one window'} "
                            f"of data.max_length + 1 = {length + 1} characters; use a longer text or a shorter "
                            f"max_length")
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
    h = hashlib.sha256(json.dumps({k: v for k, v in cfg.items() if k not in ("workers", "eval_batch_size")},
                                  sort_keys=True, default=str).encode())
    h.update(ids.tobytes())
    return DataBundle(x_tr, y_tr, x_va, y_va, x_te, y_te, len(vocab), vocab, (length,), False, h.hexdigest()[:16],
                      task="causal_lm")


BUNDLES["text_lm"] = load_lm
