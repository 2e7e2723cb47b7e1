"""Lower precision for deployment, one function per backend; `distill bench` measures them all.

* PyTorch: dynamic int8 Linear layers (`torch.ao.quantization.quantize_dynamic`), static int8 calibrated on
  training samples (FX graph mode; CNNs and MLPs), fp16/bf16 weights.
* ONNX Runtime: dynamic int8 (per-channel weights; embeddings' Gather quantized too) and static int8 (QDQ,
  calibrated).
* torchao (optional, `pip install torchao`): int8 dynamic activations and weights, and the PT2E X86
  Inductor quantizer, which moved from torch.ao to torchao.

torch 2.13 marks `torch.ao.quantization` deprecated in favour of torchao, yet measured here its dynamic
int8 was several times faster than fp32 on BERT-sized Linear layers while torchao's ran slower than fp32 in
eager mode. Every backend call goes through `_api`, so an API that a newer release removes is one clear
line naming it, never a silent fallback.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Optional

import torch
from torch import nn

from ..errors import UserError
from ..models.hf import HFClassifier, trim_padding

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _api(what: str, module: str, name: str, install: str = ""):
    """`module.name`, or a one-line error saying that this installed version lacks it."""
    import importlib
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        hint = install or f"torch=={torch.__version__} lacks it; distill pins torch==2.13.0"
        raise UserError(f"{what}: {module}.{name} is not available ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"{hint}") from None


def dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) whose nn.Linear layers hold int8 weights (one scale per output row,
    symmetric) with activations quantized per batch."""
    quantize_dynamic = _api("dynamic int8", "torch.ao.quantization", "quantize_dynamic")
    qconfig = _api("dynamic int8", "torch.ao.quantization", "per_channel_dynamic_qconfig")
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice is known (see the module docstring)
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: qconfig}, dtype=torch.qint8)


def static_int8(model: nn.Module, calibration: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Static int8 (weights and activations; ranges from `calibration` inputs) by FX graph mode."""
    if isinstance(model, HFClassifier):
        raise UserError("static int8 in PyTorch: transformers are not FX-traceable here; use onnx_static "
                        "(ONNX Runtime static int8) for them")
    mapping = _api("static int8", "torch.ao.quantization", "get_default_qconfig_mapping")("x86")
    prepare = _api("static int8", "torch.ao.quantization.quantize_fx", "prepare_fx")
    convert = _api("static int8", "torch.ao.quantization.quantize_fx", "convert_fx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(copy.deepcopy(model).eval(), mapping, (calibration[:1],))
        with torch.no_grad():
            for i in range(0, len(calibration), batch_size):
                prepared(calibration[i:i + batch_size])
        return convert(prepared)


def torchao_int8(model: nn.Module) -> nn.Module:
    """torchao's int8 dynamic-activation int8-weight Linear layers (eager)."""
    install = "install it with pip install torchao (optional)"
    quantize_ = _api("torchao", "torchao.quantization", "quantize_", install)
    config = _api("torchao", "torchao.quantization", "Int8DynamicActivationInt8WeightConfig", install)
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config())
    return model


