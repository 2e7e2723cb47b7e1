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
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..models.hf import HFClassifier
from ..models.tokenizer_trim import bpe_model, kept_tokens, tokenizer_json
from .structure import RemappedEmbedding, slice_module


def check_trimmable(model, tok, where: str) -> None:
    """What trimming needs, checked before any compress step runs rather than after the steps before it
    have fine-tuned: a model not trimmed already, and a tokenizer whose dropped tokens can go somewhere (a
    classifier's: its unknown token) or that can be rewritten (a causal LM's: BPE, in tokenizer.json)."""
    if isinstance(model, HFClassifier):
        _classifier_trimmable(model, tok.unk_token_id)
    else:
        _lm_trimmable(model, tok, where)


def _classifier_trimmable(model: HFClassifier, unk_id: Optional[int]) -> None:
    if unk_id is None:
        raise UserError("compress.vocab: the tokenizer has no unknown token to send dropped tokens to")
    emb = model.hf.get_input_embeddings()
    if isinstance(emb, RemappedEmbedding):
        raise UserError("compress.vocab: the vocabulary of this model is already trimmed")
    if type(emb) is not nn.Embedding:  # (a RemappedEmbedding would drop what it adds: Gemma's scale by sqrt(width))
        raise UserError(f"compress.vocab: this model's word embedding is a {type(emb).__name__}, not a plain "
                        f"Embedding; classifiers' vocabularies are trimmed for plain ones only: remove vocab from "
                        f"compress.steps")


def _lm_trimmable(model, tok, where: str) -> None:
    if model.vocab_ids is not None:
        raise UserError("compress.vocab: the vocabulary of this model is already trimmed")
    top = max(bpe_model(tokenizer_json(tok, where), where)["vocab"].values())
    rows = model.hf.get_input_embeddings().num_embeddings
    if top >= rows:
        raise UserError(f"compress.vocab: {where}: the tokenizer has ids up to {top}, and the model's embedding "
                        f"only {rows} rows; they do not belong together")


def trim_vocabulary(model: HFClassifier, texts: Sequence[torch.Tensor], unk_id: int) -> HFClassifier:
    """A copy of `model` whose word embeddings hold only the rows of tokens in `texts` (and special tokens)."""
    _classifier_trimmable(model, unk_id)
    model = copy.deepcopy(model)
    emb = model.hf.get_input_embeddings()
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

CONFIG_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id",
              "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens")


def trim_lm_vocabulary(model, texts: Sequence[torch.Tensor], tok, where: str):
    """A copy of causal LM `model` with only the embedding and output rows of the tokens in `texts` (see
    `kept_tokens`); it still takes and scores the original ids (`vocab_ids`: new id -> original id)."""
    from ..models.hf import tokenizer_hash
    _lm_trimmable(model, tok, where)
    used = torch.unique(torch.cat([t.flatten() for t in texts]))
    hf = copy.deepcopy(model.hf)
    emb, out = hf.get_input_embeddings(), hf.get_output_embeddings()
    ids = torch.tensor(kept_tokens(tokenizer_json(tok, where), set(used[used >= 0].tolist()), where,
                                   emb.num_embeddings))
    tied = out is not None and out.weight is emb.weight
    small = _rows_of(emb, ids)  # (a copy of the module: kinds such as Gemma's scaled embedding stay as they are)
    hf.set_input_embeddings(small)
    if out is not None:
        hf.set_output_embeddings(nn.Linear(emb.embedding_dim, len(ids), bias=False) if tied else slice_module(out, ids))
        if tied:
            hf.get_output_embeddings().weight = small.weight
    new = {old: i for i, old in enumerate(ids.tolist())}
    for config in (hf.config, getattr(hf, "generation_config", None)):
        for key in CONFIG_IDS:
            v = getattr(config, key, None) if config is not None else None
            if v is not None:
                setattr(config, key, [new[i] for i in v if i in new] if isinstance(v, list) else new.get(v))
    hf.config.distill_vocab_size, hf.config.vocab_size = model.vocab_size, len(ids)
    hf.config.distill_vocab_ids = ids.tolist()
    hf.config.distill_vocab_of = tokenizer_hash(tok)  # (the tokenizer it was trimmed from: see save_folder)
    return model.rewrap(hf)


def _rows_of(emb: nn.Embedding, ids: torch.Tensor) -> nn.Embedding:
    weight = emb.weight
    emb.weight = None  # (so that the copy does not copy the whole table)
    try:
        small = copy.deepcopy(emb)
    finally:
        emb.weight = weight
    small.weight = nn.Parameter(weight.detach()[ids].clone())
    small.num_embeddings = len(ids)
    pad = emb.padding_idx
    small.padding_idx = int((ids == pad).nonzero()) if pad is not None and pad in ids else None
    return small
