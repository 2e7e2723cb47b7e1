"""Teacher outputs on the training set, computed once and cached on disk.

The cache entry is a folder of `.npy` files (logits, and features for any hooked teacher layers), read back
memory-mapped so a large set never has to sit in RAM. Its key hashes the teacher's weights, the preprocessed
data and the layer names: change any of them and a new entry is made. Logits (not probabilities) are stored,
so a different temperature reuses the same entry.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..engine.batch import TeacherOutputs
from ..engine.inference import model_device
from ..hooks import FeatureCapture
from .online import teacher_forward
from ..io import read_json, sha256_json, write_json
from ..progress import bar


def default_cache_dir() -> str:
    return os.environ.get("DISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "distill")


def cache_key(teacher_sha: str, data_fingerprint: str, feature_layers: List[str], device: Optional[str] = None) -> str:
    """The entry of these teacher weights on this data (and, off the CPU, the device that computed it)."""
    return sha256_json({"teacher": teacher_sha, "data": data_fingerprint, "layers": sorted(feature_layers),
                        **({"device": device} if device else {})})[:24]


@dataclass
class CachedOutputs:
    logits: np.ndarray
    features: Dict[str, np.ndarray]

    def batch(self, idx: torch.Tensor) -> TeacherOutputs:
        rows = idx.cpu().numpy()
        return TeacherOutputs(torch.from_numpy(np.ascontiguousarray(self.logits[rows])),
                              {k: torch.from_numpy(np.ascontiguousarray(v[rows])) for k, v in self.features.items()})

    def source(self):
        """A teacher source: the cached outputs of the batch's sample indices (the inputs are not read)."""
        return lambda x, idx: self.batch(idx)


def load_or_build(teacher: nn.Module, x_train: torch.Tensor, key: str, cache_dir: str,
                  feature_layers: List[str], batch_size: int) -> Tuple[CachedOutputs, bool]:
    """Returns (outputs, hit): the cache entry for `key`, computing it first when absent."""
    entry = os.path.join(cache_dir, key)
    hit = _complete(entry)
    if not hit:
        _build(teacher, x_train, entry, feature_layers, batch_size)
    meta = read_json(os.path.join(entry, "meta.json"))
    logits = np.load(os.path.join(entry, "logits.npy"), mmap_mode="r")
    feats = {name: np.load(os.path.join(entry, f"feat_{i}.npy"), mmap_mode="r")
             for i, name in enumerate(meta["layers"])}
    return CachedOutputs(logits, feats), hit


def _complete(entry: str) -> bool:
    return os.path.isfile(os.path.join(entry, "meta.json"))


def _sweep_stale(cache_dir: str, age_s: float = 24 * 3600) -> None:
    """Remove temp folders left by runs killed mid-build a day ago or more (a live build is younger)."""
    now = time.time()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name.startswith(".tmp-") and now - os.path.getmtime(path) > age_s:
            shutil.rmtree(path, ignore_errors=True)


def _build(teacher: nn.Module, x: torch.Tensor, entry: str, layers: List[str], batch_size: int) -> None:
    """Writes into a temp folder, then renames it into place: a killed run leaves no partial entry."""
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    _sweep_stale(os.path.dirname(entry))
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(entry))
    try:
        arrays: Dict[str, np.ndarray] = {}
        with FeatureCapture(teacher, layers, "distill.features") as cap:
            for start in bar(range(0, len(x), batch_size), desc="soft labels", unit="batch"):
                logits, feats = teacher_forward(teacher, x[start:start + batch_size].to(model_device(teacher)), cap)
                outs = {"logits": logits, **{f"feat_{i}": feats[n] for i, n in enumerate(layers)}}
                for name, t in outs.items():
                    if name not in arrays:  # memory-mapped on disk, filled batch by batch
                        arrays[name] = np.lib.format.open_memmap(os.path.join(tmp, f"{name}.npy"), mode="w+",
                                                                 dtype=np.float32, shape=(len(x), *t.shape[1:]))
                    arrays[name][start:start + len(t)] = t.float().cpu().numpy()
        for a in arrays.values():
            a.flush()
        write_json(os.path.join(tmp, "meta.json"), {"layers": layers, "n": len(x)})
        if os.path.isdir(entry) and not _complete(entry):  # left by a run killed before it finished
            shutil.rmtree(entry)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same entry first: theirs is identical
            if not _complete(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
