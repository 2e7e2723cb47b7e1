"""Nothing lost: SIGKILL at random points then --resume gives the same weights as an uninterrupted run;
SIGTERM checkpoints and says how to continue; NaN/Inf steps are skipped, then stop the run clearly."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distill.checkpoint import Checkpoints
from distill.engine.objective import Objective
from distill.engine.trainer import TrainingDiverged, fit

# (the teacher's 40 steps: a signal sent after its first checkpoint lands in its stage; the students' 24 and 120:
# each stage outlasts the 0.6 s an attempt runs on after its first progress, so 3 kills or more land every time)
EPOCHS = {"teacher": 10, "student_scratch": 6, "student": 6}
RECIPE = ["digits", "--set", f"teacher.train.epochs={EPOCHS['teacher']}",
          "--set", f"train.epochs={EPOCHS['student']}", "--set", "train.checkpoint_every=7"]


def environment() -> dict:
    """The processes' environment, read as each starts (so the conftest's per-test DISTILL_CACHE is in it);
    one thread, as bitwise equality is per thread count."""
    return {**os.environ, "DISTILL_QUIET": "1", "OMP_NUM_THREADS": "1"}


def start(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "distill", "run", *RECIPE, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())


def same_results(a, b, names=("teacher", "student_scratch", "student")):
    for name in names:
        wa, wb = load_file(os.path.join(a, f"{name}.safetensors")), load_file(os.path.join(b, f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ma, mb = (json.load(open(os.path.join(d, "metrics.json"))) for d in (a, b))
    for name in names:
        for key in ("accuracy", "macro_f1", "val_accuracy", "selected_epoch", "params"):
            assert ma[name][key] == mb[name][key], (name, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's folder, from `reference()`: the run starts at once, beside the first test's
    attempts (one thread each, on 2 cores), and is awaited where a test compares with it."""
    out = tmp_path_factory.mktemp("ref")
    p = start(out)

    def done():
        assert p.wait(timeout=300) == 0, p.stderr.read()
        return str(out)
    yield done
    if p.poll() is None:  # (a test failed before it was awaited)
        p.kill()
        p.wait()


