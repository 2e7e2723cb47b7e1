"""The training loop, for a teacher, a scratch student and a distilled student alike.

Read it in one sitting: `Objective` turns a batch into a loss (CE only, or the distillation mix), and
`fit` runs epochs of that objective, evaluates on the validation split after each, and keeps the epoch
with the best validation accuracy. The test split is never seen here.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoints, rng_state, set_rng_state
from .data import DataBundle, augment, has_augmentation
from .data.augment_text import mask_tokens
from .errors import UserError
from .hooks import FeatureCapture
from .io import write_text
from .logbook import Logbook
from .losses import Projector, align, ce_loss, confidence_weights, kd_loss
from .monitor import kd_ce_consistency
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
            if f["loss"].startswith("attention"):  # maps are compared as they are, head counts aside
                self.projectors.append(nn.Identity())
                continue
            self.projectors.append(Projector(f["projector"], s_shape[0] if len(s_shape) == 3 else s_shape[-1],
                                             t_shape[0] if len(t_shape) == 3 else t_shape[-1],
                                             where=f"distill.features[{i}]"))
        self._capture = FeatureCapture(student, [f["student"] for f in self.features], "distill.features")
        noise = self.dcfg.get("data", {})
        self.mask_fraction = noise["mask_fraction"] if teacher and noise.get("mask") else 0.0
        if self.mask_fraction and getattr(student, "mask_id", None) is None:
            raise UserError("distill.data.mask: the student's tokenizer has no mask token to mask inputs with")
        self.teacher_sees_noise = noise.get("teacher_sees") == "noised"
        # Distillation strength: the monitor's reaction may change it (saved in checkpoints as extra state);
        # the schedules move alpha and T from it as training progresses (`progress`, set by `fit`).
        self.strength = {"alpha": float(self.dcfg["alpha"]), "temperature": float(self.dcfg["temperature"]),
                         "feature_scale": 1.0}
        self.progress = 0.0
        self.terms: Dict[str, torch.Tensor] = {}  # the last batch's KD and CE terms, for gradient consistency

    def get_extra_state(self) -> Dict[str, float]:
        return dict(self.strength)

    def set_extra_state(self, state: Dict[str, float]) -> None:
        self.strength.update(state)

    def current(self, name: str) -> float:
        """alpha or temperature now: the strength, moved towards `<name>_end` by the schedule."""
        sched = self.dcfg.get("schedule") or {}
        kind, start, end = sched.get(name, "constant"), self.strength[name], sched.get(f"{name}_end")
        if kind == "constant" or end is None:
            return start
        p = min(max(self.progress, 0.0), 1.0)
        shape = p if kind == "linear" else (1 - math.cos(math.pi * p)) / 2
        return start + (end - start) * shape

    def noised(self, x: torch.Tensor) -> torch.Tensor:
        """The student's input: token ids with a fraction masked (noise injection), else `x` itself.
        Drawn from the global torch RNG, which checkpoints save, so a resumed run masks the same tokens."""
        if not self.mask_fraction:
            return x
        s = self.student
        return mask_tokens(x, self.mask_fraction, s.mask_id, s.pad_id, s.special_ids)

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        x_student = self.noised(x)
        with self._capture as cap:
            logits = self.student(x_student)
        alpha = self.current("alpha") if self.teacher else 0.0
        loss = ce_loss(logits, y)
        labelled = y >= 0  # (teacher-labelled texts have none)
        parts = {"ce": loss.item(), "correct": float((logits.argmax(1) == y)[labelled].sum()),
                 "labelled": float(labelled.sum())}
        if self.teacher is None:
            parts["total"] = parts["ce"]
            return loss, parts
        t_logits, t_feats = self.teacher(x_student if self.teacher_sees_noise else x, idx)
        weights = confidence_weights(t_logits) if self.dcfg.get("sample_weight") == "confidence" else None
        kd = kd_loss(logits, t_logits, self.current("temperature"), weights)
        parts["kd"] = kd.item()
        self.terms = {"kd": kd, "ce": loss}
        loss = (1 - alpha) * loss + alpha * kd
        for i, (f, proj) in enumerate(zip(self.features, self.projectors)):
            s_feat, t_feat = cap.outputs[f["student"]], t_feats[f["teacher"]]
            if not f["loss"].startswith("attention"):
                s_feat, t_feat = align(s_feat, t_feat, proj)
            if s_feat.shape != t_feat.shape:
                raise UserError(f"distill.features[{i}]: student '{f['student']}' gives {tuple(s_feat.shape[1:])} "
                                f"after the projector, teacher '{f['teacher']}' gives {tuple(t_feat.shape[1:])}")
            term = LOSSES.get(f["loss"])(s_feat, t_feat)
            parts[f"feat{i}_{f['loss']}"] = term.item()
            loss = loss + f["weight"] * self.strength["feature_scale"] * term
        parts["total"] = loss.item()
        return loss, parts


def make_optimizer(params, ocfg: Dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, wd = ocfg["name"], ocfg["lr"], ocfg["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=ocfg["momentum"], weight_decay=wd, nesterov=ocfg["nesterov"])
    fused = {"fused": True} if ocfg.get("fused") else {}  # (off by default: it rounds differently, so old runs differ)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **fused)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **fused)


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


def batches(n: int, batch_size: int, gen: torch.Generator, lengths: Optional[torch.Tensor] = None,
            labels: Optional[torch.Tensor] = None, sampling: str = "random") -> List[torch.Tensor]:
    """A shuffled epoch of index batches; a trailing batch of one sample is dropped (BatchNorm needs two).

    sampling: `random`; `stratified`, every batch with the classes in the data's proportions; `balanced`,
    samples drawn with weights 1/class-count so every class is equally frequent. With `lengths` (text) and
    random sampling, batches are bucketed: indices sorted by length within windows of 50 batches, so
    a batch pads little, and the batch order shuffled.
    """
    if sampling == "balanced":
        groups = labels + 1  # texts without a hard label (-1) are one more group
        weights = 1.0 / torch.bincount(groups)[groups].float()
        perm = torch.multinomial(weights, n, replacement=True, generator=gen)
    elif sampling == "stratified":
        rank = torch.empty(n)
        for c in labels.unique():
            members = (labels == c).nonzero().flatten()
            order = members[torch.randperm(len(members), generator=gen)]
            rank[order] = (torch.arange(len(members)) + torch.rand(len(members), generator=gen)) / len(members)
        perm = rank.argsort()
    else:
        perm = torch.randperm(n, generator=gen)
    out = list(perm.split(batch_size))
    if lengths is not None and sampling == "random":
        window = batch_size * 50
        chunks = [c[lengths[c].argsort(stable=True)] for c in perm.split(window)]
        out = [b for c in chunks for b in c.split(batch_size)]
        out = [out[i] for i in torch.randperm(len(out), generator=gen)]
        out.sort(key=len, reverse=True)  # any short batch last (stable: the shuffled order is kept)
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


def epoch_batches(data: DataBundle, data_cfg: Dict[str, Any], gen: torch.Generator, start: int = 0):
    """The epoch's batches from batch `start` on (a resumed epoch skips those already trained on)."""
    ds = _EpochBatches(data, data_cfg, batches(len(data.y_train), data_cfg["batch_size"], gen, data.lengths,
                                               data.y_train, data_cfg["sampling"]),
                       int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    if data_cfg["workers"] == 0:
        return (ds[i] for i in range(start, len(ds)))
    return torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start, len(ds)),
                                       num_workers=data_cfg["workers"])


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits in eval mode without a graph; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    pad = getattr(model, "pad_id", None)
    order = (x != pad).sum(1).argsort() if pad is not None else None  # text: batch similar lengths together
    try:
        with torch.inference_mode():
            xs = x if order is None else x[order]
            out = torch.cat([model(xs[i:i + batch_size]).float() for i in range(0, len(xs), batch_size)])
    finally:
        model.train(was_training)
    if order is not None:
        out = torch.empty(out.shape).index_copy_(0, order, out)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    return (predict(model, x, batch_size).argmax(1) == y).float().mean().item()


