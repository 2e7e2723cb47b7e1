"""Export a trained model for deployment: ONNX (checked in ONNX Runtime), TorchScript, or safetensors.

Every export is verified before it is kept: the exported file is loaded back and run on real test inputs,
and its outputs must match PyTorch's within `tolerance(...)`; a mismatch is an error, not a warning. Text
models are exported with their natural deployment signature, (input_ids, attention_mask) with dynamic batch
and sequence axes, rather than distill's single padded-ids tensor.

A model trained on normalised inputs is, by default, exported wrapped in `Normalized`, so the ONNX and
TorchScript files take RAW inputs and apply the training split's mean/std themselves (`preprocessing` is the
dict saved in the weights' metadata, see `distill.pipeline.artifacts.preprocessing`). safetensors stays weights-only.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from ..io import atomic_path, save_model
from ..models.gpt import GPT
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


class _TokensOnly(nn.Module):
    """tokens -> logits for the registry's GPT, whose forward also takes a key/value cache and a start
    position: the ONNX exporter would make those defaults inputs of the graph that a caller must feed."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Normalized(nn.Module):
    """`model((x - mean) / std)`: the per-feature (vectors, (N, D)) or per-channel (images, (N, C, H, W))
    normalisation of training baked into the graph, so the exported file takes raw inputs."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], image: bool) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise UserError(f"preprocessing.normalize: {len(mean)} means and {len(std)} stds; they must match")
        shape = (1, -1, 1, 1) if image else (1, -1)
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def raw_inputs(x: torch.Tensor, stats: Dict[str, Any], image: bool) -> torch.Tensor:
    """Inputs normalised with a DataBundle's `stats` back as the reader gave them (for a file that bakes the
    normalisation in)."""
    shape = (1, -1, 1, 1) if image else (1, -1)
    return x * torch.tensor(stats["std"]).reshape(shape) + torch.tensor(stats["mean"]).reshape(shape)


def normalized(model: nn.Module, preprocessing: Optional[Dict[str, Any]], x: torch.Tensor) -> Optional[Normalized]:
    """`model` wrapped in the normalisation of `preprocessing` (checked against the raw batch `x`), or None
    when there is none to bake in (no "normalize", or a text model: token ids are never normalised)."""
    norm = (preprocessing or {}).get("normalize")
    if not norm or isinstance(model, HFClassifier):
        return None
    if norm.get("axis", 1) != 1:
        raise UserError(f"preprocessing.normalize.axis={norm.get('axis')}: only axis 1 (features or channels) "
                        f"is supported; export with --no-preprocessing")
    image = bool(norm.get("image", x.dim() == 4))
    if x.dim() != (4 if image else 2) or x.shape[1] != len(norm["mean"]):
        raise UserError(f"preprocessing.normalize: {len(norm['mean'])} {'channel' if image else 'feature'} "
                        f"statistics do not fit inputs of shape {tuple(x.shape[1:])}; export with --no-preprocessing")
    return Normalized(model, norm["mean"], norm["std"], image).eval()


def signature(model: nn.Module, x: torch.Tensor) -> Tuple[nn.Module, Dict[str, torch.Tensor], Dict[str, Dict]]:
    """The module to export, named example inputs made from the padded batch `x`, and their dynamic axes."""
    if isinstance(model, HFClassifier):
        ids, mask = trim_padding(x, model.pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
        return _TextSignature(model).eval(), inputs, {k: {0: "batch", 1: "sequence"} for k in inputs}
    if isinstance(model, GPT):
        seq = {0: "batch", 1: "sequence"}  # (logits per position: any length up to the context)
        return _TokensOnly(model).eval(), {"x": x}, {"x": seq, "logits": seq}
    return model.eval(), {"x": x}, {"x": {0: "batch"}}


def tolerance(reference: torch.Tensor) -> float:
    """Largest accepted |exported - PyTorch| on the logits: float32 rounding, scaled by their size."""
    return 1e-4 * max(1.0, float(reference.abs().max()))


def _onnx(module: nn.Module, inputs: Dict[str, torch.Tensor], axes: Dict[str, Dict], path: str) -> None:
    try:
        import onnx  # noqa: F401 (torch's exporter writes through it)
    except ImportError:
        raise UserError("--format onnx: the onnx package is not installed (pip install -e '.[deploy]')") from None
    try:
        with warnings.catch_warnings():  # tracer warnings about Python control flow are expected here
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(inputs.values()), path, input_names=list(inputs),
                              output_names=["logits"], dynamic_axes={"logits": {0: "batch"}, **axes},
                              opset_version=17, dynamo=False)
    except (AttributeError, TypeError) as e:  # the exporter API moved: say so instead of a deep traceback
        raise UserError(f"--format onnx: this torch {torch.__version__} has no compatible torch.onnx.export "
                        f"(TorchScript-based exporter): {e}") from None
    except torch.onnx.errors.OnnxExporterError as e:  # a layer ONNX has no operator for (adaptive pooling...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # (less the advice to file one)
        raise UserError(f"--format onnx: the model cannot be exported to ONNX ({first[:200]}); "
                        f"--format torchscript may take it") from None


def _run_onnx(path: str, inputs: Dict[str, torch.Tensor]) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--format onnx: onnxruntime is not installed (pip install -e '.[deploy]'); the export "
                        "is only kept once ONNX Runtime has checked it") from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def export_model(model: nn.Module, x: torch.Tensor, fmt: str, path: str, meta: Dict[str, Any],
                 preprocessing: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write `model` as `fmt` to `path` (atomically) after checking its outputs on the batch `x`.

    With a `preprocessing` that has "normalize", onnx and torchscript exports take RAW inputs (the
    normalisation is baked in, see `Normalized`) and `x` must then be raw too: the check runs the wrapped
    model in PyTorch on it. safetensors stays weights-only (`meta` carries the statistics)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    wrapped = normalized(model, preprocessing, x) if fmt != "safetensors" else None
    module, inputs, axes = signature(wrapped if wrapped is not None else model, x)
    with torch.no_grad():
        reference = module(*inputs.values()).float()  # (positional: a layer list's Sequential names its input `input`)
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        if fmt == "onnx":
            _onnx(module, inputs, axes, tmp)
            run = lambda feed: torch.from_numpy(_run_onnx(tmp, feed))  # noqa: E731
        elif fmt == "torchscript":
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, tuple(inputs.values()), strict=False)
            traced.save(tmp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit is marked deprecated in favour of torch.export
                loaded = torch.jit.load(tmp)
            run = lambda feed: loaded(*feed.values())  # noqa: E731
        else:
            save_model(model, tmp, meta)
            saved, state = load_file(tmp), model.state_dict()
            same = saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
            run = lambda feed: module(*feed.values()) if same else torch.full_like(reference, float("inf"))  # noqa: E731
        with torch.no_grad():
            diff = float((run(inputs).float() - reference).abs().max())
            if 1 in axes.get("logits", {}):  # (logits per position: checked at a shorter length too)
                short = {k: v[:, :max(1, v.shape[1] // 2)] for k, v in inputs.items()}
                diff = max(diff, float((run(short).float() - module(*short.values()).float()).abs().max()))
        if not np.isfinite(diff) or diff > tolerance(reference):
            raise UserError(f"{path}: the {fmt} export differs from PyTorch by {diff:.3g} on the logits "
                            f"(tolerance {tolerance(reference):.3g}); the file was not written")
    return {"format": fmt, "path": path, "size_bytes": os.path.getsize(path), "max_abs_diff": diff,
            "tolerance": tolerance(reference), "checked_on": int(len(x)),
            "preprocessing": "baked" if wrapped is not None else "none", "export_s": round(time.perf_counter() - t0, 3)}
