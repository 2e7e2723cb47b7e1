"""The loss registry: `kd`, `ce` (logits) and `mse`, `cosine` (features)."""
from .feature import Projector, align, feature_cosine, feature_mse
from .kd import ce_loss, kd_loss

__all__ = ["kd_loss", "ce_loss", "feature_mse", "feature_cosine", "Projector", "align"]
