"""distill: knowledge distillation and model compression for PyTorch.

    from distill import Recipe, run
    metrics = run(Recipe.load("digits", ["train.epochs=5"]), out="runs/digits")
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so `distill --help` answers without loading torch.
_EXPORTS = {"Recipe": "recipe", "UserError": "errors", "RunDir": "pipeline.rundir", "run": "pipeline.plan",
            "run_seeds": "pipeline.plan", "train_teacher": "pipeline.plan", "soft_labels": "pipeline.plan",
            "train_student": "pipeline.plan"}  # (evaluate: distill.pipeline.plan.evaluate; distill.evaluate is a module)
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


def __dir__() -> list:
    """The lazy exports too (tab completion offers them)."""
    return sorted({*globals(), *_EXPORTS})
