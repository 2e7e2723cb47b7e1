"""Signals watched while distilling, and the reaction to them.

- Knowledge retention: how similar the student's representations are to the teacher's, on a fixed
  validation probe, per epoch. Linear CKA (Kornblith et al., 2019) compares two sets of representations of
  the same inputs by their sample-by-sample similarity structure, so it needs no projector and works across
  widths: 1 for representations equal up to rotation and scale, near 0 for unrelated ones. It is computed from
  the n x n Gram matrices, so wide features (a text model's tokens x hidden) cost no more than narrow ones.
  Beside it, the cosine between the projected student features and the teacher's: what the feature loss
  itself sees.
- Gradient consistency: (a) the cosine between the teacher's and the student's input gradients of their
  losses on the probe: both read the same input, so the directions compare whatever the widths; (b) the
  cosine between the parameter gradients that the distillation term and the hard-label term push into the
  student, overall and per layer, on training batches: negative means the teacher pulls against the labels.
- The reaction: under `monitor.retention_min`, warn and adjust the distillation strength.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .engine.inference import fast_pooling
from .hooks import FeatureCapture
from .losses import align


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two batches of representations (first dimension: the same n samples).

    <HKH, HLH> / (|HKH| |HLH|) with K = XX^T, L = YY^T and H the centering matrix, computed from the centred
    features: HKH = XcXc^T, so no n x n centering matrix and no n^3 products; for features narrower than the
    batch, in feature space (<XcXc^T, YcYc^T> = |Xc^T Yc|^2)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    if max(x.shape[1], y.shape[1]) <= x.shape[0]:
        hsic, kk, ll = (x.T @ y).square().sum(), (x.T @ x).norm(), (y.T @ y).norm()
    else:
        k, l_ = x @ x.T, y @ y.T
        hsic, kk, ll = (k * l_).sum(), k.norm(), l_.norm()
    denom = float(kk * ll)
    return float(hsic) / denom if denom > 0 else 0.0


def _outputs(model: nn.Module, layers: List[str], x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    was_training = model.training
    model.eval()
    try:
        with fast_pooling(model), FeatureCapture(model, layers, "distill.features") as cap, torch.inference_mode():
            logits = model(x)
            feats = {k: cap.outputs[k] for k in layers}
    finally:
        model.train(was_training)
    return logits, feats


def projected_cosine(s_feat: torch.Tensor, t_feat: torch.Tensor, projector: nn.Module) -> Optional[float]:
    """Mean per-sample cosine between the projected student features and the teacher's (None when the two
    do not compare element by element, e.g. attention maps with other head counts)."""
    with torch.no_grad():
        s, t = align(s_feat, t_feat, projector)
    if s.shape != t.shape:
        return None
    return F.cosine_similarity(s.flatten(1).float(), t.flatten(1).float(), dim=1).mean().item()


def retention_monitor(teacher: nn.Module, student: nn.Module, probe: torch.Tensor,
                      pairs: List[Tuple[str, str]], projectors: Sequence[nn.Module] = (),
                      labels: Optional[torch.Tensor] = None) -> Callable[[], Dict[str, float]]:
    """A function giving, on `probe`: linear CKA between teacher and student for the logits and each mapped
    (teacher layer, student layer) pair; the cosine after each pair's projector (`projectors`, in pair
    order); with `labels`, the input-gradient cosine. The teacher's side is computed once."""
    t_logits, t_feats = _outputs(teacher, [t for t, _ in pairs], probe)
    n_grad = 32 if probe.dtype == torch.long else 64  # text: each token's gradient spans the vocabulary
    t_grad = input_gradient(teacher, probe[:n_grad], labels[:n_grad]) if labels is not None else None

    def measure() -> Dict[str, float]:
        s_logits, s_feats = _outputs(student, [s for _, s in pairs], probe)
        out = {"retention_cka/logits": linear_cka(t_logits, s_logits)}
        for t, s in pairs:  # (text features: both models trim the probe to the same length)
            out[f"retention_cka/{t}->{s}"] = linear_cka(t_feats[t], s_feats[s])
        for (t, s), proj in zip(pairs, projectors):
            cos = projected_cosine(s_feats[s], t_feats[t], proj)
            if cos is not None:
                out[f"retention_cos/{t}->{s}"] = cos
        if t_grad is not None:
            cos = gradient_cosine(t_grad, input_gradient(student, probe[:n_grad], labels[:n_grad]))
            if cos is not None:
                out["grad_input_cos"] = cos
        return out
    return measure


# ---------------------------------------------------------------- gradient consistency

