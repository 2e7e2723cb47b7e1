"""A small decoder-only transformer (GPT) for language models that distill trains from scratch.

Pre-norm blocks of causal self-attention (PyTorch's scaled_dot_product_attention) and a GELU MLP, learned
positions, the output layer tied to the token embedding. Input: token ids (N, L) with L <= `context`; output:
next-token logits (N, L, vocabulary). `vocabulary` is the data's number of classes (its tokens).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .layers import ArgError, whole


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, cache: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """With `cache` ([keys, values] of the positions before `h`, or empty), `h` attends to those too
        and the cache is extended: generation then costs one position per step, not the whole prefix."""
        n, length, width = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(width, dim=2)
        q, k, v = (t.view(n, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        causal = cache is None or length > 1  # (one new position may attend to every cached one)
        if causal and k.shape[2] != length:
            raise ValueError("a prefix with a cache is fed one position at a time")
        att = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.proj(att.transpose(1, 2).reshape(n, length, width)))
        return h + self.drop(self.mlp(self.ln2(h)))


class GPT(nn.Module):
    input_dtype = torch.long  # token ids (the shape check feeds zeros of this type)
    per_position = True  # logits for every position, not one per sample

    def __init__(self, vocabulary: int, context: int, layers: int, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocabulary, width), nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.tok.weight  # tied: the output layer reads the embedding table
        self.apply(self._init)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token table (Hugging Face's name for it): what the monitor's input gradient differentiates by."""
        return self.tok

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, caches: Optional[List[List[torch.Tensor]]] = None,
                start: int = 0) -> torch.Tensor:
        x = x.long()
        h = self.drop(self.tok(x) + self.pos(torch.arange(start, start + x.shape[1], device=x.device)))
        for i, block in enumerate(self.blocks):
            h = block(h, caches[i] if caches is not None else None)
        return self.head(self.ln(h))

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """`ids` (N, L) continued by `new_tokens` sampled tokens (greedy at temperature 0), in eval mode.
        Within the context a key/value cache feeds one new position per step; past it, the window slides and
        the last `context` tokens are run again each step."""
        was_training = self.training
        self.eval()
        caches: List[List[torch.Tensor]] = [[] for _ in self.blocks]
        try:
            logits = self(ids[:, -self.context:], caches)[:, -1].float() if ids.shape[1] <= self.context else None
            for _ in range(new_tokens):
                if logits is None:  # past the context: no cache, the window slides
                    logits = self(ids[:, -self.context:])[:, -1].float()
                # (drawn on the CPU, where a seeded generator lives: the same tokens on any device)
                nxt = logits.argmax(-1, keepdim=True) if temperature <= 0 else torch.multinomial(
                    (logits / temperature).softmax(-1).cpu(), 1, generator=generator).to(ids.device)
                ids = torch.cat([ids, nxt], 1)
                at = ids.shape[1] - 1
                logits = self(nxt, caches, at)[:, -1].float() if at < self.context and caches[0] else None
        finally:
            self.train(was_training)
        return ids


@MODELS.register("gpt")
def gpt(input_shape: Tuple[int, ...], num_classes: int, layers: int = 4, width: int = 256, heads: int = 4,
        dropout: float = 0.0) -> nn.Module:
    """A GPT over the data's tokens (`num_classes` of them) with a context of the data's sequence length."""
    for name, value in (("layers", layers), ("width", width), ("heads", heads)):
        whole(name, value)
    if width % heads:
        raise ArgError(f"width {width} is not divisible by heads {heads}")
    return GPT(num_classes, input_shape[0], layers, width, heads, dropout)
