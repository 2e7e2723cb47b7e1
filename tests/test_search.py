"""`distill search`: a grid of trials against one teacher, ranked on validation accuracy only, with the
table, plot and best recipe written; the same seed gives the same trials; mistakes are one line."""
import glob
import json
import re
import os
import sys

import pytest

from distill import Recipe
from distill.cli import main
from distill.search import DEFAULT_GRID, parse_grid, parse_space, recipe_point, yaml_value

FAST = ["--set", "train.epochs=2", "--set", "teacher.train.epochs=2"]
GRID = ["--grid", "distill.temperature=2,4", "--grid", "distill.alpha=0.5,0.9"]


def test_grid_parsing_and_default():
    assert parse_grid([]) == DEFAULT_GRID and DEFAULT_GRID["distill.temperature"] == [2, 3, 4, 5]
    assert parse_grid(["distill.temperature=2,3.5", "train.optimizer.name=adam,sgd"]) == {
        "distill.temperature": [2, 3.5], "train.optimizer.name": ["adam", "sgd"]}


@pytest.mark.parametrize("flag,item", [("--grid", "data.val_fraction=0.1,0.2"), ("--space", "data.split_seed=0,1"),
                                       ("--grid", "data.arith.train=100,200"), ("--grid", "data.train_subset=500,900"),
                                       ("--grid", "data={val_fraction: 0.02},{val_fraction: 0.5}")])  # (the section)
