"""torch.distributed on the CPU (gloo), 2 processes on 127.0.0.1, each ended by its pid within a time bound:

- 2 processes with per-process batch b train exactly as 1 process accumulating 2 micro-batches of b (bit for
  bit), and as 1 process with batch 2b within rtol 1e-5; for a tabular classifier and a text model (and, bit
  for bit against accumulation, a character language model);
- the soft-label cache entry is the same bytes whether 1 or 2 processes built it;
- evaluation counts every test sample once when N is not divisible by the process count;
- gradients are all-reduced once per optimizer step, not once per accumulated micro-batch;
- a process killed with SIGKILL (either, or all) stops the job at once with a line naming it and the resume
  command; the checkpoint loads, and the resumed run ends bitwise equal to an uninterrupted one;
- a process that hangs stops the others after `train.timeout_s`, with a line saying how to continue;
- resuming with another process count is refused in one line;
- two torchrun "nodes" meeting at a rendezvous on 127.0.0.1 train as `--nproc 2` does;
- every socket a job listens on is bound to 127.0.0.1 (tests/local_torchrun.py starts the hand-made ones so).
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment() -> dict:
    """The processes' environment, read as each starts (so the conftest's per-test DISTILL_CACHE is in it)."""
    env = {**os.environ, "DISTILL_QUIET": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": ROOT}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


TABULAR = ["breast_cancer", "--set", "teacher.args.dropout=0.0", "--set", "teacher.train.epochs=3",
           "--set", "train.epochs=3", "--set", "train.select=last", "--set", "data.eval_batch_size=64"]
# (the students' 6 epochs of 20 steps: a kill after the student's first checkpoint lands seconds before its end)
DIGITS = ["digits", "--set", "teacher.train.epochs=4", "--set", "train.epochs=6", "--set", "train.checkpoint_every=5"]


TORCHRUN = [sys.executable, os.path.join(ROOT, "tests", "local_torchrun.py"), "0", "0"]  # (one node, on 127.0.0.1)


def start(args):
    """A process in its own session, so that a time-out ends it and every process it started, by its pid."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
                            start_new_session=True)


def finish(p, timeout=240):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the session's group: its id is the launcher's pid
        p.communicate()
        raise
    return p.returncode, out, err


def distill(*args, timeout=240):
    return finish(start([sys.executable, "-m", "distill", *args]), timeout)


def ok(*args):
    code, out, err = distill(*args)
    assert code == 0, err[-3000:]
    return out, err


def weights(folder, name):
    path = os.path.join(folder, name)
    return load_file(path + ".safetensors" if os.path.isfile(path + ".safetensors") else
                     os.path.join(path, "model.safetensors"))


