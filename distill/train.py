"""The training loop, for a teacher, a scratch student and a distilled student alike.

Read it in one sitting: `Objective` turns a batch into a loss (CE only, or the distillation mix), and
`fit` runs epochs of that objective, evaluates on the validation split after each, and keeps the epoch
with the best validation accuracy. The test split is never seen here.
"""
from __future__ import annotations

import copy
import math
import random
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .data import DataBundle, augment, has_augmentation
from .errors import UserError
from .hooks import FeatureCapture
from .io import append_jsonl
from .losses import Projector, align, ce_loss, kd_loss
from .progress import bar
from .registry import LOSSES

# (x, idx) -> teacher logits and features for that batch: computed online or read from the cache.
TeacherSource = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Objective(nn.Module):
    """loss = (1 - alpha) * CE(student, labels) + alpha * KD(student, teacher; T) + sum_i w_i * feature_i.

    Without a teacher it is plain cross-entropy (the scratch baseline). Projectors live here, not in the
    student, so they train with it and are left out of the exported student.
    """

    def __init__(self, student: nn.Module, dcfg: Optional[Dict[str, Any]] = None,
                 teacher: Optional[TeacherSource] = None,
                 teacher_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
                 student_shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.dcfg = dcfg or {"alpha": 0.0, "temperature": 1.0, "features": []}
        self.features: List[Dict[str, Any]] = self.dcfg["features"] if teacher else []
        self.projectors = nn.ModuleList()
        for i, f in enumerate(self.features):
            s_shape, t_shape = student_shapes[f["student"]], teacher_shapes[f["teacher"]]
            self.projectors.append(Projector(f["projector"], s_shape[0] if len(s_shape) == 3 else s_shape[-1],
                                             t_shape[0] if len(t_shape) == 3 else t_shape[-1],
                                             where=f"distill.features[{i}]"))
        self._capture = FeatureCapture(student, [f["student"] for f in self.features], "distill.features")

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        with self._capture as cap:
            logits = self.student(x)
        alpha = self.dcfg["alpha"] if self.teacher else 0.0
        loss = ce_loss(logits, y)
        parts = {"ce": loss.item()}
        if self.teacher is None:
            parts["total"] = parts["ce"]
            return loss, parts
        t_logits, t_feats = self.teacher(x, idx)
        kd = kd_loss(logits, t_logits, self.dcfg["temperature"])
        parts["kd"] = kd.item()
        loss = (1 - alpha) * loss + alpha * kd
        for i, (f, proj) in enumerate(zip(self.features, self.projectors)):
            s_feat, t_feat = align(cap.outputs[f["student"]], t_feats[f["teacher"]], proj)
            if s_feat.shape != t_feat.shape:
                raise UserError(f"distill.features[{i}]: student '{f['student']}' gives {tuple(s_feat.shape[1:])} "
                                f"after the projector, teacher '{f['teacher']}' gives {tuple(t_feat.shape[1:])}")
            term = LOSSES.get(f["loss"])(s_feat, t_feat)
            parts[f"feat{i}_{f['loss']}"] = term.item()
            loss = loss + f["weight"] * term
        parts["total"] = loss.item()
        return loss, parts


def make_optimizer(params, ocfg: Dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, wd = ocfg["name"], ocfg["lr"], ocfg["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=ocfg["momentum"], weight_decay=wd, nesterov=ocfg["nesterov"])
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def lr_factor(epoch: int, scfg: Dict[str, Any], epochs: int) -> float:
    """Multiplier of the base lr at `epoch`: linear warm-up, then constant, cosine or multi-step decay."""
    warm = scfg["warmup_epochs"]
    if epoch < warm:
        return (epoch + 1) / (warm + 1)
    if scfg["name"] == "cosine":
        span = max(1, epochs - warm)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))
    if scfg["name"] == "multistep":
        return scfg["gamma"] ** sum(epoch >= m for m in scfg["milestones"])
    return 1.0


def batches(n: int, batch_size: int, gen: torch.Generator) -> List[torch.Tensor]:
    """A shuffled epoch of index batches; a trailing batch of one sample is dropped (BatchNorm needs two)."""
    perm = torch.randperm(n, generator=gen)
    out = list(perm.split(batch_size))
    return out[:-1] if len(out) > 1 and len(out[-1]) == 1 else out


class _EpochBatches(torch.utils.data.Dataset):
    """Batch i of an epoch: inputs (augmented with its own seeded generator), labels and sample indices.

    Seeding each batch from (epoch seed, i) makes the augmentation the same whether batches are made in
    this process or in `data.workers` loader processes.
    """

    def __init__(self, data: DataBundle, data_cfg: Dict[str, Any], index_batches: List[torch.Tensor],
                 epoch_seed: int) -> None:
        self.data, self.tcfg, self.batches, self.seed = data, data_cfg["transforms"], index_batches, epoch_seed
        self.augmenting = has_augmentation(self.tcfg)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.batches[i]
        x = self.data.x_train[idx]
        if self.augmenting:
            x = augment(x, self.tcfg, torch.Generator().manual_seed(self.seed + i))
        return x, self.data.y_train[idx], idx


def epoch_batches(data: DataBundle, data_cfg: Dict[str, Any], gen: torch.Generator):
    ds = _EpochBatches(data, data_cfg, batches(len(data.y_train), data_cfg["batch_size"], gen),
                       int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    if data_cfg["workers"] == 0:
        return (ds[i] for i in range(len(ds)))
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=data_cfg["workers"])


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits in eval mode without a graph; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    return (predict(model, x, batch_size).argmax(1) == y).float().mean().item()


def fit(role: str, objective: Objective, data: DataBundle, data_cfg: Dict[str, Any], tcfg: Dict[str, Any],
        log_path: Optional[str] = None) -> Dict[str, Any]:
    """Train `objective.student` in place; returns the selected epoch and its validation accuracy."""
    torch.set_flush_denormal(True)  # near-zero losses otherwise make CPU steps 100x slower
    try:
        return _fit(role, objective, data, data_cfg, tcfg, log_path)
    finally:
        torch.set_flush_denormal(False)  # process-wide state: give it back as we found it (the default)


def _fit(role: str, objective: Objective, data: DataBundle, data_cfg: Dict[str, Any], tcfg: Dict[str, Any],
         log_path: Optional[str]) -> Dict[str, Any]:
    student = objective.student
    set_seed(tcfg["seed"])
    gen = torch.Generator().manual_seed(tcfg["seed"])
    opt = make_optimizer([p for p in objective.parameters() if p.requires_grad], tcfg["optimizer"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, tcfg["scheduler"], tcfg["epochs"]))
    bf16 = tcfg["precision"] == "bf16"
    best_val, best_epoch, best_state = -1.0, -1, None
    epochs = bar(range(tcfg["epochs"]), desc=role, unit="epoch")
    for epoch in epochs:
        student.train()  # every epoch: evaluation below switches to eval mode
        objective.train()
        t0, sums, steps = time.perf_counter(), defaultdict(float), 0
        for x, y, idx in epoch_batches(data, data_cfg, gen):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, parts = objective(x, y, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg["grad_clip"]:
                nn.utils.clip_grad_norm_(objective.parameters(), tcfg["grad_clip"])
            opt.step()
            steps += 1
            for k, v in parts.items():
                sums[k] += v
        lr = opt.param_groups[0]["lr"]
        sched.step()
        train_time = time.perf_counter() - t0
        val_acc = accuracy(student, data.x_val, data.y_val, data_cfg["eval_batch_size"])
        if tcfg["select"] == "last" or val_acc > best_val:
            best_val, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(student.state_dict())
        record = {"model": role, "epoch": epoch + 1, "lr": lr, "val_accuracy": val_acc,
                  "train_time_s": round(train_time, 4), **{f"loss_{k}": v / max(steps, 1) for k, v in sums.items()}}
        epochs.set_postfix(loss=f"{sums['total'] / max(steps, 1):.3f}", val=f"{val_acc:.3f}", refresh=False)
        if log_path:
            append_jsonl(log_path, record)
    student.load_state_dict(best_state)
    return {"selected_epoch": best_epoch + 1, "val_accuracy": best_val}
