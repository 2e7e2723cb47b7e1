"""Where training runs: the device, the autocast device type, and the process's place among its peers.

`train.device: auto` picks CUDA when present, else the CPU. The rank and world size come from the environment
torchrun sets (RANK, WORLD_SIZE); a plain process is rank 0 of 1. Only the main process writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterator

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


@dataclass(frozen=True)
class Runtime:
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_name(cls, device: str = "auto") -> "Runtime":
        return cls(resolve_device(device), int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