def compare(a, b, exact):
    for name in ("teacher", "student_scratch", "student"):
        wa, wb = weights(a, name), weights(b, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            if exact:
                assert torch.equal(wa[k], wb[k]), (name, k)
            else:
                torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")


def three_layouts(tmp, recipe, two=None):
    """The same recipe as 1 process x accumulate 2, 2 processes, and 1 process with the whole batch at once,
    each with its own soft-label cache (in tmp/cache_NAME). `two`: a folder holding the 2 processes' run already
    made (`tabular_two`), as two/two with two/cache_two."""
    layouts = {"accumulate": ["--set", "train.accumulate=2"], "one": [], "two": ["--nproc", "2"]}
    runs = {name: str(tmp / name) for name in layouts}
    started = {name: start([sys.executable, "-m", "distill", "run", *recipe, "--out", runs[name], "--set",
                            f"output.cache_dir={tmp / ('cache_' + name)}", *layouts[name]])
               for name in ("accumulate", "one")}  # (one thread each: the two single processes run at once)
    for name, p in started.items():
        code, _, err = finish(p)
        assert code == 0, (name, err[-3000:])
    if two is None:
        ok("run", *recipe, "--out", runs["two"], "--set", f"output.cache_dir={tmp / 'cache_two'}", *layouts["two"])
    else:
        runs["two"] = str(two / "two")
    return runs


@pytest.fixture(scope="module")
def tabular_two(tmp_path_factory):
    """TABULAR under --nproc 2 (with a soft-label cache of its own), made once: the tests that compare with it
    only read it."""
    tmp = tmp_path_factory.mktemp("tabular_two")
    ok("run", *TABULAR, "--out", str(tmp / "two"), "--set", f"output.cache_dir={tmp / 'cache_two'}", "--nproc", "2")
    return tmp


def test_two_processes_train_as_one_with_accumulation_and_build_the_same_cache(tmp_path, tabular_two):
    runs = three_layouts(tmp_path, TABULAR, tabular_two)
    compare(runs["accumulate"], runs["two"], exact=True)
    compare(runs["accumulate"], runs["one"], exact=False)
    # the teacher pass shared between two processes (3 batches of 64: 2 and 1) gives the same bytes
    key = json.load(open(os.path.join(runs["two"], "soft_labels.json")))["cache_key"]
    one, two = tmp_path / "cache_accumulate" / key, tabular_two / "cache_two" / key
    assert sorted(os.listdir(one)) == sorted(os.listdir(two)) and "logits.npy" in os.listdir(two)
    for f in os.listdir(one):
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    # 143 test samples over 2 processes (72 + 71): the same metrics as one process, none counted twice
    m1, m2 = (json.load(open(os.path.join(runs[n], "metrics.json"))) for n in ("accumulate", "two"))
    for name in m1:
        for k in ("accuracy", "macro_f1", "auc", "sensitivity", "specificity"):
            assert m1[name][k] == m2[name][k], (name, k)
    log = [json.loads(line) for line in open(os.path.join(runs["two"], "log.jsonl"))]
    assert all("epoch" not in r or "model" in r for r in log)  # one writer: no torn or doubled lines
    assert sum(1 for r in log if r.get("model") == "student" and "val_accuracy" in r) == 3


def test_text_model_two_processes_train_as_one(tmp_path):
    textkit = pytest.importorskip("textkit")
    import yaml
    textkit.tiny_bert(str(tmp_path / "bert"), dropout=0.0)  # (dropout draws differ per process by design)
    recipe = textkit.text_recipe(str(tmp_path), train={"select": "last"}, data={"eval_batch_size": 32})
    recipe.pop("output")
    (tmp_path / "text.yaml").write_text(yaml.safe_dump(recipe))
    runs = three_layouts(tmp_path, [str(tmp_path / "text.yaml")])
    compare(runs["accumulate"], runs["two"], exact=True)
    compare(runs["accumulate"], runs["one"], exact=False)


def test_language_model_two_processes_train_as_one_accumulating(tmp_path):
    """With teacher-written windows beside the text (which the main process alone writes)."""
    import test_lm
    path = test_lm.recipe(tmp_path, train={"select": "last"},
                          distill={"sequence_kd": {"windows": 16, "replace": False}})
    runs = {}
    for name, extra in (("accumulate", ["--set", "train.accumulate=2"]), ("two", ["--nproc", "2"])):
        runs[name] = str(tmp_path / name)
        ok("run", path, "--out", runs[name], "--set", f"output.cache_dir={tmp_path / ('cache_' + name)}", *extra)
    compare(runs["accumulate"], runs["two"], exact=True)


def test_compress_under_torchrun_writes_its_models_once(tmp_path):
    """Every process saved the compressed models and wrote compress.json: transformers writes no weights from a
    process that is not the main one, and whichever rename landed last left a Hugging Face folder without them
    (compress failed every time on a language model); a CNN's files were written twice over."""
    import shutil
    import yaml
    import lmkit
    recipe = lmkit.lm_recipe(str(tmp_path), train={"select": "last"})
    recipe.pop("output")
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ok("run", str(path), "--out", one, "--no-baseline", "--set", f"output.cache_dir={tmp_path / 'cache'}")
    shutil.copytree(one, two)
    steps = ["--set", "compress.steps=[layers]", "--set", "compress.layers.to=1", "--set", "compress.layers.epochs=1"]
    ok("compress", one, *steps)
    code, out, err = finish(start([*TORCHRUN, "--nproc-per-node", "2", "-m", "distill", "compress", two, *steps]))
    assert code == 0, err[-3000:]
    assert out.count("models: ") == 1  # (the table once, from the main process)
    records = [json.load(open(os.path.join(d, "compress", "compress.json")))["models"] for d in (one, two)]
    assert [r["name"] for r in records[0]] == [r["name"] for r in records[1]] == ["layers1"]
    a, b = weights(one, "compress/layers1"), weights(two, "compress/layers1")  # (two processes: a batch twice
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}  # as large, other weights)


