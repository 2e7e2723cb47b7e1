"""Test-split metrics and deployment numbers (parameters, file size, CPU latency)."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .engine.inference import predict
from .models import count_params
from .models.hf import unpadded_lengths
from .roles import SCRATCH, STUDENT, TEACHER, is_assistant
from .tasks import task_for


def latency_ms(model: nn.Module, x: torch.Tensor, runs: int = 100, threads: int = 1) -> float:
    """Median wall time of a forward pass on batch `x`, after warm-up, on a fixed number of threads."""
    return latency_percentiles(model, x, runs, threads)[0]


def latency_percentiles(model: nn.Module, x: torch.Tensor, runs: int = 100, threads: int = 1,
                        q: Sequence[float] = (50, 95)) -> List[float]:
    """Percentiles (ms) of the wall time of a forward pass on batch `x`, after warm-up, on `threads` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(min(10, runs)):
                model(x)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
        model.train(was_training)
    return [1000 * float(np.percentile(times, p)) for p in q]


def typical_sample(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """One test input for batch-1 latency: for text, a text of median length (lengths vary), without its
    padding (a causal LM would read the padding too), else the first."""
    pad = getattr(model, "pad_id", None)
    if pad is None:
        return x[:1]
    lengths = unpadded_lengths(x, pad)
    i = int(lengths.argsort()[len(x) // 2])
    return x[i:i + 1, :int(lengths[i])]


def weights_size(path: str) -> int:
    """Bytes of the model's file as deployed: the safetensors file (its weights and distill's header: class
    names, preprocessing, the run's record of the model, about 2 KB), or a Hugging Face folder's
    model.safetensors (tokenizer not counted). Two students of one architecture differ by their headers."""
    return os.path.getsize(os.path.join(path, "model.safetensors") if os.path.isdir(path) else path)


def evaluate_model(model: nn.Module, path: str, x: torch.Tensor, y: torch.Tensor, ecfg: Dict[str, Any],
                   batch_size: int = 512, runtime: Any = None, task: Any = None) -> Dict[str, Any]:
    """Test metrics (those named in `evaluate.metrics` that apply), size, batch-1 latency and throughput
    (samples per second at `evaluate.throughput_batch`), both on `evaluate.threads` threads. With several
    processes the predictions are shared out and gathered, and only the main process measures speed."""
    task = task or task_for()
    if hasattr(task, "evaluate"):
        keep = task.evaluate(model, x, y, ecfg, batch_size, runtime, path)
    else:
        keep = task.metrics(predict(model, x, batch_size, runtime), y, ecfg)
    model.cpu()  # (scored on the run's device; latency and throughput are the CPU's, on evaluate.threads)
    if runtime is not None and not runtime.is_main:
        return keep
    big = x[:ecfg["throughput_batch"]]
    if getattr(model, "pad_id", None) is not None:  # (the batch's own width, not the longest test text's)
        big = big[:, :int(unpadded_lengths(big, model.pad_id).max())]
    batch_ms = latency_ms(model, big, max(5, ecfg["latency_runs"] // 10), ecfg["threads"])
    return {**keep, "params": count_params(model), "size_bytes": weights_size(path),
            "latency_ms": latency_ms(model, typical_sample(x, model), ecfg["latency_runs"], ecfg["threads"]),
            "throughput": len(big) / batch_ms * 1000}


def mean_std(values: List[float]) -> Dict[str, float]:
    arr = np.asarray(values, dtype=float)
    # (the sample standard deviation, n - 1: of one seed there is none, and 0 would say there is no spread)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None}


COLUMNS = [("bpc", "bits/char", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
           ("bits_per_byte", "bits/byte", "{:.4f}"), ("exact_match", "exact match", "{:.3f}"),
           ("bleu", "BLEU", "{:.1f}"), ("chrf", "chrF", "{:.1f}"), ("teacher_kl", "KL to teacher", "{:.3f}"),
           ("top1_agreement", "agree", "{:.3f}"),
           ("accuracy", "accuracy", "{:.4f}"), ("macro_f1", "macro-F1", "{:.4f}"), ("auc", "AUC", "{:.4f}"),
           ("sensitivity", "sensitivity", "{:.4f}"), ("specificity", "specificity", "{:.4f}"),
           ("params", "params", "{:,.0f}"), ("size_bytes", "size KB", None), ("latency_ms", "ms/sample", "{:.4f}"),
           ("throughput", "samples/s", "{:,.0f}"), ("completion_tokens_per_s", "completion tok/s", "{:,.0f}")]
LABELS = {TEACHER: "teacher", SCRATCH: "student (no KD)", STUDENT: "student (distilled)"}


def _cell(value: Any, fmt: Optional[str], key: str) -> str:
    if isinstance(value, dict):  # mean and std over seeds; sizes do not vary with the seed
        if key in ("params", "size_bytes") or value["std"] is None:
            return _cell(value["mean"], fmt, key)
        return f"{_cell(value['mean'], fmt, key)} ± {_cell(value['std'], fmt, key)}"
    if key == "size_bytes":
        return f"{value / 1024:,.1f}"
    return fmt.format(value)


def format_table(metrics: Dict[str, Any]) -> str:
    """A plain-text table: teacher, scratch student, distilled student (single run or mean ± std)."""
    assistants = sorted((k for k in metrics if is_assistant(k)), key=lambda k: int(k.split("_")[1]))
    skipped = [k for k, v in metrics.items() if isinstance(v, dict) and v.get("skipped")]
    rows = [k for k in (TEACHER, *assistants, SCRATCH, STUDENT) if k in metrics and k not in skipped]
    # (a column any row has: the teacher has no agreement with itself, and it dropped the students' column)
    cols = [c for c in COLUMNS if any(metrics[r].get(c[0]) is not None for r in rows)]
    table = [["model"] + [c[1] for c in cols]]
    label = lambda r: LABELS.get(r) or f"assistant {r.split('_')[1]} (distilled)"  # noqa: E731
    table += [[label(r)] + [_cell(metrics[r][c[0]], c[2], c[0]) if metrics[r].get(c[0]) is not None else "–"
                            for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    lines += [f"{LABELS.get(k, k)}: skipped (baseline: false)" for k in skipped]
    return "\n".join(lines)
