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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..engine.batch import TeacherOutputs
from ..engine.inference import model_device
from ..engine.runtime import CPU, Runtime, shard
from ..errors import UserError
from ..hooks import FeatureCapture
from .online import teacher_forward
from ..io import TMP_PREFIX, read_run_json, sha256_json, sweep_stale, write_json
from ..progress import bar


def default_cache_dir() -> str:
    return os.environ.get("DISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "distill")


def check_cache_dir(configured: Optional[str]) -> str:
    """The soft-label cache folder (`output.cache_dir`, else $DISTILL_CACHE, else ~/.cache/distill), made now:
    a file in its place, or a path that cannot be a folder, is one line before any training, not an OSError
    when the first entry is written after the teacher has trained."""
    folder = os.path.expanduser(configured) if configured else default_cache_dir()  # (~ as a shell reads it)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        if configured or os.environ.get("DISTILL_CACHE"):
            key = "output.cache_dir" if configured else "DISTILL_CACHE"
            raise UserError(f"{key}: {folder}: cannot be the cache folder ({e.strerror or e})") from None
        raise UserError(f"{folder}: cannot be the cache folder ({e.strerror or e}); set DISTILL_CACHE to a folder "
                        f"that can") from None
    return folder


def cache_key(teacher_sha: str, data_fingerprint: str, feature_layers: List[str],
              computed: Optional[Dict[str, Any]] = None) -> str:
    """The entry of these teacher weights on this data (and `computed`: how, where that changes the last bits:
    the device off the CPU, a batch size other than the default)."""
    return sha256_json({"teacher": teacher_sha, "data": data_fingerprint, "layers": sorted(feature_layers),
                        **(computed or {})})[:24]


@dataclass
class CachedOutputs:
    logits: np.ndarray
    features: Dict[str, np.ndarray]

    def batch(self, idx: torch.Tensor) -> TeacherOutputs:
        rows = idx.cpu().numpy()
        return TeacherOutputs(torch.from_numpy(np.ascontiguousarray(self.logits[rows])),
                              {k: torch.from_numpy(np.ascontiguousarray(v[rows])) for k, v in self.features.items()})

    def source(self):
        """A teacher source: the cached outputs of the batch's sample indices (the inputs are read for their
        length only: a language model's batch is cut after its longest sequence)."""
        def source(x: torch.Tensor, idx: torch.Tensor) -> TeacherOutputs:
            out = self.batch(idx)
            if out.logits.dim() == 3 and out.logits.shape[1] != x.shape[1]:
                out.logits = out.logits[:, :x.shape[1]]
            return out
        return source


def load_or_build(teacher: nn.Module, x_train: torch.Tensor, key: str, cache_dir: str,
                  feature_layers: List[str], batch_size: int, runtime: Runtime = CPU) -> Tuple[CachedOutputs, bool]:
    """Returns (outputs, hit): the cache entry for `key`, computing it first when absent. Under torchrun the
    processes share the teacher pass out and the main one publishes the entry; every process then checks it
    holds what its own teacher and data call for."""
    same_key_everywhere(key, runtime)
    same_folder_everywhere(cache_dir, runtime)
    entry = os.path.join(cache_dir, key)
    hit = runtime.from_main(_complete(entry))
    if not hit:
        _build(teacher, x_train, entry, feature_layers, batch_size, runtime)
    meta = read_run_json(os.path.join(entry, "meta.json")) or {}
    layers = meta.get("layers")
    if not (isinstance(meta.get("n"), int) and isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
        # (damaged after it was written: a traceback where it was read)
        raise UserError(f"{entry}: meta.json is not what distill writes (an int n, a list of layer names); delete "
                        f"the folder to rebuild it")
    if meta["n"] != len(x_train) or meta.get("key", key) != key:
        raise UserError(f"{entry}: the cached teacher outputs hold {meta['n']} samples of key {meta.get('key')}, "
                        f"and process {runtime.rank} trains on {len(x_train)} of key {key}; refusing to train on "
                        f"a mismatched entry (delete the folder to rebuild it)")
    files = {None: "logits.npy", **{name: f"feat_{i}.npy" for i, name in enumerate(meta["layers"])}}
    try:  # (an entry damaged after it was written: a file deleted or cut short)
        arrays = {name: np.load(os.path.join(entry, f), mmap_mode="r") for name, f in files.items()}
    except (OSError, ValueError) as e:
        raise UserError(f"{entry}: a cached teacher output is unreadable ({e}); delete the folder to rebuild it")
    short = [files[name] for name, a in arrays.items() if len(a) != meta["n"]]
    if short:
        raise UserError(f"{entry}: {short[0]} holds another number of samples than the {meta['n']} its meta.json "
                        f"names; delete the folder to rebuild it")
    logits = arrays.pop(None)
    return CachedOutputs(logits, arrays), hit


def same_key_everywhere(key: str, runtime: Runtime, what: str = "soft labels") -> None:
    """Every process needs the cache entry the main one builds (the same teacher and data on every machine)."""
    keys = runtime.gather(key)
    for rank, other in enumerate(keys):
        if other != keys[0]:
            raise UserError(f"{what}: process {rank} needs cache entry {other} and process 0 needs {keys[0]}: "
                            f"the teacher weights or the data differ between processes; refusing to train")


def same_folder_everywhere(folder: str, runtime: Runtime, what: str = "soft labels") -> None:
    """Every process reads the cache entries the main one publishes (and writes parts the main one joins): from
    a folder they all see. Two machines each with the default cache folder (each its own disk) found nothing
    there: a traceback on one process, a false 'resume' hint on the other."""
    if not runtime.distributed:
        return
    token, written = f".distill-shared-{os.urandom(8).hex()}", False  # (not from the seeded RNGs)
    if runtime.is_main:
        try:
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, token), "w").close()
            written = True
        except OSError:  # (a read-only cache, say: read as it is, unchecked; every process hears so)
            pass
    token, written = runtime.from_main((token, written))  # (and every process waits for the marker)
    if not written:
        return
    marker = os.path.join(folder, token)
    seen = runtime.gather(os.path.isfile(marker))  # (every process has looked once this returns)
    if runtime.is_main:
        os.remove(marker)
    blind = [str(rank) for rank, ok in enumerate(seen) if not ok]
    if blind:
        who = f"processes {', '.join(blind)} do not" if len(blind) > 1 else f"process {blind[0]} does not"
        raise UserError(f"{what}: {who} see {folder}, where "
                        f"process 0 keeps the cache: with several machines, output.cache_dir must be a folder "
                        f"they all see (the default is each machine's own)")


