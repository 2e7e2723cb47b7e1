"""Divergences between the teacher's and the student's distributions at each position (a token of a language
model, or a sample of a classifier), for `distill.method`:

    forward_kl        KL(p_t || p_s)                       the teacher's distribution is the target
    reverse_kl        KL(p_s || p_t)                       mode-seeking (MiniLLM)
    jsd               beta KL(p_t || m) + (1-beta) KL(p_s || m),  m = beta p_t + (1-beta) p_s   (GKD)
                      beta = 0 is forward KL and beta = 1 reverse KL, TRL's convention (the formula itself
                      tends to 0 at both ends, so the ends are defined as those two divergences)
    skew_kl           KL(p_t || alpha p_t + (1-alpha) p_s)        (DistiLLM)
    skew_reverse_kl   KL(p_s || alpha p_s + (1-alpha) p_t)        (DistiLLM)
    tvd               1/2 sum |p_t - p_s|

Each is computed in fp32 on logits divided by T and multiplied by T^2, averaged over the positions where
`mask` is true (weighted per sample by `weights`). Positions are taken `chunk` at a time, each chunk
recomputed in the backward pass, so that the fp32 copies of batch x length x vocabulary are never all held
at once.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..registry import LOSSES

CHUNK = 4096  # positions per chunk: 4096 x 49,152 vocabulary x 4 bytes = 0.8 GB of fp32 per live copy


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _mix(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q)."""
    if w <= 0.0:
        return log_q
    if w >= 1.0:
        return log_p
    return torch.logsumexp(torch.stack([log_p + math.log(w), log_q + math.log1p(-w)]), 0)