class InputGradient:
    """d CE / d input, per sample. For images and vectors, the gradient itself; for token ids, the
    gradient with respect to each token's one-hot vector, g_emb @ E^T, kept factored as (g_emb, E) since it
    spans the vocabulary (two models with one vocabulary compare through E_t^T E_s, whatever the widths)."""

    def __init__(self, grad: torch.Tensor, embedding: Optional[torch.Tensor] = None) -> None:
        self.grad, self.embedding = grad.double(), None if embedding is None else embedding.double()


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> InputGradient:
    """The input gradient of `model`'s summed cross-entropy on (x, y), in eval mode; the model's parameters
    receive no gradient and its train/eval mode is restored."""
    was_training = model.training
    model.eval()
    # token ids: differentiate by the embedded tokens (a Hugging Face model's table, or the registry GPT's)
    table = model.hf.get_input_embeddings() if hasattr(model, "hf") else \
        model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    store: Dict[str, torch.Tensor] = {}

    def leaf(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
        store["x"] = out.detach().requires_grad_(True)  # the embedded tokens, as a leaf to differentiate by
        return store["x"]
    handle = table.register_forward_hook(leaf) if table is not None else None
    try:
        with torch.enable_grad():
            if table is None:
                store["x"] = x.detach().float().requires_grad_(True)
            logits = model(store["x"] if table is None else x)
            keep = y >= 0
            loss = F.cross_entropy(logits[keep].float(), y[keep], reduction="sum")
            (grad,) = torch.autograd.grad(loss, store["x"])
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    return InputGradient(grad.flatten(1) if table is None else grad, None if table is None else table.weight.detach())


def gradient_cosine(a: InputGradient, b: InputGradient) -> Optional[float]:
    """Mean per-sample cosine between two models' input gradients (None for token gradients of models with
    different vocabularies or sequence lengths, which do not compare)."""
    if a.embedding is None:
        if a.grad.shape != b.grad.shape:
            return None
        return F.cosine_similarity(a.grad, b.grad, dim=1).mean().item()
    if b.embedding is None or a.embedding.shape[0] != b.embedding.shape[0] or a.grad.shape[:2] != b.grad.shape[:2]:
        return None
    ea, eb = a.embedding, b.embedding  # (vocab, width) each
    # <g_a E_a^T, g_b E_b^T> per token = g_a (E_a^T E_b) g_b^T: summed over tokens, per sample
    dot = torch.einsum("ntd,de,nte->n", a.grad, ea.T @ eb, b.grad)
    na = torch.einsum("ntd,de,nte->n", a.grad, ea.T @ ea, a.grad)
    nb = torch.einsum("ntd,de,nte->n", b.grad, eb.T @ eb, b.grad)
    ok = (na > 0) & (nb > 0)
    return (dot[ok] / (na[ok] * nb[ok]).sqrt()).mean().item() if bool(ok.any()) else None


def layer_of(param_name: str) -> str:
    """A parameter's layer, for per-layer signals: its name up to the first block index ("body.3",
    "hf.bert.encoder.layer.2"), else its module ("hf.classifier")."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) or param_name


def kd_ce_consistency(student: nn.Module, kd: torch.Tensor, ce: torch.Tensor) -> Dict[str, float]:
    """Cosine between the parameter gradients of the KD term and of the CE term, over all the student's
    parameters and per layer; the graph is kept, so the step's own backward pass follows unchanged."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    g_kd = torch.autograd.grad(kd, params, retain_graph=True, allow_unused=True)
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    layers: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    for (name, _), a, b in zip(named, g_kd, g_ce):
        if a is not None and b is not None:
            layers.setdefault(layer_of(name), []).append((a.flatten().double(), b.flatten().double()))
    out: Dict[str, float] = {}
    every = [pair for pairs in layers.values() for pair in pairs]
    for key, pairs in [("grad_kd_ce_cos", every)] + [(f"grad_kd_ce_cos/{k}", v) for k, v in layers.items()]:
        a, b = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        denom = (a.norm() * b.norm()).item()
        if denom > 0:  # (no hard labels in the batch: no CE gradient, nothing to compare)
            out[key] = (a @ b).item() / denom
    return out


# raise_feature_weight multiplies the feature losses' weights by at most this: a retention that the features
# cannot lift (a student too small) otherwise grew it by `factor` every epoch, to 1e7 in 40 epochs, until the
# feature losses drowned the task's and the student fell below the one trained without distillation.
FEATURE_SCALE_MAX = 10.0


def _unchanged(action: str) -> str:
    """Why a reaction changed nothing: warn changes nothing; the others stop at their bounds."""
    bound = {"lower_temperature": "the temperature is at its floor, 1", "raise_alpha": "alpha is at its ceiling, 1",
             "raise_feature_weight": f"the feature scale is at its ceiling, {FEATURE_SCALE_MAX:g}"}
    return "no adjustment (action: warn)" if action == "warn" else \
        f"no adjustment (action: {action}; {bound.get(action, 'at its bound')})"


def with_reaction(measure: Callable[[], Dict[str, float]], objective: nn.Module, mcfg: Dict, warn: Callable
                  ) -> Callable[[], Dict]:
    """`measure`, plus the recipe's reaction: when the watched retention is under `monitor.retention_min`,
    warn and adjust the objective's distillation strength; the change is returned with the signals (so the
    epoch's log line records it, before and after) and saved in checkpoints with the objective. A reaction at
    its bound is said once (the log line of each epoch still records it): it was the same line every epoch."""
    said_bound = False

    def signals() -> Dict:
        nonlocal said_bound
        out: Dict = measure()
        if mcfg["retention_min"] is None:
            return out
        values = [v for k, v in out.items() if k.startswith("retention_cka/")]
        watched = out["retention_cka/logits"] if mcfg["watch"] == "logits" else sum(values) / len(values)
        if watched >= mcfg["retention_min"]:
            return out
        s, f, before = objective.strength, mcfg["factor"], dict(objective.strength)
        if mcfg["action"] == "raise_feature_weight":
            s["feature_scale"] = min(FEATURE_SCALE_MAX, max(s["feature_scale"], s["feature_scale"] * f))
        elif mcfg["action"] == "lower_temperature":
            s["temperature"] = min(s["temperature"], max(1.0, s["temperature"] / f))  # (never raised)
        elif mcfg["action"] == "raise_alpha":
            s["alpha"] = min(1.0, s["alpha"] * f)
        changed = {k: [before[k], s[k]] for k in s if s[k] != before[k]}
        bound = not changed and mcfg["action"] != "warn"
        if not (bound and said_bound):
            warn(f"monitor: retention {watched:.3f} < {mcfg['retention_min']}: "
                 + (", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items()) or _unchanged(mcfg["action"]))
                 + (" (said once; each epoch's log line records it)" if bound else ""))
        said_bound = said_bound or bound
        out.update(retention_watched=watched, adjusted=changed)
        return out
    return signals
