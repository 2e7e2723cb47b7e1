"""Prompt/completion data for causal language models (`data.dataset: completions`), tokenised once and cached.

Each JSONL row is either {prompt, completion} (column names `data.prompt_column`, `data.completion_column`),
or {messages: [{role, content}, ...]} whose last message is the assistant's completion and the rest the
prompt, rendered with the tokenizer's chat template (`data.chat_template: true` renders a plain prompt as a
user turn the same way). The completion is followed by EOS: a tuned model otherwise runs on past its answer.

A row becomes one sequence, prompt then completion, stored shifted: the input is every token but the last,
the target every token but the first, so the logits at position t score token t + 1. Targets on the prompt
and on the padding are -100: the loss counts completion tokens only (TRL's completion-only loss). Sequences
are padded on the right with the pad id to the longest one; batches are bucketed by length.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from ..errors import UserError
from ..io import atomic_path, sha256_file, sha256_json
from ..models.hf import load_tokenizer, pad_id, tokenizer_hash
from .datasets import BUNDLES, DataBundle, read_text_file
from .text import _jsonl_rows

IGNORE = -100  # the target of a position that no loss counts (prompt, padding)


def _rows(path: str) -> List[Dict[str, Any]]:
    if not path.endswith((".jsonl", ".json")):
        raise UserError(f"{path}: completions data is JSONL, one {{prompt, completion}} or {{messages}} object a line")
    rows = read_text_file(path, lambda fh: _jsonl_rows(path, fh))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _texts(row: Dict[str, Any], i: int, path: str, cfg: Dict[str, Any], tok) -> Tuple[str, str, bool]:
    """(prompt text, completion text, whether the prompt is already rendered with special tokens)."""
    where = f"{path}: line {i + 1}"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise UserError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects")
        if msgs[-1].get("role") != "assistant" or not str(msgs[-1]["content"]).strip():
            raise UserError(f"{where}: the last message must be the assistant's, with content (the completion)")
        return _render(msgs[:-1], tok, where), str(msgs[-1]["content"]), True
    p, c = cfg["prompt_column"], cfg["completion_column"]
    for col, key in ((p, "data.prompt_column"), (c, "data.completion_column")):
        if col not in row:
            raise UserError(f"{where}: no '{col}' ({key}); columns: {', '.join(map(str, row)) or 'none'} "
                            f"(or give 'messages')")
        if not isinstance(row[col], str) or not row[col].strip():
            raise UserError(f"{where}: empty or non-text '{col}'")
    if cfg["chat_template"]:
        return _render([{"role": "user", "content": row[p]}], tok, where), row[c], True
    return row[p], row[c], False


def _render(messages: List[Dict[str, Any]], tok, where: str) -> str:
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{where}: the tokenizer has no chat template to render messages with; give prompt and "
                        f"completion columns instead")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(prompt: str, completion: str, rendered: bool, tok) -> Tuple[List[int], List[int]]:
    """Token ids of the prompt (with the tokenizer's BOS unless the chat template rendered it) and of the
    completion followed by EOS."""
    p = tok(prompt, add_special_tokens=not rendered)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    return list(p), list(c) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])


def tokenize_rows(path: str, cfg: Dict[str, Any], tok) -> Tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of every row of `path`, each (N, longest - 1), padded; cached by file, tokenizer and
    settings. A prompt of `data.max_length` tokens or more, or a sequence that does not fit, is an error."""
    from ..teachers.cache import default_cache_dir
    keys = ("prompt_column", "completion_column", "chat_template", "max_length")
    key = sha256_json({"file": sha256_file(path), "tokenizer": tokenizer_hash(tok), **{k: cfg[k] for k in keys}})[:24]
    cached = os.path.join(default_cache_dir(), f"completions-{key}.npz")
    if os.path.isfile(cached):
        with np.load(cached) as z:
            return z["x"], z["y"]
    seqs = []
    limit = cfg["max_length"]
    for i, row in enumerate(_rows(path)):
        p, c = encode(*_texts(row, i, path, cfg, tok), tok)
        if len(p) >= limit:
            raise UserError(f"{path}: line {i + 1}: the prompt is {len(p)} tokens, data.max_length is {limit}; "
                            f"shorten the prompt or raise data.max_length")
        if len(p) + len(c) - 1 > limit:
            raise UserError(f"{path}: line {i + 1}: prompt and completion are {len(p) + len(c)} tokens with EOS, "
                            f"more than data.max_length + 1 = {limit + 1}; raise data.max_length")
        seqs.append((p, c))
    x, y = as_arrays(seqs, pad_id(tok))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with atomic_path(cached) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, x=x, y=y)
    return x, y