def _complete(entry: str) -> bool:
    return os.path.isfile(os.path.join(entry, "meta.json"))


def _build(teacher: nn.Module, x: torch.Tensor, entry: str, layers: List[str], batch_size: int,
           runtime: Runtime = CPU) -> None:
    """Writes into a temp folder, then renames it into place: a killed run leaves no partial entry.

    Under torchrun process r computes a contiguous block of whole batches (the same batches one process
    would compute, so the entry is the same bit for bit) into part files; behind a barrier the main process
    joins them and publishes the entry, and the others wait for it."""
    parent = os.path.dirname(entry)
    tmp = None
    if runtime.is_main:
        os.makedirs(parent, exist_ok=True)
        sweep_stale(parent)
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
    tmp = runtime.from_main(tmp)
    try:
        if not runtime.distributed:
            _teacher_pass(teacher, x, 0, len(x), batch_size, layers, tmp, "")
        else:
            mine = shard(-(-len(x) // batch_size), runtime.world_size, runtime.rank)
            lo, hi = mine.start * batch_size, min(mine.stop * batch_size, len(x))
            failed = None
            try:
                _teacher_pass(teacher, x, lo, hi, batch_size, layers, tmp, f".part{runtime.rank}", runtime.is_main)
            except Exception as e:  # (told to the others first: no entry is published without every block)
                failed = e
            if runtime.sum(torch.tensor([float(failed is not None)]))[0] > 0:
                if failed is not None:
                    raise failed
                raise UserError("soft labels: another process failed while computing its block of the teacher's "
                                "outputs; no cache entry was published")
            if runtime.is_main:
                _join_parts(tmp, ["logits", *(f"feat_{i}" for i in range(len(layers)))],
                            [len(shard(-(-len(x) // batch_size), runtime.world_size, r)) for r in
                             range(runtime.world_size)], batch_size, len(x))
        if runtime.is_main:
            write_json(os.path.join(tmp, "meta.json"), {"layers": layers, "n": len(x), "key": os.path.basename(entry)})
            _publish(tmp, entry)
    finally:
        runtime.barrier()  # the entry is in place (or the build failed) before any process reads it
        if runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def _teacher_pass(teacher: nn.Module, x: torch.Tensor, lo: int, hi: int, batch_size: int, layers: List[str],
                  folder: str, suffix: str, show: bool = True) -> None:
    """Teacher logits and features of rows lo..hi, batch by batch, into memory-mapped `NAME{suffix}.npy`."""
    arrays: Dict[str, np.ndarray] = {}
    with FeatureCapture(teacher, layers, "distill.features") as cap:
        for start in bar(range(lo, hi, batch_size), desc="soft labels", unit="batch", show=show):
            logits, feats = teacher_forward(teacher, x[start:min(start + batch_size, hi)].to(model_device(teacher)),
                                            cap)
            outs = {"logits": logits, **{f"feat_{i}": feats[n] for i, n in enumerate(layers)}}
            for name, t in outs.items():
                if name not in arrays:  # memory-mapped on disk, filled batch by batch
                    arrays[name] = np.lib.format.open_memmap(os.path.join(folder, f"{name}{suffix}.npy"), mode="w+",
                                                             dtype=np.float32, shape=(hi - lo, *t.shape[1:]))
                arrays[name][start - lo:start - lo + len(t)] = t.float().cpu().numpy()
    for a in arrays.values():
        a.flush()


def _join_parts(folder: str, names: List[str], batches: List[int], batch_size: int, n: int,
                rows_at_once: int = 65536) -> None:
    """`NAME.npy` from the processes' `NAME.partR.npy` (process R computed `batches[R]` batches), in rank
    order, copied in blocks (never all in memory); a missing or short part is an error, never a gap."""
    for name in names:
        paths = [os.path.join(folder, f"{name}.part{r}.npy") for r in range(len(batches))]
        parts, start = [], 0
        for r, (path, k) in enumerate(zip(paths, batches)):
            rows = max(0, min(start + k * batch_size, n) - start)
            start += k * batch_size
            if not rows:
                continue  # (a process with no rows writes no part)
            part = np.load(path, mmap_mode="r") if os.path.exists(path) else None
            if part is None or len(part) != rows:
                raise RuntimeError(f"soft labels: process {r}'s block of {name} is missing or short")
            parts.append(part)
        out = np.lib.format.open_memmap(os.path.join(folder, f"{name}.npy"), mode="w+", dtype=np.float32,
                                        shape=(sum(len(p) for p in parts), *parts[0].shape[1:]))
        at = 0
        for part in parts:
            for i in range(0, len(part), rows_at_once):
                block = part[i:i + rows_at_once]
                out[at:at + len(block)] = block
                at += len(block)
        out.flush()
        del out, parts
        for p in paths:
            if os.path.exists(p):
                os.remove(p)


def _publish(tmp: str, entry: str) -> None:
    if os.path.isdir(entry) and not _complete(entry):  # left by a run killed before it finished
        shutil.rmtree(entry)
    try:
        os.rename(tmp, entry)
    except OSError:  # another process finished the same entry first: theirs is identical
        if not _complete(entry):
            raise