def _progress(out):
    """Checkpoint files and finished stages: changes only when training has really moved on."""
    ck = [f for _, _, fs in os.walk(out / "checkpoints") for f in fs] if (out / "checkpoints").exists() else []
    stages = (out / "stages.json").read_text() if (out / "stages.json").exists() else ""
    return sorted(ck), stages


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(reference, tmp_path):
    out, rng, kills = tmp_path / "killed", random.Random(1), 0
    for attempt in range(60):
        before = _progress(out)
        p = start(out, "--resume") if attempt else start(out)
        while p.poll() is None and _progress(out) == before:  # wait until this attempt makes progress,
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))  # then kill at a random point (mid-step, mid-write, mid-stage)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            continue
        assert p.returncode == 0, p.stderr.read()
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 3
    same_results(reference(), out)
    lines = [json.loads(line) for line in open(out / "log.jsonl")]
    for model in ("teacher", "student_scratch", "student"):  # no duplicated or missing epoch lines since the
        # training that finished started: a resume drops the lines after its checkpoint; an attempt killed before
        # its stage's first checkpoint is started afresh, and its lines stay before it as an earlier history
        # (as `logbook.read_log` reads them: a new epoch 1 starts the model's history again)
        epochs = [r["epoch"] for r in lines if r.get("model") == model and "val_accuracy" in r]
        last = max(i for i, e in enumerate(epochs) if e == 1)
        assert epochs[last:] == list(range(1, EPOCHS[model] + 1)), (model, epochs)
    from distill.logbook import read_log
    steps = read_log(str(out / "log.jsonl"))[1]  # step lines: none lost, the same values
    assert steps == read_log(os.path.join(reference(), "log.jsonl"))[1] and steps


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_says_how_to_resume_and_resume_matches(reference, tmp_path, sig, capsys):
    out = tmp_path / "term"
    p = start(out)
    deadline = time.time() + 120
    while not os.path.isdir(out / "checkpoints" / "teacher") and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in err and f"continue with: distill run {out} --resume" in err
    assert "Traceback" not in err
    # the same command again without --resume: refused, every checkpoint kept (not silently started over)
    from distill.cli import main
    from test_bad_inputs import files
    kept = files(out)
    capsys.readouterr()
    assert main(["run", str(out)]) == 2
    said = capsys.readouterr().err
    assert "checkpoints of this teacher stage, stopped at step" in said and "continue with --resume" in said, said
    assert files(out) == kept
    if sig == signal.SIGINT:  # every checkpoint unreadable: --resume refuses and keeps them (no silent restart)
        damaged = out / "garbled"
        shutil.copytree(out, damaged)
        for f in (damaged / "checkpoints" / "teacher").glob("step-*.pt"):
            f.write_bytes(b"not a checkpoint")
        kept = files(damaged)
        assert main(["run", str(damaged), "--resume"]) == 2
        said = capsys.readouterr().err
        assert f"--resume: no checkpoint in {damaged / 'checkpoints' / 'teacher'} can be read" in said, said
        assert files(damaged) == kept
        # one that loads but is not this stage's (and a garbled inputs.json): refused, kept
        torch.save({"a": torch.zeros(1)}, sorted((damaged / "checkpoints" / "teacher").glob("step-*.pt"))[-1])
        (damaged / "checkpoints" / "teacher" / "inputs.json").write_text("{garbled")
        kept = files(damaged)
        assert main(["run", str(damaged), "--resume"]) == 2
        said = capsys.readouterr().err
        assert "is not one of this teacher stage (KeyError" in said and len(said.strip().splitlines()) == 1, said
        assert files(damaged) == kept
    newest = sorted((out / "checkpoints" / "teacher").glob("step-*.pt"))[-1]
    before = torch.load(newest, weights_only=True)["progress"]["seconds"]
    p = subprocess.run([sys.executable, "-m", "distill", "run", "--resume", str(out)], capture_output=True,
                       text=True, env=environment(), timeout=300)
    assert p.returncode == 0, p.stderr
    same_results(reference(), out)
    # the stage's time counts the attempt before the stop (it counted the resumed one alone)
    assert json.load(open(out / "stages.json"))["teacher"]["train_time_s"] > before > 0


def test_different_recipe_in_the_same_folder_is_refused_unless_overwrite(tmp_path, capsys, monkeypatch):
    from distill.cli import main
    from test_bad_inputs import files
    monkeypatch.setenv("DISTILL_QUIET", "1")
    out = tmp_path / "other"
    args = ["run", "breast_cancer", "--set", "train.epochs=1", "--set", "teacher.train.epochs=2", "--set",
            "evaluate.latency_runs=1", "--out", str(out)]
    assert main(args) == 0
    before = files(out)
    capsys.readouterr()
    assert main(args + ["--set", "distill.alpha=0.5"]) == 2
    assert "holds a run of a different recipe" in capsys.readouterr().err
    assert files(out) == before  # the earlier result is untouched
    assert main(args + ["--set", "distill.alpha=0.5", "--overwrite"]) == 0
    assert "teacher: inputs unchanged" in capsys.readouterr().err
    # data.workers (processes loading the batches; the draws are the same) is no other recipe: reused as it is
    assert main(args + ["--set", "distill.alpha=0.5", "--set", "data.workers=1"]) == 0
    assert capsys.readouterr().err.count("inputs unchanged") >= 3


