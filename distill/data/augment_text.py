"""Data distillation for text, on token ids: noise for the student, and new teacher-labelled texts.

- `mask_tokens`: replace a fraction of real (non-special, non-pad) tokens by [MASK] (noise injection).
- `substitute`: copies of each text with some words replaced by a near neighbour in the teacher's own input
  embedding space (cosine), so the new words are ones the teacher treats as similar.
- `eda`: copies with random word deletion and swaps (Wei and Zou's EDA, without a thesaurus).
A "word" is a token with its WordPiece continuations (`##...`), so words are never cut in half. Copies are
deterministic given the seed, and carry no hard label: the teacher's soft labels are their only target.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..models.hf import pad_id
from .datasets import with_teacher_labelled


def mask_tokens(x: torch.Tensor, fraction: float, mask_id: int, pad_id: int, special_ids: Sequence[int],
                gen: torch.Generator | None = None) -> torch.Tensor:
    """A copy of `x` with each real token replaced by `mask_id` with probability `fraction`."""
    real = (x != pad_id) & ~torch.isin(x, torch.tensor(list(special_ids), dtype=x.dtype, device=x.device))
    hit = (torch.rand(x.shape, generator=gen) < fraction).to(x.device) & real  # (drawn on the CPU's RNG)
    return torch.where(hit, torch.full_like(x, mask_id), x)


class TokenText:
    """Word segmentation and re-packing of padded token-id rows for one tokenizer."""

    def __init__(self, tokenizer) -> None:
        vocab = tokenizer.get_vocab()
        self.tokens = [""] * len(vocab)
        for tok, i in vocab.items():
            if i < len(self.tokens):
                self.tokens[i] = tok
        self.pad = pad_id(tokenizer)  # (what the texts are padded with: data/text.py)
        self.special = set(tokenizer.all_special_ids)
        # how a token says where a word starts: WordPiece marks the pieces after the first ("##ing"); byte-level
        # BPE (GPT-2, RoBERTa: "Ġ") and SentencePiece ("▁") mark the first piece, after a space
        self.wordpiece = any(t.startswith("##") for t in self.tokens)
        probe = tokenizer.tokenize("a word")  # (the marker, if any, on the word after a space)
        self.start = next((m for m in ("Ġ", "▁") if not self.wordpiece and any(p.startswith(m) for p in probe[1:])),
                          None)

    def is_continuation(self, i: int) -> bool:
        if self.start is not None:
            return i not in self.special and not self.tokens[i].startswith(self.start)
        return self.wordpiece and self.tokens[i].startswith("##")

    def words(self, row: np.ndarray) -> tuple:
        """(prefix specials, list of words as token lists, suffix specials) of one padded row."""
        ids = [int(t) for t in row if t != self.pad]
        head = []
        while ids and ids[0] in self.special:
            head.append(ids.pop(0))
        tail: List[int] = []
        while ids and ids[-1] in self.special:
            tail.insert(0, ids.pop())
        words: List[List[int]] = []
        for t in ids:
            if words and self.is_continuation(t):
                words[-1].append(t)
            else:
                words.append([t])
        return head, words, tail

    def pack(self, head: List[int], words: List[List[int]], tail: List[int], length: int) -> np.ndarray:
        ids = head + [t for w in words for t in w] + tail
        ids = ids[:length - len(tail)] + tail if len(ids) > length else ids
        return np.array(ids + [self.pad] * (length - len(ids)), dtype=np.int64)

    def whole_word(self, i: int) -> bool:
        t = self.tokens[i][len(self.start):] if self.start else self.tokens[i]
        return i not in self.special and t.isalpha() and not self.is_continuation(i)


def check_neighbours(k: int, tokenizer_path: str) -> None:
    """`distill.data.neighbours` refused before anything trains when the tokenizer has no more whole-word
    tokens than that to draw from (the word itself aside)."""
    from ..models.hf import load_tokenizer
    text = TokenText(load_tokenizer(tokenizer_path, "data.tokenizer"))
    n = sum(text.whole_word(i) for i in range(len(text.tokens)))
    if k >= n:
        raise UserError(f"distill.data.neighbours: {k}, and the tokenizer ({tokenizer_path}) has {n:,} whole-word "
                        f"tokens to draw substitutes from; give fewer than {n:,}")


def neighbour_table(embeddings: torch.Tensor, text: TokenText, token_ids: Sequence[int], k: int
                    ) -> Dict[int, np.ndarray]:
    """For each token in `token_ids`, its `k` nearest whole-word tokens by cosine of input embeddings."""
    candidates = torch.tensor([i for i in range(len(text.tokens)) if text.whole_word(i)])
    emb = torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=1)
    cand = emb[candidates]
    table: Dict[int, np.ndarray] = {}
    queries = [i for i in token_ids if text.whole_word(i)]
    for start in range(0, len(queries), 1024):
        q = torch.tensor(queries[start:start + 1024])
        sim = emb[q] @ cand.T
        sim[candidates.unsqueeze(0) == q.unsqueeze(1)] = -2.0  # never the word itself
        top = sim.topk(k, dim=1).indices
        for row, i in enumerate(q.tolist()):
            table[i] = candidates[top[row]].numpy()
    return table


def substitute(x: np.ndarray, text: TokenText, table: Dict[int, np.ndarray], copies: int, prob: float,
               rng: np.random.Generator) -> np.ndarray:
    """`copies` versions of each row with single-token words swapped for a random neighbour w.p. `prob`."""
    out = []
    for _ in range(copies):
        for row in x:
            head, words, tail = text.words(row)
            new = [[int(rng.choice(table[w[0]]))] if len(w) == 1 and w[0] in table and rng.random() < prob else w
                   for w in words]
            out.append(text.pack(head, new, tail, x.shape[1]))
    return np.stack(out) if out else np.zeros((0, x.shape[1]), np.int64)


def eda(x: np.ndarray, text: TokenText, copies: int, prob: float, rng: np.random.Generator) -> np.ndarray:
    """`copies` versions of each row: each word deleted w.p. `prob` (one always stays), then
    round(prob * words) random swaps of two words."""
    out = []
    for _ in range(copies):
        for row in x:
            head, words, tail = text.words(row)
            kept = [w for w in words if rng.random() >= prob] or words[:1]
            for _ in range(int(round(prob * len(kept)))):
                if len(kept) > 1:
                    i, j = rng.choice(len(kept), 2, replace=False)
                    kept[i], kept[j] = kept[j], kept[i]
            out.append(text.pack(head, kept, tail, x.shape[1]))
    return np.stack(out) if out else np.zeros((0, x.shape[1]), np.int64)


def held_out_rows(ids: np.ndarray, data) -> List[int]:
    """The rows of `ids` that are also validation or test texts of `data`."""
    def key(row: np.ndarray) -> bytes:  # (the ids without padding: splits may be padded to other widths)
        return row[row != data.pad_id].tobytes()
    held = {key(row) for x in (data.x_val, data.x_test) for row in x.numpy()}
    return [i for i, row in enumerate(ids) if key(row) in held]


def not_held_out(ids: np.ndarray, data, path: str) -> np.ndarray:
    """`ids`, refused when a text is also a validation or test text: the student would learn the teacher's
    labels of the texts it is scored on."""
    found = held_out_rows(ids, data)
    if found:
        raise UserError(f"distill.data.unlabeled: {path}: {len(found)} of its {len(ids)} texts are validation or "
                        f"test texts too (the first: text {found[0] + 1}); the student would learn the teacher's "
                        f"labels of texts it is scored on; remove them")
    return ids


def with_augmented_texts(data, ddcfg: Dict, data_cfg: Dict, teacher, seed: int):
    """`data` plus the augmented copies and unlabeled texts of `distill.data`, appended to the training split
    with label -1 (no hard label: the teacher's soft labels are their target). Returns (bundle, counts)."""
    from ..models.hf import load_tokenizer
    from .text import tokenize_file
    x = data.x_train.numpy()
    rng = np.random.default_rng(seed)
    parts: Dict[str, np.ndarray] = {}
    tok = load_tokenizer(data_cfg["tokenizer"], "data.tokenizer")
    if ddcfg["substitute"] or ddcfg["eda"]:
        text = TokenText(tok)
        if ddcfg["substitute"]:
            table = neighbour_table(teacher.hf.get_input_embeddings().weight, text, np.unique(x).tolist(),
                                    ddcfg["neighbours"])
            parts["substitute"] = substitute(x, text, table, ddcfg["substitute"], ddcfg["word_prob"], rng)
        if ddcfg["eda"]:
            parts["eda"] = eda(x, text, ddcfg["eda"], ddcfg["word_prob"], rng)
    if ddcfg["unlabeled"]:
        parts["unlabeled"] = not_held_out(tokenize_file(ddcfg["unlabeled"], data_cfg, tok, labelled=False)[0], data,
                                          ddcfg["unlabeled"])
    counts = {k: len(v) for k, v in parts.items()}
    if not parts:
        return data, counts
    return with_teacher_labelled(data, torch.from_numpy(np.concatenate(list(parts.values())))), counts
