"""Benchmarks of recipes whose data distill does not ship (../shared/data, beside the project) skip with the
reason when it is absent, before any work, instead of failing part-way with a traceback."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from distill import Recipe
from distill.errors import UserError


def skip_without_data(*recipes: str, sets: Sequence[str] = ()) -> None:
    """Exit 0, saying why, when a recipe's data file in ../shared/data is missing; any other mistake in it (a
    path the user gave that is not there) is raised as it is."""
    for recipe in recipes:
        try:
            Recipe.load(recipe, list(sets))
        except UserError as e:
            if "file not found" not in str(e) or "shared/data" not in str(e):
                raise
            print(f"skipped: {recipe}: {e}", file=sys.stderr)
            sys.exit(0)


def run_main(main: Callable[[], Optional[int]]) -> None:
    """A benchmark's main(): a mistake in its recipe or arguments is one line and exit 2, as distill says it."""
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
