"""A language-model teacher's outputs as a top-k cache on disk (offline KD: the teacher never sits in memory
while the student trains; arcee DistillKit's practice).

At each position a student learns from, the teacher's distribution at the KD temperature is kept as its k
most likely token ids with their log-probabilities and the log of the probability mass left outside them
(the tail). The losses compare the two distributions over those k + 1 buckets (tokens.py), which is exact
when k is the vocabulary. A folder per entry:

    manifest.json         format, teacher and tokenizer hashes, vocabulary, k, temperature, data hash,
                          rows and tokens, bytes per token, the shards
    shard-00000.safetensors ...
        starts   (rows,)      int64   first position of each row kept (its first target)
        offsets  (rows + 1,)  int64   each row's positions in the arrays below: offsets[r]..offsets[r+1]
        tokens   (T,)         int32   the input token at each kept position
        mask     (T,)         bool    whether its loss counts
        ids      (T, k)       uint16 (when the vocabulary fits) or int32
        logprobs (T, k)       fp16
        tail     (T,)         fp16    log of the mass outside the k ids

At k = 32 a position takes 32 x (2 + 2) + 2 + 4 + 1 = 135 bytes, against 98 KB of dense fp16 logits over a
49,152-token vocabulary. The shards are written one at a time, each atomically, into `<entry>.partial`: a
killed build resumes at the first missing shard (with several processes, each writes every world-th
shard); the folder is renamed into place once the manifest is written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..data.datasets import last_target
from ..engine.batch import TeacherOutputs
from ..engine.inference import model_device
from ..engine.runtime import CPU, Runtime
from ..errors import UserError
from ..io import atomic_path, locked, read_json, sha256_json, write_json
from ..progress import bar
from .cache import same_folder_everywhere, same_key_everywhere

FORMAT = 1
ROWS_PER_SHARD = 256
FLOOR = -1e4  # log-probability standing in for log 0 (exp underflows to exactly 0 in fp32; no inf, no NaN)


def spans(y: torch.Tensor) -> tuple:
    """Per row, the positions kept: from its first target to its last (inclusive)."""
    has = y >= 0
    first = torch.where(has.any(1), has.float().argmax(1), torch.zeros(len(y), dtype=torch.long))
    return first, last_target(y)


def topk_of(logits: torch.Tensor, k: int, temperature: float) -> tuple:
    """(ids, log-probabilities, tail log-mass) of the k most likely tokens at `temperature`."""
    z = logits.float()
    log_p = torch.log_softmax(z if temperature == 1 else z / temperature, dim=-1)  # (x / 1 is x: one pass less)
    values, ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    # (exact, not log(1 - sum): no rounding; in place, as log_p is not read again: no copy of the vocabulary)
    tail = torch.logsumexp(log_p.scatter_(-1, ids, float("-inf")), -1)
    return ids, values, tail.clamp_min(FLOOR)


def _shard_path(folder: str, s: int) -> str:
    return os.path.join(folder, f"shard-{s:05d}.safetensors")


def write_shard(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, temperature: float, path: str,
                batch_size: int) -> int:
    """One shard of rows x, y; returns the number of positions it holds."""
    from safetensors.torch import save_file
    first, last = spans(y)
    device = model_device(teacher)
    parts: Dict[str, List[torch.Tensor]] = {"tokens": [], "mask": [], "ids": [], "logprobs": [], "tail": []}
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                width = max(int(last[i:i + batch_size].max()), 1)
                pos = torch.arange(width)
                keep = (pos >= first[i:i + batch_size, None]) & (pos < last[i:i + batch_size, None])
                xb = x[i:i + batch_size, :width].to(device)
                # the teacher's logits on each row's span only (P, V), row after row: not on the prompt
                logits = (teacher(xb, positions=keep.to(device)) if getattr(teacher, "selects_positions", False)
                          else teacher(xb)[keep.to(device)])
                vocab = logits.shape[-1]
                # (chosen where the teacher is: k ids and values a position come back, not the vocabulary)
                ids, values, tail = (t.cpu() for t in topk_of(logits, k, temperature))
                rows = keep.sum(1).tolist()
                for r, (ids_r, values_r, tail_r) in enumerate(zip(ids.split(rows), values.split(rows), tail.split(rows))):
                    a, b = int(first[i + r]), int(last[i + r])
                    parts["tokens"].append(x[i + r, a:b].to(torch.int32))
                    parts["mask"].append(y[i + r, a:b] >= 0)
                    parts["ids"].append(ids_r)
                    parts["logprobs"].append(values_r.clamp_min(FLOOR).half())
                    parts["tail"].append(tail_r.half())
    finally:
        teacher.train(was_training)
    id_type = torch.int32 if vocab > 65536 else torch.uint16
    lengths = (last - first).clamp_min(0)
    arrays = {name: torch.cat(p) for name, p in parts.items()}
    arrays["ids"] = arrays["ids"].to(id_type)
    arrays["starts"] = first.to(torch.int64)
    arrays["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    with atomic_path(path) as tmp:
        save_file({n: a.contiguous() for n, a in arrays.items()}, tmp)
    return int(arrays["offsets"][-1])


class TopKCache:
    """A finished entry, read shard by shard through memory maps; `source()` is a teacher source."""

    def __init__(self, folder: str) -> None:
        from safetensors import safe_open
        self.folder, self.manifest = folder, read_json(os.path.join(folder, "manifest.json"))
        self.shards = [safe_open(_shard_path(folder, s), framework="pt") for s in range(len(self.manifest["shards"]))]
        self.index = [(sh.get_tensor("starts"), sh.get_tensor("offsets")) for sh in self.shards]
        self.k = self.manifest["k"]

    def batch(self, idx: torch.Tensor, width: int) -> TeacherOutputs:
        """Top-k outputs (N, width, k) of training rows `idx`; positions not kept hold a placeholder that no
        loss counts (all mass on the first bucket)."""
        n = len(idx)
        ids = torch.zeros(n, width, self.k, dtype=torch.long)
        logprobs = torch.full((n, width, self.k), FLOOR)
        logprobs[..., 0] = 0.0
        tail = torch.full((n, width, 1), FLOOR)
        mask = torch.zeros(n, width, dtype=torch.bool)
        for j, row in enumerate(idx.tolist()):
            s, r = divmod(row, ROWS_PER_SHARD)
            starts, offsets = self.index[s]
            a, b, start = int(offsets[r]), int(offsets[r + 1]), int(starts[r])
            if b <= a:
                continue
            stop = min(start + b - a, width)
            take = stop - start
            if take <= 0:
                continue
            sh = self.shards[s]
            ids[j, start:stop] = sh.get_slice("ids")[a:a + take].to(torch.long)
            logprobs[j, start:stop] = sh.get_slice("logprobs")[a:a + take].float()
            tail[j, start:stop, 0] = sh.get_slice("tail")[a:a + take].float()
            mask[j, start:stop] = sh.get_slice("mask")[a:a + take]
        return TeacherOutputs(mask=mask, topk_ids=ids, topk_logprobs=logprobs, tail_mass=tail)

    def source(self):
        return lambda x, idx: self.batch(idx, x.shape[1])


def check_k(k: int, vocab: int) -> None:
    if k > vocab:
        raise UserError(f"distill.topk: {k} is more than the teacher's vocabulary of {vocab} tokens; give at most "
                        f"{vocab} (k = {vocab} keeps every token, the same as dense logits)")


def expected(teacher_sha: str, tokenizer: str, vocab: int, k: int, temperature: float, data: str, rows: int,
             computed: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What an entry is built for; and how it was computed where that changes the last bits (as the dense
    cache's key: another device's kernels, or another batch size, can pick other tokens at a tie)."""
    check_k(k, vocab)
    return {"format": FORMAT, "teacher": teacher_sha, "tokenizer": tokenizer, "vocab": vocab, "k": k,
            "temperature": float(temperature), "data": data, "rows": rows, **(computed or {})}


