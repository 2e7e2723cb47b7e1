"""The command line as a user meets it: help, listing, stages, and one-line errors with exit code 2."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from distill.cli import build_parser, main


def cli(*args, cwd=None):
    env = {**os.environ, "DISTILL_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=cwd, env=env)


def _commands():
    """Every subcommand the parser has, with its parser and one-line help: a new command cannot be missed."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    return {name: (parser, helps.get(name)) for name, parser in sub.choices.items()}


COMMANDS = sorted(_commands())
NO_TARGET = {"recipes"}  # the commands that take no RECIPE / RUN_DIR argument


def _squash(text):
    return "".join(text.split())  # argparse rewraps help text (and may break lines after a hyphen)


def test_the_parser_has_every_documented_command():
    assert set(COMMANDS) >= {"recipes", "run", "train-teacher", "soft-labels", "train-student", "evaluate",
                             "export", "compress", "bench", "report", "doctor", "search"}
    for name, (parser, _) in _commands().items():
        takes_target = any(a.dest == "target" for a in parser._actions if not a.option_strings)
        assert takes_target != (name in NO_TARGET), name


def test_top_level_help_lists_every_command_with_its_purpose():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    for name, (_, what) in _commands().items():
        assert what, f"{name}: no help text"
        assert name in r.stdout and _squash(what) in _squash(r.stdout), name


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_for_every_command(cmd):
    parser, _ = _commands()[cmd]
    r = cli(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: distill {cmd}")
    assert parser.description, f"{cmd}: no description"
    assert _squash(parser.description) in _squash(r.stdout)  # what the command is for


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c not in NO_TARGET])
def test_every_command_refuses_a_missing_target_in_one_line(cmd, tmp_path, capsys, monkeypatch):
    """A missing folder (or recipe) given to any command: one `error:` line naming it, exit 2, nothing made."""
    monkeypatch.chdir(tmp_path)
    parser, _ = _commands()[cmd]
    missing = str(tmp_path / "no-such-run")
    required = [[a.option_strings[0], str(next(iter(a.choices)) if a.choices else "x")]
                for a in parser._actions if a.option_strings and a.required]  # e.g. export --format
    code = main([cmd, missing, *[x for pair in required for x in pair]])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith(f"error: {missing}: ") and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "Traceback" not in captured.err
    assert os.listdir(tmp_path) == []  # no run folder, no runs/, no cache


