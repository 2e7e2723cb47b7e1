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
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import UserError
from ..io import atomic_path, sha256_file, sha256_json
from ..models.hf import load_tokenizer, pad_id, tokenization_hash
from .datasets import BUNDLES, DataBundle, read_text_file
from .text import jsonl_rows

IGNORE = -100  # the target of a position that no loss counts (prompt, padding)


def _rows(path: str, what: str = "completions data is JSONL, one {prompt, completion} or {messages} object a line"
          ) -> List[Tuple[int, Dict[str, Any]]]:
    """(line number, object) of each row of a JSONL file."""
    if not path.lower().endswith((".jsonl", ".json")):
        raise UserError(f"{path}: {what}")
    rows = read_text_file(path, lambda fh: jsonl_rows(path, fh))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _texts(row: Dict[str, Any], line: int, path: str, cfg: Dict[str, Any], tok) -> Tuple[str, str, bool]:
    """(prompt text, completion text, whether the prompt is already rendered with special tokens)."""
    where = f"{path}: line {line}"
    if "messages" in row:
        msgs = _messages(row, where, 2, "at least two {role, content} objects")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise UserError(f"{where}: the last message must be the assistant's, with content (the completion)")
        return _render(msgs[:-1], tok, where), str(msgs[-1]["content"]), True
    for col, key in ((cfg["prompt_column"], "data.prompt_column"),
                     (cfg["completion_column"], "data.completion_column")):
        _need_text(row, col, key, where)
    prompt, rendered = _user_prompt(row, cfg, tok, where)
    return prompt, row[cfg["completion_column"]], rendered


def _messages(row: Dict[str, Any], where: str, least: int, what: str) -> List[Dict[str, Any]]:
    """A row's chat: at least `least` {role, content} objects whose role and content are text."""
    msgs = row["messages"]
    if not isinstance(msgs, list) or len(msgs) < least or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise UserError(f"{where}: 'messages' must be a list of {what}, each role and content text")
    return msgs


def _need_text(row: Dict[str, Any], col: str, key: str, where: str) -> None:
    if col not in row:
        raise UserError(f"{where}: no '{col}' ({key}); columns: {', '.join(map(str, row)) or 'none'} "
                        f"(or give 'messages')")
    if not isinstance(row[col], str) or not row[col].strip():
        raise UserError(f"{where}: empty or non-text '{col}'")


def _user_prompt(row: Dict[str, Any], cfg: Dict[str, Any], tok, where: str) -> Tuple[str, bool]:
    """A plain row's prompt (rendered as a user turn with `data.chat_template`) and whether it is rendered."""
    text = row[cfg["prompt_column"]]
    if cfg["chat_template"]:
        if not getattr(tok, "chat_template", None):
            raise UserError(f"data.chat_template: true, and the tokenizer ({cfg['tokenizer']}) has no chat template "
                            f"to render prompts with; set it to false")
        return _render([{"role": "user", "content": text}], tok, where), True
    return text, False


def _render(messages: List[Dict[str, Any]], tok, where: str) -> str:
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{where}: the tokenizer has no chat template to render messages with; give prompt and "
                        f"completion columns instead")
    from jinja2 import TemplateError
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # (templates refuse, e.g., roles out of turn with raise_exception)
        raise UserError(f"{where}: the tokenizer's chat template refuses these messages ({e})") from None


def tokenize_prompts(path: str, cfg: Dict[str, Any], tok, pattern: Optional[str], need_answers: bool,
                     held: frozenset = frozenset()) -> Tuple[List[List[int]], List[Optional[str]]]:
    """The token ids of each prompt of a JSONL file of {prompt} or {messages} rows without completions (the
    teacher writes those), rendered as the training prompts are, and each row's reference answer as the
    verifier compares it (`_answer`). A prompt among `held` (the held-out prompts' ids) is refused."""
    ids, answers = [], []
    for line, row in _rows(path, "teacher prompts are JSONL, one {prompt, answer} or {messages, answer} "
                                 "object a line"):
        where = f"{path}: line {line}"
        if "messages" in row:
            msgs = _messages(row, where, 1, "{role, content} objects (the prompt)")
            if msgs[-1]["role"] == "assistant":
                raise UserError(f"{where}: the last message is the assistant's, a written completion; here the "
                                f"teacher writes it (drop it, and give the final answer as 'answer')")
            text, rendered = _render(msgs, tok, where), True
        else:
            _need_text(row, cfg["prompt_column"], "data.prompt_column", where)
            text, rendered = _user_prompt(row, cfg, tok, where)
        ids.append(prompt_ids(text, rendered, tok))
        _prompt_fits(len(ids[-1]), cfg["max_length"], where)
        if tuple(ids[-1]) in held:
            raise UserError(f"{where}: this prompt is also a validation or test prompt; the teacher's trace of it "
                            f"would train the student on a held-out problem")
        answers.append(_answer(row, where, pattern, need_answers))
    return ids, answers