def test_on_policy_kd_with_a_feature_loss_two_processes_train_as_one_accumulating(tmp_path):
    """Whether a step is on-policy, and the student's samples, are drawn from the step's seeds, not each
    process's RNG: the processes took different branches (a gloo abort, as the projector's gradient was
    reduced on one process only) and, without features, trained otherwise than one process accumulating."""
    import yaml
    from lmkit import lm_recipe
    recipe = lm_recipe(str(tmp_path), train={"select": "last"}, distill={
        "method": "jsd", "temperature": 1.0, "alpha": 0.5, "on_policy": {"fraction": 0.5, "max_new_tokens": 6},
        "features": [{"student": "hf.model.layers.1", "teacher": "hf.model.layers.3", "loss": "mse"}]})
    recipe.pop("output")
    (tmp_path / "op.yaml").write_text(yaml.safe_dump(recipe))
    runs = {}
    for name, extra in (("accumulate", ["--set", "train.accumulate=2"]), ("two", ["--nproc", "2"])):
        runs[name] = str(tmp_path / name)
        ok("run", str(tmp_path / "op.yaml"), "--out", runs[name], "--set",
           f"output.cache_dir={tmp_path / ('cache_' + name)}", *extra)
    compare(runs["accumulate"], runs["two"], exact=True)


def test_worker_checks_evaluation_gather_cache_key_refusal_and_one_sync_per_step(tmp_path):
    code, out, err = finish(start([*TORCHRUN, "--nproc-per-node", "2", os.path.join(ROOT, "tests", "distributed_worker.py"), str(tmp_path)]), 120)
    assert code == 0, err[-3000:]
    for rank in (0, 1):
        seen = json.load(open(tmp_path / f"rank{rank}.json"))
        assert seen["world"] == 2 and seen["rows"] == 7 and seen["same_as_one_process"]
        assert "process 1 needs cache entry key-of-rank-1 and process 0 needs key-of-rank-0" in seen["mismatch"]
        assert seen["topk_mismatch"].startswith("top-k cache: process 1 needs cache entry")
        assert seen["unshared"].startswith(f"soft labels: process 1 does not see {tmp_path / 'cache_of_rank_'}") \
            and "output.cache_dir must be a folder they all see" in seen["unshared"]
        assert not [f for f in os.listdir(tmp_path / "shared_cache") if f.startswith(".distill-shared")]
        assert seen["unwritable"] == "passed"
        # accumulate 2: 12 optimizer steps, 12 all-reduces (one bucket), not 24
        assert seen["steps"] == 12 and seen["allreduces"] == seen["steps"]


def test_processes_wait_for_the_main_one_working_alone_longer_than_the_collective_timeout(tmp_path):
    """train.timeout_s bounds the collectives of training; a run under --nproc failed after training when the
    main process measured latency (or wrote completions, a cache) for longer, with 'lost the other processes',
    and in training when it wrote a checkpoint for longer."""
    code, out, err = finish(start([*TORCHRUN, "--nproc-per-node", "2", os.path.join(ROOT, "tests", "distributed_wait.py"), str(tmp_path)]), 120)
    assert code == 0, err[-3000:]
    seen = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["sum"] for r in seen] == [4.0, 4.0]
    # (a checkpoint written for longer than the timeout in training: process 1 waited, and knows where it is)
    assert [r["checkpoint"] for r in seen] == ["checkpoints/step-00000007.pt"] * 2