def test_resume_continues_only_checkpoints_of_the_same_inputs(tmp_path, capsys, monkeypatch):
    """The recipe unchanged but its data file edited after a stop: --resume is refused in one line (the
    teacher's checkpoints, written on the old rows, kept); with --overwrite they are dropped and the teacher
    starts over, ending bitwise where a fresh run on the new rows ends."""
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    rows = [",".join([f"{v:.6g}" for v in x] + [d.target_names[t]]) for x, t in zip(d.data, d.target)]
    data = tmp_path / "bc.csv"
    write = lambda n: data.write_text("\n".join([",".join([*d.feature_names, "label"]), *rows[:n]]) + "\n")  # noqa: E731
    write(len(rows))
    recipe = ["breast_cancer", "--set", "data.dataset=csv", "--set", f"data.path={data}", "--set",
              "teacher.train.epochs=10", "--set", "train.epochs=1", "--set", "train.checkpoint_every=5",
              "--set", "evaluate.latency_runs=1", "--no-baseline"]
    monkeypatch.setenv("DISTILL_QUIET", "1")

    def cli(out, *extra):  # (in this process, after the stopped one: `fresh` and the resumed run share its threads)
        from distill.cli import main
        capsys.readouterr()
        code = main(["run", *recipe, "--out", str(out), *extra])
        return subprocess.CompletedProcess([], code, *capsys.readouterr())
    out = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "-m", "distill", "run", *recipe, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    deadline = time.time() + 120
    while not list((out / "checkpoints" / "teacher").glob("step-*.pt")) and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    ck = sorted(os.listdir(out / "checkpoints" / "teacher"))
    assert "inputs.json" in ck and any(f.startswith("step-") for f in ck)
    write(len(rows) - 50)  # the data changes under the stopped run
    recipe_before = (out / "recipe.yaml").read_text()
    r = cli(out, "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--resume: {out / 'checkpoints' / 'teacher'} was written by the teacher stage of other inputs" \
        in r.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(out / "checkpoints" / "teacher")) == ck  # kept, and nothing else rewritten
    assert (out / "recipe.yaml").read_text() == recipe_before and not (out / "stages.json").exists()
    r = cli(out, "--resume", "--overwrite")
    assert r.returncode == 0 and "other inputs; dropped, the stage starts over" in r.stderr, r.stderr
    fresh = tmp_path / "fresh"
    assert cli(fresh).returncode == 0
    same_results(fresh, out, ("teacher", "student"))


def test_kill_during_checkpoint_writing_leaves_the_previous_one(tmp_path):
    script = ("import torch, sys\nfrom distill.checkpoint import Checkpoints\n"
              f"c = Checkpoints({str(tmp_path)!r}, keep=3)\n"
              "c.save(1, {'w': torch.ones(10)})\nprint('saved', flush=True)\n"
              "for step in range(2, 10**6): c.save(step, {'w': torch.randn(4_000_000)})\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=environment())
    assert p.stdout.readline().strip() == "saved"
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    warnings = []
    state = Checkpoints(str(tmp_path), warn=warnings.append).latest()
    assert state is not None and state["w"].numel() in (10, 4_000_000)


def test_kill_during_soft_label_caching_leaves_no_entry_and_the_next_run_rebuilds(tmp_path):
    script = ("import time, torch\nfrom torch import nn\nfrom distill.teachers import load_or_build\n"
              "class Slow(nn.Module):\n    def forward(self, x):\n        print('batch', flush=True)\n"
              "        time.sleep(0.2)\n        return x[:, :3] * 2\n"
              f"load_or_build(Slow(), torch.ones(100, 4), 'key', {str(tmp_path)!r}, [], batch_size=10)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=environment())
    for _ in range(3):
        assert p.stdout.readline().strip() == "batch"  # killed mid-way through the 10 batches
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(tmp_path / "key")  # only a hidden temp folder may remain, never the entry
    from distill.teachers import load_or_build
    out, hit = load_or_build(nn.Identity(), torch.ones(100, 4) * 3, "key", str(tmp_path), [], batch_size=10)
    assert not hit and float(out.logits[0, 0]) == 3.0


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    c = Checkpoints(str(tmp_path), keep=3)
    c.save(1, {"w": torch.ones(3)})
    c.save(2, {"w": torch.zeros(3)})
    newest = sorted(os.listdir(tmp_path))[-1]
    with open(tmp_path / newest, "r+b") as fh:
        fh.truncate(20)
    warnings = []
    state = Checkpoints(str(tmp_path), warn=warnings.append).latest()
    assert torch.equal(state["w"], torch.ones(3))
    assert len(warnings) == 1 and "skipping unreadable checkpoint" in warnings[0] and newest in warnings[0]


def test_keeps_the_last_k(tmp_path):
    tmp_path = tmp_path / "run[1]"  # (a folder name that is a glob pattern: its files were never found)
    c = Checkpoints(str(tmp_path), keep=2)
    for step in range(5):
        c.save(step, {"step": step})
    assert sorted(os.listdir(tmp_path)) == ["step-00000003.pt", "step-00000004.pt"]
    (tmp_path / "step-00000009.pt").write_bytes(b"unreadable")  # (a resume went back from it to step 4)
    c.save(6, {"step": 6})  # (kept, the stale step 9 outranked it: with keep 1 the new one was deleted at once)
    assert sorted(os.listdir(tmp_path)) == ["step-00000004.pt", "step-00000006.pt"]
    assert Checkpoints(str(tmp_path), keep=1).save(7, {"step": 7}) and os.listdir(tmp_path) == ["step-00000007.pt"]


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))
    torch.save({"x": Evil()}, tmp_path / "step-00000001.pt")
    warnings = []
    assert Checkpoints(str(tmp_path), warn=warnings.append).latest() is None
    assert not (tmp_path / "PWNED").exists() and "skipping unreadable checkpoint" in warnings[0]