def _answer(row: Dict[str, Any], where: str, pattern: Optional[str], needed: bool) -> Optional[str]:
    """A prompt row's `answer` as the verifier compares it with the regex's finding in a completion: text or
    an integer, itself put through the regex when that matches (so "Answer: 12" and 12 both give "12")."""
    from ..tasks.causal_lm import extract
    value = row.get("answer")
    if value is None and not needed:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise UserError(f"{where}: 'answer' must be text or an integer, for distill.sequence_kd.verify to check "
                        f"the teacher against (got {value!r})")
    text = str(value).strip()
    found = extract(text, pattern) if pattern else None
    return found if found is not None else text


def _prompt_fits(n: int, limit: int, where: str) -> None:
    if n >= limit:
        raise UserError(f"{where}: the prompt is {n} tokens, data.max_length is {limit}; shorten the prompt or "
                        f"raise data.max_length")


def prompt_ids(text: str, rendered: bool, tok) -> List[int]:
    """A prompt's token ids: with the tokenizer's BOS unless the chat template rendered it, and without the
    EOS a tokenizer that ends every text with one appends (Llama's add_eos_token): the completion follows the
    prompt, and a model taught to write on after EOS would not stop at its own."""
    ids = list(tok(text, add_special_tokens=not rendered)["input_ids"])
    if not rendered and ids and ids[-1] == tok.eos_token_id:
        plain = list(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) > len(plain) and ids[len(ids) - 1 - len(plain):-1] == plain:  # (appended after the text)
            ids.pop()
    return ids


def completion_ids(text: str, tok) -> List[int]:
    """A completion's token ids, followed by EOS."""
    return list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]


def encode(prompt: str, completion: str, rendered: bool, tok) -> Tuple[List[int], List[int]]:
    """Token ids of the prompt (with the tokenizer's BOS unless the chat template rendered it) and of the
    completion followed by EOS."""
    return prompt_ids(prompt, rendered, tok), completion_ids(completion, tok)


def tokenize_rows(path: str, cfg: Dict[str, Any], tok) -> Tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of every row of `path`, each (N, longest - 1), padded; cached by file, tokenizer and
    settings. A prompt of `data.max_length` tokens or more, or a sequence that does not fit, is an error."""
    from ..teachers.cache import check_cache_dir
    keys = ("prompt_column", "completion_column", "chat_template", "max_length")
    key = sha256_json({"file": sha256_file(path), "tokenizer": tokenization_hash(tok),
                       "prompts": "no appended EOS", **{k: cfg[k] for k in keys}})[:24]
    cached = os.path.join(check_cache_dir(None), f"completions-{key}.npz")
    if os.path.isfile(cached):
        with np.load(cached) as z:
            return z["x"], z["y"]
    seqs = []
    limit = cfg["max_length"]
    for line, row in _rows(path):
        texts = _texts(row, line, path, cfg, tok)
        try:
            p, c = encode(*texts, tok)
        except Exception as e:  # (the tokenizers library raises plain Exceptions: a character it has no token for)
            raise UserError(f"{path}: line {line}: the tokenizer cannot encode it "
                            f"({str(e).splitlines()[0]})") from None
        _prompt_fits(len(p), limit, f"{path}: line {line}")
        if len(p) + len(c) - 1 > limit:
            raise UserError(f"{path}: line {line}: prompt and completion are {len(p) + len(c)} tokens with EOS, "
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


def sequence_tokens(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every token of the sequences that `as_arrays` shifted into (inputs, targets) rows, once each: a row's
    prompt (its inputs up to the first target) and its targets (the completion), not its padding. (The inputs
    and the targets hold the completion twice over, and the inputs their padding.)"""
    first = (y >= 0).int().argmax(1)  # (the prompt's last position, which predicts the completion's first token)
    prompt = x[torch.arange(x.shape[1])[None, :] <= first[:, None]]
    return torch.cat([prompt, y[y >= 0]])


