"""Capture intermediate outputs by module name with forward hooks (for feature distillation)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from .errors import UserError, did_you_mean


def module_names(model: nn.Module) -> List[str]:
    return [n for n, _ in model.named_modules() if n]


class FeatureCapture:
    """`with FeatureCapture(model, ["layer2"]) as cap: model(x); cap.outputs["layer2"]`."""

    def __init__(self, model: nn.Module, names: List[str], where: str = "") -> None:
        modules = dict(model.named_modules())
        for name in names:
            if not name or name not in modules:
                valid = module_names(model)  # (a transformer's run to hundreds: the first, as one line)
                shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
                raise UserError(f"{where}: no module named '{name}'{did_you_mean(name, valid)}; valid names: {shown}")
        self.model, self.names = model, list(dict.fromkeys(names))
        self._modules = [(n, modules[n]) for n in self.names]  # (looked up once: not on every batch)
        self.outputs: Dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def store(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return store

    def __enter__(self) -> "FeatureCapture":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