def per_position(name: str, log_s: torch.Tensor, log_t: torch.Tensor, beta: float = 0.5,
                 alpha: float = 0.1) -> torch.Tensor:
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return _kl(log_t, log_s)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return _kl(log_s, log_t)
    if name == "jsd":
        m = _mix(log_t, log_s, beta)
        return beta * _kl(log_t, m) + (1 - beta) * _kl(log_s, m)
    if name == "skew_kl":
        return _kl(log_t, _mix(log_t, log_s, alpha))
    if name == "skew_reverse_kl":
        return _kl(log_s, _mix(log_s, log_t, alpha))
    if name == "tvd":
        return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    raise KeyError(name)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 up to fp32 (the losses are computed in fp32); fp64 kept (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scaled(logits: torch.Tensor, t: float) -> torch.Tensor:
    """logits / T in fp32 or higher (no division at T = 1: a pass over the vocabulary saved)."""
    z = _at_least_fp32(logits)
    return z if t == 1.0 else z / t


def _log_probs(logits: torch.Tensor, t: float) -> torch.Tensor:
    return F.log_softmax(_scaled(logits, t), dim=-1)


FLOOR = -1e4  # log-probability standing in for log 0 (exp gives exactly 0 in fp32, and no inf or NaN)


class TopkBuckets(torch.autograd.Function):
    """The student's log-probabilities over the teacher's k + 1 buckets, from its logits z (already / T):
    log p(id) for the k ids, then log p(tail), the mass outside them, summed over the other tokens (not
    1 - the kept mass, which rounds to 0 when the tail is small and would blow its gradient up).

    Written out, forward and backward, because autograd through log_softmax, scatter and logsumexp makes
    five vocabulary-sized temporaries a position, and this one two: e = exp(z - max z), kept for the
    backward pass, and the gradient made from it. With p = softmax(z) and p_tail the softmax over the tokens
    outside the ids (0 on them): d log p(id_i)/dz = onehot(id_i) - p, d log p(tail)/dz = p_tail - p.
    A row whose tail underflows e (its mass below 1e-30 of the top token's) is summed again exactly alone."""

    TINY = 1e-30

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        mx = z.amax(-1, keepdim=True)
        e = (z - mx).exp_()
        s_all = e.sum(-1, keepdim=True)
        lse = mx + s_all.log()
        kept = z.gather(-1, ids) - lse
        s_tail = e.scatter_(-1, ids, 0.0).sum(-1, keepdim=True)
        lse_tail = mx + s_tail.log()
        low = ((s_tail < TopkBuckets.TINY).squeeze(-1) & (ids.shape[-1] < z.shape[-1])).nonzero().squeeze(1)
        z_low = z.index_select(0, low)
        if len(low):  # (exactly, at its own scale)
            lse_tail[low] = torch.logsumexp(z_low.scatter(-1, ids[low], float("-inf")), -1, keepdim=True)
        ctx.save_for_backward(e, ids, s_all, s_tail, kept, lse, lse_tail, low, z_low)
        return torch.cat([kept, (lse_tail - lse).clamp_min(FLOOR)], -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        e, ids, s_all, s_tail, kept, lse, lse_tail, low, z_low = ctx.saved_tensors
        k = ids.shape[-1]
        g_kept, g_tail = g[..., :k], g[..., k:] * (lse_tail - lse >= FLOOR)  # (no gradient through the floor)
        g_sum = g_kept.sum(-1, keepdim=True) + g_tail
        tail_scale = torch.where(s_tail >= TopkBuckets.TINY, g_tail / s_tail.clamp_min(TopkBuckets.TINY), 0.0)
        grad = e * (tail_scale - g_sum / s_all)  # off the ids: g_tail p_tail - g_sum p (e kept: retain_graph)
        if len(low):
            p_tail = (z_low - lse_tail[low]).exp_().scatter_(-1, ids[low], 0.0)
            grad[low] += p_tail * g_tail[low]
        grad.scatter_(-1, ids, -g_sum * kept.exp())  # on the ids: g_kept - g_sum p (set once, then added)
        return grad.scatter_add_(-1, ids, g_kept), None


def topk_buckets(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's log-probabilities over the teacher's k + 1 buckets, its k ids then the rest (the tail),
    from its logits `z` (divided by T)."""
    return TopkBuckets.apply(z, ids)


def require_same_shape(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       topk: int = 0) -> None:
    """Logit KD compares one vocabulary (or class list) on both sides: a mismatch is a user's, said plainly
    (with the way out that applies: vocab_align compares dense logits, not a top-k cache's)."""
    if student_logits.shape == teacher_logits.shape:
        return
    from ..errors import UserError
    if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
        how = "set distill.topk: 0 (dense logits) and distill.vocab_align: truncate" if topk else \
            "set distill.vocab_align: truncate"
        raise UserError(f"distill.method: {name}: the student gives {student_logits.shape[-1]:,} logits per "
                        f"token and the teacher {teacher_logits.shape[-1]:,}; logit KD needs one vocabulary "
                        f"({how} when the tokenizers agree and only the output layers are padded to different "
                        f"sizes)")
    raise UserError(f"distill.method: {name}: the student gives logits of shape {tuple(student_logits.shape)} "
                    f"and the teacher {tuple(teacher_logits.shape)}; the vocabularies (or classes) must match")


def token_divergence(name: str, student_logits: torch.Tensor, teacher_logits: Any, temperature: float,
                     weights: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                     chunk: int = CHUNK, **settings: float) -> torch.Tensor:
    """`name`'s divergence averaged over the masked positions, times T^2, `chunk` positions at a time.

    The teacher is dense logits, or (a cached teacher) `TeacherOutputs` in the top-k form: its k ids and
    log-probabilities at the temperature plus the tail's log-mass. Then both sides are compared over those
    k + 1 buckets, the student's tail being its probability outside the teacher's k ids; with k equal to the
    vocabulary that is the dense divergence."""
    if not isinstance(teacher_logits, torch.Tensor):
        return _topk_divergence(name, student_logits, teacher_logits, temperature, weights, mask, chunk, **settings)
    require_same_shape(name, student_logits, teacher_logits)
    vocab, t = student_logits.shape[-1], float(temperature)
    w = _weights(student_logits, weights, mask)

    def chunk_sum(s_c: torch.Tensor, t_c: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
        return (per_position(name, _log_probs(s_c, t), _log_probs(t_c.detach(), t), **settings) * w_c).sum()
    return _chunked(chunk_sum, student_logits.reshape(-1, vocab), [teacher_logits.reshape(-1, vocab)], w, chunk) * (t * t)


def _weights(student_logits: torch.Tensor, weights: Optional[torch.Tensor], mask: Optional[torch.Tensor]
             ) -> torch.Tensor:
    """Per position (flattened): the mask, times the sample's weight."""
    lead = student_logits.shape[:-1]
    w = torch.ones(lead, device=student_logits.device) if mask is None else \
        mask.to(student_logits.device, torch.float32).expand(lead)
    if weights is not None:  # per sample, over its positions
        w = w * weights.float().reshape(weights.shape + (1,) * (len(lead) - weights.dim()))
    return w.reshape(-1)


def _chunked(chunk_sum: Callable, s: torch.Tensor, teacher: list, w: torch.Tensor, chunk: int) -> torch.Tensor:
    """The weighted mean over positions of `chunk_sum`, `chunk` positions at a time (each chunk recomputed in
    the backward pass when it needs a gradient). Positions of weight 0 (masked out: a prompt, padding) are
    dropped first, so no pass over the vocabulary is spent on them."""
    total = s.new_zeros((), dtype=torch.promote_types(s.dtype, torch.float32))
    keep = w != 0
    if not bool(keep.all()):
        rows = keep.nonzero().squeeze(1)
        s, teacher, w = s.index_select(0, rows), [t.index_select(0, rows.to(t.device)) for t in teacher], w[rows]
    recompute = torch.is_grad_enabled() and s.requires_grad and len(s) > chunk
    for i in range(0, len(s), chunk):
        part = (s[i:i + chunk], *(t[i:i + chunk] for t in teacher), w[i:i + chunk])
        total = total + (checkpoint(chunk_sum, *part, use_reentrant=False) if recompute else chunk_sum(*part))
    return total / w.sum().clamp_min(1e-12)


def _topk_divergence(name: str, student_logits: torch.Tensor, teacher: Any, temperature: float,
                     weights: Optional[torch.Tensor], mask: Optional[torch.Tensor], chunk: int,
                     **settings: float) -> torch.Tensor:
    from ..errors import UserError
    if teacher.topk_ids is None:
        raise UserError(f"distill.method: {name}: the teacher source gives neither dense logits nor top-k outputs")
    if teacher.topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise UserError(f"distill.method: {name}: the top-k teacher outputs cover positions "
                        f"{tuple(teacher.topk_ids.shape[:-1])}, the student {tuple(student_logits.shape[:-1])}")
    vocab, k, t = student_logits.shape[-1], teacher.topk_ids.shape[-1], float(temperature)
    if int(teacher.topk_ids.max()) >= vocab:
        raise UserError(f"distill.method: {name}: the cached teacher names token {int(teacher.topk_ids.max())}, "
                        f"outside the student's {vocab:,}-token vocabulary; one tokenizer is needed")
    device = student_logits.device
    log_t = _at_least_fp32(torch.cat([teacher.topk_logprobs, teacher.tail_mass], -1).to(device)).clamp_min(FLOOR)

    def chunk_sum(s_c: torch.Tensor, ids_c: torch.Tensor, t_c: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
        log_s = topk_buckets(_scaled(s_c, t), ids_c)
        return (per_position(name, log_s, t_c, **settings) * w_c).sum()
    return _chunked(chunk_sum, student_logits.reshape(-1, vocab),
                    [teacher.topk_ids.to(device).reshape(-1, k), log_t.reshape(-1, k + 1)],
                    _weights(student_logits, weights, mask), chunk) * (t * t)


def _register(name: str, settings: Optional[str], doc: str) -> Callable:
    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
             weights: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, **kw: float) -> torch.Tensor:
        return token_divergence(name, student_logits, teacher_logits, temperature, weights, mask, **kw)
    loss.__name__, loss.__doc__ = name, doc
    tags = {"settings": settings} if settings else {}
    return LOSSES.register(name, group="logits", topk=True, **tags)(loss)


forward_kl = _register("forward_kl", None, "KL(p_t || p_s) per position, masked mean, times T^2.")
reverse_kl = _register("reverse_kl", None, "KL(p_s || p_t) per position, masked mean, times T^2.")
jsd = _register("jsd", "jsd", "Generalized JSD(beta) (GKD; beta 0: forward KL, 1: reverse KL), masked mean, T^2.")
skew_kl = _register("skew_kl", "skew", "KL(p_t || alpha p_t + (1-alpha) p_s) (DistiLLM), masked mean, T^2.")
skew_reverse_kl = _register("skew_reverse_kl", "skew",
                            "KL(p_s || alpha p_s + (1-alpha) p_t) (DistiLLM), masked mean, T^2.")
tvd = _register("tvd", None, "Total variation 1/2 sum |p_t - p_s| per position, masked mean, times T^2.")
