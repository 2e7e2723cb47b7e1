"""The training loop, for a teacher, a scratch student, a distilled student or a compress fine-tune alike.

Read it in one sitting: each step, the objective turns a batch into a loss, the loss is backpropagated and
the optimizer steps (a step whose loss or gradient is NaN or Inf is skipped and counted). After each epoch
the model is validated and the epoch with the best selection metric is kept. Everything else (log lines,
the monitor, gradient signals, TensorBoard, checkpoints, search pruning) is a callback. The test split is
never seen here.
"""
from __future__ import annotations

import copy
import math
import random
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import rng_state, set_rng_state
from ..data import DataBundle
from ..errors import UserError
from ..progress import bar
from .callbacks import Callback, Checkpointing, LogLines
from .runtime import CPU, Runtime, flush_denormal
from .sampling import epoch_batches, steps_per_epoch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, ocfg: Dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, wd = ocfg["name"], ocfg["lr"], ocfg["weight_decay"]
    # Multi-tensor (foreach) updates also on the CPU, where PyTorch's default is one tensor at a time: the
    # same arithmetic, bit for bit, in fewer kernel launches. Fused kernels are opt-in: they round differently.
    kind = {"fused": True} if ocfg.get("fused") else {"foreach": True}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=ocfg["momentum"], weight_decay=wd, nesterov=ocfg["nesterov"],
                               foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **kind)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **kind)


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


COUNTS = ("correct", "labelled")  # summed to give the training accuracy, not averaged like losses


def _read(acc: Dict[str, Any]) -> Dict[str, float]:
    """The sums in `acc` by name (one read from the device); also as older checkpoints kept them (a tensor per name)."""
    if "keys" in acc:
        return dict(zip(acc["keys"], acc["values"].tolist()))
    return {k: float(v) for k, v in acc.items() if k not in ("n", "max")}


