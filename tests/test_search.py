"""`distill search`: a grid of trials against one teacher, ranked on validation accuracy only, with the
table, plot and best recipe written; the same seed gives the same trials; mistakes are one line."""
import json
import os

import pytest

from distill import Recipe
from distill.cli import main
from distill.search import DEFAULT_GRID, parse_grid

FAST = ["--set", "train.epochs=2", "--set", "teacher.train.epochs=2"]
GRID = ["--grid", "distill.temperature=2,4", "--grid", "distill.alpha=0.5,0.9"]


def test_grid_parsing_and_default():
    assert parse_grid([]) == DEFAULT_GRID and DEFAULT_GRID["distill.temperature"] == [2, 3, 4, 5]
    assert parse_grid(["distill.temperature=2,3.5", "train.optimizer.name=adam,sgd"]) == {
        "distill.temperature": [2, 3.5], "train.optimizer.name": ["adam", "sgd"]}


def test_search_ranks_on_validation_and_writes_the_best_recipe(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["search", "digits", *FAST, *GRID, "--out", out]) == 0
    printed = capsys.readouterr()
    result = json.load(open(os.path.join(out, "search.json")))
    trials = result["trials"]
    assert [(t["distill.temperature"], t["distill.alpha"]) for t in trials] == [(2, 0.5), (2, 0.9), (4, 0.5), (4, 0.9)]
    best = max(trials, key=lambda t: t["val_accuracy"])
    keys = ("distill.temperature", "distill.alpha")
    assert result["best"] == {k: best[k] for k in keys}
    assert "test" not in json.dumps(trials)  # the test split is not read by a search
    cfg = Recipe.load(os.path.join(out, "best.yaml")).cfg
    assert (cfg["distill"]["temperature"], cfg["distill"]["alpha"]) == tuple(best[k] for k in keys)
    assert cfg["train"]["epochs"] == 2  # the --set values every trial had are kept
    assert len({t["scratch_val_accuracy"] for t in trials}) == 1  # one no-KD baseline, trained once
    assert printed.err.count("teacher: inputs unchanged") == 3  # one teacher, trained once
    with open(os.path.join(out, "search.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| best |" in open(os.path.join(out, "search.md")).read()
    # reproducible by seed: a fresh search elsewhere gives the same validation accuracies
    again = str(tmp_path / "again")
    assert main(["search", "digits", *FAST, "--grid", "distill.temperature=4", "--grid", "distill.alpha=0.9",
                 "--out", again]) == 0
    repeat = json.load(open(os.path.join(again, "search.json")))["trials"][0]
    assert repeat["val_accuracy"] == trials[3]["val_accuracy"]


@pytest.mark.parametrize("args, message", [
    (["--grid", "distill.temperature"], "--grid distill.temperature: expected KEY=V1,V2,..."),
    (["--grid", "distill.temprature=2,3"], "--set distill.temprature: unknown key 'temprature'"),
    (["--grid", "distill.alpha=0.5,1.5"], "distill.alpha: must be between 0 and 1"),
])
def test_search_mistakes_are_one_line(tmp_path, capsys, args, message):
    out = str(tmp_path / "s")
    assert main(["search", "digits", *FAST, *args, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)  # every trial is validated before anything runs