class _NaNAt(nn.Module):
    """A student whose output is NaN on the forward passes listed in `bad` (counting training passes)."""

    def __init__(self, bad):
        super().__init__()
        self.body, self.head, self.bad, self.calls = nn.Linear(4, 8), nn.Linear(8, 3), set(bad), 0

    def forward(self, x):
        out = self.head(torch.relu(self.body(x)))
        if self.training:
            self.calls += 1
            if self.calls in self.bad:
                out = out * float("nan")
        return out


class _NaNGrad(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (a finite loss whose gradient is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class _NaNGradAt(_NaNAt):
    """Finite outputs and losses, but a NaN gradient on the training passes listed in `bad`."""

    def forward(self, x):
        out = self.head(torch.relu(self.body(x)))
        if self.training:
            self.calls += 1
            if self.calls in self.bad:
                out = _NaNGrad.apply(out)
        return out


def _train(student, tmp_path, **over):
    from distill.data.datasets import DataBundle
    from distill.recipe import SCHEMA, TRAIN, validate_section
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.arange(40) % 3
    data = DataBundle(x, y, x[:10], y[:10], x[:10], y[:10], 3, ["a", "b", "c"], (4,), False, "fp")
    tcfg = validate_section({"epochs": 2, **over}, TRAIN, "train")
    dcfg = validate_section({"batch_size": 8}, SCHEMA["data"], "data")
    log = str(tmp_path / "log.jsonl")
    return fit("student", Objective(student), data, dcfg, tcfg, log=log,
               checkpoints=Checkpoints(str(tmp_path / "ck"))), log


def test_isolated_nan_steps_are_skipped_and_counted(tmp_path):
    student = _NaNAt({2, 4, 7})
    info, log = _train(student, tmp_path)
    lines = [json.loads(line) for line in open(log)]
    assert [r["skipped_steps"] for r in lines] == [2, 1]
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert info["selected_epoch"] >= 1


def test_a_step_whose_gradient_alone_is_nan_is_skipped_too(tmp_path):
    student = _NaNGradAt({2, 4, 7})
    info, log = _train(student, tmp_path)
    assert [json.loads(line)["skipped_steps"] for line in open(log)] == [2, 1]
    assert all(torch.isfinite(p).all() for p in student.parameters())
    with pytest.raises(TrainingDiverged, match="the gradient was NaN or Inf for 3 steps in a row"):
        _train(_NaNGradAt({3, 4, 5}), tmp_path / "again", max_bad_steps=3)


def test_consecutive_nan_steps_stop_with_a_clear_error(tmp_path):
    student = _NaNAt({3, 4, 5, 6})
    with pytest.raises(TrainingDiverged) as err:
        _train(student, tmp_path, max_bad_steps=3)
    msg = str(err.value)
    assert "epoch 1 step 5" in msg and "the ce loss was NaN or Inf for 3 steps in a row" in msg
    assert "learning rate" in msg and "\n" not in msg
    assert Checkpoints(str(tmp_path / "ck")).latest() is None  # nothing bad was saved (no epoch finished)
    assert "no checkpoint was written" in msg  # (it said the last good one was kept, of none)


def test_an_update_that_makes_the_weights_non_finite_stops_the_stage(tmp_path):
    """lr 1e308: the first step's loss and gradient were finite, its update made every weight Inf, each later
    step was skipped, and a stage shorter than max_bad_steps was saved, all NaN. lr 1e38 with Adam: torch's
    overflow error, as a traceback."""
    from torch import nn
    for optimizer, over, said in (
            ("adam", {"lr": 1e308}, "epoch 1: the weights became NaN or Inf (an update too large)"),
            ("adam", {"lr": 1e308, "checkpoint_every": 1},  # (a checkpoint of them, resumed from: the same again)
             "epoch 1 step 1: the weights became NaN or Inf (an update too large)"),
            ("adam", {"lr": 1e38}, "epoch 1 step 1: the optimizer's update overflowed"),
            ("sgd", {"lr": 1e30}, "epoch 1: the validation loss is NaN or Inf (the outputs overflow)")):  # (weights
        folder = tmp_path / f"{optimizer}{len(over)}{over['lr']}"  # finite, 2e29)
        with pytest.raises(TrainingDiverged, match=re.escape(said)) as err:
            _train(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), folder, max_bad_steps=50,
                   optimizer={"name": optimizer, "lr": over["lr"]}, **{k: v for k, v in over.items() if k != "lr"})
        assert "learning rate too high" in str(err.value) and "no checkpoint was written" in str(err.value)
        assert Checkpoints(str(folder / "ck")).latest() is None  # (nothing non-finite was saved)


def test_a_signal_after_a_stages_last_step_stops_the_run_once_the_stage_is_saved(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the teacher's last validation was dropped when training ended (the loop looks between
    steps), and the run trained every later stage. It stops now, with the teacher saved; run again, the teacher
    is reused."""
    from distill.cli import main
    from distill.engine import trainer as T
    real = T.Trainer.end_epoch

    def end_epoch(self, epoch, seconds):
        if self.role == "teacher" and epoch + 1 == self.tcfg["epochs"]:
            os.kill(os.getpid(), signal.SIGINT)  # (as the teacher's last epoch is validated)
        return real(self, epoch, seconds)
    monkeypatch.setattr(T.Trainer, "end_epoch", end_epoch)
    args = ["run", "digits", "--set", "teacher.train.epochs=2", "--set", "train.epochs=1", "--out", str(tmp_path)]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "teacher: stopped by SIGINT once the stage had finished (it is saved; the next stages did not start)" \
        in err, err
    assert list(json.load(open(tmp_path / "stages.json"))) == ["teacher"]
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert "teacher: inputs unchanged" in capsys.readouterr().err


def test_a_full_disk_while_saving_a_model_or_a_checkpoint_is_one_line_and_keeps_the_previous_file(tmp_path):
    """safetensors and torch.save report a failed write as SafetensorError and RuntimeError, not OSError:
    a traceback, where write_json said one line. (A full disk, made here with a file-size limit.)"""
    script = (
        "import os, resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from distill.checkpoint import Checkpoints\n"
        "from distill.errors import UserError\n"
        "from distill.io import save_model\n"
        "from distill.models import build_model\n"
        "d = sys.argv[1]\n"
        "m = build_model({'arch': ['Flatten()', 'Linear(64, 1000)', 'ReLU()', 'Linear(1000, 10)']}, (1, 8, 8), 10)\n"
        "save_model(m, os.path.join(d, 'm.safetensors'), {})\n"
        "before = open(os.path.join(d, 'm.safetensors'), 'rb').read()\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "for save in (lambda: save_model(m, os.path.join(d, 'm.safetensors'), {}),\n"
        "             lambda: Checkpoints(os.path.join(d, 'ck')).save(1, {'w': m.state_dict()})):\n"
        "    try:\n"
        "        save()\n"
        "    except UserError as e:\n"
        "        print('one line:', str(e))\n"
        "assert open(os.path.join(d, 'm.safetensors'), 'rb').read() == before\n"
        "print('left:', sorted(f for _, _, fs in os.walk(d) for f in fs))\n")
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env=environment())
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert [line.split(": cannot write")[0] for line in lines[:2]] == [
        f"one line: {tmp_path / 'm.safetensors'}", f"one line: {tmp_path / 'ck' / 'step-00000001.pt'}"], lines
    assert all("the previous version of the file, if any, is unchanged" in line for line in lines[:2])
    assert lines[2] == "left: ['m.safetensors']"  # (no temp file left behind)


def test_a_run_resumed_at_an_epoch_s_last_step_logs_the_rate_that_step_used(tmp_path, monkeypatch):
    """With a per-step schedule the optimizer's rate has moved on when the checkpoint at an epoch's last step
    is written; the resumed run logged that next rate on the epoch's line (the weights were right)."""
    from distill import Recipe, run
    from distill.engine import trainer as T
    sets = ["teacher.train.epochs=2", "student.train.epochs=2", "baseline=false", "monitor.enabled=false",
            "student.train.scheduler.interval=step", "student.train.checkpoint_every=20",
            "student.train.checkpoint_seconds=0", f"output.cache_dir={tmp_path / 'cache'}"]  # (20 steps an epoch)
    quiet = lambda m: None  # noqa: E731
    run(Recipe.load("digits", sets), str(tmp_path / "whole"), echo=quiet)

    class Stop(Exception):
        pass
    end_epoch = T.Trainer.end_epoch

    def stop_first(self, epoch, seconds):
        if self.role == "student" and epoch == 0:
            raise Stop()  # (after the step-20 checkpoint, before the epoch's line)
        return end_epoch(self, epoch, seconds)
    monkeypatch.setattr(T.Trainer, "end_epoch", stop_first)
    with pytest.raises(Stop):
        run(Recipe.load("digits", sets), str(tmp_path / "cut"), echo=quiet)
    monkeypatch.setattr(T.Trainer, "end_epoch", end_epoch)
    run(Recipe.load("digits", sets), str(tmp_path / "cut"), echo=quiet, resume=True)
    lines = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl") if '"val_accuracy"' in line
              and '"student"' in line] for d in ("whole", "cut")]
    assert [r["lr"] for r in lines[0]] == [r["lr"] for r in lines[1]] and len(lines[0]) == 2


