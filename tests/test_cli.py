"""The command line as a user meets it: help, listing, stages, and one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import pytest

from distill.cli import main


def cli(*args, cwd=None):
    env = {**os.environ, "DISTILL_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_help_for_every_command():
    r = cli("--help")
    assert r.returncode == 0 and "run" in r.stdout and "train-teacher" in r.stdout
    for cmd in ("run", "recipes", "train-teacher", "soft-labels", "train-student", "evaluate"):
        assert cli(cmd, "--help").returncode == 0, cmd


def test_recipes_lists_bundled(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "cifar_resnet32x4_resnet8x4" in out


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


def test_bad_layer_in_recipe_is_refused_before_work(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("teacher: {arch: [\"__import__('os').system('touch PWNED')\"]}\nstudent: {model: mlp}\n")
    r = cli("run", str(p), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and "teacher.arch[0]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "PWNED").exists()


def test_stages_one_by_one_on_a_run_folder(tmp_path):
    out = str(tmp_path / "run")
    r = cli("train-teacher", "digits", "--set", "train.epochs=2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "teacher.safetensors"))
    assert cli("soft-labels", out).returncode == 0
    assert cli("train-student", out).returncode == 0
    r = cli("evaluate", out)
    assert r.returncode == 0 and "student (distilled)" in r.stdout
    assert set(json.load(open(os.path.join(out, "metrics.json")))) == {"teacher", "student", "student_scratch"}
    r = cli("train-teacher", out)  # nothing changed: reused, not retrained
    assert "teacher: inputs unchanged" in r.stderr


def test_run_prints_the_table(tmp_path):
    r = cli("run", "--set", "train.epochs=2", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    for row in ("teacher", "student (no KD)", "student (distilled)", "accuracy", "ms/sample"):
        assert row in r.stdout
