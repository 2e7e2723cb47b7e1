"""Whole runs on real data (scikit-learn digits and breast cancer), stage reuse, determinism."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill import Recipe, run, run_seeds
from distill import RunDir
from distill.pipeline.plan import evaluate, train_student, train_teacher


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:  # restored at teardown: later modules see the old value
        mp.setenv("DISTILL_CACHE", cache)
        messages = []
        metrics = run(Recipe.load("digits"), out=out, echo=messages.append)
        yield out, metrics, cache


def test_default_recipe_distils_a_real_student(digits_run):
    out, metrics, _ = digits_run
    t, s, b = metrics["teacher"], metrics["student"], metrics["student_scratch"]
    # (seed 0 of the default: 20% of the training digits labelled; the other 80% taught by the teacher alone)
    assert t["accuracy"] > 0.93 and s["accuracy"] > 0.93  # real thresholds on 360 held-out digits (chance: 0.10)
    assert t["accuracy"] > b["accuracy"] and s["accuracy"] > b["accuracy"]  # what the default demo shows
    assert s["params"] * 8 <= t["params"]
    assert s["params"] == b["params"]
    for m in (t, s, b):
        assert set(m) >= {"accuracy", "macro_f1", "params", "size_bytes", "latency_ms", "val_accuracy"}
        assert m["latency_ms"] > 0 and m["size_bytes"] > 0


def test_run_folder_artifacts(digits_run):
    out, metrics, _ = digits_run
    for name in ("recipe.yaml", "teacher.safetensors", "student.safetensors", "student_scratch.safetensors",
                 "metrics.json", "log.jsonl", "stages.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert json.load(open(os.path.join(out, "metrics.json"))) == json.loads(json.dumps(metrics))
    recipe = Recipe.load("digits")
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    for model, role in (("teacher", "teacher"), ("student", "student"), ("student_scratch", "student")):
        epochs = recipe[role]["train"]["epochs"]
        logged = [r["epoch"] for r in lines if r.get("model") == model and "val_accuracy" in r]
        assert logged == list(range(1, epochs + 1))
    assert Recipe.load(os.path.join(out, "recipe.yaml")).cfg == Recipe.load("digits").cfg
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_second_run_reuses_every_stage_and_a_new_temperature_only_retrains_the_student(digits_run, monkeypatch,
                                                                                     tmp_path):
    shared, metrics, cache = digits_run
    out = str(tmp_path / "run")
    shutil.copytree(shared, out)  # (copy2 keeps the times; the module's folder stays as the other tests expect)
    monkeypatch.setenv("DISTILL_CACHE", cache)
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in ("teacher.safetensors", "student.safetensors")}
    messages = []
    again = run(Recipe.load("digits"), out=out, echo=messages.append)
    assert any("teacher: inputs unchanged" in m for m in messages)
    assert any("student: inputs unchanged" in m for m in messages)
    assert again["student"]["accuracy"] == metrics["student"]["accuracy"]
    messages.clear()
    # the retrained student trains 2 of the recipe's 300 epochs (the stages' inputs, which decide what is reused,
    # are the recipe's as they are): which stages train is what is checked here, and every training is recorded
    from distill.pipeline import training
    real, trained = training.train, []

    def shorter(run_dir, name, objective, data=None, monitor=None, tcfg=None):
        trained.append(name)
        return real(run_dir, name, objective, data, monitor, {**(tcfg or run_dir.train_cfg(name)), "epochs": 2})
    monkeypatch.setattr(training, "train", shorter)
    rd = RunDir(Recipe.load("digits", ["distill.temperature=3"]), out, messages.append, overwrite=True)
    train_teacher(rd)
    train_student(rd)
    assert trained == ["student"]
    assert any("teacher: inputs unchanged" in m for m in messages)
    assert any("student_scratch: inputs unchanged" in m for m in messages)
    assert any("soft labels: cache hit" in m for m in messages)  # T changes nothing in the cached logits
    assert not any("student: inputs unchanged" in m for m in messages)
    assert os.path.getmtime(os.path.join(out, "teacher.safetensors")) == before["teacher.safetensors"]
    assert os.path.getmtime(os.path.join(out, "student.safetensors")) > before["student.safetensors"]


def test_metrics_of_models_or_a_recipe_replaced_by_a_run_that_stopped_are_not_reported(digits_run, monkeypatch,
                                                                                      tmp_path, capsys):
    """metrics.json records which version of each model it measured, and under which recipe: a rerun of a
    changed recipe that stops before its evaluation leaves the old numbers beside a new recipe.yaml (and
    perhaps new models), and report and doctor say so instead of showing them as this run's."""
    from distill.cli import main
    from distill.pipeline import training
    shared, _, cache = digits_run
    monkeypatch.setenv("DISTILL_CACHE", cache)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "distil", stopped)  # (the distilled student's stage stops)
    for change, why in [("distill.temperature=3", "measured earlier versions of student, trained again"),
                        ("student.train.epochs=2", "measured earlier versions of student_scratch, student, trained")]:
        out = str(tmp_path / change)
        shutil.copytree(shared, out)
        metrics = open(os.path.join(out, "metrics.json")).read()
        rd = RunDir(Recipe.load("digits", [change]), out, quiet, overwrite=True)
        train_teacher(rd)
        with pytest.raises(KeyboardInterrupt):
            train_student(rd)  # (a changed student.train retrains the baseline first, which finishes)
        assert open(os.path.join(out, "metrics.json")).read() == metrics  # (kept as it was: nothing is lost)
        for command in ("report", "doctor"):
            capsys.readouterr()
            assert main([command, out]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and why in err[0] and "finish that run" in err[0], err
    assert main(["doctor", shared]) == 0  # (the finished run's own metrics are its models')


def test_a_stage_stopped_after_replacing_its_file_is_made_again_and_its_model_is_not_measured(digits_run, tmp_path,
                                                                                            monkeypatch, capsys):
    """A stage killed after its output was replaced and before stages.json took its new record: the old record
    was reused for the new file (another temperature's samples 'reused' as this one's). The record is marked
    unfinished before a stage makes its files."""
    from distill.cli import main
    from distill.pipeline.stage import Stage, run_stage
    shared, _, cache = digits_run
    monkeypatch.setenv("DISTILL_CACHE", cache)
    out = str(tmp_path / "run")
    shutil.copytree(shared, out)

    def make(text, stop=False):
        def write():
            with open(os.path.join(out, "x.txt"), "w") as fh:
                fh.write(text)
            if stop:
                raise KeyboardInterrupt  # (killed here)
            return {}
        return write
    rd = RunDir(Recipe.load("digits"), out, quiet)
    assert not run_stage(rd, Stage("x", {"v": 1}, ["x.txt"], make("one")))["reused"]
    with pytest.raises(KeyboardInterrupt):
        run_stage(rd, Stage("x", {"v": 2}, ["x.txt"], make("two", stop=True)))
    record = run_stage(RunDir(Recipe.load("digits"), out, quiet), Stage("x", {"v": 1}, ["x.txt"], make("one")))
    assert not record["reused"] and open(os.path.join(out, "x.txt")).read() == "one"
    # a model whose stage did not finish: its metrics are out of date, and evaluate refuses to measure it
    stages = json.load(open(os.path.join(out, "stages.json")))
    stages["student"]["fingerprint"] = "unfinished"
    json.dump(stages, open(os.path.join(out, "stages.json"), "w"))
    for command, why in (("report", "measured earlier versions of student"),
                         ("evaluate", "a run that started making it again stopped before it finished"),
                         ("export", "finish the run first (export needs it)"),
                         ("compress", "finish the run first (compress needs it)"),
                         ("bench", "finish the run first (bench needs it)")):
        capsys.readouterr()
        assert main([command, out] + (["--format", "safetensors"] if command == "export" else [])) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    from distill.compress.bench import is_stale
    assert is_stale({"model": "student", "fingerprint": "unfinished"}, {"student": "unfinished"})


def test_same_seed_same_weights_and_other_seed_differs(tmp_path):
    def weights(seed, name):
        out = str(tmp_path / f"s{seed}_{name}")
        run(Recipe.load("digits", ["train.epochs=2", "teacher.train.epochs=5", f"train.seed={seed}"]), out=out,
            echo=quiet)
        return load_file(os.path.join(out, "student.safetensors"))
    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not all(np.array_equal(a[k].numpy(), c[k].numpy()) for k in a)


def test_binary_task_reports_auc_sensitivity_specificity(tmp_path):
    m = run(Recipe.load("breast_cancer", ["train.epochs=5"]), out=str(tmp_path), echo=quiet)
    for model in ("teacher", "student", "student_scratch"):
        assert {"auc", "sensitivity", "specificity"} <= set(m[model])
        assert 0.8 < m[model]["auc"] <= 1.0


def test_feature_distillation_with_layer_lists_and_projector_not_exported(tmp_path):
    messages = []
    m = run(Recipe.load("digits_layers", ["train.epochs=3"]), out=str(tmp_path), echo=messages.append)
    assert m["student"]["accuracy"] > 0.5
    rec = Recipe.load("digits_layers")
    assert rec["distill"]["features"], "the recipe should exercise feature distillation"
    state = load_file(os.path.join(tmp_path, "student.safetensors"))
    scratch = load_file(os.path.join(tmp_path, "student_scratch.safetensors"))
    assert set(state) == set(scratch)  # the projector's weights stayed behind
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert any("loss_feat0_mse" in r for r in log if r.get("model") == "student")


def test_bf16_autocast_trains(tmp_path):
    """bf16 really is used: the same seed in fp32 gives other weights (runs are deterministic otherwise, see
    test_same_seed_same_weights_and_other_seed_differs), and bf16 still trains a finite, useful student."""
    import torch
    seen = {}

    def fit(precision):
        out = str(tmp_path / precision)
        dtypes = seen.setdefault(precision, set())
        forward = torch.nn.Linear.forward

        def spy(self, x):  # every Linear output's dtype, training and evaluation alike
            y = forward(self, x)
            dtypes.add(y.dtype)
            return y
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.Linear, "forward", spy)
            m = run(Recipe.load("digits", ["train.epochs=3", "teacher.train.epochs=5",
                                           f"train.precision={precision}"]), out=out, echo=quiet)
        return m, load_file(os.path.join(out, "student.safetensors"))
    (m16, w16), (m32, w32) = fit("bf16"), fit("fp32")
    assert torch.bfloat16 in seen["bf16"] and seen["fp32"] == {torch.float32}  # autocast ran, only for bf16
    assert set(w16) == set(w32)
    for w in (w16, w32):
        assert all(t.dtype == w32[k].dtype and bool(t.isfinite().all()) for k, t in w.items())
    assert not all(np.array_equal(w16[k].numpy(), w32[k].numpy()) for k in w32)  # bf16 rounding changed them
    assert m16["student"]["accuracy"] > 0.5 and m32["student"]["accuracy"] > 0.5