def check_manifest(folder: str, want: Dict[str, Any]) -> None:
    """An entry is used only for what it was built for: the student's tokenizer, this teacher and data."""
    have = read_json(os.path.join(folder, "manifest.json")) or {}
    for key, value in want.items():
        if have.get(key) != value:
            what = {"tokenizer": "another tokenizer", "teacher": "another teacher", "data": "other data"}.get(key, key)
            raise UserError(f"{folder}: this top-k cache was built for {what} ({key} {have.get(key)!r}, here "
                            f"{value!r}); refusing to train on it (delete the folder to rebuild it)")


def load_or_build(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, folder: str, want: Dict[str, Any],
                  batch_size: int, runtime: Runtime = CPU, echo=print) -> tuple:
    """(the cache entry in `folder`, whether it was there already): built first when absent, resuming a
    killed build at its first missing shard. Another command building the same entry (a run beside, sharing
    the cache) is waited for, and its entry used."""
    same_key_everywhere(sha256_json(want)[:16], runtime, "top-k cache")
    same_folder_everywhere(os.path.dirname(os.path.abspath(folder)), runtime, "top-k cache")
    built = os.path.isfile(os.path.join(folder, "manifest.json"))  # (a read-only cache is read without a lock)
    with locked(folder + ".lock", echo) if runtime.is_main and not built else contextlib.nullcontext():
        runtime.barrier()  # (the other processes wait here, however long the main one waits for the lock)
        return _load_or_build(teacher, x, y, folder, want, batch_size, runtime, echo)


