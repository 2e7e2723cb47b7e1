"""`distill search RECIPE`: a grid over distillation settings, each trial a run of the distilled student.

The default grid is the seed design's temperature search, T in {2, 3, 4, 5}, crossed with alpha in
{0.5, 0.7, 0.9}; `--grid KEY=V1,V2,...` replaces it with any recipe keys. The teacher is trained once and the
no-distillation student once (their inputs do not change between trials); soft labels are cached once.
Trials are ranked by the distilled student's validation accuracy, never the test split. The search writes
`search.md` (the table), `search.json`, `search.png` and `best.yaml`, the recipe with the best values.

`--sampler tpe` replaces the grid by Optuna's TPE sampler over `--space` ranges (any recipe keys), seeded by
the student's seed so a search repeats exactly. The first trial is the recipe's own values (when inside the
space), so the search never ranks below the recipe it started from. A median pruner stops a trial whose
distilled student is behind the other trials' median validation accuracy at the same epoch, fed by fit's
per-epoch hook; the table says where each pruned trial stopped and how many epochs pruning saved.
"""
from __future__ import annotations

import glob
import itertools
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from .errors import UserError
from .io import save_figure, write_json, write_text
from .launch import is_main_process
from .plots import pyplot
from .recipe import Recipe, dump_yaml, load_yaml
from .roles import SCRATCH, TEACHER

DEFAULT_GRID = {"distill.temperature": [2, 3, 4, 5], "distill.alpha": [0.5, 0.7, 0.9]}
NO_PLOT = "search: matplotlib is not installed, so no search.png (pip install -e '.[plot]')"


# data keys that change which rows the validation split holds: trials ranked on different splits are not compared
SPLIT_KEYS = ("dataset", "path", "test_path", "val_fraction", "test_fraction", "split_seed", "train_subset", "arith",
              "label_column", "text_column", "prompt_column", "completion_column")


def same_split(flag: str, keys: Sequence[str], cfg: Dict[str, Any]) -> None:
    """Refuse search keys that change which rows the validation split holds (text_lm: its windows, by their
    length): the trials are ranked on it; and keys that leave the trained students as they are (where the
    run is written, compress, bench, the test-time measures): their trials would differ in nothing."""
    from .pipeline.rundir import AFTER_TRAINING
    for key in keys:
        parts = key.split(".")
        if parts[0] in AFTER_TRAINING or (parts[0] == "evaluate" and parts[1:2] != ["exact_match"]):
            raise UserError(f"{flag} {key}: does not change the students a trial trains (it is read after "
                            f"training, or says where the run is written), so every trial would be the same; "
                            f"search training settings (distill.*, student.*, train.*)")
        if parts[0] == "data" and (len(parts) == 1 or parts[1] in SPLIT_KEYS or (  # (`data`: the whole section)
                parts[1] == "max_length" and cfg["data"]["dataset"] == "text_lm")):
            raise UserError(f"{flag} {key}: a search ranks its trials on the validation split, and {key} changes "
                            f"the rows it holds, so the trials would not be compared on the same data; fix it with "
                            f"--set and search once per value")


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """`["distill.temperature=2,4", ...]` -> {"distill.temperature": [2, 4]}; the default grid when empty."""
    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise UserError(f"--grid {item}: expected KEY=V1,V2,..., e.g. --grid distill.temperature=2,3,4")
        if key.strip() in grid:
            raise UserError(f"--grid {item}: {key.strip()} is given twice; list all its values in one --grid")
        if "" in (v.strip() for v in values.split(",")):
            raise UserError(f"--grid {item}: an empty value (a comma too many?)")
        try:
            grid[key.strip()] = [load_yaml(v) for v in values.split(",")]
        except yaml.YAMLError:
            raise UserError(f"--grid {item}: cannot read the values") from None
        _once("--grid", item, grid[key.strip()])
    return grid or dict(DEFAULT_GRID)


def _once(flag: str, item: str, values: List[Any]) -> None:
    """A value given twice would train the same trial twice (2 and 2.0 are one value)."""
    for i, v in enumerate(values):
        if v in values[:i]:
            raise UserError(f"{flag} {item}: {yaml_value(v)} is given twice; give each value once")


