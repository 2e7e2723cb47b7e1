"""`distill search RECIPE`: a grid over distillation settings, each trial a run of the distilled student.

The default grid is the seed design's temperature search, T in {2, 3, 4, 5}, crossed with alpha in
{0.5, 0.7, 0.9}; `--grid KEY=V1,V2,...` replaces it with any recipe keys. The teacher is trained once and the
no-distillation student once (their inputs do not change between trials); soft labels are cached once.
Trials are ranked by the distilled student's validation accuracy, never the test split. The search writes
`search.md` (the table), `search.json`, `search.png` and `best.yaml`, the recipe with the best values.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Dict, List, Sequence

import yaml

from .errors import UserError
from .io import save_figure, write_json, write_text
from .recipe import Recipe

DEFAULT_GRID = {"distill.temperature": [2, 3, 4, 5], "distill.alpha": [0.5, 0.7, 0.9]}


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """`["distill.temperature=2,4", ...]` -> {"distill.temperature": [2, 4]}; the default grid when empty."""
    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise UserError(f"--grid {item}: expected KEY=V1,V2,..., e.g. --grid distill.temperature=2,3,4")
        try:
            grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError:
            raise UserError(f"--grid {item}: cannot read the values") from None
    return grid or dict(DEFAULT_GRID)


def search(recipe: Recipe, grid: Dict[str, List[Any]], overrides: Sequence[str], out: str, echo=print
           ) -> Dict[str, Any]:
    from . import runner
    keys = list(grid)
    trials = [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]
    for t in trials:  # every trial's recipe is validated before the first one runs
        Recipe.load(recipe.source, [*overrides, *(f"{k}={v}" for k, v in t.items())])
    rows = []
    folder = os.path.join(out, "trials")
    for i, trial in enumerate(trials):
        sets = [*overrides, *(f"{k}={v}" for k, v in trial.items())]
        echo(f"search: trial {i + 1}/{len(trials)}: " + ", ".join(f"{k}={v}" for k, v in trial.items()))
        rd = runner.RunDir(Recipe.load(recipe.source, sets), folder, echo, overwrite=True)
        t0 = time.perf_counter()
        results = runner.train_student(rd, runner.train_teacher(rd))
        rows.append({**trial, "val_accuracy": results["student"]["val_accuracy"],
                     "scratch_val_accuracy": results["student_scratch"]["val_accuracy"],
                     "selected_epoch": results["student"].get("selected_epoch"),
                     "time_s": round(time.perf_counter() - t0, 1)})
    best = max(rows, key=lambda r: r["val_accuracy"])  # ties: the first in grid order
    best_sets = [*overrides, *(f"{k}={best[k]}" for k in keys)]
    write_text(os.path.join(out, "best.yaml"), Recipe.load(recipe.source, best_sets).to_yaml())
    table = format_search(rows, keys, best)
    result = {"grid": grid, "trials": rows, "best": {k: best[k] for k in keys}, "table": table}
    write_json(os.path.join(out, "search.json"), result)
    write_text(os.path.join(out, "search.md"), table + "\n")
    plot_search(rows, keys, os.path.join(out, "search.png"))
    return result


def format_search(rows: List[Dict[str, Any]], keys: List[str], best: Dict[str, Any]) -> str:
    head = keys + ["val accuracy", "no-KD val accuracy", "epoch", "seconds", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = "best" if r is best else ""
        lines.append("| " + " | ".join([*(str(r[k]) for k in keys), f"{r['val_accuracy']:.4f}",
                                        f"{r['scratch_val_accuracy']:.4f}", str(r["selected_epoch"]),
                                        f"{r['time_s']:.1f}", mark]) + " |")
    return "\n".join(lines)


def _ordered(values) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed kinds (numbers and names): sort as text
        return sorted(values, key=str)


def plot_search(rows: List[Dict[str, Any]], keys: List[str], path: str) -> bool:
    """Validation accuracy over the grid: a heatmap for two keys, else one line per trial order."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if len(keys) == 2:
        xs, ys = (_ordered({r[k] for r in rows}) for k in keys)
        grid = [[next((r["val_accuracy"] for r in rows if r[keys[0]] == x and r[keys[1]] == y), float("nan"))
                 for x in xs] for y in ys]
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(keys[0])
        ax.set_ylabel(keys[1])
        for j, row in enumerate(grid):
            for i, v in enumerate(row):
                ax.text(i, j, f"{v:.3f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(im, ax=ax, label="validation accuracy")
    else:
        labels = [", ".join(f"{r[k]}" for k in keys) for r in rows]
        ax.bar(range(len(rows)), [r["val_accuracy"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("validation accuracy")
        ax.set_xlabel(", ".join(keys))
    ax.set_title("distill search: distilled student, validation accuracy")
    save_figure(fig, path)
    return True