class Trainer:
    """Trains `objective.student` in place on `data`; `fit()` returns the selected epoch and its validation
    metrics. `prog` is everything about where training stands, saved in checkpoints as is."""

    def __init__(self, role: str, objective: nn.Module, data: DataBundle, data_cfg: Dict[str, Any],
                 tcfg: Dict[str, Any], callbacks: Sequence[Callback] = (), runtime: Runtime = CPU,
                 task: Any = None) -> None:
        from ..tasks import task_for  # (the task protocol sits above the engine)
        self.role, self.objective, self.data, self.data_cfg, self.tcfg = role, objective, data, data_cfg, tcfg
        self.runtime, self.task = runtime, task or task_for(data)
        self.callbacks: List[Callback] = sorted(callbacks, key=lambda c: c.order)
        self.student = objective.student
        self.prog: Dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_score": None, "best_epoch": -1,
                                     "best_metrics": {}, "best_state": None, "sums": {}, "bad": 0, "skipped": 0,
                                     "window": {}, "signals": {}}

    # ---------------------------------------------------------------- set-up
    def _setup(self) -> None:
        tcfg = self.tcfg
        set_seed(tcfg["seed"])
        self.gen = torch.Generator().manual_seed(tcfg["seed"])
        self.objective.to(self.runtime.device)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, tcfg["optimizer"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda e: lr_factor(e, tcfg["scheduler"], tcfg["epochs"]))
        self.per_epoch = steps_per_epoch(len(self.data.y_train), self.data_cfg["batch_size"])
        self.epoch_gen = self.gen.get_state()
        self.resumed = False
        for cb in self.callbacks:  # a checkpoint is restored (or old ones cleared) before anything else starts
            cb.restore(self)
        for cb in self.callbacks:
            cb.on_fit_start(self)

    def state(self) -> Dict[str, Any]:
        """What a checkpoint holds: the objective (student, projectors, strength), optimizer, scheduler, the
        shuffling generator as at the start of the epoch, every RNG and the progress."""
        return {"objective": self.objective.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "epoch_gen": self.epoch_gen, "rng": rng_state(),
                "progress": self.prog}

    def load_state(self, saved: Dict[str, Any]) -> None:
        self.objective.load_state_dict(saved["objective"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.gen.set_state(saved["epoch_gen"])
        set_rng_state(saved["rng"])
        old = saved["progress"]  # (checkpoints of distill before the trainer kept best_score and best_metrics)
        self.prog = {**self.prog, "best_score": old.get("best_val"), "best_metrics": {"val_accuracy": old.get("best_val")}
                     if "best_val" in old else {}, **old, "window": old.get("window", {}),
                     "signals": old.get("signals", {})}

    # ---------------------------------------------------------------- the loop
    def fit(self) -> Dict[str, Any]:
        with flush_denormal(), _StopOnSignal() as stop:
            self._setup()
            tcfg, prog = self.tcfg, self.prog
            self.bar = bar(None, desc=self.role, unit="step", total=tcfg["epochs"] * self.per_epoch,
                           initial=prog["epoch"] * self.per_epoch + prog["batch"])
            for epoch in range(self.prog["epoch"], tcfg["epochs"]):
                self.epoch_gen = self.gen.get_state()  # the epoch's batches are drawn from here: a resume redraws them
                self.student.train()  # every epoch: validation below switches to eval mode
                self.objective.train()
                t0 = time.perf_counter()
                for batch in epoch_batches(self.data, self.data_cfg, self.gen, self.task, start=self.prog["batch"]):
                    self.step(epoch, batch)
                    if stop.signum is not None:
                        path = self.checkpoint_now()
                        raise Interrupted(self.role, stop.signum, f"epoch {epoch + 1}, step {self.prog['step']}", path)
                self.end_epoch(epoch, time.perf_counter() - t0)
            self.bar.close()
            for cb in self.callbacks:
                cb.on_fit_end(self)
        self.student.load_state_dict(self.prog["best_state"])
        return {"selected_epoch": self.prog["best_epoch"] + 1, **self.prog["best_metrics"]}

    def step(self, epoch: int, batch: Any) -> None:
        prog, objective = self.prog, self.objective
        objective.progress = prog["step"] / max(self.tcfg["epochs"] * self.per_epoch, 1)  # drives the schedules
        objective.epoch = prog["step"] / max(self.per_epoch, 1)
        batch = self.runtime.put(batch)
        with self.runtime.autocast(self.tcfg["precision"]):
            loss, parts = objective(batch.x, batch.y, batch.idx, batch.mask)
        self.opt.zero_grad(set_to_none=True)
        record_step = any(cb.wants_step(self, prog["step"] + 1) for cb in self.callbacks)
        signals: Dict[str, float] = {}
        if record_step:  # before backward frees the graph
            for cb in self.callbacks:
                signals.update(cb.before_backward(self))
        objective.terms = {}
        loss.backward()
        if self.tcfg["grad_clip"]:
            nn.utils.clip_grad_norm_(self.params, self.tcfg["grad_clip"])
        bad = self._non_finite(parts)  # one host sync per step: whether to skip it
        prog["batch"] += 1
        prog["step"] += 1
        self.bar.update(1)
        if bad:
            self._skip(epoch, bad)
            signals = {}
        else:
            prog["bad"] = 0
            self.opt.step()
            self._accumulate(parts)
        record = self.step_record(epoch, signals) if record_step else None
        for cb in self.callbacks:
            cb.on_step_end(self, epoch, record, bad is not None)

    def _non_finite(self, parts: Dict[str, torch.Tensor]) -> Optional[str]:
        """The first loss term that is NaN or Inf, "gradient" when only a gradient is, else None."""
        grads = [p.grad for p in self.params if p.grad is not None]
        # The total is non-finite when any weighted term is; adding the gradient norms makes it one check.
        total = parts["total"].detach().float().reshape(())
        if grads:
            total = total + torch.stack(torch._foreach_norm(grads)).sum()
        if bool(torch.isfinite(total)):
            return None
        values = torch.stack([v.detach().float().reshape(()) for v in parts.values()])
        finite = torch.isfinite(values).tolist()
        return next((k for k, fine in zip(parts, finite) if not fine), "gradient")

    def _skip(self, epoch: int, bad: str) -> None:
        prog, tcfg = self.prog, self.tcfg
        prog["bad"] += 1
        prog["skipped"] += 1
        if prog["bad"] >= tcfg["max_bad_steps"]:
            kept = any(isinstance(cb, Checkpointing) for cb in self.callbacks)
            raise TrainingDiverged(
                f"{self.role}: epoch {epoch + 1} step {prog['step']}: the {bad} "
                f"{'loss ' if bad != 'gradient' else ''}was NaN or Inf for {prog['bad']} steps in a row; "
                f"likely cause: learning rate too high (train.optimizer.lr={tcfg['optimizer']['lr']}), "
                f"NaN/Inf in the input data, or bf16 overflow; "
                f"{'the last good checkpoint is kept' if kept else 'no checkpoint was written'}")
        self.opt.zero_grad(set_to_none=True)

    def _accumulate(self, parts: Dict[str, torch.Tensor]) -> None:
        """Loss sums for the epoch and for the window since the last step line: one float64 vector on the
        device (one add per step, not one per part), read back once per log line."""
        keys = list(parts)
        values = torch.stack([v.detach().reshape(()).double() for v in parts.values()])
        for acc in (self.prog["sums"], self.prog["window"]):
            same = acc.get("keys") == keys
            acc.update(keys=keys, values=acc["values"] + values if same else values)
        window = self.prog["window"]
        window["n"] = window.get("n", 0) + 1
        total = values[keys.index("total")]
        window["max"] = torch.maximum(window["max"], total) if "max" in window else total

    def step_record(self, epoch: int, signals: Dict[str, float]) -> Dict[str, Any]:
        """The line logged every few steps: mean and max loss since the last one, and the gradient signals of
        this step (also summed into the epoch's means)."""
        prog = self.prog
        window, n = prog["window"], max(prog["window"].get("n", 0), 1)
        record = {"model": self.role, "epoch": epoch + 1, "step": prog["step"], "lr": self.opt.param_groups[0]["lr"],
                  **{f"loss_{k}": v / n for k, v in _read(window).items() if k not in COUNTS}, **signals}
        if "max" in window:
            record["loss_total_max"] = float(window["max"])
        for k, v in signals.items():
            total, count = prog["signals"].get(k, (0.0, 0))
            prog["signals"][k] = (total + v, count + 1)
        prog["window"] = {}
        return record

    def end_epoch(self, epoch: int, seconds: float) -> None:
        prog = self.prog
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        val = self.task.validate(self.student, self.data, self.data_cfg["eval_batch_size"], self.runtime)
        self._select(epoch, val)
        n = max(prog["batch"] - prog["skipped"], 1)
        sums = _read(prog["sums"])
        counts = {k: sums.pop(k, 0.0) for k in COUNTS}
        record = {"model": self.role, "epoch": epoch + 1, "lr": lr, **val,
                  **({"train_accuracy": counts["correct"] / counts["labelled"]} if counts["labelled"] else {}),
                  "train_time_s": round(seconds, 4), "skipped_steps": prog["skipped"],
                  **{f"loss_{k}": v / n for k, v in sums.items()},
                  **{k: total / count for k, (total, count) in prog["signals"].items()}}
        prog.update(epoch=epoch + 1, batch=0, sums={}, skipped=0, signals={})
        self.epoch_gen = self.gen.get_state()
        for cb in self.callbacks:  # the monitor adds its signals, then the line is logged, then checkpointed
            cb.on_epoch_end(self, record)
        watched = {"retention": f"{record['retention_watched']:.3f} low, "
                                f"{'adjusted' if record['adjusted'] else 'warned'}"} if "adjusted" in record else {}
        shown = {"val": f"{val[self.task.select_metric]:.3f}"} if self.task.select_metric in val else {}
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{sums.get('total', 0.0) / n:.3f}", **shown, **watched)

    def _select(self, epoch: int, val: Dict[str, float]) -> None:
        """Keep this epoch's weights if `train.select` is `last`, or if its selection metric is the best yet."""
        prog, metric = self.prog, self.tcfg.get("select_metric") or self.task.select_metric
        score = val.get(metric)
        sign = -1.0 if self.task.lower_is_better(metric) else 1.0
        better = score is not None and (prog["best_score"] is None or sign * score > sign * prog["best_score"])
        if self.tcfg["select"] == "last" or better:
            prog.update(best_score=score, best_epoch=epoch, best_metrics=dict(val),
                        best_state=copy.deepcopy(self.student.state_dict()))

    def checkpoint_now(self) -> Optional[str]:
        """Write a checkpoint now (on a stop signal), through the checkpoint callback if there is one."""
        return next((cb.save(self) for cb in self.callbacks if isinstance(cb, Checkpointing)), None)


def fit(role: str, objective: nn.Module, data: DataBundle, data_cfg: Dict[str, Any], tcfg: Dict[str, Any], *,
        log: Optional[str] = None, checkpoints: Any = None, resume: bool = False,
        callbacks: Sequence[Callback] = (), runtime: Runtime = CPU) -> Dict[str, Any]:
    """Train `objective.student` in place; returns the selected epoch and its validation metrics.

    The shorthand for a trainer with epoch log lines in `log` and checkpoints in `checkpoints` (a
    `Checkpoints`), resumed from the newest one with `resume=True`, plus any other `callbacks`."""
    cbs = list(callbacks)
    if log:
        cbs.append(LogLines(log))
    if checkpoints is not None:
        cbs.append(Checkpointing(checkpoints, tcfg["checkpoint_every"], resume,
                                 seconds=tcfg.get("checkpoint_seconds", 0.0)))
    return Trainer(role, objective, data, data_cfg, tcfg, cbs, runtime).fit()
