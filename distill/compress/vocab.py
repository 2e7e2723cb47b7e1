"""Vocabulary trimming: keep only the rows of tokens the task's data uses.

A pretrained tokenizer's vocabulary (30k WordPiece tokens for BERT, 49k BPE tokens for SmolLM2) is mostly
rows a task never reads.

Classifiers: the kept rows go into a `RemappedEmbedding`, which maps each original token id to its row
(tokens never seen in the training and validation texts map to the unknown token), so the tokenizer and the
model's inputs stay unchanged. As in TextPruner's vocabulary pruning, this is exact for every text made of
seen tokens.

Causal LMs: the output layer is the larger prize, as every decoding step multiplies by all of it (in a
10-layer SmolLM2 student it is as much compute as 8 of the layers). The embedding and output rows of the
kept tokens are gathered, and the tokenizer is rewritten to the new ids (as vocabtrimmer does), so the
saved folder is a plain Hugging Face model that generates with plain transformers. The BPE merges that
build a kept token are kept with it, with all single characters (the 256 byte tokens of a byte-level
BPE), so any text still tokenizes and every text of the data tokenizes into the same tokens as before.
The kept tokens' logits are unchanged, so greedy decoding is too wherever the argmax was a kept token; the
probabilities are renormalised over the kept tokens (the mass a model put on the others, small for a
model tuned on the data, moves to them). Inside distill the model still reads and scores the original ids
(`HFCausalLM.vocab_ids`); a dropped token scores as impossible.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Dict, List, Sequence, Set

import torch
from torch import nn

from ..errors import UserError
from ..models.hf import HFClassifier
from .structure import RemappedEmbedding, slice_module


def trim_vocabulary(model: HFClassifier, texts: Sequence[torch.Tensor], unk_id: int) -> HFClassifier:
    """A copy of `model` whose word embeddings hold only the rows of tokens in `texts` (and special tokens)."""
    if unk_id is None:
        raise UserError("compress.vocab: the tokenizer has no unknown token to send dropped tokens to")
    model = copy.deepcopy(model)
    emb = model.hf.get_input_embeddings()
    if isinstance(emb, RemappedEmbedding):
        raise UserError("compress.vocab: the vocabulary of this model is already trimmed")
    ids = torch.cat([t.flatten() for t in texts] + [torch.tensor(model.special_ids + [unk_id, model.pad_id])])
    used = torch.unique(ids[(ids >= 0) & (ids < emb.num_embeddings)])
    new = RemappedEmbedding(len(used), emb.embedding_dim, emb.num_embeddings)
    with torch.no_grad():
        new.weight.copy_(emb.weight[used])
        new.remap.fill_(int((used == unk_id).nonzero()))
        new.remap[used] = torch.arange(len(used))
    model.hf.set_input_embeddings(new)
    return model


# ---------------------------------------------------------------- causal language models

BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _merge_pairs(merges: list) -> List[tuple]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _bpe_model(tj: Dict, where: str) -> Dict:
    m = tj.get("model", {})
    if m.get("type") != "BPE":
        raise UserError(f"compress.vocab: {where}: a {m.get('type')} tokenizer; trimming a causal LM's vocabulary "
                        f"needs a BPE tokenizer (Llama, Qwen, GPT-2, SmolLM, ...)")
    if m.get("continuing_subword_prefix") or m.get("end_of_word_suffix"):
        raise UserError(f"compress.vocab: {where}: BPE with a subword prefix or word suffix is not supported")
    return m


def kept_tokens(tj: Dict, used_ids: Set[int], where: str) -> List[int]:
    """The ids to keep: those used, every added (special) token, every single character and byte token,
    and, recursively, both halves of every merge that makes a kept token (BPE builds a token through
    them, so without them the data would tokenize differently)."""
    m = _bpe_model(tj, where)
    vocab: Dict[str, int] = m["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    keep = {by_id[i] for i in used_ids if i in by_id}
    keep |= {t for t in vocab if len(t) == 1 or BYTE_FALLBACK.fullmatch(t)}
    if m.get("unk_token"):
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
    ids = {vocab[t] for t in keep} | {a["id"] for a in tj.get("added_tokens", [])}
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
    for a in tj.get("added_tokens", []):
        a["id"] = new[a["id"]]
    _renumber_post_processor(tj.get("post_processor"), m["vocab"], {a["content"]: a["id"] for a in tj.get("added_tokens", [])})
    return tj


def _renumber_post_processor(node, vocab: Dict[str, int], added: Dict[str, int]) -> None:
    """Template post-processors name their special tokens with ids: give them the new ones."""
    if isinstance(node, dict):
        if isinstance(node.get("ids"), list) and isinstance(node.get("tokens"), list):
            node["ids"] = [added.get(t, vocab.get(t)) for t in node["tokens"]]
        for v in node.values():
            _renumber_post_processor(v, vocab, added)
    elif isinstance(node, list):
        for v in node:
            _renumber_post_processor(v, vocab, added)


def tokenizer_json(tok, where: str) -> Dict:
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise UserError(f"compress.vocab: {where}: not a fast (tokenizers) tokenizer; trimming rewrites tokenizer.json")
    return json.loads(tok.backend_tokenizer.to_str())


def save_trimmed_tokenizer(tok, ids: Sequence[int], folder: str) -> None:
    """Save `tok` into `folder` with only the tokens `ids` (renumbered): tokenizer.json is rewritten, and so
    are the ids that tokenizer_config.json keys its added tokens by."""
    tok.save_pretrained(folder)
    tj = trimmed_tokenizer_json(tokenizer_json(tok, folder), ids)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(tj, fh, ensure_ascii=False)
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            tc = json.load(fh)
        if "added_tokens_decoder" in tc:
            new = {old: i for i, old in enumerate(ids)}
            tc["added_tokens_decoder"] = {str(new[int(k)]): v for k, v in tc["added_tokens_decoder"].items()
                                          if int(k) in new}
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(tc, fh, ensure_ascii=False, indent=2)


def trim_lm_vocabulary(model, texts: Sequence[torch.Tensor], tok, where: str):
    """A copy of causal LM `model` with only the embedding and output rows of the tokens in `texts` (see
    `kept_tokens`); it still takes and scores the original ids (`vocab_ids`: new id -> original id)."""
    if model.vocab_ids is not None:
        raise UserError("compress.vocab: the vocabulary of this model is already trimmed")
    used = torch.unique(torch.cat([t.flatten() for t in texts]))
    ids = torch.tensor(kept_tokens(tokenizer_json(tok, where), set(used[used >= 0].tolist()), where))
    hf = copy.deepcopy(model.hf)
    emb, out = hf.get_input_embeddings(), hf.get_output_embeddings()
    pad = emb.padding_idx
    small = nn.Embedding(len(ids), emb.embedding_dim,
                         padding_idx=int((ids == pad).nonzero()) if pad is not None and pad in ids else None)
    with torch.no_grad():
        small.weight.copy_(emb.weight[ids])
    tied = out is not None and out.weight is emb.weight
    hf.set_input_embeddings(small)
    if out is not None:
        hf.set_output_embeddings(nn.Linear(emb.embedding_dim, len(ids), bias=False) if tied else slice_module(out, ids))
        if tied:
            hf.get_output_embeddings().weight = small.weight
    new = {old: i for i, old in enumerate(ids.tolist())}
    for config in (hf.config, getattr(hf, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
            v = getattr(config, key, None) if config is not None else None
            if v is not None:
                setattr(config, key, [new[i] for i in v if i in new] if isinstance(v, list) else new.get(v))
    hf.config.distill_vocab_size, hf.config.vocab_size = model.vocab_size, len(ids)
    hf.config.distill_vocab_ids = ids.tolist()
    return model.rewrap(hf)
