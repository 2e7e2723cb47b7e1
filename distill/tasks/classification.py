"""Classification: images, tabular rows and texts, with one label per sample (-1: none, a teacher-labelled
text), trained on logits and selected by validation accuracy."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment, has_augmentation
from ..engine.batch import Batch
from ..engine.inference import predict
from ..registry import TASKS


@TASKS.register("classification")
class Classification:
    name = "classification"
    select_metric = "val_accuracy"

    def __init__(self, data: Any = None, cfg: Any = None) -> None:
        pass

    def lower_is_better(self, metric: str) -> bool:
        return metric.endswith("loss")

    def collate(self, data: Any, idx: torch.Tensor, transforms: Dict[str, Any], seed: int) -> Batch:
        x = data.x_train[idx]
        if has_augmentation(transforms):
            x = augment(x, transforms, torch.Generator().manual_seed(seed))
        return Batch(x, data.y_train[idx], idx)

    def counts(self, logits: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Correct predictions among the samples with a hard label, and how many have one (for the training
        accuracy, summed over the epoch on the device)."""
        # (label -1 never equals an argmax, so unlabelled samples are never counted correct)
        return {"correct": (logits.argmax(-1) == y).sum(), "labelled": (y >= 0).sum()}

    def validate(self, model: nn.Module, data: Any, batch_size: int, runtime: Any = None) -> Dict[str, float]:
        if not len(data.y_val):  # data.val_fraction: 0 (selection by the last epoch)
            return {}
        logits = predict(model, data.x_val, batch_size, runtime)
        return {"val_accuracy": (logits.argmax(1) == data.y_val).float().mean().item(),
                "val_loss": F.cross_entropy(logits, data.y_val).item()}

    def metrics(self, logits: torch.Tensor, y: torch.Tensor, ecfg: Dict[str, Any]) -> Dict[str, float]:
        """The test metrics named in `evaluate.metrics` that apply (the binary ones to two classes)."""
        m = classification_metrics(logits, y, ecfg["positive_class"])
        return {k: v for k, v in m.items() if k in ecfg["metrics"]}


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, positive: int = 1) -> Dict[str, float]:
    """Accuracy and macro-F1; for two classes also AUC, sensitivity and specificity of class `positive`."""
    from sklearn.metrics import f1_score, roc_auc_score  # (here: a language-model run does not load sklearn)
    pred, y_np = logits.argmax(1).numpy(), y.numpy()
    out = {"accuracy": float((pred == y_np).mean()),
           # (over the classes in the labels or the predictions: a class the test split lacks and no model
           # predicts would count as F1 0 and understate every model)
           "macro_f1": float(f1_score(y_np, pred, average="macro", zero_division=0))}
    if logits.shape[1] == 2:
        prob = torch.softmax(logits, 1)[:, positive].numpy()
        is_pos = y_np == positive
        # (undefined when the test split lacks a class: null in metrics.json, which NaN is not valid JSON for)
        out["auc"] = float(roc_auc_score(is_pos, prob)) if 0 < is_pos.sum() < len(is_pos) else None
        out["sensitivity"] = float((pred[is_pos] == positive).mean()) if is_pos.any() else None
        out["specificity"] = float((pred[~is_pos] != positive).mean()) if (~is_pos).any() else None
    return out

