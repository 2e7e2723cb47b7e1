"""Knowledge retention: how similar the student's representations are to the teacher's, measured during
training on a fixed probe batch.

Linear CKA (Kornblith et al., 2019) compares two sets of representations of the same inputs by their
sample-by-sample similarity structure, so it needs no projector and works across widths: 1 for
representations equal up to rotation and scale, near 0 for unrelated ones. It is computed from the n x n
Gram matrices, so wide features (a text model's tokens x hidden) cost no more than narrow ones.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from .hooks import FeatureCapture


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two batches of representations (first dimension: the same n samples)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    k, l_ = x @ x.T, y @ y.T
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n  # centering
    kc, lc = h @ k @ h, h @ l_ @ h
    denom = (kc.norm() * lc.norm()).item()
    return float((kc * lc).sum().item() / denom) if denom > 0 else 0.0


def _outputs(model: nn.Module, layers: List[str], x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    was_training = model.training
    model.eval()
    try:
        with FeatureCapture(model, layers, "distill.features") as cap, torch.inference_mode():
            logits = model(x)
            feats = {k: cap.outputs[k] for k in layers}
    finally:
        model.train(was_training)
    return logits, feats


def retention_monitor(teacher: nn.Module, student: nn.Module, probe: torch.Tensor,
                      pairs: List[Tuple[str, str]]) -> Callable[[], Dict[str, float]]:
    """A function giving linear CKA between teacher and student on `probe`, for the logits and each mapped
    (teacher layer, student layer) pair; the teacher's side is computed once."""
    t_logits, t_feats = _outputs(teacher, [t for t, _ in pairs], probe)

    def measure() -> Dict[str, float]:
        s_logits, s_feats = _outputs(student, [s for _, s in pairs], probe)
        out = {"retention_cka/logits": linear_cka(t_logits, s_logits)}
        for t, s in pairs:  # (text features: both models trim the probe to the same length)
            out[f"retention_cka/{t}->{s}"] = linear_cka(t_feats[t], s_feats[s])
        return out
    return measure


def with_reaction(measure: Callable[[], Dict[str, float]], objective: nn.Module, mcfg: Dict, warn: Callable
                  ) -> Callable[[], Dict]:
    """`measure`, plus the recipe's reaction: when the watched retention is under `monitor.retention_min`,
    warn and adjust the objective's distillation strength; the change is returned with the signals (so the
    epoch's log line records it, before and after) and saved in checkpoints with the objective."""
    def signals() -> Dict:
        out: Dict = measure()
        if mcfg["retention_min"] is None:
            return out
        values = [v for k, v in out.items() if k.startswith("retention_cka/")]
        watched = out["retention_cka/logits"] if mcfg["watch"] == "logits" else sum(values) / len(values)
        if watched >= mcfg["retention_min"]:
            return out
        s, f, before = objective.strength, mcfg["factor"], dict(objective.strength)
        if mcfg["action"] == "raise_feature_weight":
            s["feature_scale"] *= f
        elif mcfg["action"] == "lower_temperature":
            s["temperature"] = max(1.0, s["temperature"] / f)
        elif mcfg["action"] == "raise_alpha":
            s["alpha"] = min(1.0, s["alpha"] * f)
        changed = {k: [before[k], s[k]] for k in s if s[k] != before[k]}
        warn(f"monitor: retention {watched:.3f} < {mcfg['retention_min']}: "
             + (", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items()) or "no adjustment (action: warn)"))
        out.update(retention_watched=watched, adjusted=changed)
        return out
    return signals
