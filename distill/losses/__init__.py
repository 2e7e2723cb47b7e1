"""The loss registry. Logits (`distill.method`): `kd`, `dkd`, `dist`, and per position (tokens or samples)
`forward_kl`, `reverse_kl`, `jsd`, `skew_kl`, `skew_reverse_kl`, `tvd`; labels: `ce`; features through a projector:
`mse`, `cosine`; relations within the batch: `at`, `pkt`, `rkd`, `rkd_distance`, `rkd_angle`, `sp`; with its
own trainable parts: `crd`; transformer attention maps: `attention_kl`, `attention_mse`."""
from . import contrastive, logits, relations, tokens  # noqa: F401  (they register their losses)
from .feature import Projector, align, feature_cosine, feature_mse
from .kd import ce_loss, confidence_weights, kd_loss
from .transformer import attention_kl, attention_mse, layer_pairs, transformer_features

__all__ = ["kd_loss", "ce_loss", "confidence_weights", "feature_mse", "feature_cosine", "Projector", "align",
           "attention_kl", "attention_mse", "layer_pairs", "transformer_features"]