def as_arrays(seqs: List[Tuple[List[int], List[int]]], pad: int) -> Tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of (prompt ids, completion ids) pairs, shifted, right-padded to the longest."""
    width = max(len(p) + len(c) - 1 for p, c in seqs)
    x = np.full((len(seqs), width), pad, np.int64)
    y = np.full((len(seqs), width), IGNORE, np.int64)
    for r, (p, c) in enumerate(seqs):
        ids = p + c
        x[r, :len(ids) - 1] = ids[:-1]
        y[r, len(p) - 1:len(ids) - 1] = c  # position len(p) - 1 (the prompt's last token) predicts c[0]
    return x, y


def _pad_to(a: np.ndarray, width: int, value: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value) if a.shape[1] < width else a


def load_completions(cfg: Dict[str, Any]) -> DataBundle:
    if cfg["dataset"] == "arith":  # generated here, seeded: written once into the cache as JSONL files
        cfg = {**cfg, **dict(zip(("path", "test_path"), arith_files(cfg)))}
    tok = load_tokenizer(cfg["tokenizer"], "data.tokenizer")
    x, y = tokenize_rows(cfg["path"], cfg, tok)
    gen = np.random.default_rng(cfg["split_seed"])
    order = gen.permutation(len(x))
    if cfg["test_path"]:
        xt, yt = tokenize_rows(cfg["test_path"], cfg, tok)
        n_test = 0
    else:
        n_test = int(round(len(x) * cfg["test_fraction"]))
    n_val = int(round(len(x) * cfg["val_fraction"]))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    if not cfg["test_path"]:
        xt, yt = x[test], y[test]
    if len(train) < 2 or (cfg["val_fraction"] > 0 and not len(val)) or not len(yt):
        raise UserError(f"{cfg['path']}: {len(x)} rows leave {len(train)} for training, {len(val)} for validation "
                        f"and {len(yt)} for testing; give more rows or change data.val_fraction / test_fraction")
    width = max(x.shape[1], xt.shape[1])
    pad = pad_id(tok)
    xs = [torch.from_numpy(_pad_to(a, width, pad)) for a in (x[train], x[val], xt)]
    ys = [torch.from_numpy(_pad_to(a, width, IGNORE)) for a in (y[train], y[val], yt)]
    h = hashlib.sha256(sha256_json({k: v for k, v in cfg.items() if k not in ("workers", "eval_batch_size")}).encode())
    for t in xs + ys:
        h.update(t.numpy().tobytes())
    return DataBundle(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], len(tok), [], (width,), False, h.hexdigest()[:16],
                      pad_id=int(pad), task="causal_lm", tokenizer=cfg["tokenizer"])


def arith_files(cfg: Dict[str, Any]) -> Tuple[str, str]:
    """The train and test JSONL of `data.arith` (distill's multi-step arithmetic generator, seeded by
    data.split_seed), made once in the cache."""
    from ..teachers.cache import default_cache_dir
    from .arith import write_split
    a = cfg["arith"]
    folder = os.path.join(default_cache_dir(), "arith", sha256_json({**a, "seed": cfg["split_seed"]})[:16])
    paths = os.path.join(folder, "train.jsonl"), os.path.join(folder, "test.jsonl")
    if not all(os.path.isfile(p) for p in paths):
        os.makedirs(folder, exist_ok=True)
        write_split(folder, a["train"], a["test"], cfg["split_seed"], a["operations"], a["digits"])
    return paths


BUNDLES["completions"] = BUNDLES["arith"] = load_completions
