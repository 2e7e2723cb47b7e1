"""Progress bars (rate and ETA) for every long loop, on stderr."""
from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bar(it: Iterable[T], desc: str, unit: str = "it", show: bool = True, **kw) -> "tqdm[T]":
    """A tqdm bar; DISTILL_QUIET=1 hides them (tests), and off a terminal they update every few seconds.
    `show=False` hides it too (processes other than the main one under torchrun)."""
    quiet = os.environ.get("DISTILL_QUIET") == "1" or not show
    return tqdm(it, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, leave=False,
                mininterval=0.5 if os.isatty(2) else 5.0, **kw)
