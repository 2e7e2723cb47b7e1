"""Named components (timm style): a recipe names a thing, a test can list them all."""
from __future__ import annotations

from typing import Callable, Dict, List, TypeVar

from .errors import UserError, did_you_mean

T = TypeVar("T", bound=Callable)


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def add(fn: T) -> T:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' registered twice")
            self._items[key] = fn
            return fn
        return add

    def get(self, name: str, where: str = "") -> Callable:
        if name not in self._items:
            at = f"{where}: " if where else ""
            raise UserError(f"{at}unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                            f"choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


MODELS = Registry("model")
LOSSES = Registry("loss")
DATASETS = Registry("dataset")