def test_online_teacher_with_augmentation_on_npz_images(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(80) % 4
    x = (rng.random((80, 12, 12, 3)) * 60).astype(np.uint8)
    x[np.arange(80), y * 3, :, :] = 255  # a learnable signal: a bright row per class
    yt = np.arange(20) % 4
    xt = (rng.random((20, 12, 12, 3)) * 60).astype(np.uint8)
    xt[np.arange(20), yt * 3, :, :] = 255
    path = tmp_path / "imgs.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    recipe = Recipe.from_dict({
        "data": {"dataset": "npz", "path": str(path), "val_fraction": 0.2, "batch_size": 16,
                 "transforms": {"random_crop": 1, "hflip": True}},
        "teacher": {"model": "seed_cnn_teacher"}, "student": {"model": "seed_cnn_student"},
        "distill": {"features": [{"teacher": "body.3", "student": "body.3", "loss": "cosine"}]},
        "train": {"epochs": 2}})
    messages = []
    m = run(recipe, out=str(tmp_path / "run"), echo=messages.append)
    assert any("teacher run online" in msg for msg in messages)
    assert set(m) == {"teacher", "student", "student_scratch"}


def test_teacher_alone_trains_on_augmented_views(tmp_path, monkeypatch):
    """`teacher.augment`: the teacher trains on shifted images, the students on the images as they are (so the
    distilled student reads the soft-label cache); only the teacher's weights and fingerprint change."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    base = ["train.epochs=2", "teacher.train.epochs=2", "monitor=off"]
    weights = {}
    for name, extra in (("plain", ["teacher.augment.random_crop=0"]), ("shifted", ["teacher.augment.random_crop=1"])):
        messages = []
        run(Recipe.load("digits", base + extra), out=str(tmp_path / name), echo=messages.append)
        assert any("teacher outputs from the soft-label cache" in m for m in messages), name
        weights[name] = {role: load_file(str(tmp_path / name / f"{role}.safetensors"))
                         for role in ("teacher", "student_scratch")}
        stages = json.load(open(tmp_path / name / "stages.json"))
        weights[name]["fingerprints"] = {k: stages[k]["fingerprint"] for k in ("teacher", "student_scratch")}
    plain, shifted = weights["plain"], weights["shifted"]
    assert any(not (plain["teacher"][k] == shifted["teacher"][k]).all() for k in plain["teacher"])
    assert all((plain["student_scratch"][k] == shifted["student_scratch"][k]).all() for k in plain["student_scratch"])
    assert plain["fingerprints"]["teacher"] != shifted["fingerprints"]["teacher"]
    assert plain["fingerprints"]["student_scratch"] == shifted["fingerprints"]["student_scratch"]


def test_checkpoint_teacher_is_loaded_not_retrained(digits_run, tmp_path):
    out, metrics, _ = digits_run
    messages = []
    m = run(Recipe.load("digits", ["train.epochs=2", f"teacher.checkpoint={out}/teacher.safetensors"]),
            out=str(tmp_path), echo=messages.append)
    assert any("teacher: loaded from" in msg for msg in messages)
    assert m["teacher"]["accuracy"] == metrics["teacher"]["accuracy"]


def test_checkpoint_teacher_of_another_split_or_raw_inputs_is_refused(digits_run, tmp_path):
    """Another split of the same data: its statistics are close, and the teacher loaded silently, trained on
    most of this test split (0.989 on it, against 0.975 on its own)."""
    from distill.errors import UserError
    from distill.pipeline.artifacts import build_role
    out, _, _ = digits_run
    ck = f"teacher.checkpoint={out}/teacher.safetensors"
    for split in ("data.split_seed=3", "data.test_fraction=0.3"):
        with pytest.raises(UserError, match=r"trained on another split of this data \(data.split_seed or "
                                            r"test_fraction differ\), so rows of this test split may be rows it "
                                            r"trained on"):
            build_role(RunDir(Recipe.load("digits", [ck, split]), str(tmp_path), quiet), "teacher")
    # the same test rows under another validation or label fraction: loaded
    for same_test in ("data.val_fraction=0.2", "data.label_fraction=0.5"):
        build_role(RunDir(Recipe.load("digits", [ck, same_test]), str(tmp_path), quiet), "teacher")
    with pytest.raises(UserError, match="trained on normalised inputs, and data.transforms.normalize is false here; "
                                        "set it to true"):
        build_role(RunDir(Recipe.load("digits", [ck, "data.transforms.normalize=false"]), str(tmp_path), quiet),
                   "teacher")
    # weights of the same shapes under another architecture (here its dropout; ReLU for Tanh alike) loaded silently
    with pytest.raises(UserError, match="holds a model of another architecture .* leave teacher.model, args and arch "
                                        "out to load it as it was saved"):
        build_role(RunDir(Recipe.load("digits", [ck, "teacher.args.dropout=0.1"]), str(tmp_path), quiet), "teacher")


def test_multi_seed_summary_has_mean_and_std(tmp_path, capsys):
    s = run_seeds(Recipe.load("digits", ["train.epochs=2", "teacher.train.epochs=5"]), [0, 1], out=str(tmp_path), echo=quiet)
    assert s["seeds"] == [0, 1]
    acc = s["student"]["accuracy"]
    assert set(acc) == {"mean", "std"} and 0 < acc["mean"] <= 1
    from distill.evaluate import format_table, mean_std
    assert acc["std"] == pytest.approx(np.std([json.load(open(tmp_path / f"seed_{i}" / "metrics.json"))["student"][
        "accuracy"] for i in (0, 1)], ddof=1))  # (the sample std)
    one = mean_std([0.5])  # (one seed has no spread to show: not ± 0)
    assert one == {"mean": 0.5, "std": None} and "±" not in format_table({"student": {"accuracy": one}})
    assert os.path.isfile(tmp_path / "seed_1" / "metrics.json") and os.path.isfile(tmp_path / "summary.json")
    from distill.cli import main  # the seeds' folder is not a run: the commands on it say which to give
    for command in (["report", str(tmp_path)], ["run", str(tmp_path), "--resume"]):
        assert main(command) == 2
        assert f"it holds the runs of --seeds (2): give one, e.g. {tmp_path / 'seed_0'}" in capsys.readouterr().err


def test_the_resume_hint_of_a_seeds_run_is_the_command_as_given():
    from distill.cli import _resume_hint, build_parser
    args = build_parser().parse_args(["run", "breast_cancer", "--set", "train.epochs=1", "--set", "x.y=a b",
                                      "--seeds", "2", "--out", "sd"])
    assert _resume_hint(args, "sd")[1] == ("distill run breast_cancer --set train.epochs=1 --set 'x.y=a b' "
                                           "--seeds 2 --out sd --resume")


def test_evaluate_stage_alone_on_a_run_folder(digits_run):
    out, metrics, _ = digits_run
    rd = RunDir(Recipe.load(os.path.join(out, "recipe.yaml")), out, quiet)
    again = evaluate(rd)
    assert again["student"]["accuracy"] == metrics["student"]["accuracy"]


def test_checkpoint_with_another_class_list_is_refused(digits_run, tmp_path):
    from distill.errors import UserError
    out, _, _ = digits_run
    with pytest.raises(UserError, match="classes|architecture"):
        run(Recipe.load("breast_cancer", ["train.epochs=1", f"teacher.checkpoint={out}/teacher.safetensors"]),
            out=str(tmp_path), echo=quiet)


def test_csv_dataset_runs_end_to_end(tmp_path):
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    lines = [",".join(list(d.feature_names) + ["label"])]
    lines += [",".join([f"{v:.6g}" for v in x] + [d.target_names[t]]) for x, t in zip(d.data, d.target)]
    (tmp_path / "bc.csv").write_text("\n".join(lines) + "\n")
    m = run(Recipe.load("breast_cancer", ["data.dataset=csv", f"data.path={tmp_path / 'bc.csv'}", "train.epochs=5"]),
            out=str(tmp_path / "run"), echo=quiet)
    assert m["student"]["accuracy"] > 0.8 and "auc" in m["student"]


def test_a_longer_timeout_retrains_nothing(tmp_path):
    """train.timeout_s (how long a collective may wait) leaves every model as it is; it was in the stages'
    fingerprints, so raising it retrained every model and refused --resume of a stopped one."""
    sets = ["train.epochs=2", "teacher.train.epochs=2", "data.train_subset=300", "monitor=off"]
    out = str(tmp_path / "r")
    run(Recipe.load("digits", sets), out, echo=quiet)
    before = json.load(open(os.path.join(out, "stages.json")))
    run(Recipe.load("digits", sets + ["train.timeout_s=600"]), out, echo=quiet)
    after = json.load(open(os.path.join(out, "stages.json")))
    for stage in ("teacher", "student_scratch", "student"):
        assert after[stage]["fingerprint"] == before[stage]["fingerprint"], stage
        assert after[stage]["train_time_s"] == before[stage]["train_time_s"], stage  # (reused, not retrained)


def test_evaluate_with_other_measuring_settings_keeps_the_folder_whole(tmp_path, capsys):
    """evaluate --set evaluate.X --overwrite rewrote recipe.yaml and left the stage records of the old recipe:
    the next plain evaluate was refused as if a rerun had stopped. A change the models would need training
    for is refused (it made recipe.yaml describe models the folder does not hold)."""
    from distill.cli import main
    from test_bad_inputs import files
    out = str(tmp_path / "r")
    run(Recipe.load("digits", ["train.epochs=2", "teacher.train.epochs=2", "data.train_subset=300"]), out,
        echo=quiet)
    assert main(["evaluate", out, "--set", "evaluate.latency_runs=3", "--set", "description=the same",
                 "--overwrite"]) == 0
    assert main(["evaluate", out]) == 0
    before = files(out)
    capsys.readouterr()
    assert main(["evaluate", out, "--set", "student.train.epochs=5", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "student.train.epochs: distill evaluate trains nothing, and the folder's models were trained without " \
           f"this change; give it to distill run {out} --overwrite" in err, err
    assert files(out) == before
    # another recipe named for the folder: the command that would apply it names that recipe
    assert main(["evaluate", "digits_all_labels", "--out", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "give it to distill run " in err and f"digits_all_labels.yaml --out {out} --overwrite" in err, err
    assert files(out) == before


def test_the_api_stage_functions_check_and_cache_as_their_commands_do(tmp_path, monkeypatch):
    """train_student skipped the checks `distill train-student` makes (cached soft labels for shifted views
    trained); soft_labels computed the teacher's outputs on the labelled rows alone, and recorded that entry
    as the one the student used. A student that runs the teacher online has none to cache."""
    from distill import soft_labels
    from distill.errors import UserError
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    fast = ["teacher.train.epochs=1", "train.epochs=1", "data.train_subset=400"]
    rd = RunDir(Recipe.load("digits", fast), str(tmp_path / "r"), quiet)
    import random
    import torch
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    teacher = train_teacher(rd)  # (the caller's RNGs are left as they were: they were reseeded, and a random
    assert not teacher.training  # (digits' teacher has dropout: left in training mode, its outputs were random)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())  # search around the API drew one point)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())
    outputs = soft_labels(rd, teacher)
    assert len(outputs.logits) == len(rd.data.y_train) + len(rd.data.x_unlabelled) > 4 * len(rd.data.y_train)
    used = json.load(open(rd.path("soft_labels.json")))["cache_key"]
    train_student(rd, teacher)
    assert json.load(open(rd.path("soft_labels.json")))["cache_key"] == used
    shifted = RunDir(Recipe.load("digits", [*fast, "distill.teacher_outputs=cached", "student.augment.random_crop=1"]),
                     str(tmp_path / "r"), quiet, overwrite=True)
    with pytest.raises(UserError, match="cached soft labels are the teacher's on the training inputs as they are"):
        train_student(shifted, teacher)
    online = RunDir(Recipe.load("digits", [*fast, "student.augment.random_crop=1"]), str(tmp_path / "o"), quiet)
    assert soft_labels(online, teacher) is None and not os.path.exists(online.path("soft_labels.json"))


@pytest.mark.parametrize("teacher, message", [
    ("abc", "teacher: expected a torch.nn.Module, got str"),
    (torch.nn.Linear(3, 10), r"teacher: the model given does not take this data's inputs of shape \(1, 8, 8\) "
                             r"\(RuntimeError: mat1 and mat2"),
    (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)),
     r"teacher: the model given outputs \(2, 5\) for 2 samples; this data has 10 classes")],
    ids=["not a module", "other inputs", "other classes"])
def test_a_teacher_given_to_the_api_is_checked_before_anything_is_written(tmp_path, teacher, message):
    """soft_labels cached a 5-class teacher's outputs for 10-class data; train_student trained the baseline,
    then failed with a bare IndexError or RuntimeError, leaving a half-made folder."""
    from distill import soft_labels
    from distill.errors import UserError
    for stage in (soft_labels, train_student):
        rd = RunDir(Recipe.load("digits", ["train.epochs=1"]), str(tmp_path / stage.__name__), quiet)
        with pytest.raises(UserError, match=message):
            stage(rd, teacher)
        assert not os.path.exists(rd.out) and not os.path.exists(tmp_path / "cache")


def test_a_soft_label_entry_is_of_one_batch_size(tmp_path, monkeypatch):
    """On the CPU a teacher's outputs differ in their last bits with the batch size (data.eval_batch_size), and
    the entry one run computed was served to a run of another: the student's bits hung on which ran first."""
    from distill import soft_labels
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    fast = ["teacher.train.epochs=1", "train.epochs=1", "data.train_subset=400"]
    rd = RunDir(Recipe.load("digits", fast), str(tmp_path / "r"), quiet)
    teacher = train_teacher(rd)
    keys = []
    for batch in (512, 7):
        rd = RunDir(Recipe.load("digits", [*fast, f"data.eval_batch_size={batch}"]), str(tmp_path / "r"), quiet,
                    overwrite=True)
        soft_labels(rd, teacher)
        keys.append(json.load(open(rd.path("soft_labels.json")))["cache_key"])
    assert keys[0] != keys[1] and len(os.listdir(tmp_path / "cache")) == 2


def test_a_metric_one_seed_leaves_undefined_is_left_out_of_its_mean():
    """(a NaN AUC of one seed made the mean and std over every seed NaN)"""
    from distill.pipeline.plan import summarise_seeds
    summary = summarise_seeds({0: {"student": {"accuracy": 0.9, "auc": 0.8, "fingerprint": "a"}},
                               1: {"student": {"accuracy": 0.8, "auc": None, "fingerprint": "b"}},
                               2: {"student": {"accuracy": 0.7, "auc": 0.6, "fingerprint": "c"}}})
    assert summary["student"]["accuracy"] == pytest.approx({"mean": 0.8, "std": 0.1})
    assert summary["student"]["auc"] == pytest.approx({"mean": 0.7, "std": 2 ** 0.5 / 10, "seeds": 2})
    assert "fingerprint" not in summary["student"] and summary["seeds"] == [0, 1, 2]
