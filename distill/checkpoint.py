"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint holds the student and projectors (the objective), optimizer, scheduler, the RNG states (Python,
NumPy, torch, and the trainer's shuffling generator as it was at the start of the epoch) and the position in
the epoch. Each is written atomically (temp file, fsync, rename); the newest K are kept. Loading uses
`torch.load(weights_only=True)`, so a checkpoint can hold tensors and plain data, never code; a corrupt or
partial file is skipped with a warning and the next newest is used. Beside them, `inputs.json` holds the
fingerprint of the stage that wrote them, so a stage whose inputs changed does not continue another's state.
"""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from .io import atomic_path, read_json, write_json


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its own RNG
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """`folder/step-00000042.pt` files, newest last; `key`: the fingerprint of the stage writing them."""

    def __init__(self, folder: str, keep: int = 2, warn: Callable[[str], None] = print,
                 key: Optional[str] = None) -> None:
        self.folder, self.keep, self.warn, self.key = folder, max(1, keep), warn, key

    @property
    def _inputs(self) -> str:
        return os.path.join(self.folder, "inputs.json")

    def _files(self) -> list:
        return sorted(glob.glob(os.path.join(glob.escape(self.folder), "step-*.pt")))  # (a "[" in a folder name)

    def save(self, step: int, state: Dict[str, Any]) -> str:
        path = os.path.join(self.folder, f"step-{step:08d}.pt")
        if self.key and self.written_by() != self.key:  # (before the first file: none is ever without its key)
            write_json(self._inputs, {"fingerprint": self.key})
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        files = self._files()
        at = files.index(path)
        # (files past this step are ones a resume went back from, unreadable: kept, they would outrank this one)
        for old in files[at + 1:] + files[:at + 1][:-self.keep]:
            os.remove(old)
        return path

    def latest(self) -> Optional[Dict[str, Any]]:
        """The newest checkpoint that loads; corrupt or partial ones are skipped with a warning."""
        for path in reversed(self._files()):
            try:
                return torch.load(path, weights_only=True, map_location="cpu")
            except Exception as e:  # truncated, corrupt, or not a checkpoint: try the one before
                self.warn(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})")
        return None

    def newest_step(self) -> Optional[int]:
        """The step of the newest checkpoint file here, readable or not (None: there is none)."""
        files = self._files()
        steps = [int(m.group(1)) for m in (re.fullmatch(r"step-(\d+)\.pt", os.path.basename(f)) for f in files) if m]
        return max(steps) if steps else (0 if files else None)  # (0: only files of other names)

    def written_by(self) -> Optional[str]:
        """The fingerprint of the stage that wrote the checkpoints here (None: none, or written without one)."""
        if not self._files():
            return None
        try:
            inputs = read_json(self._inputs, {})
        except ValueError:  # (damaged: as unknown as a missing one)
            return None
        return inputs.get("fingerprint") if isinstance(inputs, dict) else None

    def clear(self) -> None:
        for path in self._files():
            os.remove(path)
        if os.path.isfile(self._inputs):
            os.remove(self._inputs)
