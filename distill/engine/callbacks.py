"""Everything the trainer does besides training, as callbacks: log lines, the monitor's signals, gradient
consistency, TensorBoard, checkpoints, and a per-epoch hook (a search's pruner).

A callback overrides the moments it cares about; `order` sorts them, so that at the end of an epoch the
monitor adds its signals first, the line is then logged, then the checkpoint written (a resume trims log
lines past the checkpoint), and only then may a pruner stop the trial.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Optional

from ..errors import UserError
from ..io import append_jsonl, write_text

Trainer = Any  # engine.trainer.Trainer, which imports this module (so it is not imported here)


class Callback:
    order = 50

    def restore(self, t: Trainer) -> None:
        """Before training starts: put back saved state (checkpoints)."""

    def on_fit_start(self, t: Trainer) -> None:
        """Training starts (`t.resumed` says whether from a checkpoint)."""

    def wants_step(self, t: Trainer, step: int) -> bool:
        """Whether step `step` (1-based) is one to record; then `before_backward` runs for it."""
        return False

    def before_backward(self, t: Trainer) -> Dict[str, float]:
        """On a recorded step, with the step's graph still alive: signals to log with the step."""
        return {}

    def on_step_end(self, t: Trainer, epoch: int, record: Optional[Dict[str, Any]], skipped: bool) -> None:
        """After each step; `record` is the step's log line when some callback asked for the step, else None."""

    def on_epoch_end(self, t: Trainer, record: Dict[str, Any]) -> None:
        """After validation; `record` is the epoch's log line (a callback may add to it, in order)."""

    def on_fit_end(self, t: Trainer) -> None:
        """Training finished."""


class LogLines(Callback):
    """`log.jsonl`: a line per epoch, and one every `every` steps and on each step whose gradient signals are
    measured (mean and max loss since the last line, with the step's signals), unless `every` is 0. A resume
    first drops the lines written after the checkpoint it starts from."""
    order = 20

    def __init__(self, path: Optional[str], every: int = 0, tensorboard: Optional["TensorBoard"] = None) -> None:
        self.path, self.every, self.tensorboard = path, every, tensorboard

    def write(self, record: Dict[str, Any]) -> None:
        if self.path:
            append_jsonl(self.path, record)
        if self.tensorboard:
            self.tensorboard.scalars(record)

    def on_fit_start(self, t: Trainer) -> None:
        if t.resumed and self.path:
            trim_log(self.path, t.role, t.prog["epoch"], t.prog["step"])

    def wants_step(self, t: Trainer, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def on_step_end(self, t: Trainer, epoch: int, record: Optional[Dict[str, Any]], skipped: bool) -> None:
        if record is not None and self.every:  # (every: 0, epoch lines only; a step's signals are in their means)
            self.write(record)

    def on_epoch_end(self, t: Trainer, record: Dict[str, Any]) -> None:
        self.write(record)


class TensorBoard(Callback):
    """Scalars of every log line (epoch lines against the epoch, step lines against the step) and, per epoch,
    histograms of the model's weights and last gradients, in `folder/<role>`."""
    order = 30
    SKIP = ("model", "epoch", "step")

    def __init__(self, folder: str) -> None:
        from ..logbook import summary_writer_class
        self.folder, self.writer_class, self.writers = folder, summary_writer_class(), {}

    def _writer(self, role: str):
        if role not in self.writers:
            self.writers[role] = self.writer_class(os.path.join(self.folder, role))
        return self.writers[role]

    def scalars(self, record: Dict[str, Any]) -> None:
        writer = self._writer(record["model"])
        kind, x = ("step", record["step"]) if "step" in record else ("epoch", record["epoch"])
        for key, value in record.items():
            if key not in self.SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{kind}/{key}", value, x)
        for key, (_before, after) in record.get("adjusted", {}).items():
            writer.add_scalar(f"adjusted/{key}", after, x)

    def on_epoch_end(self, t: Trainer, record: Dict[str, Any]) -> None:
        writer = self._writer(t.role)
        for name, p in t.student.named_parameters():
            writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), record["epoch"])
            if p.grad is not None:
                writer.add_histogram(f"gradients/{name}", p.grad.detach().float().cpu(), record["epoch"])
        writer.flush()

    def on_fit_end(self, t: Trainer) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


class Monitor(Callback):
    """Adds `measure()`'s signals (knowledge retention, input-gradient consistency, the reaction's
    adjustments) to the line of each epoch in which the step count passed a multiple of `every` (0: every
    epoch), and of the last. Decided from the step count alone, so a resumed run measures the same epochs.
    The time spent measuring is added to the progress's `monitor_s` (see `timed`)."""
    order = 10

    def __init__(self, measure: Callable[[], Dict[str, Any]], every: int = 0) -> None:
        self.measure, self.every = measure, every

    def due(self, t: Trainer, epoch: int) -> bool:
        step, every = t.prog["step"], self.every
        return not every or epoch == t.tcfg["epochs"] or step // every > (step - t.per_epoch) // every

    def on_epoch_end(self, t: Trainer, record: Dict[str, Any]) -> None:
        if not self.due(t, record["epoch"]):
            return
        t0 = time.perf_counter()
        record.update(self.measure())
        timed(t, t0)
        if t.runtime.distributed:  # the reaction is the main process's (on a GPU the processes may round apart)
            t.objective.strength.update(t.runtime.from_main(dict(t.objective.strength)))


