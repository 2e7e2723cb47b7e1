"""Text classification data: CSV or JSONL rows of (text, label), tokenised once and cached.

Texts become one int64 tensor of token ids per split, padded to `data.max_length` with the tokenizer's
pad id; models trim each batch to its longest real sequence, and `batches` groups similar lengths
(bucketing), so the padding costs almost nothing. Label names are sorted and kept, so they can be saved
with the model. The token cache is keyed by the file contents, the tokenizer's vocabulary and settings.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Tuple

import numpy as np

from ..errors import UserError, did_you_mean
from ..io import atomic_path, sha256_file, sha256_json
from ..models.hf import load_tokenizer, pad_id, tokenization_hash
from ..registry import DATASETS
from ..teachers.cache import check_cache_dir
from .datasets import Raw, _class_order, read_text_file


def read_texts(path: str, text_col: str, label_col: str | None) -> Tuple[List[str], List[str]]:
    """(texts, labels) from a .csv (header row) or .jsonl (one object a line); `label_col=None` reads text only.
    A .txt file is one text a line, without labels."""
    ext = os.path.splitext(path)[1].lower()  # (TEXTS.TXT as texts.txt)
    if ext == ".txt":
        if label_col is not None:
            raise UserError(f"{path}: a .txt file has no labels; give a .csv or .jsonl with a '{label_col}' column")
        texts = read_text_file(path, lambda fh: [line.strip() for line in fh if line.strip()])
        if not texts:
            raise UserError(f"{path}: no texts (one a line)")
        return texts, []
    rows = read_text_file(path, lambda fh: jsonl_rows(path, fh) if ext in (".jsonl", ".json")
                          else _csv_rows(path, fh, (text_col, label_col)))
    if not rows:
        raise UserError(f"{path}: no rows")
    first = rows[0][1]
    for col, key in ((text_col, "data.text_column"), (label_col, "data.label_column")):
        if col is not None and col not in first:
            raise UserError(f"{path}: no column named '{col}' ({key}){did_you_mean(col, list(first))}; "
                            f"columns: {', '.join(map(str, first))}")
    texts, labels = [], []
    for line, row in rows:
        if None in row:  # (csv.DictReader puts the fields past the header's under the key None)
            header = len([k for k in row if k is not None])
            raise UserError(f"{path}: line {line} has {header + len(row[None])} fields, the header has {header} (a "
                            f"comma in a text needs the text in double quotes)")
        text = row.get(text_col)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}: line {line}: empty or missing '{text_col}'")
        texts.append(text)
        if label_col is not None:
            label = row.get(label_col)
            if label is None or str(label).strip() == "":
                raise UserError(f"{path}: line {line}: empty or missing '{label_col}'")
            if isinstance(label, bool) or not isinstance(label, (str, int)):  # (JSONL: 1.0, NaN, [..] are no class)
                raise UserError(f"{path}: line {line}: '{label_col}' is {json.dumps(label)}; a class is a name or "
                                f"a whole number")
            labels.append(str(label).strip())
    return texts, labels


def _csv_rows(path: str, fh, read: Tuple[str | None, ...]) -> List[Tuple[int, Dict[str, Any]]]:
    """(line number, row) of each CSV row (blank lines skipped, as DictReader does), for errors that say where.
    A column read (`read`) named twice in the header is refused: DictReader keeps the last silently. (Other
    columns may repeat or have no name: pandas writes its index as a column with none.)"""
    reader = csv.DictReader(fh)
    header = reader.fieldnames or []
    twice = [c for c in read if c is not None and header.count(c) > 1]
    if twice:
        raise UserError(f"{path}: the header names '{twice[0]}' more than once; only the last such column would be "
                        f"read: rename the others")
    return [(reader.line_num, row) for row in reader]


def jsonl_rows(path: str, fh) -> List[Tuple[int, Dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file."""
    rows = []
    for i, line in enumerate(fh):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            array = " (a JSON array is not read: write one object a line, JSONL)" if line.lstrip()[:1] == "[" else ""
            raise UserError(f"{path}: line {i + 1}: not JSON ({e.msg}){array}") from None
        if not isinstance(row, dict):
            array = " (a JSON array is not read: write one object a line, JSONL)" if isinstance(row, list) else ""
            raise UserError(f"{path}: line {i + 1}: expected a JSON object per line{array}")
        rows.append((i + 1, row))
    return rows


def tokenize(texts: List[str], tok, max_length: int, cache_dir: str, source_key: str) -> np.ndarray:
    """(N, max_length) int64 token ids, padded on the right with `pad_id(tok)` (models trim the padding columns
    at the end; a tokenizer that pads on the left, or has no pad token, pads here as they expect), truncated on
    the tokenizer's side; read from the cache when present."""
    specials = tok.num_special_tokens_to_add()
    if max_length <= specials:
        raise UserError(f"data.max_length: {max_length} tokens hold only the tokenizer's {specials} special "
                        f"token(s) and no text; give more")
    key = sha256_json({"src": source_key, "tokenization": tokenization_hash(tok), "max": max_length,
                       "cls": type(tok).__name__, "lower": getattr(tok, "do_lower_case", None),
                       "truncation": tok.truncation_side, "pad": pad_id(tok), "format": 2})[:24]
    path = os.path.join(cache_dir, f"tokens-{key}.npy")
    if os.path.isfile(path):
        return np.load(path)
    rows = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    ids = np.full((len(rows), max_length), pad_id(tok), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, ids)
    return ids


def tokenize_file(path: str, cfg: Dict[str, Any], tok, labelled: bool = True) -> Tuple[np.ndarray, List[str]]:
    """Token ids and raw labels of one file, tokenised by `tok`, with the ids cached."""
    texts, labels = read_texts(path, cfg["text_column"], cfg["label_column"] if labelled else None)
    src = {"file": sha256_file(path), "text": cfg["text_column"], "label": cfg["label_column"] if labelled else None}
    ids = tokenize(texts, tok, cfg["max_length"], check_cache_dir(None), sha256_json(src))
    return ids, labels


@DATASETS.register("text")
def _text(cfg: Dict[str, Any]):
    """`path` (and optional `test_path`) CSV/JSONL with `text_column` and `label_column`."""
    tok = load_tokenizer(cfg["tokenizer"], "data.tokenizer")
    x, y = tokenize_file(cfg["path"], cfg, tok)
    xt, yt = tokenize_file(cfg["test_path"], cfg, tok) if cfg["test_path"] else (None, None)
    classes = sorted(set(y) | set(yt or []), key=_class_order)  # (as tabular CSV: 2 before 10)
    index = {c: i for i, c in enumerate(classes)}
    return Raw(x, np.array([index[v] for v in y]), xt, None if yt is None else np.array([index[v] for v in yt]),
               class_names=classes, pad_id=pad_id(tok))
