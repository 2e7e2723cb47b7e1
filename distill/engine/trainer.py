"""The training loop, for a teacher, a scratch student, a distilled student or a compress fine-tune alike.

Read it in one sitting: each step, the objective turns a batch into a loss, the loss is backpropagated and
the optimizer steps (a step whose loss or gradient is NaN or Inf is skipped and counted). After each epoch
the model is validated and the epoch with the best selection metric is kept. Everything else (log lines,
the monitor, gradient signals, TensorBoard, checkpoints, search pruning) is a callback. The test split is
never seen here.

Under torchrun the trainable objective (student, projectors, any method's own parts; never the frozen
teacher) is wrapped in DistributedDataParallel. Each process trains on its micro-batches of the same global
batch, weighted so that the averaged gradient is the global batch's; gradients are synchronised only on a
step's last micro-batch. One small all-reduce per step shares the step's loss, whether any process saw a
NaN, and whether any was asked to stop, so every process skips, logs and stops at the same step.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..checkpoint import rng_state, set_rng_state
from ..data import DataBundle
from ..errors import UserError
from ..progress import bar
from ..roles import recipe_section
from .callbacks import Callback, Checkpointing, LogLines
from .runtime import CPU, Runtime, flush_denormal
from .sampling import Split, Step, epoch_batches, steps_per_epoch


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


def lr_factor(epoch: float, scfg: Dict[str, Any], epochs: int) -> float:
    """Multiplier of the base lr at `epoch`: linear warm-up, then constant, cosine or multi-step decay. With
    `scheduler.interval: step` the epoch is fractional (steps done / steps per epoch), so cosine decays every
    step to nearly 0 at the last one, as Hugging Face, torchtune and nanoGPT schedule it; the milestones of
    multi-step fall on the same epoch boundaries either way."""
    warm = scfg["warmup_epochs"]
    if epoch < warm:
        return (epoch + 1) / (warm + 1)
    if scfg["name"] == "cosine":
        span = max(1, epochs - warm)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))
    if scfg["name"] == "multistep":
        return scfg["gamma"] ** sum(epoch >= m for m in scfg["milestones"])
    return 1.0


def lr_key(role: str) -> str:
    """The recipe key that sets a model's learning rate (a compress fine-tune's is compress.lr, scaled by QAT's
    lr_scale)."""
    return "compress.lr" if role.startswith("compress/") else f"{recipe_section(role)}.train.optimizer.lr"


class TrainingDiverged(UserError):
    """Too many consecutive steps with a NaN or Inf loss or gradient (in the stage of `role`)."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role