def need_validation(recipe: Recipe) -> None:
    if not recipe.cfg["data"]["val_fraction"]:
        raise UserError("data.val_fraction: 0 leaves no validation split, and a search ranks its trials on it; "
                        "give data.val_fraction > 0")


def search(recipe: Recipe, grid: Dict[str, List[Any]], overrides: Sequence[str], out: str, echo=print
           ) -> Dict[str, Any]:
    need_validation(recipe)
    same_split("--grid", list(grid), recipe.cfg)
    from .engine.trainer import TrainingDiverged
    from .pipeline.plan import TRAINING, execute, preflight
    from .pipeline.rundir import RunDir
    keys = list(grid)
    trials = [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]
    folder = os.path.join(out, "trials")
    for t in trials:  # every trial's recipe is checked, and its models built, before the first one trains
        try:
            trial = Recipe.load(recipe.source, _sets(overrides, t))
            need_validation(trial)
            preflight(RunDir(trial, folder, lambda line: None, resume=True, overwrite=True))
        except UserError as e:  # (named as the grid point: the --set values alone were checked already)
            said = next((k for k in t if str(e).startswith(f"--set {k}:")), None)
            if said:  # (a grid key the recipe refuses: said as the --grid it was given as)
                raise UserError(f"--grid {said}{str(e)[len(f'--set {said}'):]}") from None
            raise UserError(f"--grid {', '.join(f'{k}={yaml_value(v)}' for k, v in t.items())}: {e}") from None
    rows: List[Dict[str, Any]] = [{} for _ in trials]
    for i in teacher_order(grid, trials):
        trial = trials[i]
        sets = _sets(overrides, trial)  # (as YAML: a null stays null, not the text 'None')
        echo(f"search: trial {i + 1}/{len(trials)}: " + ", ".join(f"{k}={yaml_value(v)}" for k, v in trial.items()))
        # (resume: the trials a stopped search finished are reused, the one it stopped in continues)
        rd = RunDir(Recipe.load(recipe.source, sets), folder, echo, resume=True, overwrite=True)
        rd.remember = True
        t0 = time.perf_counter()
        row = {**trial, "state": "complete", "val_accuracy": None, "scratch_val_accuracy": None,
               "selected_epoch": None}
        try:
            results = execute(rd, TRAINING, check=False)  # (checked above)
            row.update(val_accuracy=results["student"]["val_accuracy"],
                       scratch_val_accuracy=results.get(SCRATCH, {}).get("val_accuracy"),
                       selected_epoch=results["student"].get("selected_epoch"))
        except TrainingDiverged as e:  # (a point of the grid where training blows up: a result, not the end)
            if not _of_the_trial(e.role, keys):
                raise
            row.update(state="diverged", error=str(e))
            _diverged(rd, e, f"trial {i + 1}", echo)
        rows[i] = {**row, "time_s": round(time.perf_counter() - t0, 1)}
    best = max(_completed(rows), key=lambda r: r["val_accuracy"])  # ties: the first in grid order
    table = format_search(rows, keys, best)
    result = {"grid": grid, "trials": rows, "best": {k: best[k] for k in keys}, "table": table}
    write_results(recipe, overrides, out, result, table, lambda path: plot_search(rows, keys, path), echo)
    return result


def teacher_order(grid: Dict[str, List[Any]], trials: List[Dict[str, Any]]) -> List[int]:
    """The order the trials train in: the grid's, but with the trials of one teacher together (a grid over
    teacher and distillation keys would otherwise train the teacher again at every trial; the folder holds one).
    The table keeps the grid's order."""
    reach = [k for k in grid if _of_the_trial(TEACHER, [k])]
    return sorted(range(len(trials)), key=lambda i: [grid[k].index(trials[i][k]) for k in reach])


