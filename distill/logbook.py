"""Training records: `log.jsonl` read back (for the report and the doctor), and the TensorBoard writer class.

The trainer's callbacks write them (engine/callbacks.py: LogLines, TensorBoard); each role gets its own
TensorBoard folder, `tensorboard/<role>`, so TensorBoard overlays them as runs.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

from .errors import UserError


def summary_writer_class():
    """torch's SummaryWriter, or a one-line error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard: the tensorboard package is not installed; "
                        "pip install -e '.[tensorboard]'") from None
    return SummaryWriter


MEASURED = ("loss_", "val_", "train_", "lr", "retention", "grad")  # numeric fields of the training lines


def read_run_log(folder: str, cfg: Dict[str, Any]) -> Tuple[Dict[str, List[Dict[str, Any]]],
                                                            Dict[str, List[Dict[str, Any]]]]:
    """`read_log` of a run folder, for its recipe `cfg`: without the lines of models an earlier recipe trained
    and this one has not: a baseline (baseline: false here), assistants past this recipe's chain, a teacher
    this recipe loads (its stage says where from) instead."""
    from .io import read_run_json
    from .roles import SCRATCH, assistant_names, is_assistant
    epochs, steps = read_log(os.path.join(folder, "log.jsonl"))
    chain = assistant_names(cfg)
    stages = read_run_json(os.path.join(folder, "stages.json"), {})
    loaded = {k for k, v in stages.items() if isinstance(v, dict) and v.get("loaded_from")}
    for role in [r for r in {*epochs, *steps} if (r == SCRATCH and not cfg["baseline"])
                 or (is_assistant(r) and r not in chain) or r in loaded]:
        epochs.pop(role, None), steps.pop(role, None)
    return epochs, steps


def read_log(path: str) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, List[Dict[str, Any]]]]:
    """Epoch records and step records per model, in order. A log can hold several attempts (resumed or
    repeated stages): a later record replaces an earlier one of the same epoch (step), and a new epoch 1
    (a training started afresh) starts the model's history again."""
    epochs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    steps: Dict[str, Dict[int, Dict[str, Any]]] = {}
    if not os.path.isfile(path):
        return {}, {}
    with open(path, encoding="utf-8", errors="replace") as fh:  # (a line of bytes damaged: not JSON, passed over)
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:  # a line cut short by a crash: the rest of the log is still good
                continue
            if not isinstance(r, dict) or "model" not in r or not isinstance(r.get("epoch"), int) or "event" in r \
                    or not isinstance(r.get("step", 0), int):
                continue  # (not a training line, or not one that distill wrote)
            role = str(r["model"])
            # (a measurement that is not a number, in a line edited by hand, is dropped: the plots compute with them)
            r = {k: v for k, v in r.items() if not k.startswith(MEASURED) or v is None or (
                isinstance(v, (int, float)) and not isinstance(v, bool))}
            if "step" in r:  # (epoch lines have no step)
                seen = steps.setdefault(role, {})
                if seen and r["epoch"] == 1 and r["step"] <= max(seen):
                    seen.clear()
                seen[int(r["step"])] = r
            else:
                seen = epochs.setdefault(role, {})
                if r["epoch"] == 1:
                    seen.clear()
                seen[int(r["epoch"])] = r
    order = lambda d: {k: [v[i] for i in sorted(v)] for k, v in d.items()}  # noqa: E731
    return order(epochs), order(steps)
