"""Vocabulary trimming: keep only the embedding rows of tokens the task's data uses.

A pretrained tokenizer's vocabulary (30k WordPiece tokens for BERT) is mostly rows a task never reads, and
in a small encoder those rows are most of the file. The kept rows go into a `RemappedEmbedding`, which maps
each original token id to its row (tokens never seen in the training and validation texts map to the
unknown token), so the tokenizer and the model's inputs stay unchanged. As in TextPruner's vocabulary
pruning, this is exact for every text made of seen tokens.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..errors import UserError
from ..models.hf import HFClassifier
from .structure import RemappedEmbedding


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