class TrainingDiverged(UserError):
    """Too many consecutive steps with a NaN or Inf loss or gradient."""


class Interrupted(Exception):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written."""

    def __init__(self, role: str, signum: int, where: str, checkpoint: Optional[str]) -> None:
        self.role, self.signum, self.checkpoint = role, signum, checkpoint
        super().__init__(f"{role}: stopped by {signal.Signals(signum).name} at {where}; "
                         f"checkpoint {checkpoint or 'not written (checkpoints are off)'}")


class _StopOnSignal:
    """While training, SIGINT/SIGTERM only set a flag; the loop finishes its step, checkpoints, and stops."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def fit(role: str, objective: Objective, data: DataBundle, data_cfg: Dict[str, Any], tcfg: Dict[str, Any],
        log: Union[str, Logbook, None] = None, checkpoints: Optional[Checkpoints] = None, resume: bool = False,
        monitor: Optional[Callable[[], Dict[str, float]]] = None,
        on_epoch: Optional[Callable[[int, float], None]] = None, every: int = 0,
        gradients: bool = False) -> Dict[str, Any]:
    """Train `objective.student` in place; returns the selected epoch and its validation accuracy.

    With `checkpoints`, state is saved every `train.checkpoint_every` steps and at each epoch end, and
    `resume=True` continues from the newest readable checkpoint, bit for bit as if never stopped.
    `log` (a log.jsonl path or a Logbook) gets a line per epoch, with `monitor()`'s signals, and a line
    every `every` steps; with `gradients`, those steps also measure the KD-vs-CE gradient consistency.
    `on_epoch(epoch, val_accuracy)` is called after each epoch is logged and checkpointed (a search's
    trial pruner raises from it to stop a bad trial).
    """
    book = log if isinstance(log, Logbook) else Logbook(log)
    torch.set_flush_denormal(True)  # near-zero losses otherwise make CPU steps 100x slower
    try:
        with _StopOnSignal() as stop:
            return _fit(role, objective, data, data_cfg, tcfg, book, checkpoints, resume, stop, monitor,
                        on_epoch, every, gradients)
    finally:
        torch.set_flush_denormal(False)  # process-wide state: give it back as we found it (the default)