def test_a_search_over_the_validation_split_is_refused(flag, item, tmp_path, capsys):
    assert main(["search", "digits", flag, item, *(["--sampler", "tpe"] if flag == "--space" else []),
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    key = item.split("=")[0]
    assert f"{flag} {key}: a search ranks its trials on the validation split, and {key} changes" in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()
    assert parse_grid(["data.batch_size=32,64"]) == {"data.batch_size": [32, 64]}  # (the split stays)


def test_the_context_length_is_a_split_key_of_windowed_text_only():
    from distill.errors import UserError
    from distill.search import same_split
    same_split("--grid", ["data.max_length"], {"data": {"dataset": "text"}})  # (the same texts, cut elsewhere)
    with pytest.raises(UserError, match="--grid data.max_length: a search ranks its trials on the validation split"):
        same_split("--grid", ["data.max_length"], {"data": {"dataset": "text_lm"}})  # (other windows)


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


def test_the_trials_of_one_teacher_train_one_after_the_other():
    """The folder holds one teacher: a grid over its settings and the distillation's trains each teacher once,
    not once a trial (alpha 0.5 with teacher A, then B, then alpha 0.9 with A again)."""
    from distill.search import teacher_order
    grid = {"distill.alpha": [0.5, 0.9], "teacher.train.epochs": [3, 1]}
    trials = [dict(zip(grid, combo)) for combo in [(0.5, 3), (0.5, 1), (0.9, 3), (0.9, 1)]]
    assert teacher_order(grid, trials) == [0, 2, 1, 3]
    grid = {"distill.alpha": [0.5, 0.9], "distill.temperature": [2, 4]}  # (one teacher: the grid's order)
    assert teacher_order(grid, [dict(zip(grid, c)) for c in [(0.5, 2), (0.5, 4), (0.9, 2), (0.9, 4)]]) == [0, 1, 2, 3]


def test_grid_of_null_and_a_number(tmp_path):
    """A grid value reaches its trial as YAML: null stays null (it was the text 'None', refused as not a number)."""
    out = str(tmp_path / "s")
    assert main(["search", "digits", *FAST, "--grid", "train.grad_clip=null,1.0", "--out", out]) == 0
    assert [t["train.grad_clip"] for t in json.load(open(os.path.join(out, "search.json")))["trials"]] == [None, 1.0]


def test_a_search_stopped_by_a_signal_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    from distill.engine.trainer import Interrupted

    def stopped(*_a, **_k):
        raise Interrupted("student", 2, "epoch 1, step 3", "ck/step-00000003.pt")
    monkeypatch.setattr("distill.search.search", stopped)
    assert main(["search", "digits", *FAST, "--out", str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped by SIGINT" in err[0] and "the search stopped" in err[0], err


def _rows(out):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in json.load(open(os.path.join(out, "search.json")))["trials"]]


def _stopped_then_run_again(args, out, stop_when, monkeypatch, capsys, hook="LogLines"):
    """`distill search ARGS --out OUT` stopped by SIGINT at the first epoch end where `stop_when(t, record)`
    (the trainer stops at its next step, checkpointed), then run again to its end; the second run's stderr."""
    import signal
    from distill.engine import callbacks
    cls = getattr(callbacks, hook)
    real = cls.on_epoch_end

    def stopping(self, t, record):
        real(self, t, record)
        if stop_when(t, record):
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(cls, "on_epoch_end", stopping)
    assert main([*args, "--out", out]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*args, "--out", out]) == 0
    return capsys.readouterr().err


def test_a_finished_tpe_search_run_again_says_what_the_first_said(tmp_path, capsys):
    """Its students are reused, and their epochs reported to the pruner and counted as the first run counted
    them: the same table, not 'reused' (that is for a trial repeating an earlier trial of the same search)."""
    out, one = str(tmp_path / "s"), [*FAST, "--sampler", "tpe", "--trials", "1", "--pruner", "none"]
    assert main(["search", "digits", *one, "--out", out]) == 0
    first = _rows(out)
    assert main(["search", "digits", *one, "--out", out]) == 0  # (trial 1: the recipe's values, already trained)
    assert _rows(out) == first and not first[0]["reused"] and first[0]["epochs"] == 2
    assert "trained 2 of 2 epochs" in capsys.readouterr().out


def test_a_stopped_tpe_search_continued_ends_as_an_uninterrupted_one(tmp_path, capsys, monkeypatch):
    """Stopped (SIGINT) in its first trial and run again, the search resumes that trial and reports its
    earlier epochs to the pruner too: the same trials, prunings and values as a search never stopped."""
    args = ["search", "digits", *FAST, *TPE, "--trials", "3"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = str(tmp_path / "stopped")
    _stopped_then_run_again(args, out, lambda t, record: True, monkeypatch, capsys, hook="EpochHook")
    assert _rows(out) == _rows(str(tmp_path / "straight"))


def test_a_grid_search_stopped_in_a_later_trial_reuses_the_finished_ones_and_resumes_that_one(tmp_path, capsys,
                                                                                              monkeypatch):
    """The trials share one folder. Run again, the search used to train its finished trials anew, and the
    first of them dropped the checkpoints of the trial it had stopped in; now it reuses their results (kept
    by fingerprint in trials/trials.json) and continues the stopped trial from its checkpoint."""
    args = ["search", "digits", *FAST, "--grid", "distill.temperature=2,3,4"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    ends = []

    def in_the_third_trial(t, record):
        ends.append(t.role)
        return ends.count("student") == 5  # (trial 3's first epoch: 2 epochs a trial)
    out = str(tmp_path / "stopped")
    err = _stopped_then_run_again(args, out, in_the_third_trial, monkeypatch, capsys)
    assert "student: inputs unchanged, reusing its result in an earlier trial" in err  # (trial 1's)
    assert err.count("student: inputs unchanged") == 2, err  # (trial 2's student is the folder's)
    assert "student: resumed at epoch" in err and "dropped" not in err, err
    assert _rows(out) == _rows(str(tmp_path / "straight"))


def test_a_trial_rerun_before_the_stopped_one_sets_its_checkpoints_aside(tmp_path, capsys, monkeypatch):
    """Run again, a search trains again the trials it did not keep (a diverged or pruned one), in the folder
    the stopped trial's checkpoints are in: they were dropped as "of other inputs", and the stopped trial
    started over. They are set aside now, and brought back for the trial that wrote them."""
    args = ["search", "digits", *FAST, "--grid", "student.train.optimizer.lr=1e6,0.003"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = str(tmp_path / "stopped")
    err = _stopped_then_run_again(args, out, lambda t, record: t.role == "student" and "0.003" in open(
        os.path.join(out, "trials", "recipe.yaml")).read(), monkeypatch, capsys)  # (trial 2's student)
    assert "search: trial 1 diverged" in err and "student: resumed at epoch" in err and "dropped" not in err, err
    assert _rows(out) == _rows(str(tmp_path / "straight"))
    assert not glob.glob(os.path.join(out, "trials", "checkpoints", "*"))  # (none set aside is left)


def test_a_pruned_trial_rerun_after_a_stop_reports_its_own_baseline(tmp_path, capsys, monkeypatch):
    """A pruned trial's baseline accuracy was read from stages.json, which after a stop held the baseline of
    the trial the search had stopped in: search.json gave the pruned trial another trial's number."""
    args = ["search", "digits", "--set", "train.epochs=4", "--set", "teacher.train.epochs=2", *TPE, "--trials", "5"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    straight = _rows(str(tmp_path / "straight"))
    assert [r["state"] for r in straight[:3]] == ["complete", "pruned", "complete"], straight
    epochs = []

    def in_the_third_trial(t, record):
        epochs.append(record["epoch"])
        return len(epochs) == straight[0]["epochs"] + straight[1]["epochs"] + 1
    _stopped_then_run_again(args, str(tmp_path / "stopped"), in_the_third_trial, monkeypatch, capsys, hook="EpochHook")
    assert _rows(str(tmp_path / "stopped")) == straight


def test_a_grid_of_list_values_is_plotted(tmp_path):
    """The heatmap's axes took the distinct values as a set: a grid over layer widths, [8] and [16], trained
    every trial and then failed with a traceback (a list is not hashable)."""
    pytest.importorskip("matplotlib")
    from distill.search import plot_search
    keys = ["student.args.channels", "distill.alpha"]
    rows = [{keys[0]: c, keys[1]: a, "val_accuracy": 0.5 + i / 10} for i, (c, a) in
            enumerate([([8], 0.5), ([8], 0.9), ([16], 0.5), ([16], 0.9)])]
    assert plot_search(rows, keys, str(tmp_path / "s.png")) and os.path.getsize(tmp_path / "s.png") > 1000


@pytest.mark.parametrize("kind, given, message", [
    ("search", {"best.yaml": "x: 1"}, "holds best.yaml, which no earlier search here wrote"),
    ("search", {"summary.json": "{}"}, "holds summary.json, of a --seeds run"),
    ("seeds", {"summary.json": "{}"}, "holds summary.json, which no earlier --seeds run here wrote"),
    ("seeds", {"search.md": ""}, "holds search.md, of a search"),
])
def test_search_and_seeds_refuse_files_they_did_not_write(tmp_path, capsys, kind, given, message):
    out = tmp_path / "o"
    out.mkdir()
    for name, text in given.items():
        (out / name).write_text(text)
    args = ["search", "digits", *FAST, "--grid", "distill.temperature=2,3"] if kind == "search" else \
        ["run", "digits", *FAST, "--seeds", "1"]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(out)) == sorted(given)  # (nothing written, nothing replaced)


def test_an_out_that_is_a_file_is_refused_before_any_trial_or_seed_trains(tmp_path, capsys):
    """(found at the first trial's folder, after its checks; a --seeds run, at its first seed's)"""
    (tmp_path / "f").write_text("mine")
    for args in (["search", "digits", "--grid", "distill.alpha=0.5"], ["run", "digits", "--seeds", "2"]):
        assert main([*args, "--out", str(tmp_path / "f")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {tmp_path / 'f'}: a file, not a folder") and "trial" not in err, err
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["--grid", "distill.temperature=2,2.0"], "--grid distill.temperature=2,2.0: 2.0 is given twice"),
    (["--grid", "output.dir=/tmp/a,/tmp/b"], "--grid output.dir: does not change the students a trial trains"),
    (["--grid", "evaluate.latency_runs=1,2"], "--grid evaluate.latency_runs: does not change the students"),
    (["--grid", "distill.temperature"], "--grid distill.temperature: expected KEY=V1,V2,..."),
    (["--grid", "distill.temprature=2,3"],  # (said as the --grid it was given as, not as a --set)
     "--grid distill.temprature: unknown key 'temprature' (did you mean 'temperature'?)"),
    (["--grid", "distill.alpha=0.5,1.5"], "distill.alpha: must be between 0 and 1"),
    (["--grid", "distill.alpha=0.5", "--grid", "distill.alpha=0.9"], "distill.alpha is given twice"),
    (["--grid", "distill.temperature=2,"], "--grid distill.temperature=2,: an empty value"),
    (["--set", "train.select=last", "--grid", "data.val_fraction=0.1,0"],
     "--grid data.val_fraction: a search ranks its trials on the validation split"),
    (["--grid", "student.args.channels=[8],8"],  # (found by building each trial's models before the first trains)
     "--grid student.args.channels=8: student.args: 'int' object is not iterable (model 'cnn')"),
    (["--set", "distill.teacher_outputs=cached", "--grid", "student.augment.random_crop=0,1"],  # (a later trial:
     "--grid student.augment.random_crop=1: distill.teacher_outputs: cached soft labels"),  # it trained, unchecked)
])
def test_search_mistakes_are_one_line(tmp_path, capsys, args, message):
    out = str(tmp_path / "s")
    assert main(["search", "digits", *FAST, *args, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)  # every trial is validated before anything runs


# ---------------------------------------------------------------- --sampler tpe (Optuna) with pruning

# lr from the recipe's own 0.01 (trial 1 has the recipe's values) down to a hopeless 1e-5: a low-lr trial is
# behind trial 1 after its first epoch, so with pruning from the first completed trial on, it is pruned.
# (300 training images: a tiny budget; the grid test above covers the full data.)
TPE = ["--set", "data.train_subset=300", "--set", "student.train.optimizer.lr=0.01", "--sampler", "tpe",
       "--trials", "4", "--space", "student.train.optimizer.lr=0.00001:0.01:log", "--space",
       "distill.temperature=1.0:8.0", "--pruner-startup-trials", "1", "--pruner-warmup-epochs", "0"]


def test_space_parsing_and_default():
    assert parse_space([]) == parse_space(["distill.temperature=1.0:8.0", "distill.alpha=0.1:1.0"])
    dims = parse_space(["train.epochs=2:9", "student.train.optimizer.lr=1e-5:0.01:log",
                        "data.sampling=random,balanced"])
    assert {k: {f: v for f, v in d.items() if f != "arg"} for k, d in dims.items()} == {
        "train.epochs": {"low": 2, "high": 9, "log": False, "int": True},
        "student.train.optimizer.lr": {"low": 1e-5, "high": 0.01, "log": True, "int": False},
        "data.sampling": {"choices": ["random", "balanced"]}}
    digits = Recipe.load("digits")  # trial 1 is the recipe's own values, when inside the space
    assert recipe_point(digits, dims) is None  # its train.epochs (100) is outside 2-9
    assert recipe_point(digits, parse_space(["distill.temperature=1:8", "train.optimizer.name=adam,adamw"])) == {
        "distill.temperature": 2, "train.optimizer.name": "adamw"}
    assert recipe_point(digits, parse_space(["distill.temperature=3.0:8.0"])) is None
    assert yaml_value(1e-5) == "1.0e-05"  # YAML 1.1 reads 1e-05 as text: --set values must read back as numbers
    assert Recipe.load("digits", [f"distill.temperature={yaml_value(2.5228119064786636)}"]).cfg["distill"][
        "temperature"] == 2.5228119064786636


def test_tpe_search_prunes_and_repeats_by_seed(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["search", "digits", *FAST, *TPE, "--out", out]) == 0
    result = json.load(open(os.path.join(out, "search.json")))
    trials, keys = result["trials"], ["student.train.optimizer.lr", "distill.temperature"]
    assert [t["trial"] for t in trials] == [1, 2, 3, 4]
    assert (trials[0][keys[0]], trials[0][keys[1]]) == (0.01, 2.0)  # trial 1: the recipe's own values
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned and all(t["epochs"] == t["pruned_at"] < 2 and t["selected_epoch"] is None for t in pruned)
    done = [t for t in trials if t["state"] == "complete"]
    best = max(done, key=lambda t: t["val_accuracy"])
    assert result["best"] == {k: best[k] for k in keys} and result["best_trial"] == best["trial"]
    assert result["epochs_trained"] == sum(t["epochs"] for t in trials) < result["epochs_budget"] == 8
    table = open(os.path.join(out, "search.md")).read()
    assert f"pruned at epoch {pruned[0]['pruned_at']} |" in table and "| best |" in table
    assert f"{result['epochs_trained']} of 8 epochs" in table
    cfg = Recipe.load(os.path.join(out, "best.yaml")).cfg
    assert (cfg["student"]["train"]["optimizer"]["lr"], cfg["distill"]["temperature"]) == tuple(best[k] for k in keys)
    assert cfg["train"]["epochs"] == 2
    with open(os.path.join(out, "search.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # a pruned student leaves nothing behind: no checkpoints, and the student stage on record is a completed one
    trials_dir = os.path.join(out, "trials")
    assert not glob.glob(os.path.join(trials_dir, "checkpoints", "student", "*"))
    stages = json.load(open(os.path.join(trials_dir, "stages.json")))
    assert stages["student"]["val_accuracy"] in {t["val_accuracy"] for t in done}
    assert all(t["epochs"] == 2 for t in done)  # a trial after a pruned one trained in full, reusing nothing
    # reproducible by seed: the same search elsewhere draws the same trials and gets the same values
    again = str(tmp_path / "again")
    assert main(["search", "digits", *FAST, *TPE, "--out", again]) == 0
    repeat = json.load(open(os.path.join(again, "search.json")))["trials"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert drop(repeat) == drop(trials)


@pytest.mark.parametrize("args, message", [
    (["--space", "distill.alpha=0:2"], "--space distill.alpha=0:2: distill.alpha: must be between 0 and 1"),
    (["--space", "distill.alpha"], "--space distill.alpha: expected KEY=LOW:HIGH"),
    (["--space", "distill.alpha=0.9:0.1"], "--space distill.alpha=0.9:0.1: LOW must be below HIGH"),
    (["--space", "distill.temperature=0:8:log"], "a log range needs LOW > 0"),
    (["--space", "distill.temperature=a:8"], "LOW and HIGH must be numbers"),
    (["--space", "distill.temperature=1:8:cubic"], "--space distill.temperature=1:8:cubic: expected"),
    (["--space", "distill.temprature=1:8"], "unknown key 'temprature'"),
    (["--space", "train.epochs=1.5:3"], "--space train.epochs=1.5:3: train.epochs"),
    (["--space", "train.optimizer.name=adam,rmsprop"], "--space train.optimizer.name=adam,rmsprop"),
    (["--trials", "0"], "--trials 0: expected a number >= 1"),
    (["--space", "student.args.dropout=0.0:1.2"],  # (the models built at each bound: trial 2 stopped the search)
     "--space student.args.dropout=0.0:1.2: student.model: 'cnn' dropout probability has to be between 0 and 1"),
    (["--grid", "distill.alpha=0.5"], "--grid distill.alpha=0.5: only for --sampler grid"),
])
def test_tpe_mistakes_are_one_line(tmp_path, capsys, args, message):
    out = str(tmp_path / "s")
    assert main(["search", "digits", *FAST, "--sampler", "tpe", *args, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)  # refused before any trial


@pytest.mark.parametrize("args, message", [
    (["--space", "distill.alpha=0.1:1"], "--space: only for --sampler tpe"),
    (["--pruner-warmup-epochs", "0"], "--pruner-warmup-epochs: only for --sampler tpe"),
])
def test_tpe_flags_without_tpe_are_refused(tmp_path, capsys, args, message):
    assert main(["search", "digits", *FAST, *args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_tpe_without_optuna_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    out = str(tmp_path / "s")
    assert main(["search", "digits", *FAST, "--sampler", "tpe", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install -e ".[search]"' in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)


def test_search_over_distillation_methods(tmp_path):
    out = str(tmp_path / "s")
    assert main(["search", "digits", *FAST, "--grid", "distill.method=kd,dkd,dist", "--out", out]) == 0
    trials = json.load(open(os.path.join(out, "search.json")))["trials"]
    assert [t["distill.method"] for t in trials] == ["kd", "dkd", "dist"]
    assert len({t["val_accuracy"] for t in trials}) > 1  # three different objectives, three different students
    assert Recipe.load(os.path.join(out, "best.yaml")).cfg["distill"]["method"] in ("kd", "dkd", "dist")


def test_a_trial_that_diverges_is_a_row_of_the_search_not_its_end(tmp_path, capsys):
    """One diverging grid point (or TPE trial) stopped the whole search with the NaN error, and no rerun could
    finish it. It is now a row marked diverged, never best, its checkpoints removed."""
    out = str(tmp_path / "g")
    assert main(["search", "digits", *FAST, "--grid", "student.train.optimizer.lr=0.003,1e6", "--out", out]) == 0
    err = capsys.readouterr().err
    assert re.search(r"search: trial 2 diverged: student(_scratch)?: epoch \d+( step \d+: the ce loss was NaN|: the "
                     r"validation loss is NaN)", err), err
    rows = json.load(open(os.path.join(out, "search.json")))["trials"]
    assert [r["state"] for r in rows] == ["complete", "diverged"] and rows[1]["val_accuracy"] is None
    assert "| 1000000.0 | diverged |" in open(os.path.join(out, "search.md")).read()
    assert not any(os.listdir(os.path.join(out, "trials", "checkpoints", r)) for r in ("student", "student_scratch")
                   if os.path.isdir(os.path.join(out, "trials", "checkpoints", r)))
    out = str(tmp_path / "t")  # TPE: the recipe's own point first (1e6), then the space's choices
    assert main(["search", "digits", *FAST, "--set", "student.train.optimizer.lr=1e6", "--sampler", "tpe",
                 "--trials", "3", "--pruner", "none", "--space", "student.train.optimizer.lr=1e6,0.003",
                 "--out", out]) == 0
    result = json.load(open(os.path.join(out, "search.json")))
    assert result["trials"][0]["state"] == "diverged" and result["best"] == {"student.train.optimizer.lr": 0.003}
    assert re.search(r"0 of 3 trials pruned, [12] diverged;", result["summary"]), result["summary"]
    assert main(["search", "digits", *FAST, "--grid", "student.train.optimizer.lr=1e6", "--out",
                 str(tmp_path / "all")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: every trial diverged; the first: student")
    # a stage every trial shares (the teacher, for a grid over T) stops the search at once: it would diverge in each
    assert main(["search", "digits", *FAST, "--set", "teacher.train.optimizer.lr=1e6", "--grid",
                 "distill.temperature=2,3", "--out", str(tmp_path / "shared")]) == 2
    err = capsys.readouterr().err
    assert "trial 2/2" not in err and err.strip().splitlines()[-1].startswith("error: teacher: epoch "), err
