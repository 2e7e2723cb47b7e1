"""The order of training samples: shuffled (or stratified, or class-balanced) index batches per epoch, drawn
from the trainer's own generator so that a resumed run redraws exactly the same epoch.

`data.batch_size` is the global batch of one optimizer step. With several processes and gradient
accumulation, each batch is cut into `processes x train.accumulate` contiguous micro-batches and process r
takes micro-batches r*A ... r*A+A-1: every process draws the same global order (the same generator, seeded
alike), so no sample is dropped or seen twice. Each micro-batch's loss weighs its share of the batch's
samples, and a mean over targets (labelled samples, target tokens) its share of the batch's targets, so the
optimisation does not depend on the process count (except for losses that relate the samples of a batch,
which see each micro-batch alone)."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..data import DataBundle
from ..errors import UserError


def batches(n: int, batch_size: int, gen: torch.Generator, lengths: Optional[torch.Tensor] = None,
            labels: Optional[torch.Tensor] = None, sampling: str = "random", parts: int = 1) -> List[torch.Tensor]:
    """A shuffled epoch of index batches; a trailing batch too small to give each of its `parts` micro-batches
    two samples is dropped (BatchNorm needs two; in one process: a trailing batch of one sample).

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
    return out[:-1] if len(out) > 1 and len(out[-1]) < 2 * parts else out


def steps_per_epoch(n_train: int, batch_size: int, parts: int = 1) -> int:
    """How many batches `batches` makes of `n_train` samples."""
    last = n_train % batch_size or batch_size
    return -(-n_train // batch_size) - (1 if n_train > batch_size and last < 2 * parts else 0)


@dataclass(frozen=True)
class Split:
    """How a global batch is shared: `world` processes, each taking `accumulate` micro-batches in turn."""
    rank: int = 0
    world: int = 1
    accumulate: int = 1

    @property
    def parts(self) -> int:
        return self.world * self.accumulate

    def check(self, batch: int) -> None:
        """The global batch must give every micro-batch two samples or more (BatchNorm trains on two)."""
        least = self.parts * (2 if self.parts > 1 else 1)
        if batch < least:
            raise UserError(f"data.batch_size: {batch} is the global batch, too small for processes x train.accumulate"
                            f" = {self.world} x {self.accumulate} micro-batches of two samples or more; give at "
                            f"least {least}")

    def mine(self, batch: torch.Tensor) -> List[torch.Tensor]:
        pieces = batch.tensor_split(self.parts)
        return list(pieces[self.rank * self.accumulate:(self.rank + 1) * self.accumulate])


WHOLE = Split()


@dataclass
class Step:
    """This process's share of one optimizer step: its micro-batches, and the size of the global batch (a
    micro-batch's loss weighs len(micro-batch) / `n` of the step's); with several micro-batches, the global
    batch's `targets` (labelled samples, target tokens), which means over targets are taken over. `seed` is
    the step's (the same on every process), `seeds` each micro-batch's (its place in the global batch, not
    its process): what the step's random choices are drawn from (on-policy KD), so that N processes draw what
    one process accumulating N does, and a resumed run draws them again."""
    micro: List[Any]
    n: int
    targets: int = 0
    seed: Optional[int] = None
    seeds: Optional[List[int]] = None


class _EpochBatches(torch.utils.data.Dataset):
    """Batch i of an epoch, made by the task from its sample indices (inputs augmented with a generator
    seeded from (epoch seed, i)). That seeding makes the augmentation the same whether batches are made in
    this process or in `data.workers` loader processes."""

    def __init__(self, data: DataBundle, data_cfg: Dict[str, Any], task: Any, index_batches: List[torch.Tensor],
                 epoch_seed: int, split: Split) -> None:
        self.data, self.tcfg, self.task, self.batches, self.seed = data, data_cfg["transforms"], task, index_batches, \
            epoch_seed
        self.split = split

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Step:
        batch, split, seed = self.batches[i], self.split, self.seed + i
        if split.parts == 1:
            return Step([self.task.collate(self.data, batch, self.tcfg, seed)], len(batch), seed=seed, seeds=[seed])
        first = split.rank * split.accumulate  # micro-batch j augments with its own seed (0: the batch's)
        seeds = [seed + (first + j) * 2**31 for j in range(split.accumulate)]
        return Step([self.task.collate(self.data, piece, self.tcfg, s) for s, piece in zip(seeds, split.mine(batch))],
                    len(batch), int((self.data.y_train[batch] >= 0).sum()),  # (every process counts the whole batch's)
                    seed, seeds)


def epoch_batches(data: DataBundle, data_cfg: Dict[str, Any], gen: torch.Generator, task: Any = None, start: int = 0,
                  split: Split = WHOLE):
    """The epoch's steps (this process's micro-batches of each) from step `start` on (a resumed epoch skips
    those already trained on)."""
    from ..tasks import task_for
    ds = _EpochBatches(data, data_cfg, task or task_for(data),
                       batches(len(data.y_train), data_cfg["batch_size"], gen, data.lengths, data.y_train,
                               data_cfg["sampling"], split.parts),
                       int(torch.randint(0, 2**31 - 1, (1,), generator=gen)), split)
    if data_cfg["workers"] == 0:
        return (ds[i] for i in range(start, len(ds)))
    return _WorkersStartShielded(torch.utils.data.DataLoader(
        ds, batch_size=None, sampler=range(start, len(ds)), num_workers=data_cfg["workers"],
        generator=torch.Generator().manual_seed(ds.seed),  # (its own: else its base seed is drawn from the global
        worker_init_fn=leave_stop_signals))  # RNG, dropout's)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _WorkersStartShielded:
    """A DataLoader whose workers start with SIGINT and SIGTERM blocked, so that one sent to the process group
    before a worker's `leave_stop_signals` ran waits, and is then discarded, instead of killing the worker."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # (forked and spawned workers inherit it)
        try:
            return iter(self.loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # (a signal that came meanwhile is delivered now)


def leave_stop_signals(worker: int) -> None:
    """A loader worker leaves SIGINT and SIGTERM to the training process, which stops at the end of its step,
    saves a checkpoint, then ends the workers. Ctrl-C signals the terminal's foreground process group and
    torchrun each process's group: a worker in it died of the signal and failed the step in progress ("DataLoader
    worker is killed by signal"), before the checkpoint. So the worker moves to a group of its own. It does not
    ignore SIGTERM: the loader ends a worker that does not stop when told with it, and a Python process waits
    for its workers at exit, forever for one that ignores it. (A job system that signals every process, such as
    Slurm's scancel, still ends the workers: `data.workers: 0` there.)"""
    os.setpgrp()
    for sig in _STOP_SIGNALS:  # a group's signal that came before the move, blocked since, is discarded:
        signal.signal(sig, signal.SIG_IGN)  # setting SIG_IGN drops a pending signal
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (not the training process's handler, inherited by fork)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
