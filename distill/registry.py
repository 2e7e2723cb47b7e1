"""Named components (timm style): a recipe names a thing, a test can list them all."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, TypeVar

from .errors import UserError, did_you_mean

T = TypeVar("T", bound=Callable)


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable] = {}
        self._tags: Dict[str, Dict[str, Any]] = {}

    def register(self, name: str | None = None, **tags: Any) -> Callable[[T], T]:
        """`@REG.register("name", group="feature")`: `tags` describe the item (what it applies to, how)."""
        def add(fn: T) -> T:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' registered twice")
            self._items[key] = fn
            self._tags[key] = tags
            return fn
        return add

    def tags(self, name: str) -> Dict[str, Any]:
        return self._tags.get(name, {})

    def get(self, name: str, where: str = "") -> Callable:
        at = f"{where}: " if where else ""
        if not isinstance(name, str):  # (a list or a mapping from a file's header: unhashable, a TypeError)
            raise UserError(f"{at}expected the name of a {self.kind}, got {type(name).__name__} {name!r:.60}")
        if name not in self._items:
            raise UserError(f"{at}unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                            f"choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self, **tags: Any) -> List[str]:
        """Every name, or those whose tags match all of `tags` (e.g. names(group="feature"))."""
        return sorted(k for k in self._items if all(self._tags[k].get(t) == v for t, v in tags.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items


MODELS = Registry("model")
LOSSES = Registry("loss")
DATASETS = Registry("dataset")
AGGREGATORS = Registry("teacher aggregator")
TASKS = Registry("task")
