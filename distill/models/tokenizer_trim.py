"""A BPE tokenizer cut down to some of its tokens, for a causal LM whose vocabulary `distill compress` trims
(compress/vocab.py): which tokens to keep so that the data tokenizes as before, and the rewritten
tokenizer.json with the kept tokens renumbered 0.. in their old order."""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Dict, List, Sequence, Set

from ..errors import UserError
from ..io import read_json, write_text

BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _merge_pairs(merges: list) -> List[tuple]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def bpe_model(tj: Dict, where: str) -> Dict:
    m = tj.get("model", {})
    if m.get("type") != "BPE":
        raise UserError(f"compress.vocab: {where}: a {m.get('type')} tokenizer; trimming a causal LM's vocabulary "
                        f"needs a BPE tokenizer (Llama, Qwen, GPT-2, SmolLM, ...)")
    if m.get("continuing_subword_prefix") or m.get("end_of_word_suffix"):
        raise UserError(f"compress.vocab: {where}: BPE with a subword prefix or word suffix is not supported")
    return m


def kept_tokens(tj: Dict, used_ids: Set[int], where: str, rows: int) -> List[int]:
    """The ids to keep: those used, every added (special) token the model's `rows` embed, every single
    character and byte token, and, recursively, both halves of every merge that makes a kept token (BPE builds
    a token through them, so without them the data would tokenize differently). (transformers' GGUF converter
    may add an unknown token one past the embedding: no text of the data holds it.)"""
    m = bpe_model(tj, where)
    vocab: Dict[str, int] = m["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    keep = {by_id[i] for i in used_ids if i in by_id}
    keep |= {t for t in vocab if len(t) == 1 or BYTE_FALLBACK.fullmatch(t)}
    if m.get("unk_token") in vocab:
        keep.add(m["unk_token"])
    made_of: Dict[str, List[tuple]] = {}
    for a, b in _merge_pairs(m["merges"]):
        made_of.setdefault(a + b, []).append((a, b))
    todo = list(keep)
    while todo:
        for pair in made_of.get(todo.pop(), ()):
            for half in pair:
                if half not in keep and half in vocab:
                    keep.add(half)
                    todo.append(half)
    ids = {vocab[t] for t in keep} | {a["id"] for a in tj.get("added_tokens", []) if a["id"] < rows}
    return sorted(ids)


def trimmed_tokenizer_json(tj: Dict, ids: Sequence[int]) -> Dict:
    """`tj` (a tokenizer.json) with only the tokens `ids`, renumbered 0.. in their old order, and the merges
    among them."""
    tj = copy.deepcopy(tj)
    m = tj["model"]
    new = {old: i for i, old in enumerate(ids)}
    m["vocab"] = {t: new[i] for t, i in m["vocab"].items() if i in new}
    kept = set(m["vocab"])
    pairs = [(a, b) for a, b in _merge_pairs(m["merges"]) if a in kept and b in kept and a + b in kept]
    m["merges"] = [list(p) for p in pairs] if m["merges"] and isinstance(m["merges"][0], list) else \
        [f"{a} {b}" for a, b in pairs]
    tj["added_tokens"] = [a for a in tj.get("added_tokens", []) if a["id"] in new]  # (see kept_tokens)
    for a in tj["added_tokens"]:
        a["id"] = new[a["id"]]
    if isinstance(tj.get("padding"), dict) and tj["padding"].get("pad_id") in new:
        tj["padding"]["pad_id"] = new[tj["padding"]["pad_id"]]
    ids_of = {**m["vocab"], **{a["content"]: a["id"] for a in tj.get("added_tokens", [])}}
    _renumber_post_processor(tj.get("post_processor"), ids_of)
    return tj


def _renumber_post_processor(node, ids_of: Dict[str, int]) -> None:
    """Post-processors name their special tokens with ids (template: {tokens, ids}; BERT/RoBERTa: sep and
    cls as [token, id]): give them the new ones."""
    if isinstance(node, dict):
        if isinstance(node.get("ids"), list) and isinstance(node.get("tokens"), list):
            node["ids"] = [ids_of.get(t) for t in node["tokens"]]
        for key in ("sep", "cls"):
            pair = node.get(key)
            if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str):
                node[key] = [pair[0], ids_of.get(pair[0])]
        for v in node.values():
            _renumber_post_processor(v, ids_of)
    elif isinstance(node, list):
        for v in node:
            _renumber_post_processor(v, ids_of)


def tokenizer_json(tok, where: str) -> Dict:
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise UserError(f"compress.vocab: {where}: not a fast (tokenizers) tokenizer; trimming rewrites tokenizer.json")
    return json.loads(tok.backend_tokenizer.to_str())


def save_trimmed_tokenizer(tok, ids: Sequence[int], folder: str) -> None:
    """Save `tok` into `folder` with only the tokens `ids` (renumbered): tokenizer.json is rewritten, and so
    are the ids that tokenizer_config.json keys its added tokens by."""
    tok.save_pretrained(folder)
    tj = trimmed_tokenizer_json(tokenizer_json(tok, folder), ids)
    write_text(os.path.join(folder, "tokenizer.json"), json.dumps(tj, ensure_ascii=False))
    path = os.path.join(folder, "tokenizer_config.json")
    tc = read_json(path, {})
    if "added_tokens_decoder" in tc:
        new = {old: i for i, old in enumerate(ids)}
        tc["added_tokens_decoder"] = {str(new[int(k)]): v for k, v in tc["added_tokens_decoder"].items()
                                      if int(k) in new}
        write_text(path, json.dumps(tc, ensure_ascii=False, indent=2))
