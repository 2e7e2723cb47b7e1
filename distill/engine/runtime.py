"""Where training runs: the device, the autocast device type, and the process's place among its peers.

`train.device: auto` picks CUDA when present, else the CPU. The rank and world size come from the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is rank 0 of 1. With more than one process the
process group is started here: gloo on the CPU, NCCL on CUDA with one GPU per process (cuda:LOCAL_RANK), and a
timeout on every collective (`train.timeout_s`), so that a process whose peer died or hung stops instead of
waiting for ever. Only the main process (rank 0) writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, List

import torch

from ..errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str, where: str = "train.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{where}: cuda: no CUDA device is visible to this process; use cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{where}: mps: no Apple GPU (MPS) is available here; use cpu or auto")
    if name not in DEVICES:
        raise UserError(f"{where}: {name!r} is not one of {', '.join(DEVICES)}")
    return torch.device(name)


def memory_bytes() -> int:
    """The machine's physical memory (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def refuse_beyond_memory(what: str, nbytes: float) -> None:
    """A size that needs more memory than the machine has is one line before the work, not a process that
    swaps for hours or that the kernel kills. `what` names the setting and how the size follows from it."""
    have = memory_bytes()
    if have and nbytes > have:
        raise UserError(f"{what}: needs about {nbytes / 2 ** 30:,.0f} GiB of memory, more than this machine's "
                        f"{have / 2 ** 30:,.0f} GiB; give a smaller value")


# How long the other processes wait at a barrier while the main process works alone (writes a stage's files,
# the teacher's completions, a cache; measures latency): hours, where train.timeout_s (the collectives of
# training) is minutes. A process that dies is seen by torchrun, which ends the others; this bounds a hang.
WAIT_S = 24 * 3600
_waits: List[Any] = []  # (the gloo group of those barriers, made with the process group)


def start_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the job torchrun started (once per process): gloo on the CPU, NCCL on CUDA."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": device} if cuda else {}))  # (NCCL: bound to this process's GPU)
    _waits[:] = [dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WAIT_S))]


def wait_for_all() -> None:
    """Every process here, however long the main process works alone before it (up to WAIT_S)."""
    import torch.distributed as dist
    dist.barrier(group=_waits[0] if _waits else None)


def shard(n: int, parts: int, i: int) -> range:
    """Part i of range(n) cut into `parts` contiguous pieces whose sizes differ by at most one (no padding:
    every index is in exactly one part)."""
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return range(start, start + base + (1 if i < extra else 0))


@dataclass(frozen=True)
class Runtime:
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_name(cls, device: str = "auto", timeout_s: float = 120.0) -> "Runtime":
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        dev = resolve_device(device)
        if world > 1:
            if dev.type == "mps":
                raise UserError("train.device: mps: one Apple GPU serves one process; run without --nproc")
            if dev.type == "cuda":  # one GPU per process
                if local >= torch.cuda.device_count():
                    raise UserError(f"--nproc: process {local} of this machine has no GPU of its own "
                                    f"({torch.cuda.device_count()} visible); start at most that many processes")
                dev = torch.device("cuda", local)
                torch.cuda.set_device(dev)
            start_process_group(dev, timeout_s)
        return cls(dev, rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------ collectives (no-ops in one process)
    def barrier(self) -> None:
        if self.distributed:
            wait_for_all()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the processes (a new tensor; `value` itself in one process)."""
        if not self.distributed:
            return value
        import torch.distributed as dist
        out = value.detach().to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(value.device)

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every process: decisions (reuse a stage? checkpoint now?) are taken once."""
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The rows of all processes, concatenated in rank order, when process i holds rows `shard(n, W, i)`
        (so each row counts exactly once: nothing is padded into the result)."""
        if not self.distributed:
            return local
        import torch.distributed as dist
        sizes = [len(shard(n, self.world_size, i)) for i in range(self.world_size)]
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[:len(local)] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)]).to(local.device)

    @property
    def autocast_device(self) -> str:
        return self.device.type

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device for `precision: bf16`, else nothing."""
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.autocast_device, dtype=torch.bfloat16)

    def put(self, value: Any) -> Any:
        """A tensor (or a dict/tuple/list of them) on this device; on the CPU the same objects come back."""
        if self.device.type == "cpu":  # (everything is made on the host: no walk over fields on every batch)
            return value
        if isinstance(value, torch.Tensor):
            return value if value.device == self.device else value.to(self.device, non_blocking=True)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a Batch, TeacherOutputs
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            moved = {k: self.put(v) for k, v in fields.items()}
            same = all(moved[k] is v for k, v in fields.items())  # (on the CPU: the same object, no copy)
            return value if same else dataclasses.replace(value, **moved)
        if isinstance(value, dict):
            return {k: self.put(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(self.put(v) for v in value)
        return value


CPU = Runtime()


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Near-zero losses otherwise make CPU steps 100x slower; process-wide, so given back afterwards."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