def _pad_to(a: np.ndarray, width: int, value: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value) if a.shape[1] < width else a


def load_completions(cfg: Dict[str, Any]) -> DataBundle:
    given = cfg  # (hashed as given: where the cache keeps the generated files is not the data)
    if cfg["dataset"] == "arith":  # generated here, seeded: written once into the cache as JSONL files
        cfg = {**cfg, **dict(zip(("path", "test_path"), arith_files(cfg)))}
    tok = load_tokenizer(cfg["tokenizer"], "data.tokenizer")
    if tok.eos_token_id is None:  # (without it the model never learns to stop: generations run to the limit)
        raise UserError(f"data.tokenizer: {cfg['tokenizer']} has no EOS token, which ends every completion; give "
                        f"the model's own tokenizer, or set eos_token in its tokenizer_config.json")
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
    h = hashlib.sha256(sha256_json({k: v for k, v in given.items() if k not in ("workers", "eval_batch_size")}).encode())
    for t in xs + ys:
        h.update(t.numpy().tobytes())
    return DataBundle(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], len(tok), [], (width,), False, h.hexdigest()[:16],
                      pad_id=int(pad), task="causal_lm", tokenizer=cfg["tokenizer"])


def arith_files(cfg: Dict[str, Any]) -> Tuple[str, str]:
    """The train and test JSONL of `data.arith` (distill's multi-step arithmetic generator, seeded by
    data.split_seed), made once in the cache."""
    from ..teachers.cache import check_cache_dir
    from .arith import write_split
    a = cfg["arith"]
    folder = os.path.join(check_cache_dir(None), "arith", sha256_json({**a, "seed": cfg["split_seed"]})[:16])
    paths = os.path.join(folder, "train.jsonl"), os.path.join(folder, "test.jsonl")
    if not all(os.path.isfile(p) for p in paths):
        os.makedirs(folder, exist_ok=True)
        try:
            write_split(folder, a["train"], a["test"], cfg["split_seed"], a["operations"], a["digits"])
        except ValueError as e:  # (more problems than there are of this size)
            raise UserError(f"data.arith: train {a['train']} + test {a['test']}: {e}") from None
    return paths


def teacher_prompts_file(cfg: Dict[str, Any]) -> Any:
    """The file of `distill.sequence_kd.prompts` (None when unset): the path given, or for arith data a count
    of generated problems written once into the cache, disjoint from the train and test splits."""
    n, data = cfg["distill"]["sequence_kd"]["prompts"], cfg["data"]
    if n is None or isinstance(n, str):
        return n
    from .arith import write_prompts
    a = data["arith"]
    path = os.path.join(os.path.dirname(arith_files(data)[0]), f"prompts-{n}.jsonl")
    if not os.path.isfile(path):
        try:
            write_prompts(path, n, a["train"], a["test"], data["split_seed"], a["operations"], a["digits"])
        except ValueError as e:  # (more problems than there are of this size)
            raise UserError(f"distill.sequence_kd.prompts: {n}: {e}") from None
    return path


def teacher_prompts(cfg: Dict[str, Any], data: DataBundle, tok) -> Tuple[List[List[int]], List[Optional[str]]]:
    """The prompts of `distill.sequence_kd.prompts`, tokenised, with their reference answers (none when unset).
    None may be a validation or test prompt: the teacher's trace of it would train the student on a held-out
    problem."""
    path = teacher_prompts_file(cfg)
    if path is None:
        return [], []
    from ..tasks.causal_lm import prompts_and_answers
    held = frozenset(tuple(p) for x, y in ((data.x_val, data.y_val), (data.x_test, data.y_test)) if len(y)
                     for p in prompts_and_answers(x, y)[0])
    return tokenize_prompts(path, cfg["data"], tok, cfg["evaluate"]["exact_match"]["answer"],
                            cfg["distill"]["sequence_kd"]["verify"], held)


BUNDLES["completions"] = BUNDLES["arith"] = load_completions
