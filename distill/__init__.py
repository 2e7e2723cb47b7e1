"""distill: knowledge distillation and model compression for PyTorch.

    from distill import Recipe, run
    metrics = run(Recipe.load("digits", ["train.epochs=5"]), out="runs/digits")
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so `distill --help` answers without loading torch.
_EXPORTS = {"Recipe": "recipe", "UserError": "errors", "RunDir": "runner", "run": "runner", "run_seeds": "runner",
            "train_teacher": "runner", "soft_labels": "runner", "train_student": "runner", "evaluate": "runner"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