class GradientSignals(Callback):
    """Every `every` steps, the cosine between the KD and the CE parameter gradients (overall and per layer),
    measured before the step's own backward pass (two more backward passes: hence not every step), their time
    added to the progress's `monitor_s`."""
    order = 10

    def __init__(self, every: int) -> None:
        self.every = every

    def wants_step(self, t: Trainer, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def before_backward(self, t: Trainer) -> Dict[str, float]:
        from ..monitor import kd_ce_consistency
        terms = t.objective.terms
        if not (terms and self.wants_step(t, t.prog["step"] + 1)):
            return {}
        t0 = time.perf_counter()
        signals = kd_ce_consistency(t.student, **terms)
        timed(t, t0)
        return signals


def timed(t: Trainer, t0: float) -> None:
    """What the monitor cost the stage so far, in its progress: a resumed stage counts the earlier attempts'
    time up to the checkpoint too, as its train_time_s does."""
    t.prog["monitor_s"] = t.prog.get("monitor_s", 0.0) + time.perf_counter() - t0


class Checkpointing(Callback):
    """Everything needed to continue as if never stopped: every `every` steps (0: none between epoch ends),
    and at an epoch end once `seconds` have passed since the last one (0: at every epoch end), after its line
    is logged. A stop signal checkpoints at once (the trainer), so the rate limit only bounds what a
    `kill -9` loses, while short epochs do not pay a written and fsynced file each. With `resume`, training
    starts from the newest readable checkpoint."""
    order = 40

    def __init__(self, checkpoints: Any, every: int = 0, resume: bool = False, is_main: bool = True,
                 seconds: float = 0.0) -> None:
        self.checkpoints, self.every, self.resume, self.is_main = checkpoints, every, resume, is_main
        self.seconds, self.last = seconds, time.monotonic()

    def restore(self, t: Trainer) -> None:
        saved = self.checkpoints.latest() if self.resume else None
        if self.resume and saved is None and self.checkpoints.newest_step() is not None:
            raise UserError(f"--resume: no checkpoint in {self.checkpoints.folder} can be read (the lines above say "
                            f"why); they are kept: restore one, or pass --overwrite without --resume to drop them "
                            f"and start the stage over")
        if saved:
            try:
                t.load_state(saved)
            except (KeyError, TypeError, AttributeError, ValueError, IndexError, RuntimeError) as e:
                raise UserError(f"--resume: the newest readable checkpoint in {self.checkpoints.folder} is not one "
                                f"of this {t.role} stage ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                f"); it is kept: restore the stage's own, or pass --overwrite without --resume to "
                                f"drop them and start the stage over") from None
            t.resumed = True
            if self.is_main:
                self.checkpoints.warn(f"{t.role}: resumed at epoch {t.prog['epoch'] + 1}, step {t.prog['step']}, from "
                                      f"{self.checkpoints.folder}")
        elif self.is_main:
            self.checkpoints.clear()
        self.last = time.monotonic()

    def save(self, t: Trainer) -> Optional[str]:
        """Every process calls this (the state gathers each one's RNG); the main one writes the file, and
        every process returns its path. The others wait for it on the long wait, not in the next step's
        collective: a write slower than `train.timeout_s` (a large optimizer state, a slow disk) stopped the run."""
        self.last = time.monotonic()
        state = t.state()
        path = self.checkpoints.save(t.prog["step"], state) if self.is_main else None
        t.runtime.barrier()
        return t.runtime.from_main(path)

    def on_step_end(self, t: Trainer, epoch: int, record: Optional[Dict[str, Any]], skipped: bool) -> None:
        if self.every and t.prog["step"] % self.every == 0 and not skipped:
            self.save(t)

    def on_epoch_end(self, t: Trainer, record: Dict[str, Any]) -> None:
        if t.runtime.from_main(time.monotonic() - self.last >= self.seconds):  # (the main process's clock decides)
            self.save(t)


class EpochHook(Callback):
    """`hook(epoch, record)` after each epoch is logged and checkpointed, the record with `val_history` (the
    validation accuracy of every epoch so far, those before a resume too): a search's trial pruner raises
    from it to stop a bad trial."""
    order = 60

    def __init__(self, hook: Callable[[int, Dict[str, Any]], None]) -> None:
        self.hook = hook

    def on_epoch_end(self, t: Trainer, record: Dict[str, Any]) -> None:
        self.hook(record["epoch"], {**record, "val_history": list(t.prog["val_history"])})


def trim_log(path: str, role: str, epochs_done: int, steps_done: Optional[int] = None) -> None:
    """Drop `role`'s lines written after the checkpoint a resume starts from: epoch lines past
    `epochs_done`, step lines past `steps_done`."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as fh:  # (damaged bytes: that line is dropped below)
        lines = fh.readlines()
    keep = [line for line in lines if not _past(line, role, epochs_done, steps_done)]
    if len(keep) != len(lines):
        write_text(path, "".join(keep))


def _past(line: str, role: str, epochs_done: int, steps_done: Optional[int]) -> bool:
    try:
        rec = json.loads(line)
    except ValueError:
        return True  # a torn last line from a kill mid-write
    if not isinstance(rec, dict) or rec.get("model") != role:
        return False
    if "step" in rec and steps_done is not None:
        return rec["step"] > steps_done
    return rec.get("epoch", 0) > epochs_done