def _stat(pid):
    """The fields of /proc/PID/stat after the command name (state, parent pid, ...); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid):
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and (_stat(e) or [None, None])[1] == str(pid)]


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as fh:
        env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
    return int(env.get(b"RANK", b"-1"))


def _listening(pids):
    """The addresses the sockets of these processes listen on (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).readlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # (0A: LISTEN)
                host = bytes.fromhex(f[1].split(":")[0])
                found.add(socket.inet_ntop(socket.AF_INET if len(host) == 4 else socket.AF_INET6,
                                           host[::-1] if len(host) == 4 else b"".join(
                                               host[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


def _gone_within(pid, seconds):
    """True once `pid` has exited (or is a zombie awaiting its parent) within `seconds`."""
    deadline = time.time() + seconds
    while True:
        fields = _stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    ok("run", *DIGITS, "--out", str(out), "--nproc", "2")
    return str(out)


# (a worker; every process with the launcher; the launcher alone, whose processes, in sessions of their own,
# trained on without it, the folder's lock released)
@pytest.mark.parametrize("victim", ["1", "all", "launcher"])
def test_sigkill_then_resume_with_two_processes_is_bitwise_identical(reference, tmp_path, victim, capsys):
    out = tmp_path / "run"
    launcher = start([sys.executable, "-m", "distill", "run", *DIGITS, "--out", str(out), "--nproc", "2"])
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("student/step-*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    ranks = {_rank_of(p): p for p in _children(launcher.pid)}
    assert set(ranks) == {0, 1}, ranks
    killed_at = time.time()
    victims = {"all": [launcher.pid, *ranks.values()], "launcher": [launcher.pid]}.get(victim)
    for pid in victims or [ranks[int(victim)]]:
        os.kill(pid, signal.SIGKILL)
    code, _, err = finish(launcher, 60)
    assert time.time() - killed_at < 30  # the surviving process stopped at once (a peer's socket closed)
    for pid in ranks.values():  # no process left behind (a SIGKILLed one may take a moment to finish exiting)
        assert _gone_within(pid, 10), f"process {pid} still runs 10 s after the kill"
    if victim.isdigit():
        assert code == 1
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: process {victim} (pid {ranks[int(victim)]}) was killed by SIGKILL"), last
        assert f"continue with: distill run {out} --nproc 2 --resume" in last, last
    newest = sorted((out / "checkpoints" / "student").glob("step-*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    # another process count is refused, and the checkpoint kept
    from distill.cli import main
    capsys.readouterr()
    assert main(["run", str(out), "--resume"]) == 2  # (in this process: a refusal, before any training)
    err = capsys.readouterr().err
    assert "written by 2 process(es) and this run has 1; resume with --nproc 2" in err, err[-2000:]
    assert newest.exists()
    ok("run", str(out), "--nproc", "2", "--resume")
    compare(reference, str(out), exact=True)
    m1, m2 = (json.load(open(os.path.join(d, "metrics.json"))) for d in (reference, out))
    assert all(m1[n]["accuracy"] == m2[n]["accuracy"] for n in m1)
    # the epoch a checkpoint cut in two logs the loss of both processes' steps before it too
    epochs = [{(r["model"], r["epoch"]): r["loss_total"] for r in map(json.loads, open(os.path.join(d, "log.jsonl")))
               if "val_accuracy" in r} for d in (reference, out)]
    assert epochs[0].keys() == epochs[1].keys()
    assert epochs[0] == pytest.approx(epochs[1], rel=1e-9), state["progress"]["batch"]


def test_sigterm_to_the_launcher_checkpoints_with_loader_workers_then_resumes_bitwise(reference, tmp_path):
    """A scheduler's stop: torchrun passes SIGTERM on to each process's group (loader workers were in it). Every
    process stops at the end of its step and the checkpoint is written (a worker killed by it failed the step,
    with a traceback per process, and the progress since the last checkpoint was lost)."""
    out = tmp_path / "run"
    launcher = start([sys.executable, "-m", "distill", "run", *DIGITS, "--out", str(out), "--nproc", "2",
                      "--set", "data.workers=1"])  # (the same batches as without workers)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("student/step-*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    code, _, err = finish(launcher, 60)
    assert code == 143 and "Traceback" not in err and "[rank" not in err, err[-3000:]
    assert err.count("continue with:") == 1, err  # (the main process's line; the launcher says no second)
    stopped = re.search(r"student: stopped by SIGTERM at epoch \d+, step (\d+); checkpoint (\S+);", err)
    assert stopped and os.path.isfile(stopped[2]) and stopped[2].endswith(f"step-{int(stopped[1]):08d}.pt"), err
    ok("run", str(out), "--nproc", "2", "--resume")
    compare(reference, str(out), exact=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_meet_at_a_rendezvous_and_train_as_two_processes(tmp_path, tabular_two):
    port, out = _free_port(), str(tmp_path / "nodes")
    nodes = [start([sys.executable, os.path.join(ROOT, "tests", "local_torchrun.py"), str(port), str(r), "--nnodes",
                    "2", "--nproc-per-node", "1", "-m", "distill", "run", *TABULAR,
                    "--out", out, "--set", f"output.cache_dir={tmp_path / 'cache'}"]) for r in (0, 1)]
    try:
        results = [finish(p, 180) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    compare(out, str(tabular_two / "two"), exact=True)  # (as `--nproc 2` trains)


def test_a_hung_process_stops_the_other_after_the_collective_timeout(tmp_path):
    """Process 1 is stopped in a training step, where process 0 waits train.timeout_s for it: not after the
    teacher's training (the epochs do not run out before the test ends the run), nor inside a checkpoint's save
    (the teacher's checkpoints, at epoch ends 2 s apart, are not near the stop), where process 0 would wait, by
    design, at a barrier of the main process working alone (runtime.WAIT_S: hours)."""
    out = tmp_path / "run"
    launcher = start([sys.executable, "-m", "distill", "run", *DIGITS, "--out", str(out), "--nproc", "2",
                      "--set", "train.timeout_s=5", "--set", "teacher.train.epochs=100000",
                      "--set", "teacher.train.checkpoint_every=0", "--set", "teacher.train.checkpoint_seconds=2"])
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("teacher/step-*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # (the first checkpoint's save over in both processes; the next one 1.5 s away at least)
    ranks = {_rank_of(p): p for p in _children(launcher.pid)}
    # (the rendezvous store, in the launcher, and gloo's sockets: none listens beyond this machine)
    assert _listening([launcher.pid, *ranks.values()]) == {"127.0.0.1"}
    os.kill(ranks[1], signal.SIGSTOP)  # alive, sockets open, but never answers
    stopped_at = time.time()
    try:
        _gone_within(ranks[0], 60)
        waited = time.time() - stopped_at
    finally:
        os.kill(ranks[1], signal.SIGKILL)  # (torchrun would wait 30 s more before killing a stopped process)
    code, _, err = finish(launcher, 60)
    assert 4 <= waited < 30, waited  # the collective's timeout (5 s), not for ever
    assert code == 1 and "error: process 0: lost the other processes" in err, err[-2000:]
    assert f"continue with: distill run {out} --nproc 2 --resume" in err
    torch.load(sorted((out / "checkpoints" / "teacher").glob("step-*.pt"))[-1], weights_only=True)


@pytest.mark.parametrize("command", ["bench", "export", "report", "doctor"])
def test_one_process_commands_under_torchrun_are_refused(command, monkeypatch, capsys, tmp_path):
    """Under torchrun every process runs the command: a bench would time against the others, and each would
    write the same files; rank 0 alone prints what a command prints."""
    from distill.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([command, str(tmp_path), *(["--format", "onnx"] if command == "export" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"process 0: distill {command} runs in one process" in err[0], err
    monkeypatch.setenv("RANK", "1")  # (another process: it prints nothing of its own)
    assert main(["recipes"]) == 0 and capsys.readouterr().out == ""


def test_a_mistake_every_process_finds_is_said_once(tmp_path):
    """Each of the --nproc processes finds the user's mistake; the launcher says it once, in one line, with
    neither a line per process nor torchrun's own log lines of the failed processes."""
    code, _, err = distill("run", "digits", "--out", str(tmp_path / "run"), "--nproc", "2", "--set",
                           "data.val_fraction=0.99", timeout=120)
    assert code == 2 and err.strip().splitlines() == [err.strip()], err[-2000:]
    assert err.startswith("error: data.label_fraction=0.2: keeps 2 training rows, none of classes"), err
    assert not os.path.exists(tmp_path / "run")
    # CRD under --nproc: refused before the teacher and the baseline trained (it was after them, by the trainer)
    code, _, err = distill("run", "digits", "--out", str(tmp_path / "crd"), "--nproc", "2", "--set",
                           "distill.features=[{student: body.0, teacher: body.0, loss: crd}]", timeout=120)
    assert code == 2 and err.strip() == "error: distill.features: crd keeps one memory bank of the whole training " \
                                        "set, which one process updates; train CRD in a single process (without " \
                                        "--nproc)", err[-2000:]
    assert not os.path.exists(tmp_path / "crd")


def test_mistakes_that_differ_are_said_per_process(tmp_path):
    from distill.launch import _said
    for rank, message in (("0", "a"), ("1", "b"), ("2", "a"), ("10", "a")):
        (tmp_path / rank).write_text(message)
    (tmp_path / "3.tmp").write_text("a process killed while it wrote")
    assert _said(str(tmp_path), 11) == ["error: processes 0, 2, 10: a", "error: process 1: b"]
    (tmp_path / "1").write_text("a")
    assert _said(str(tmp_path), 11) == ["error: processes 0, 1, 2, 10: a"]  # (not every process: named)
    assert _said(str(tmp_path), 4) == ["error: a"]


def test_a_loaded_teacher_s_accumulation_is_not_checked_against_the_processes():
    """`--nproc` checks each trained role's share of the batch; a teacher loaded from a checkpoint or a
    fine-tuned folder trains no step, so its `train.accumulate` is left alone."""
    from distill import Recipe
    from distill.errors import UserError
    from distill.launch import check_processes
    cfg = Recipe.load("digits", ["data.batch_size=16", "teacher.train.accumulate=16"]).cfg
    with pytest.raises(UserError, match="teacher.train.accumulate = 2 x 16 micro-batches"):
        check_processes(cfg, 2)
    for loaded in ({"checkpoint": "teacher.safetensors"}, {"hf": "folder", "finetuned": True}):
        check_processes({**cfg, "teacher": {**cfg["teacher"], **loaded}}, 2)


def test_a_lost_peer_is_found_behind_the_error_raised_while_stopping():
    """A loader worker's failure as the process stopped was raised while gloo's error was handled: the run
    still ends in the one line for a lost peer, not a traceback."""
    import torch.distributed as dist
    from distill.cli import _lost_peer
    try:
        try:
            raise dist.DistNetworkError("Connection closed by peer [127.0.0.1]:6550")
        except RuntimeError:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
    except RuntimeError as e:
        assert isinstance(_lost_peer(e, dist), dist.DistNetworkError)
    assert _lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), dist) is None


@pytest.mark.parametrize("codes, expected", [((143, -15), 143), ((-15, 130), 130), ((143, 1), 1), ((-15, -15), 1)])
def test_a_process_torchrun_stopped_after_an_interrupted_one_is_an_interruption(monkeypatch, capsys, codes, expected):
    """Process 1 alone was sent SIGTERM: both stop at the same step, checkpoint and exit 143, but torchrun may
    see one exit first and SIGTERM the other, whose handler is done with by then (-15): still an interruption,
    not 'process 0 exited with code 143'. A process that failed (1), or no process that said so, is not."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from distill import launch

    def run(args):
        raise ChildFailedError("distill", {r: ProcessFailure(r, 1000 + r, c, "") for r, c in enumerate(codes)})
    monkeypatch.setattr(torch.distributed.run, "run", run)
    assert launch.launch(["run", "digits"], 2, "distill run x --nproc 2 --resume") == expected
    err = capsys.readouterr().err
    assert ("error:" in err) == (expected == 1), err