def pt2e_int8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """torch.export, then PT2E with the X86 Inductor quantizer (dynamic int8; now part of torchao)."""
    from .export import signature
    install = "PT2E moved from torch.ao to torchao: pip install torchao (optional)"
    prepare = _api("pt2e", "torchao.quantization.pt2e.quantize_pt2e", "prepare_pt2e", install)
    convert = _api("pt2e", "torchao.quantization.pt2e.quantize_pt2e", "convert_pt2e", install)
    xiq = "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"
    quantizer = _api("pt2e", xiq, "X86InductorQuantizer", install)()
    quantizer.set_global(_api("pt2e", xiq, "get_default_x86_inductor_quantization_config", install)(is_dynamic=True))
    module, inputs, axes = signature(copy.deepcopy(model), calibration[:8])  # (a batch of 1 fails to export)
    dims = tuple({axis: torch.export.Dim.AUTO for axis in axes[k]} for k in inputs)
    example = tuple(t.contiguous() for t in inputs.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(torch.export.export(module, example, dynamic_shapes=dims).module(), quantizer)
        with torch.no_grad():
            for i in range(0, min(len(calibration), 256), 32):
                prepared(*(t.contiguous() for t in signature(model, calibration[i:i + 32])[1].values()))
        converted = convert(prepared)
    return ExportedGraph(converted, model.pad_id if isinstance(model, HFClassifier) else None)


class ExportedGraph(nn.Module):
    """An exported (PT2E-quantized) graph behind distill's one-tensor interface: padded token ids are split
    into (input_ids, attention_mask). The graph always runs as exported: `.train()`/`.eval()` stop here,
    because switching an exported graph's mode is refused by torchao."""

    def __init__(self, graph: nn.Module, pad_id: Optional[int]) -> None:
        super().__init__()
        self.graph, self.pad_id = graph, pad_id

    def train(self, mode: bool = True) -> "ExportedGraph":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = trim_padding(x, self.pad_id) if self.pad_id is not None else (x,)
        out = self.graph(*(t.contiguous() for t in inputs))  # exported for contiguous inputs (strides are kept)
        return out[0] if isinstance(out, (tuple, list)) else out


def onnx_int8(src: str, dst: str, mode: str, calibration=None) -> None:
    """Quantize the ONNX file `src` into `dst` with ONNX Runtime: `dynamic` (per-channel int8 weights, Gather
    included) or `static` (QDQ, activation ranges from `calibration`, a list of input feeds)."""
    from ..io import atomic_path
    module = "onnxruntime.quantization"
    install = "pip install -e '.[deploy]'"
    qtype = _api(f"onnx_{mode}", module, "QuantType", install)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs advice (pre-processing, LayerNorm axes) through the root logger
    with atomic_path(dst) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "dynamic":
            try:
                _api("onnx_dynamic", module, "quantize_dynamic", install)(src, tmp, weight_type=qtype.QInt8,
                                                                         per_channel=True)
            finally:
                root.setLevel(level)
            return
        base = _api("onnx_static", module, "CalibrationDataReader", install)

        class Feeds(base):
            def __init__(self) -> None:
                self.it = iter(calibration)

            def get_next(self):
                return next(self.it, None)
        try:
            _api("onnx_static", module, "quantize_static", install)(
                src, tmp, Feeds(), quant_format=_api("onnx_static", module, "QuantFormat", install).QDQ,
                per_channel=True, activation_type=qtype.QUInt8, weight_type=qtype.QInt8)
        finally:
            root.setLevel(level)


def cast_weights(model: nn.Module, precision: str) -> nn.Module:
    """A copy of `model` with floating-point weights in fp16 or bf16 (inputs must be cast to match)."""
    if precision not in DTYPES:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(DTYPES)}")
    return copy.deepcopy(model).to(DTYPES[precision]).eval()


def int8_linear_count(model: nn.Module) -> int:
    """How many Linear layers of `model` really hold int8 weights (a check, not a claim)."""
    return sum(1 for m in model.modules()
               if type(m).__module__.startswith("torch.ao.nn.quantized") and hasattr(m, "weight")
               and callable(m.weight) and m.weight().dtype == torch.qint8)


# ---------------------------------------------------------------- quantization-aware training

class _FakeQuantLinearWeight(nn.Module):
    """Weight -> int8 and back, exactly as `dynamic_int8` stores it (per-row symmetric qint8: scale =
    max|row| / 127.5); gradients pass straight through inside the range."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = (w.detach().abs().amax(1) / 127.5).clamp_min(torch.finfo(torch.float32).eps)
        zero = torch.zeros(len(scale), dtype=torch.int32, device=scale.device)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)


def _fake_quant_input(_module: nn.Module, args):
    """Activations as dynamic int8 sees them: per-batch affine uint8 over the batch's [min, max]
    (7-bit range, as the x86 engine reduces it)."""
    x = args[0]
    lo, hi = float(x.detach().min().clamp(max=0)), float(x.detach().max().clamp(min=0))
    scale = max(hi - lo, 1e-8) / 127
    return (torch.fake_quantize_per_tensor_affine(x, scale, int(round(-lo / scale)), 0, 127),) + args[1:]


def prepare_qat(model: nn.Module) -> nn.Module:
    """Train-time int8 simulation for every Linear layer of `model` (in place). Undo with `finish_qat`."""
    from torch.nn.utils import parametrize
    for m in model.modules():
        if isinstance(m, nn.Linear) and not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", _FakeQuantLinearWeight())
            m._distill_qat_hook = m.register_forward_pre_hook(_fake_quant_input)
    return model


def finish_qat(model: nn.Module) -> nn.Module:
    """Remove the simulation and keep the trained float weights, ready for `dynamic_int8`."""
    from torch.nn.utils import parametrize
    for m in model.modules():
        if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m._distill_qat_hook.remove()
            del m._distill_qat_hook
    return model
