"""Lower precision for deployment: dynamic int8 Linear layers, and fp16/bf16 weights.

Dynamic int8 (weights stored as int8, activations quantized on the fly per batch) uses
`torch.ao.quantization.quantize_dynamic`. torch 2.13 marks that API deprecated in favour of torchao, yet it
was the fastest CPU path measured here for BERT-sized Linear layers; if a later torch removes it, this module
says so in one line instead of failing deep inside a run.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import UserError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) whose nn.Linear layers hold int8 weights with dynamic activations."""
    try:
        quantize_dynamic = torch.ao.quantization.quantize_dynamic
    except AttributeError:
        raise UserError(f"dynamic int8: torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic; "
                        f"use torch==2.13.0 (pinned by distill) or another quantization method") from None
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice is known (see the module docstring)
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


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
