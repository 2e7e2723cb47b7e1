"""The loss registry: `kd`, `ce` (logits), `mse`, `cosine` (features), `attention_kl`, `attention_mse`."""
from .feature import Projector, align, feature_cosine, feature_mse
from .kd import ce_loss, confidence_weights, kd_loss
from .transformer import attention_kl, attention_mse, layer_pairs, transformer_features

__all__ = ["kd_loss", "ce_loss", "confidence_weights", "feature_mse", "feature_cosine", "Projector", "align",
           "attention_kl", "attention_mse", "layer_pairs", "transformer_features"]