class Interrupted(Exception):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written (or, `where` None: the signal came
    after the stage's last step, and the stage finished and was saved before the run stopped)."""

    def __init__(self, role: str, signum: int, where: Optional[str], checkpoint: Optional[str]) -> None:
        self.role, self.signum, self.checkpoint = role, signum, checkpoint
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        name = signal.Signals(signum).name
        super().__init__(f"{role}: stopped by {name} once the stage had finished (it is saved; the next stages "
                         f"did not start)" if where is None else f"{role}: stopped by {name} at {where}; "
                         f"checkpoint {checkpoint or 'not written (checkpoints are off)'}")


_pending: List[int] = []  # a signal that came after a stage's last step (its validation, last checkpoint)


def stop_if_asked(role: str, runtime: Runtime = CPU) -> None:
    """After a stage is saved: stop the run for a SIGINT/SIGTERM that came after the stage's last step (the
    loop only looks between steps), rather than forget it and go on to the next stages. Every process stops
    if the main one had it (a collective: every process calls this)."""
    signum = runtime.from_main(_pending[-1] if _pending else None)
    _pending.clear()
    if signum is not None:
        raise Interrupted(role, signum, None, None)


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

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        if self.signum is not None and exc_type is None:  # (after the last step: see stop_if_asked)
            _pending.append(self.signum)


COUNTS = ("correct", "labelled")  # summed to give the training accuracy, not averaged like losses


def _read(acc: Dict[str, Any], runtime: Runtime = CPU) -> Dict[str, float]:
    """The sums in `acc` by name, over every process (one read from the device); also as older checkpoints
    kept them (a tensor per name)."""
    if "keys" in acc:
        return dict(zip(acc["keys"], runtime.sum(acc["values"]).tolist()))
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
        tcfg, rt = self.tcfg, self.runtime
        set_seed(tcfg["seed"] + rt.rank)  # dropout differs per process; the batch order below does not
        self.gen = torch.Generator().manual_seed(tcfg["seed"])
        self.split = Split(rt.rank, rt.world_size, tcfg.get("accumulate", 1))
        self._check_split()
        self.objective.to(rt.device)
        self.model = self._wrap(self.objective)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        groups: Dict[Tuple, List[nn.Parameter]] = {}  # (the finiteness check takes one dtype and device a call)
        for p in self.params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.grad_groups = list(groups.values())  # (not the optimizer's param_groups)
        self.opt = make_optimizer(self.params, tcfg["optimizer"])
        self.per_epoch = per = steps_per_epoch(len(self.data.y_train), self.data_cfg["batch_size"], self.split.parts)
        scfg = tcfg["scheduler"]
        self.step_sched = scfg.get("interval") == "step"  # the scheduler counts steps, not epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda n: lr_factor(
            n / per if self.step_sched else n, scfg, tcfg["epochs"]))
        self.epoch_gen = self.gen.get_state()
        self.resumed = False
        self.started = time.perf_counter()  # (with the attempts before a resume, in prog["seconds"])
        for cb in self.callbacks:  # a checkpoint is restored (or old ones cleared) before anything else starts
            cb.restore(self)
        # (the rate the last step used, as an epoch line logs it: a per-step schedule has moved the optimizer's on)
        self.lr = self.prog.get("lr", self.opt.param_groups[0]["lr"])
        for cb in self.callbacks:
            cb.on_fit_start(self)

    def _check_split(self) -> None:
        split = self.split
        split.check(self.data_cfg["batch_size"])
        n, least = len(self.data.y_train), 2 * split.parts
        if split.parts > 1 and n < least:  # (an epoch of one batch, cut into micro-batches of which some are empty)
            raise UserError(f"{self.role}: {n} training samples, too few for processes x train.accumulate = "
                            f"{split.world} x {split.accumulate} micro-batches of two samples or more (at least "
                            f"{least}); use fewer processes or less accumulation, or more training data")
        if split.world > 1 and any(f["loss"] == "crd" for f in getattr(self.objective, "features", [])):
            from ..losses.contrastive import ONE_PROCESS
            raise UserError(ONE_PROCESS)

    def _wrap(self, objective: nn.Module) -> nn.Module:
        """The objective itself in one process; under torchrun, wrapped in DistributedDataParallel (which also
        makes every process start from rank 0's weights)."""
        if not self.runtime.distributed or not any(p.requires_grad for p in objective.parameters()):
            return objective
        from torch.nn.parallel import DistributedDataParallel
        cuda = self.runtime.device.type == "cuda"
        # an on-policy step is the divergence alone: the feature projectors get no gradient in it (on every
        # process alike, the step's draw being shared), which DDP must be told of
        unused = bool(getattr(objective, "on_policy", {}).get("fraction")) and any(
            p.requires_grad for p in getattr(objective, "projectors", nn.ModuleList()).parameters())
        # (a conv of one input channel: its gradient's stride over that size-1 dimension differs from the bucket's,
        # which DDP warns of on every process of every run, harmlessly: the layout of one element is no layout)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return DistributedDataParallel(objective, device_ids=[self.runtime.device.index] if cuda else None,
                                       find_unused_parameters=unused)

    def state(self) -> Dict[str, Any]:
        """What a checkpoint holds: the objective (student, projectors, strength), optimizer, scheduler, the
        shuffling generator as at the start of the epoch, every RNG and the progress. The weights are the
        same in every process and kept once; each process's RNG state is kept (a collective: every process
        calls this). Never of NaN or Inf weights: resumed from, they would fail every time."""
        self.weights_finite(f"epoch {self.prog['epoch'] + 1} step {self.prog['step']}")
        rng = self.runtime.gather(rng_state()) if self.runtime.distributed else rng_state()
        prog = {**self.prog, "seconds": self.prog.get("seconds", 0.0) + time.perf_counter() - self.started}
        for name in ("sums", "window"):  # a part-done epoch's loss sums, over every process (rank 0 resumes them)
            if self.runtime.distributed and "values" in prog[name]:
                prog[name] = {**prog[name], "values": self.runtime.sum(prog[name]["values"])}
        return {"objective": self.objective.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "interval": "step" if self.step_sched else "epoch",
                "epoch_gen": self.epoch_gen,
                **({"rng_per_rank": rng, "world_size": self.runtime.world_size} if self.runtime.distributed
                   else {"rng": rng}), "progress": prog}

    def load_state(self, saved: Dict[str, Any]) -> None:
        world = saved.get("world_size", 1)
        if world != self.runtime.world_size:
            raise UserError(f"{self.role}: the checkpoint was written by {world} process(es) and this run has "
                            f"{self.runtime.world_size}; resume with --nproc {world} (each process's data and "
                            f"random state depend on the count), or start the stage over with --overwrite (without "
                            f"--resume)")
        interval = saved.get("interval", "epoch")  # (the scheduler's count is in steps or in epochs)
        if interval != ("step" if self.step_sched else "epoch"):
            raise UserError(f"train.scheduler.interval: {self.role}'s checkpoint moved the lr every {interval}, this "
                            f"run every {'step' if self.step_sched else 'epoch'}; resume with the same interval, or "
                            f"start the stage over with --overwrite (without --resume)")
        self.objective.load_state_dict(saved["objective"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.gen.set_state(saved["epoch_gen"])
        set_rng_state(saved["rng_per_rank"][self.runtime.rank] if "rng_per_rank" in saved else saved["rng"])
        old = saved["progress"]  # (checkpoints of distill before the trainer kept best_score and best_metrics)
        self.prog = {**self.prog, "best_score": old.get("best_val"), "best_metrics": {"val_accuracy": old.get("best_val")}
                     if "best_val" in old else {}, **old, "window": old.get("window", {}),
                     "signals": old.get("signals", {})}
        for acc in (self.prog["sums"], self.prog["window"]):  # (kept on the device, loaded onto the CPU)
            acc.update({k: v.to(self.runtime.device) for k, v in acc.items() if torch.is_tensor(v)})
            if "values" in acc and "world_size" in saved and self.runtime.rank:  # (rank 0 holds every process's)
                acc["values"] = torch.zeros_like(acc["values"])

    # ---------------------------------------------------------------- the loop
    def fit(self) -> Dict[str, Any]:
        with flush_denormal(), _StopOnSignal() as stop:
            self._setup()
            tcfg, prog = self.tcfg, self.prog
            self.stop, self.stopping = stop, False
            self.bar = bar(None, desc=self.role, unit="step", total=tcfg["epochs"] * self.per_epoch,
                           initial=prog["epoch"] * self.per_epoch + prog["batch"], show=self.runtime.is_main)
            try:  # (the bar is closed however training ends, so a stop's message starts a line of its own)
                self._epochs()
            finally:
                self.bar.close()
            for cb in self.callbacks:
                cb.on_fit_end(self)
        self.student.load_state_dict(self.prog["best_state"])
        return {"selected_epoch": self.prog["best_epoch"] + 1, **self.prog["best_metrics"],
                "val_history": self.prog.get("val_history", []), "earlier_s": self.prog.get("seconds", 0.0)}

    def _epochs(self) -> None:
        for epoch in range(self.prog["epoch"], self.tcfg["epochs"]):
            self.epoch_gen = self.gen.get_state()  # the epoch's batches are drawn from here: a resume redraws them
            self.student.train()  # every epoch: validation below switches to eval mode
            self.objective.train()
            t0 = time.perf_counter()
            for step in epoch_batches(self.data, self.data_cfg, self.gen, self.task, self.prog["batch"], self.split):
                self.step(epoch, step)
                if self.stopping:  # (under torchrun: every process stops at the same step)
                    path = self.checkpoint_now()  # (on disk before any process exits: every one waits for it)
                    raise Interrupted(self.role, self.stop.signum or signal.SIGTERM,
                                      f"epoch {epoch + 1}, step {self.prog['step']}", path)
            self.end_epoch(epoch, time.perf_counter() - t0)

    def _on_policy_samples(self, step: Step) -> Tuple[Optional[list], int]:
        """An on-policy step's completions, every micro-batch's, and how many target tokens they hold in the
        step on every process: the student writes them before any loss, so that each micro-batch's divergence
        weighs by its share of the step's sampled tokens (as gold targets do) and the step's loss is the mean
        over them all, however the step is split over micro-batches and processes. (None, 0) otherwise."""
        objective = self.objective
        if step.seed is None:  # (no step seed: the draw is the global RNG's, taken in the forward pass once)
            return None, 0
        objective.step_seeds = (step.seed, step.seeds[0])
        if not objective.on_policy_now():
            return None, 0
        samples = []
        with self.runtime.autocast(self.tcfg["precision"]):  # (as in the forward pass)
            for seed, batch in zip(step.seeds, step.micro):
                objective.step_seeds = (step.seed, seed)
                batch = self.runtime.put(batch)
                samples.append(objective.student_samples(batch.x, batch.y))
        count = torch.tensor(sum(int((y >= 0).sum()) for _, y in samples), dtype=torch.float64)
        return samples, int(self.runtime.sum(count))

    def _warm_up(self) -> None:
        """`scheduler.warmup_steps`: the lr ramps up linearly over the first steps (the scheduler's own factor
        is restored at the last of them)."""
        warm, step = self.tcfg["scheduler"].get("warmup_steps", 0), self.prog["step"]
        if warm and step <= warm:
            f = self.sched.lr_lambdas[0](self.sched.last_epoch) * min(1.0, (step + 1) / warm)
            for group in self.opt.param_groups:
                group["lr"] = group["initial_lr"] * f

    def step(self, epoch: int, step: Step) -> None:
        prog, objective = self.prog, self.objective
        self._warm_up()
        self.lr = prog["lr"] = self.opt.param_groups[0]["lr"]  # (logged: the rate this step uses; kept for resumes)
        objective.progress = prog["step"] / max(self.tcfg["epochs"] * self.per_epoch, 1)  # drives the schedules
        objective.epoch = prog["step"] / max(self.per_epoch, 1)
        self.opt.zero_grad(set_to_none=True)
        record_step = any(cb.wants_step(self, prog["step"] + 1) for cb in self.callbacks)
        signals: Dict[str, float] = {}
        parts: Dict[str, torch.Tensor] = {}
        samples, sampled = self._on_policy_samples(step)
        for i, batch in enumerate(step.micro):
            objective.step_seeds = None if step.seed is None else (step.seed, step.seeds[i])
            share = len(batch.idx) / step.n  # of the global batch's loss
            if samples:
                objective.samples = samples[i]
                objective.target_share = int((samples[i][1] >= 0).sum()) / sampled / share
            else:
                objective.target_share = int((batch.y >= 0).sum()) / step.targets / share if step.targets else 1.0
            last = i == len(step.micro) - 1
            with self.model.no_sync() if not last and self.model is not objective else contextlib.nullcontext():
                batch = self.runtime.put(batch)
                with self.runtime.autocast(self.tcfg["precision"]):
                    loss, micro_parts = self.model(batch.x, batch.y, batch.idx, batch.mask)
                if record_step and i == 0:  # before backward frees the graph
                    for cb in self.callbacks:
                        signals.update(cb.before_backward(self))
                objective.terms = {}
                scale = share * self.runtime.world_size  # (DDP averages the processes' gradients)
                (loss if scale == 1.0 else loss * scale).backward()
            parts = micro_parts if share == 1.0 else _add_share(parts, micro_parts, share)
        objective.target_share, objective.step_seeds, objective.samples = 1.0, None, None
        if self.tcfg["grad_clip"]:
            nn.utils.clip_grad_norm_(self.params, self.tcfg["grad_clip"])
        bad, total = self._non_finite(parts)  # one host sync per step: whether to skip it
        prog["batch"] += 1
        prog["step"] += 1
        self.bar.update(1)
        if bad:
            self._skip(epoch, bad)
            signals = {}
        else:
            prog["bad"] = 0
            try:
                self.opt.step()
            except RuntimeError as e:  # (the optimizer's step size past float32's range: lr 1e38 in Adam)
                if "cannot be converted to type float without overflow" not in str(e):
                    raise
                raise TrainingDiverged(self.role, f"{self.role}: epoch {epoch + 1} step {prog['step']}: the "
                                       f"optimizer's update overflowed ({str(e).splitlines()[0]}); "
                                       f"{self._too_high()}; {self._kept()}") from None
            self._accumulate(parts, total)
        if self.step_sched:  # (a skipped step counts too: the schedule follows prog["step"])
            self.sched.step()
        record = self.step_record(epoch, signals) if record_step else None
        for cb in self.callbacks:
            cb.on_step_end(self, epoch, record, bad is not None)

    def _non_finite(self, parts: Dict[str, torch.Tensor]) -> Tuple[Optional[str], torch.Tensor]:
        """(the first loss term that is NaN or Inf, "gradient" when only a gradient is, else None; the step's
        total loss). Under torchrun the totals and the stop flags of all processes are summed first (the
        gradients are already the same everywhere), so all decide alike."""
        total = parts["total"].detach().reshape(())
        if self.runtime.distributed:
            shared = self.runtime.sum(torch.stack([total.double(), torch.tensor(
                float(self.stop.signum is not None), dtype=torch.float64, device=total.device)]))
            total, self.stopping = shared[0], bool(shared[1] > 0)
        else:
            self.stopping = self.stop.signum is not None
        # The total is non-finite when any weighted term is; then each group of gradients is checked.
        found = torch.isfinite(total).logical_not().float().reshape(1)
        for group in self.grad_groups:
            grads = [p.grad for p in group if p.grad is not None]
            if grads:
                found = flag_non_finite(grads, found)
        if not bool(found):
            return None, total
        values = torch.stack([v.detach().float().reshape(()) for v in parts.values()])
        finite = torch.isfinite(values).tolist()
        return next((k for k, fine in zip(parts, finite) if not fine),
                    "gradient" if bool(torch.isfinite(total)) else "total"), total

    def _skip(self, epoch: int, bad: str) -> None:
        prog, tcfg = self.prog, self.tcfg
        prog["bad"] += 1
        prog["skipped"] += 1
        if prog["bad"] >= tcfg["max_bad_steps"]:
            raise TrainingDiverged(self.role,
                f"{self.role}: epoch {epoch + 1} step {prog['step']}: the {bad} "
                f"{'loss ' if bad != 'gradient' else ''}was NaN or Inf for {prog['bad']} steps in a row; "
                f"likely cause: {self._too_high()}, NaN/Inf in the input data, or bf16 overflow; {self._kept()}")
        self.opt.zero_grad(set_to_none=True)

    def _too_high(self) -> str:
        return f"learning rate too high ({lr_key(self.role)}: {self.tcfg['optimizer']['lr']} here)"

    def _kept(self) -> str:
        """(a checkpoint written: the callback's throttle, train.checkpoint_seconds, may not have let one be; it
        holds finite weights, which may still be the ones that overflowed since)"""
        steps = [cb.checkpoints.newest_step() for cb in self.callbacks if isinstance(cb, Checkpointing)]
        step = next((s for s in steps if s is not None), None)
        return f"the last checkpoint, step {step}, is kept" if step is not None else "no checkpoint was written"

    def weights_finite(self, where: str) -> None:
        """A step whose loss and gradients were finite can still make the weights Inf or NaN (an update too
        large): every later step is then skipped, and a stage shorter than train.max_bad_steps would be saved,
        its weights all NaN. Checked before a checkpoint is written and before an epoch is validated."""
        found = torch.zeros(1, dtype=torch.float32, device=self.params[0].device)
        for group in self.grad_groups:  # (of one device and dtype each)
            found = flag_non_finite([p.detach() for p in group], found)
        if bool(found):
            raise TrainingDiverged(self.role, f"{self.role}: {where}: the weights became NaN or Inf (an update too "
                                   f"large); likely cause: {self._too_high()}; {self._kept()}")

    def _accumulate(self, parts: Dict[str, torch.Tensor], total: torch.Tensor) -> None:
        """Loss sums for the epoch and for the window since the last step line: one float64 vector on the
        device (one add per step, not one per part), read back (and summed over processes) once per log line.
        `total` is the step's whole loss (over every process), for the window's maximum."""
        keys = sorted(parts)  # (by name: an on-policy step gives its parts in another order than a gold one)
        # stacked straight into float64: each part is cast on its own (no common type first, no precision lost)
        values = torch.empty(len(keys), dtype=torch.float64, device=total.device)
        torch.stack([parts[k].detach().reshape(()) for k in keys], out=values)
        for acc in (self.prog["sums"], self.prog["window"]):
            same = acc.get("keys") == keys
            acc.update(keys=keys, values=acc["values"] + values if same else values)
        window = self.prog["window"]
        window["n"] = window.get("n", 0) + 1
        total = total.double()
        window["max"] = torch.maximum(window["max"], total) if "max" in window else total

    def step_record(self, epoch: int, signals: Dict[str, float]) -> Dict[str, Any]:
        """The line logged every few steps: mean and max loss since the last one, and the gradient signals of
        this step (also summed into the epoch's means)."""
        prog = self.prog
        window, n = prog["window"], max(prog["window"].get("n", 0), 1)
        record = {"model": self.role, "epoch": epoch + 1, "step": prog["step"], "lr": self.lr,
                  **{f"loss_{k}": v / n for k, v in _read(window, self.runtime).items() if k not in COUNTS},
                  **signals}
        if "max" in window:
            record["loss_total_max"] = float(window["max"])
        for k, v in signals.items():
            total, count = prog["signals"].get(k, (0.0, 0))
            prog["signals"][k] = (total + v, count + 1)
        prog["window"] = {}
        return record

    def end_epoch(self, epoch: int, seconds: float) -> None:
        prog = self.prog
        lr = self.lr
        if not self.step_sched:
            self.sched.step()
        self.weights_finite(f"epoch {epoch + 1}")
        val = self.task.validate(self.student, self.data, self.data_cfg["eval_batch_size"], self.runtime)
        # (weights finite, yet so large that the outputs overflow: the steps are skipped since, and the validation
        # loss is NaN; not NaN inputs in the validation split alone, which training's finite steps rule out)
        if prog["bad"] and not math.isfinite(val.get("val_loss", 0.0)):
            raise TrainingDiverged(self.role, f"{self.role}: epoch {epoch + 1}: the validation loss is NaN or Inf "
                                   f"(the outputs overflow); likely cause: {self._too_high()}; {self._kept()}")
        self._select(epoch, val)
        # (every epoch's validation accuracy, checkpointed with the rest: a resumed search's pruner reads it)
        prog["val_history"] = [*prog.get("val_history", []), val.get("val_accuracy")]
        n = max(prog["batch"] - prog["skipped"], 1)
        sums = _read(prog["sums"], self.runtime)
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
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{sums.get('total', 0.0) / n:.3f}", **shown, **watched,
                             refresh=False)  # (shown at the next redraw: off a terminal, every few seconds)

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


def flag_non_finite(grads: List[torch.Tensor], found: torch.Tensor) -> torch.Tensor:
    """`found` (a float32 tensor of one element) raised above 0 when any of `grads` (of one device and dtype)
    holds a NaN or Inf. On the CPU and CUDA this is PyTorch's AMP kernel, one pass over them; with a scale of 1
    it writes nothing back, so every gradient bit, denormals included, stays as it is. Elsewhere, the norms."""
    device = grads[0].device
    if device.type not in ("cpu", "cuda"):
        bad = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).logical_not()
        return found + bad.to(found.device)
    if device != found.device:
        return found + flag_non_finite(grads, torch.zeros(1, dtype=torch.float32, device=device)).to(found.device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, dtype=torch.float32, device=device))
    return found


def _add_share(acc: Dict[str, torch.Tensor], parts: Dict[str, torch.Tensor], share: float) -> Dict[str, torch.Tensor]:
    """`acc` plus a micro-batch's loss parts weighted by its share of the global batch (counts as they are)."""
    return {k: acc.get(k, 0) + (v.detach() if k in COUNTS else v.detach() * share) for k, v in parts.items()}


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