def _of_the_trial(role: str, keys: Sequence[str]) -> bool:
    """Whether a stage of `role` may differ between trials over `keys`: the distilled student and assistants
    always do; the teacher and the baseline only if a key can reach them. A stage every trial shares that
    diverged would diverge again in each: the search stops there, as a run would."""
    reach = {TEACHER: ("teacher.", "train.", "data.", "evaluate."),  # (evaluate: a val_exact_match selection)
             SCRATCH: ("student.", "teacher.", "train.", "data.", "baseline", "evaluate.")}  # (teacher: from_teacher)
    return role not in reach or any(k.startswith(reach[role]) for k in keys)


def _diverged(rd: Any, e: Any, trial: str, echo=print) -> None:
    """A trial whose training diverged: said, and its stage's checkpoints removed (the next trial's recipe
    differs, so it would not continue them)."""
    echo(f"search: {trial} diverged: {e}")
    if rd.runtime.is_main:
        rd.checkpoints(e.role).clear()


def _completed(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The trials that finished training; one line when none did (every one diverged or could not be built)."""
    done = [r for r in rows if r["state"] == "complete"]
    if not done and all(r["state"] in ("diverged", "refused") for r in rows):
        states = {r["state"] for r in rows}
        said = "diverged" if states == {"diverged"} else "was refused" if states == {"refused"} else \
            "diverged or was refused"
        raise UserError(f"every trial {said}; the first: {rows[0]['error']}")
    return done


def write_results(recipe: Recipe, overrides: Sequence[str], out: str, result: Dict[str, Any], markdown: str,
                  plot: Callable[[str], bool], echo=print) -> None:
    """A finished search's best.yaml (the recipe with the best values), search.json, search.md and
    search.png; from rank 0 alone (under torchrun every process ran the trials)."""
    if not is_main_process():
        return
    from .pipeline.rundir import TRIAL_ASIDE  # (set aside by trials rerun after a stop; every trial is done now)
    for aside in glob.glob(os.path.join(glob.escape(out), "trials", "checkpoints", f"*.{TRIAL_ASIDE}*")):
        shutil.rmtree(aside, ignore_errors=True)
    write_text(os.path.join(out, "best.yaml"), Recipe.load(recipe.source, _sets(overrides, result["best"])).to_yaml())
    write_json(os.path.join(out, "search.json"), result)
    write_text(os.path.join(out, "search.md"), markdown + "\n")
    if not plot(os.path.join(out, "search.png")):
        echo(NO_PLOT)


def format_search(rows: List[Dict[str, Any]], keys: List[str], best: Dict[str, Any]) -> str:
    head = keys + ["val accuracy", "no-KD val accuracy", "epoch", "seconds", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = "best" if r is best else ""
        if r.get("state") == "diverged":
            lines.append("| " + " | ".join([*(str(r[k]) for k in keys), "diverged", "", "", f"{r['time_s']:.1f}",
                                            ""]) + " |")
            continue
        lines.append("| " + " | ".join([*(str(r[k]) for k in keys), f"{r['val_accuracy']:.4f}",
                                        "skipped" if r["scratch_val_accuracy"] is None
                                        else f"{r['scratch_val_accuracy']:.4f}", str(r["selected_epoch"]),
                                        f"{r['time_s']:.1f}", mark]) + " |")
    return "\n".join(lines)


def _ordered(values) -> list:
    """The distinct values, sorted (a list value, not hashable, is told apart by its text)."""
    values = list({repr(v): v for v in values}.values())
    try:
        return sorted(values)
    except TypeError:  # mixed kinds (numbers and names): sort as text
        return sorted(values, key=str)


def plot_search(rows: List[Dict[str, Any]], keys: List[str], path: str) -> bool:
    """Validation accuracy over the grid: a heatmap for two keys, else one line per trial order."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if len(keys) == 2:
        xs, ys = (_ordered(r[k] for r in rows) for k in keys)
        grid = [[next((r["val_accuracy"] for r in rows if r[keys[0]] == x and r[keys[1]] == y
                       and r["val_accuracy"] is not None), float("nan")) for x in xs] for y in ys]
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
        ax.bar(range(len(rows)), [float("nan") if r["val_accuracy"] is None else r["val_accuracy"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("validation accuracy")
        ax.set_xlabel(", ".join(keys))
    ax.set_title("distill search: distilled student, validation accuracy")
    save_figure(fig, path)
    return True


# ---------------------------------------------------------------- TPE (Optuna) with pruning

DEFAULT_SPACE_ARGS = ("distill.temperature=1.0:8.0", "distill.alpha=0.1:1.0")  # contains the seed design's T in [2, 5]
SPACE_FORM = "expected KEY=LOW:HIGH, KEY=LOW:HIGH:log or KEY=A,B,C, e.g. --space distill.temperature=1:8"


def _number(text: str) -> Optional[float]:
    """A bound as a number: YAML's reading, or float() for forms YAML 1.1 leaves as text (1e-5)."""
    try:
        v = load_yaml(text)
    except yaml.YAMLError:
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _parse_dim(item: str, spec: str) -> Dict[str, Any]:
    if "," in spec:
        try:
            choices = [load_yaml(v) for v in spec.split(",")]
        except yaml.YAMLError:
            raise UserError(f"--space {item}: cannot read the choices") from None
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            raise UserError(f"--space {item}: choices must be plain values (numbers, words, true/false)")
        _once("--space", item, choices)
        return {"choices": choices}
    parts = spec.split(":")
    log = len(parts) == 3 and parts[2].strip() == "log"
    if len(parts) != 2 and not log:
        raise UserError(f"--space {item}: {SPACE_FORM}")
    low, high = _number(parts[0]), _number(parts[1])
    if low is None or high is None:
        raise UserError(f"--space {item}: LOW and HIGH must be numbers; {SPACE_FORM}")
    if low >= high:
        raise UserError(f"--space {item}: LOW must be below HIGH")
    if log and low <= 0:
        raise UserError(f"--space {item}: a log range needs LOW > 0")
    is_int = isinstance(low, int) and isinstance(high, int)  # integers when both bounds are
    return {"low": low if is_int else float(low), "high": high if is_int else float(high), "log": log,
            "int": is_int}


def parse_space(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """`["distill.alpha=0.1:1.0", "train.optimizer.name=adam,sgd"]` -> {key: {low, high, log, int} or
    {choices}}; the default space (temperature 1-8 and alpha 0.1-1, floats) when empty."""
    space: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep or not key or not spec.strip():
            raise UserError(f"--space {item}: {SPACE_FORM}")
        if key in space:
            raise UserError(f"--space {item}: {key} is given twice")
        space[key] = {**_parse_dim(item, spec.strip()), "arg": item}
    return space or parse_space(DEFAULT_SPACE_ARGS)


def yaml_value(v: Any) -> str:
    """A value as `--set` text that reads back as the same value (1e-05 must be written 1.0e-05 in YAML 1.1)."""
    text = dump_yaml(v, default_flow_style=True, width=1 << 30).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _sets(overrides: Sequence[str], params: Dict[str, Any]) -> List[str]:
    return [*overrides, *(f"{k}={yaml_value(v)}" for k, v in params.items())]


def validate_space(recipe: Recipe, space: Dict[str, Dict[str, Any]], overrides: Sequence[str],
                   folder: Optional[str] = None) -> None:
    """Each bound and each choice, loaded into the recipe (and, given the trials' `folder`, its models built
    and a step taken, as before a run): an out-of-range space is refused before any trial."""
    from .pipeline.plan import preflight
    from .pipeline.rundir import RunDir
    for key, dim in space.items():
        for v in dim.get("choices") or (dim["low"], dim["high"]):
            try:
                point = Recipe.load(recipe.source, _sets(overrides, {key: v}))
                need_validation(point)
                if folder:
                    preflight(RunDir(point, folder, lambda line: None, resume=True, overwrite=True))
            except UserError as e:
                raise UserError(f"--space {dim['arg']}: {e}") from None


def _current(cfg: Dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def recipe_point(recipe: Recipe, space: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The recipe's own values of the space's keys, when every one lies inside the space (else None)."""
    point = {}
    for key, dim in space.items():
        v = _current(recipe.cfg, key)
        if "choices" in dim:
            if v not in dim["choices"]:
                return None
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not dim["low"] <= v <= dim["high"] \
                or (dim["int"] and v != int(v)):
            return None
        point[key] = v if "choices" in dim else int(v) if dim["int"] else float(v)
    return point


def _suggest(trial: Any, key: str, dim: Dict[str, Any]) -> Any:
    if "choices" in dim:
        return trial.suggest_categorical(key, dim["choices"])
    if dim["int"]:
        return trial.suggest_int(key, dim["low"], dim["high"], log=dim["log"])
    return trial.suggest_float(key, dim["low"], dim["high"], log=dim["log"])


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError('--sampler tpe: Optuna is not installed; pip install -e ".[search]"') from None
    return optuna


def search_tpe(recipe: Recipe, space: Dict[str, Dict[str, Any]], overrides: Sequence[str], out: str,
               trials: int = 12, pruner: str = "median", startup_trials: int = 3,
               warmup_epochs: Optional[int] = None, echo=print) -> Dict[str, Any]:
    """`trials` TPE trials over `space`; with the median pruner a trial stops at the first epoch (after
    `warmup_epochs`, default a quarter of the student's epochs) where its best validation accuracy so far is
    below the median of the completed trials at that epoch (once `startup_trials` have completed)."""
    optuna = import_optuna()
    need_validation(recipe)
    same_split("--space", list(space), recipe.cfg)
    validate_space(recipe, space, overrides, os.path.join(out, "trials"))
    seed = recipe.cfg["student"]["train"]["seed"]
    if warmup_epochs is None:
        warmup_epochs = recipe.cfg["student"]["train"]["epochs"] // 4
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what each trial did
    # Fewer random start-up trials than Optuna's 10, so a 12-trial budget is mostly guided by TPE.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))
    prune = optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs) \
        if pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=prune,
                                storage=optuna.storages.InMemoryStorage())
    start = recipe_point(recipe, space)
    if start:
        study.enqueue_trial(start)
    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    study.optimize(lambda trial: run_trial(trial, recipe, space, overrides, os.path.join(out, "trials"), rows,
                                           f"/{trials}", echo), n_trials=trials)
    info = {"sampler": "tpe", "seed": seed,
            "space": {k: {f: v for f, v in d.items() if f != "arg"} for k, d in space.items()},
            "pruner": {"name": pruner, "startup_trials": startup_trials, "warmup_epochs": warmup_epochs}
            if pruner == "median" else {"name": "none"}}
    return write_tpe(recipe, space, overrides, out, rows, info, time.perf_counter() - t0, echo)


def run_trial(trial: Any, recipe: Recipe, space: Dict[str, Dict[str, Any]], overrides: Sequence[str],
              folder: str, rows: List[Dict[str, Any]], of: str = "", echo=print) -> float:
    """One trial in the shared trials folder: the distilled student's validation accuracy, reported every
    epoch to the pruner, which may stop it (optuna.TrialPruned); its row is appended to `rows` either way."""
    from optuna import TrialPruned
    from .engine.trainer import TrainingDiverged
    from .pipeline.plan import TRAINING, execute, preflight
    from .pipeline.rundir import RunDir
    params = {k: _suggest(trial, k, d) for k, d in space.items()}
    echo(f"search: trial {trial.number + 1}{of}: " + ", ".join(f"{k}={_show(v)}" for k, v in params.items()))
    rd = RunDir(Recipe.load(recipe.source, _sets(overrides, params)), folder, echo, resume=True, overwrite=True)
    rd.remember = True
    budget, seen = rd.cfg["student"]["train"]["epochs"], []

    def catch_up(history: List[float]) -> None:
        """The epochs trained before this process (a resumed search: a trial stopped midway, or finished),
        reported as they were then: the pruner compares later trials with the same values as without a stop."""
        for epoch, value in enumerate(history[len(seen):], start=len(seen) + 1):
            seen.append(value)
            trial.report(value, epoch)

    def on_epoch(epoch: int, record: Dict[str, Any]) -> None:
        if len(record["val_history"]) == epoch:  # (a checkpoint from before the history was kept has none)
            catch_up(record["val_history"][:epoch - 1])
        seen.append(record["val_accuracy"])
        trial.report(record["val_accuracy"], epoch)
        if epoch < budget and trial.should_prune():  # (at the last epoch nothing is left to save)
            raise TrialPruned(f"pruned at epoch {epoch}")
    rd.on_epoch = on_epoch
    row = {"trial": trial.number + 1, **params, "budget_epochs": budget}
    rows.append(row)
    t0 = time.perf_counter()
    failed = dict(pruned_at=None, val_accuracy=None, scratch_val_accuracy=None, selected_epoch=None, epochs=0)
    try:  # (every trial: a point of the space may not build where its bounds did)
        preflight(rd)
    except UserError as e:  # (a failed trial to Optuna, which goes on: its value is NaN)
        row.update(state="refused", error=str(e), time_s=round(time.perf_counter() - t0, 1), **failed)
        echo(f"search: trial {row['trial']} refused: {e}")
        return float("nan")
    try:
        results = execute(rd, TRAINING, check=False)
    except TrainingDiverged as e:
        if not _of_the_trial(e.role, list(space)):
            raise
        row.update(state="diverged", error=str(e), time_s=round(time.perf_counter() - t0, 1),
                   **{**failed, "epochs": len(seen)})
        _diverged(rd, e, f"trial {row['trial']}", echo)
        return float("nan")
    except TrialPruned:
        # The stage is not marked done, and the next trial's recipe differs, so its fingerprint does too: it
        # retrains. Its fit (not resuming) would clear these checkpoints; clear them now, so none outlives the search.
        if rd.runtime.is_main:  # (under torchrun every process is here: one removes the files)
            rd.checkpoints("student").clear()
        scratch = rd.records.get(SCRATCH, {})  # (this trial's: stages.json may hold a trial's that a stop cut short)
        row.update(state="pruned", pruned_at=len(seen), val_accuracy=max(seen),
                   scratch_val_accuracy=scratch.get("val_accuracy"), selected_epoch=None, epochs=len(seen),
                   time_s=round(time.perf_counter() - t0, 1))
        echo(f"search: trial {row['trial']} pruned at epoch {len(seen)} (best validation accuracy {max(seen):.4f})")
        raise
    catch_up(results["student"].get("val_history", []))  # (a student trained before this process)
    # the same student as an earlier trial of this search (no epoch of its own), not one a stopped search finished
    same = bool(results["student"].get("reused")) and any(
        r is not row and r.get("state") == "complete" and all(r[k] == params[k] for k in params) for r in rows)
    row.update(state="complete", pruned_at=None, val_accuracy=results["student"]["val_accuracy"],
               scratch_val_accuracy=results.get(SCRATCH, {}).get("val_accuracy"),
               selected_epoch=results["student"].get("selected_epoch"),
               epochs=0 if same else len(seen), reused=same, time_s=round(time.perf_counter() - t0, 1))
    return row["val_accuracy"]


def write_tpe(recipe: Recipe, space: Dict[str, Dict[str, Any]], overrides: Sequence[str], out: str,
              rows: List[Dict[str, Any]], info: Dict[str, Any], seconds: float, echo=print) -> Dict[str, Any]:
    """The best completed trial (pruned ones are never best), best.yaml, search.md/json/png, epochs saved."""
    done = _completed(rows)
    if not done:
        raise UserError("--pruner: every trial was pruned; use --pruner none or more --pruner-startup-trials")
    best = max(done, key=lambda r: r["val_accuracy"])  # ties: the first in trial order
    keys = list(space)
    trained = sum(r["epochs"] for r in rows if r["state"] in ("complete", "pruned"))
    budget = sum(r["budget_epochs"] for r in rows  # (pruning saved nothing of those reused, diverged or refused)
                 if not r.get("reused") and r["state"] in ("complete", "pruned"))
    pruned, reused = sum(1 for r in rows if r["state"] == "pruned"), sum(1 for r in rows if r.get("reused"))
    failed = {s: sum(1 for r in rows if r["state"] == s) for s in ("diverged", "refused")}
    summary = (f"{pruned} of {len(rows)} trials pruned"
               + "".join(f", {n} {s}" for s, n in failed.items() if n)
               + f"; the distilled student trained {trained} of {budget} "
               f"epochs" + (f" ({1 - trained / budget:.0%} fewer)" if budget else "")
               + (f"; {reused} trial(s) reused the student of an earlier one with the same settings" if reused else "")
               + f"; {seconds:.1f} s in all")
    table = format_tpe(rows, keys, best)
    result = {**info, "trials": rows, "best": {k: best[k] for k in keys}, "best_trial": best["trial"],
              "pruned": pruned, "epochs_trained": trained, "epochs_budget": budget, "time_s": round(seconds, 1),
              "table": table, "summary": summary}
    write_results(recipe, overrides, out, result, table + "\n\n" + summary, lambda path: plot_tpe(rows, space, path),
                  echo)
    return result


def _show(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_tpe(rows: List[Dict[str, Any]], keys: List[str], best: Dict[str, Any]) -> str:
    head = ["trial", *keys, "val accuracy", "no-KD val accuracy", "epoch", "epochs trained", "seconds", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = "best" if r is best else (f"pruned at epoch {r['pruned_at']}" if r["state"] == "pruned" else
                                         r["state"] if r["state"] in ("diverged", "refused") else "")
        scratch, acc = r["scratch_val_accuracy"], r["val_accuracy"]
        lines.append("| " + " | ".join([str(r["trial"]), *(_show(r[k]) for k in keys),
                                        "" if acc is None else f"{acc:.4f}",
                                        "" if scratch is None else f"{scratch:.4f}",
                                        "" if r["selected_epoch"] is None else str(r["selected_epoch"]),
                                        "reused" if r.get("reused") else f"{r['epochs']}/{r['budget_epochs']}",
                                        f"{r['time_s']:.1f}", mark]) + " |")
    return "\n".join(lines)


def plot_tpe(rows: List[Dict[str, Any]], space: Dict[str, Dict[str, Any]], path: str) -> bool:
    """Validation accuracy per trial in trial order (pruned ones hollow, at their best before stopping) and,
    for two numeric keys, the trials over those keys coloured by accuracy."""
    plt = pyplot()
    if plt is None:
        return False
    numeric = [k for k, d in space.items() if "choices" not in d][:2]
    fig, axes = plt.subplots(1, 2 if len(numeric) == 2 else 1, figsize=(11 if len(numeric) == 2 else 6.5, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    done = [r for r in rows if r["state"] == "complete"]
    cut = [r for r in rows if r["state"] == "pruned"]
    ax.scatter([r["trial"] for r in done], [r["val_accuracy"] for r in done], color="tab:blue", label="complete")
    ax.scatter([r["trial"] for r in cut], [r["val_accuracy"] for r in cut], facecolors="none",
               edgecolors="tab:red", label="pruned (best before stopping)")
    running, best = [], -1.0
    for r in rows:
        best = max(best, r["val_accuracy"]) if r["state"] == "complete" else best
        running.append(best if best >= 0 else float("nan"))
    ax.step([r["trial"] for r in rows], running, where="post", color="gray", lw=1, label="best so far")
    import matplotlib.ticker
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=8)
    if len(numeric) == 2:
        ax2 = axes[0][1]
        kx, ky = numeric
        sc = ax2.scatter([r[kx] for r in done], [r[ky] for r in done], c=[r["val_accuracy"] for r in done],
                         cmap="viridis")
        ax2.scatter([r[kx] for r in cut], [r[ky] for r in cut], marker="x", color="tab:red", label="pruned")
        for r in rows:
            ax2.annotate(str(r["trial"]), (r[kx], r[ky]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax2.set_xscale("log" if space[kx]["log"] else "linear")
        ax2.set_yscale("log" if space[ky]["log"] else "linear")
        ax2.set_xlabel(kx)
        ax2.set_ylabel(ky)
        if cut:
            ax2.legend(fontsize=8)
        if done:
            fig.colorbar(sc, ax=ax2, label="validation accuracy")
    fig.suptitle("distill search (TPE): distilled student, validation accuracy")
    save_figure(fig, path)
    return True