def _load_or_build(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, folder: str, want: Dict[str, Any],
                   batch_size: int, runtime: Runtime, echo) -> tuple:
    if runtime.from_main(os.path.isfile(os.path.join(folder, "manifest.json"))):
        check_manifest(folder, want)
        return TopKCache(folder), True
    partial = folder + ".partial"
    if runtime.is_main:
        os.makedirs(partial, exist_ok=True)
        old = read_json(os.path.join(partial, "want.json"))
        if old is not None and old != want:  # a killed build for other settings: start over
            shutil.rmtree(partial)
            os.makedirs(partial)
        write_json(os.path.join(partial, "want.json"), want)
    runtime.barrier()
    n_shards = -(-len(x) // ROWS_PER_SHARD)
    todo = [s for s in range(n_shards) if s % runtime.world_size == runtime.rank
            and not os.path.isfile(_shard_path(partial, s))]
    done_before = n_shards - len([s for s in range(n_shards) if not os.path.isfile(_shard_path(partial, s))])
    if done_before and runtime.is_main:
        echo(f"top-k cache: resuming at {done_before} of {n_shards} shards already written")
    t0, tokens = time.perf_counter(), 0
    teacher.to(runtime.device)
    for s in bar(todo, desc="top-k teacher pass", unit="shard", show=runtime.is_main):
        lo, hi = s * ROWS_PER_SHARD, min((s + 1) * ROWS_PER_SHARD, len(x))
        tokens += write_shard(teacher, x[lo:hi], y[lo:hi], want["k"], want["temperature"], _shard_path(partial, s),
                              batch_size)
    runtime.barrier()
    tokens = int(runtime.sum(torch.tensor(tokens)))  # (every process's shards: the manifest's rate is the pass's)
    if runtime.is_main:
        _finish(partial, folder, want, n_shards, tokens, time.perf_counter() - t0)
    runtime.barrier()
    return TopKCache(folder), False


def _finish(partial: str, folder: str, want: Dict[str, Any], n_shards: int, tokens_now: int, seconds: float) -> None:
    from safetensors import safe_open
    shards, total_tokens, total_bytes = [], 0, 0
    for s in range(n_shards):
        path = _shard_path(partial, s)
        with safe_open(path, framework="pt") as sh:
            t = int(sh.get_tensor("offsets")[-1])
        shards.append({"file": os.path.basename(path), "tokens": t, "bytes": os.path.getsize(path)})
        total_tokens += t
        total_bytes += os.path.getsize(path)
    write_json(os.path.join(partial, "manifest.json"), {
        **want, "tokens": total_tokens, "bytes": total_bytes,
        "bytes_per_token": round(total_bytes / max(total_tokens, 1), 1),
        "dense_fp16_bytes_per_token": 2 * want["vocab"], "shards": shards,
        "build": {"tokens_per_s": round(tokens_now / max(seconds, 1e-9), 1)}})
    os.remove(os.path.join(partial, "want.json"))
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.rename(partial, folder)


def bytes_per_token(folder: str) -> Optional[float]:
    m = read_json(os.path.join(folder, "manifest.json"))
    return None if m is None else m["bytes_per_token"]