def _finite_grads(params: List[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def _fit(role: str, objective: Objective, data: DataBundle, data_cfg: Dict[str, Any], tcfg: Dict[str, Any],
         book: Logbook, checkpoints: Optional[Checkpoints], resume: bool, stop: _StopOnSignal,
         monitor: Optional[Callable[[], Dict[str, float]]], on_epoch: Optional[Callable[[int, float], None]],
         every: int, gradients: bool) -> Dict[str, Any]:
    student = objective.student
    set_seed(tcfg["seed"])
    gen = torch.Generator().manual_seed(tcfg["seed"])
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = make_optimizer(params, tcfg["optimizer"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, tcfg["scheduler"], tcfg["epochs"]))
    bf16 = tcfg["precision"] == "bf16"
    # Everything about where training stands; saved in checkpoints as is.
    # (`window`: loss sums since the last step record; `signals`: the epoch's gradient-consistency sums)
    prog: Dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_val": -1.0, "best_epoch": -1,
                            "best_state": None, "sums": {}, "bad": 0, "skipped": 0, "window": {}, "signals": {}}
    saved = checkpoints.latest() if (checkpoints and resume) else None
    if saved:
        objective.load_state_dict(saved["objective"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["epoch_gen"])
        set_rng_state(saved["rng"])
        prog = {"window": {}, "signals": {}, **saved["progress"]}
        if book.path:
            trim_log(book.path, role, prog["epoch"], prog["step"])
    elif checkpoints:
        checkpoints.clear()

    def save(epoch_gen: torch.Tensor) -> Optional[str]:
        if not checkpoints:
            return None
        return checkpoints.save(prog["step"], {"objective": objective.state_dict(), "optimizer": opt.state_dict(),
                                               "scheduler": sched.state_dict(), "epoch_gen": epoch_gen,
                                               "rng": rng_state(), "progress": prog})

    n_train, bs = len(data.y_train), data_cfg["batch_size"]
    per_epoch = -(-n_train // bs) - (1 if n_train % bs == 1 and n_train > 1 else 0)  # as `batches` makes them
    steps = bar(None, desc=role, unit="step", total=tcfg["epochs"] * per_epoch,
                initial=prog["epoch"] * per_epoch + prog["batch"])
    for epoch in range(prog["epoch"], tcfg["epochs"]):
        epoch_gen = gen.get_state()  # the epoch's batches are drawn from here: a resume redraws the same
        student.train()  # every epoch: evaluation below switches to eval mode
        objective.train()
        t0, sums = time.perf_counter(), prog["sums"]  # running loss sums, saved with the progress
        for x, y, idx in epoch_batches(data, data_cfg, gen, start=prog["batch"]):
            objective.progress = prog["step"] / max(tcfg["epochs"] * per_epoch, 1)  # drives the schedules
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, parts = objective(x, y, idx)
            opt.zero_grad(set_to_none=True)
            bad = next((k for k, v in parts.items() if not math.isfinite(v)), None)
            record_step = every and (prog["step"] + 1) % every == 0
            signals = {}
            if bad is None and record_step and gradients and objective.terms:  # before backward frees the graph
                signals = kd_ce_consistency(student, **objective.terms)
            objective.terms = {}
            if bad is None:
                loss.backward()
                if tcfg["grad_clip"]:
                    nn.utils.clip_grad_norm_(params, tcfg["grad_clip"])
                bad = None if _finite_grads(params) else "gradient"
            prog["batch"] += 1
            prog["step"] += 1
            steps.update(1)
            if bad:
                prog["bad"] += 1
                prog["skipped"] += 1
                if prog["bad"] >= tcfg["max_bad_steps"]:
                    raise TrainingDiverged(
                        f"{role}: epoch {epoch + 1} step {prog['step']}: the {bad} "
                        f"{'loss ' if bad != 'gradient' else ''}was NaN or Inf for {prog['bad']} steps in a row; "
                        f"likely cause: learning rate too high (train.optimizer.lr={tcfg['optimizer']['lr']}), "
                        f"NaN/Inf in the input data, or bf16 overflow; "
                        f"{'the last good checkpoint is kept' if checkpoints else 'no checkpoint was written'}")
                opt.zero_grad(set_to_none=True)
            else:
                prog["bad"] = 0
                opt.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                _add_to_window(prog["window"], parts)
            if record_step:
                book.write(_step_record(role, epoch, prog, opt.param_groups[0]["lr"], signals))
            if tcfg["checkpoint_every"] and prog["step"] % tcfg["checkpoint_every"] == 0 and not bad:
                save(epoch_gen)
            if stop.signum is not None:
                path = save(epoch_gen)
                raise Interrupted(role, stop.signum, f"epoch {epoch + 1}, step {prog['step']}", path)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        val_logits = predict(student, data.x_val, data_cfg["eval_batch_size"])
        val_acc = (val_logits.argmax(1) == data.y_val).float().mean().item()
        if tcfg["select"] == "last" or val_acc > prog["best_val"]:
            prog.update(best_val=val_acc, best_epoch=epoch, best_state=copy.deepcopy(student.state_dict()))
        n = max(prog["batch"] - prog["skipped"], 1)
        counts = {k: sums.pop(k, 0.0) for k in COUNTS}
        record = {"model": role, "epoch": epoch + 1, "lr": lr, "val_accuracy": val_acc,
                  "val_loss": nn.functional.cross_entropy(val_logits, data.y_val).item(),
                  **({"train_accuracy": counts["correct"] / counts["labelled"]} if counts["labelled"] else {}),
                  "train_time_s": round(time.perf_counter() - t0, 4), "skipped_steps": prog["skipped"],
                  **{f"loss_{k}": v / n for k, v in sums.items()},
                  **{k: total / count for k, (total, count) in prog["signals"].items()},
                  **(monitor() if monitor else {})}
        watched = {"retention": f"{record['retention_watched']:.3f} low, "
                                f"{'adjusted' if record['adjusted'] else 'warned'}"} if "adjusted" in record else {}
        steps.set_postfix(epoch=epoch + 1, loss=f"{sums.get('total', 0.0) / n:.3f}", val=f"{val_acc:.3f}", **watched)
        book.write(record)
        book.histograms(role, epoch + 1, student)
        prog.update(epoch=epoch + 1, batch=0, sums={}, skipped=0, signals={})
        save(gen.get_state())  # after the log line: a resume trims lines past the checkpoint's epoch
        if on_epoch:
            on_epoch(epoch + 1, val_acc)
    steps.close()
    book.close()
    student.load_state_dict(prog["best_state"])
    return {"selected_epoch": prog["best_epoch"] + 1, "val_accuracy": prog["best_val"]}


COUNTS = ("correct", "labelled")  # summed to give the training accuracy, not losses


def _add_to_window(window: Dict[str, float], parts: Dict[str, float]) -> None:
    """Loss sums, count and maximum since the last step record."""
    for k, v in parts.items():
        if k not in COUNTS:
            window[k] = window.get(k, 0.0) + v
    window["n"] = window.get("n", 0) + 1
    window["max"] = max(window.get("max", -math.inf), parts["total"])


def _step_record(role: str, epoch: int, prog: Dict[str, Any], lr: float, signals: Dict[str, float]
                 ) -> Dict[str, Any]:
    """The line logged every `every` steps: mean and max loss since the last one, and the gradient signals
    of this step (also summed into the epoch's means)."""
    window, n = prog["window"], max(prog["window"].get("n", 0), 1)
    record = {"model": role, "epoch": epoch + 1, "step": prog["step"], "lr": lr,
              **{f"loss_{k}": v / n for k, v in window.items() if k not in ("n", "max")}, **signals}
    if "max" in window:
        record["loss_total_max"] = window["max"]
    for k, v in signals.items():
        total, count = prog["signals"].get(k, (0.0, 0))
        prog["signals"][k] = (total + v, count + 1)
    prog["window"] = {}
    return record


def trim_log(path: str, role: str, epochs_done: int, steps_done: Optional[int] = None) -> None:
    """Drop `role`'s lines written after the checkpoint a resume starts from: epoch lines past
    `epochs_done`, step lines past `steps_done`."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    keep = [line for line in lines if not _past(line, role, epochs_done, steps_done)]
    if len(keep) != len(lines):
        write_text(path, "".join(keep))


def _past(line: str, role: str, epochs_done: int, steps_done: Optional[int]) -> bool:
    try:
        rec = json.loads(line)
    except ValueError:
        return True  # a torn last line from a kill mid-write
    if rec.get("model") != role:
        return False
    if "step" in rec and "val_accuracy" not in rec and steps_done is not None:
        return rec["step"] > steps_done
    return rec.get("epoch", 0) > epochs_done