def test_recipes_lists_bundled(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "cifar_resnet32x4_resnet8x4" in out


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`distill recipes | head -1`: the rest of the output is not wanted; it ended in a BrokenPipeError
    traceback. 141 is what a shell reports for a command ended by SIGPIPE."""
    r, w = os.pipe()
    os.close(r)  # (the reader is gone before the first line)
    p = subprocess.run([sys.executable, "-m", "distill", "recipes"], stdout=w, stderr=subprocess.PIPE, text=True,
                       timeout=120)
    os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "nope.yaml"], "nope.yaml: no such recipe file or bundled recipe"),
    (["run", "--set", "train.epochz=3"], "unknown key 'epochz' (did you mean 'epochs'?)"),
    (["run", "--set", "distill.alpha=2"], "distill.alpha: must be between 0 and 1, got 2"),
    (["run", "--seeds", "0"], "--seeds: expected a positive number"),
    (["evaluate", "--out", "EMPTY"], "missing; run the stage that makes it first"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, message):
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["export", "r", "--format", "onx"], "error: distill export: argument --format: invalid choice: 'onx' (choose "
                                         "from 'onnx', 'torchscript', 'safetensors', 'hf') (see distill export --help)"),
    (["export", "r"], "error: distill export: the following arguments are required: --format"),
    # (said by the command that does not take it, whose --help lists what it takes)
    (["run", "--bogus"], "error: distill run: unrecognized arguments: --bogus (see distill run --help)"),
    (["run", "digits", "extra"], "error: distill run: unrecognized arguments: extra (see distill run --help)"),
    (["--bogus", "run"], "error: distill: unrecognized arguments: --bogus (see distill --help)")])
def test_a_command_line_mistake_is_one_line_too(capsys, args, message):
    """(argparse printed its whole usage before the error)"""
    from distill.cli import main
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.splitlines() == [err.strip()] and err.startswith(message), err


def test_bad_layer_in_recipe_is_refused_before_work(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("teacher: {arch: [\"__import__('os').system('touch PWNED')\"]}\nstudent: {model: mlp}\n")
    r = cli("run", str(p), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and "teacher.arch[0]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "PWNED").exists()


def test_stages_one_by_one_on_a_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_QUIET", "1")

    def stage(*args):  # (in this process: the entry point itself is tested by the other commands here)
        capsys.readouterr()
        code = main(list(args))
        return code, capsys.readouterr()
    out = str(tmp_path / "run")
    code, said = stage("train-teacher", "digits", "--set", "train.epochs=2", "--set", "teacher.train.epochs=5",
                       "--out", out)
    assert code == 0, said.err
    assert os.path.isfile(os.path.join(out, "teacher.safetensors"))
    assert stage("soft-labels", out)[0] == 0
    assert stage("train-student", out)[0] == 0
    code, said = stage("evaluate", out)
    assert code == 0 and "student (distilled)" in said.out
    assert set(json.load(open(os.path.join(out, "metrics.json")))) == {"teacher", "student", "student_scratch"}
    code, said = stage("train-teacher", out)  # nothing changed: reused, not retrained
    assert code == 0 and "teacher: inputs unchanged" in said.err


def test_run_prints_the_table(tmp_path):
    r = cli("run", "--set", "train.epochs=2", "--set", "teacher.train.epochs=5", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    for row in ("teacher", "student (no KD)", "student (distilled)", "accuracy", "ms/sample"):
        assert row in r.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "digits", "--out", ""], "--out: empty; give a path (is a shell variable unset?)"),
    (["report", "runs/x", "--out", " "], "--out: empty"),
    (["run", "digits", "--set", "output.dir=''"], "output.dir: empty; give a folder, or leave the key out"),
    (["run", ""], "distill run: the recipe or run folder given is empty; give one, or none (is a shell"),
    (["evaluate", " "], "distill evaluate: the recipe or run folder given is empty"),  # (it scored runs/digits)
    (["run", "--resume", ""], "distill run: the recipe or run folder given is empty"),
    (["compress", ""], "distill compress: the run folder given is empty; give one (is a shell variable unset?)"),
])
def test_an_empty_out_is_refused_not_read_as_the_default_folder(args, message, tmp_path, capsys, monkeypatch):
    """`--out "$OUT"` with OUT unset used to write runs/NAME in the current folder."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and os.listdir(tmp_path) == []


def test_runs_inside_another_run_folder_are_refused(tmp_path, capsys):
    """A run made in another run's compress/ was exported as that run's compressed model; --seeds and a
    search wrote their folders among a run's files."""
    run_dir = str(tmp_path / "r")
    assert main(["train-teacher", "digits", "--set", "teacher.train.epochs=1", "--out", run_dir]) == 0
    capsys.readouterr()
    before = sorted(os.listdir(run_dir))
    for args, message in (
            (["train-teacher", "digits", "--out", os.path.join(run_dir, "compress")],
             f"--out {run_dir}/compress: inside the run folder {run_dir}, which would take what this run writes"),
            (["run", "digits", "--seeds", "2", "--out", run_dir],
             f"--out {run_dir}: a run folder; the seeds' folders and summary.json would be mixed with its files"),
            (["search", "digits", "--out", run_dir],
             f"--out {run_dir}: a run folder; the trials, best.yaml and search.json would be mixed")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert sorted(os.listdir(run_dir)) == before


def test_test_metrics_that_all_need_two_classes_are_refused_on_more(tmp_path, capsys):
    """evaluate.metrics: [auc] on digits' 10 classes left a results table with no quality measure at all."""
    assert main(["run", "digits", "--set", "evaluate.metrics=[auc, specificity]", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "evaluate.metrics: ['auc', 'specificity'] are for two classes, and the data has 10" in err, err
    assert not os.path.exists(tmp_path / "r")


def test_a_setting_that_does_nothing_is_said_when_the_run_starts(tmp_path, capsys):
    assert main(["train-teacher", "digits", "--set", "teacher.train.epochs=1", "--set", "distill.dkd.beta=4",
                 "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "warning: distill.dkd.beta: 4 does nothing here: the dkd settings are read by the dkd loss" in err, err


def test_no_recipe_given_is_the_bundled_default_even_beside_a_folder_of_its_name(tmp_path, monkeypatch):
    """`distill run` in a folder holding a run folder named digits/ resolved that folder's recipe, not the
    bundled default README names."""
    from distill.cli import _load
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "recipe.yaml").write_text("name: mine\n")
    monkeypatch.chdir(tmp_path)
    recipe, out = _load(None, [], None)
    assert recipe.cfg["name"] == "digits" and recipe.source.endswith(os.path.join("recipes", "digits.yaml"))
