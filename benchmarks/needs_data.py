"""Benchmarks of recipes whose data distill does not ship (../shared/data, beside the project) skip with the
reason when it is absent, before any work, instead of failing part-way with a traceback."""
from __future__ import annotations

import sys
from typing import Sequence

from distill import Recipe
from distill.errors import UserError


def skip_without_data(*recipes: str, sets: Sequence[str] = ()) -> None:
    """Exit 0, saying why, when a recipe's data file is missing; any other mistake in it is raised as it is."""
    for recipe in recipes:
        try:
            Recipe.load(recipe, list(sets))
        except UserError as e:
            if "file not found" not in str(e):
                raise
            print(f"skipped: {recipe}: {e}", file=sys.stderr)
            sys.exit(0)