def test_sigterm_after_training_says_how_to_go_on(tmp_path):
    """Outside training (here: while the models are measured) SIGTERM killed the command silently (exit -15):
    a job scheduler's stop got no line. It stops as Ctrl-C does, with the command that continues."""
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "distill", "run", "--set", "teacher.train.epochs=2", "--set",
                          "train.epochs=2", "--set", "evaluate.latency_runs=100000", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # (the students are made: evaluation measures them now)
            stages = json.load(open(out / "stages.json")) if (out / "stages.json").is_file() else {}
            if stages.get("student", {}).get("fingerprint", "unfinished") != "unfinished":
                break
            time.sleep(0.1)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"interrupted (SIGTERM); continue with: distill run {out} --resume"


def test_a_reused_stage_drops_the_checkpoints_its_own_run_left(tmp_path, capsys, monkeypatch):
    """A run stopped after a stage's record was written, before its checkpoints were removed, left them for good
    (the next run reused the stage); they go when it is reused. Checkpoints of other inputs (a stopped rerun of
    a changed recipe, to go on with) are kept."""
    from distill.cli import main
    monkeypatch.setenv("DISTILL_QUIET", "1")
    out = tmp_path / "run"
    args = ["run", "breast_cancer", "--set", "train.epochs=1", "--set", "teacher.train.epochs=2", "--set",
            "evaluate.latency_runs=1", "--no-baseline", "--out", str(out)]
    assert main(args) == 0
    stages = json.load(open(out / "stages.json"))
    for stage, fingerprint in (("teacher", stages["teacher"]["fingerprint"]), ("student", "another")):
        folder = out / "checkpoints" / stage
        folder.mkdir(parents=True)
        (folder / "step-00000003.pt").write_bytes(b"x")
        (folder / "inputs.json").write_text(json.dumps({"fingerprint": fingerprint}))
    assert main(args) == 0
    assert "inputs unchanged" in capsys.readouterr().err
    assert not (out / "checkpoints" / "teacher").exists()
    assert sorted(os.listdir(out / "checkpoints" / "student")) == ["inputs.json", "step-00000003.pt"]
