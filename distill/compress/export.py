"""Export a trained model for deployment: ONNX (checked in ONNX Runtime), TorchScript, or safetensors.

Every export is verified before it is kept: the exported file is loaded back and run on real test inputs,
and its outputs must match PyTorch's within `tolerance(...)`; a mismatch is an error, not a warning. Text
models are exported with their natural deployment signature, (input_ids, attention_mask) with dynamic batch
and sequence axes, rather than distill's single padded-ids tensor.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Any, Dict, Tuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from ..io import atomic_path, save_model
from ..models.hf import HFClassifier, trim_padding

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}


class _TextSignature(nn.Module):
    """(input_ids, attention_mask) -> logits: what a serving stack feeds a Hugging Face classifier."""

    def __init__(self, model: HFClassifier) -> None:
        super().__init__()
        self.hf = model.hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


def signature(model: nn.Module, x: torch.Tensor) -> Tuple[nn.Module, Dict[str, torch.Tensor], Dict[str, Dict]]:
    """The module to export, named example inputs made from the padded batch `x`, and their dynamic axes."""
    if isinstance(model, HFClassifier):
        ids, mask = trim_padding(x, model.pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
        return _TextSignature(model).eval(), inputs, {k: {0: "batch", 1: "sequence"} for k in inputs}
    return model.eval(), {"x": x}, {"x": {0: "batch"}}


def tolerance(reference: torch.Tensor) -> float:
    """Largest accepted |exported - PyTorch| on the logits: float32 rounding, scaled by their size."""
    return 1e-4 * max(1.0, float(reference.abs().max()))


def _onnx(module: nn.Module, inputs: Dict[str, torch.Tensor], axes: Dict[str, Dict], path: str) -> None:
    try:
        with warnings.catch_warnings():  # tracer warnings about Python control flow are expected here
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(inputs.values()), path, input_names=list(inputs),
                              output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
                              opset_version=17, dynamo=False)
    except (AttributeError, TypeError) as e:  # the exporter API moved: say so instead of a deep traceback
        raise UserError(f"--format onnx: this torch {torch.__version__} has no compatible torch.onnx.export "
                        f"(TorchScript-based exporter): {e}") from None


def _run_onnx(path: str, inputs: Dict[str, torch.Tensor]) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--format onnx: onnxruntime is not installed (pip install 'distill[deploy]'); the export "
                        "is only kept once ONNX Runtime has checked it") from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def export_model(model: nn.Module, x: torch.Tensor, fmt: str, path: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """Write `model` as `fmt` to `path` (atomically) after checking its outputs on the batch `x`."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    module, inputs, axes = signature(model, x)
    with torch.no_grad():
        reference = module(**inputs).float()
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        if fmt == "onnx":
            _onnx(module, inputs, axes, tmp)
            got = torch.from_numpy(_run_onnx(tmp, inputs))
        elif fmt == "torchscript":
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, tuple(inputs.values()), strict=False)
            traced.save(tmp)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit is marked deprecated in favour of torch.export
                got = torch.jit.load(tmp)(*inputs.values())
        else:
            save_model(model, tmp, meta)
            saved, state = load_file(tmp), model.state_dict()
            same = saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
            got = reference if same else torch.full_like(reference, float("inf"))  # weights read back exactly
        diff = float((got.float() - reference).abs().max())
        if not np.isfinite(diff) or diff > tolerance(reference):
            raise UserError(f"{path}: the {fmt} export differs from PyTorch by {diff:.3g} on the logits "
                            f"(tolerance {tolerance(reference):.3g}); the file was not written")
    return {"format": fmt, "path": path, "size_bytes": os.path.getsize(path), "max_abs_diff": diff,
            "tolerance": tolerance(reference), "checked_on": int(len(x)), "export_s": round(time.perf_counter() - t0, 3)}
