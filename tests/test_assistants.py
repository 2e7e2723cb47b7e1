"""Teacher-assistant chains: teacher -> assistant(s) -> student in one run, stage reuse, chain.json, the
`auto` assistant's size, and bad `distill.assistants` specs (exit 2, one line, nothing written)."""
import json
import os

import pytest

from distill import Recipe, run
from distill.chain import interpolate
from distill.cli import main
from distill.evaluate import format_table
from distill.models import build_model, count_params

# a small teacher (13.7k parameters) and a conv8-fc32 student (4.5k), on 400 training images, 2 epochs
TINY = ["train.epochs=2", "teacher.train.epochs=2", "monitor.gradients=false", "data.train_subset=400",
        "teacher.args={channels: [16, 32], hidden: 64}", "student.args={channels: [8], hidden: 32}"]
EXPLICIT = "distill.assistants=[{model: cnn, args: {channels: [8], hidden: 64}}]"


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("chain"))
    with pytest.MonkeyPatch.context() as mp:  # restored at teardown: later modules see the old value
        mp.setenv("DISTILL_CACHE", str(tmp_path_factory.mktemp("cache")))
        metrics = run(Recipe.load("digits", [*TINY, EXPLICIT]), out=out, echo=lambda m: None)
        yield out, metrics


def test_explicit_assistant_chain_writes_every_generation(chain_run):
    out, metrics = chain_run
    assert os.path.isfile(os.path.join(out, "assistant_1.safetensors"))
    stages = set(json.load(open(os.path.join(out, "stages.json"))))
    assert {"teacher", "assistant_1", "student_scratch", "student"} <= stages
    assert set(metrics) == {"teacher", "assistant_1", "student_scratch", "student"}
    assert metrics["student"]["params"] < metrics["assistant_1"]["params"] < metrics["teacher"]["params"]
    chain = json.load(open(os.path.join(out, "chain.json")))
    gens = chain["generations"]
    assert [g["name"] for g in gens] == ["teacher", "assistant_1", "student"]
    assert gens[0]["retention_cka"] == 1.0 and all(g["retention_cka"] <= 1 for g in gens)
    for g in gens:  # the same numbers as metrics.json
        assert g["test_accuracy"] == metrics[g["name"]]["accuracy"] and g["params"] == metrics[g["name"]]["params"]
    for d, a, b in zip(chain["decay"], gens, gens[1:]):
        assert (d["from"], d["to"]) == (a["name"], b["name"])
        assert d["accuracy_drop"] == pytest.approx((a["test_accuracy"] - b["test_accuracy"]) * 100, abs=1e-3)
        assert d["decay_rate"] == pytest.approx((a["test_accuracy"] - b["test_accuracy"]) / a["test_accuracy"],
                                                abs=1e-5)
        assert d["retention_drop"] == pytest.approx(a["retention_cka"] - b["retention_cka"], abs=1e-5)
    lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in lines if r.get("model") == "assistant_1" and "val_accuracy" in r] == [1, 2]
    assert sum(1 for r in lines if "chain_generation" in r) == 3
    assert "assistant 1 (distilled)" in format_table(metrics)


def test_second_run_reuses_every_stage(chain_run):
    out, metrics = chain_run
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in
              ("teacher.safetensors", "assistant_1.safetensors", "student.safetensors")}
    messages = []
    again = run(Recipe.load("digits", [*TINY, EXPLICIT]), out=out, echo=messages.append)
    for name in ("teacher", "assistant_1", "student_scratch", "student"):
        assert any(m.startswith(f"{name}: inputs unchanged") for m in messages), (name, messages)
        assert again[name]["accuracy"] == metrics[name]["accuracy"]
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in before}


def test_auto_assistant_runs_end_to_end(tmp_path):
    metrics = run(Recipe.load("digits", [*TINY, "distill.assistants=auto"]), out=str(tmp_path), echo=lambda m: None)
    assert metrics["student"]["params"] < metrics["assistant_1"]["params"] < metrics["teacher"]["params"]
    assert json.load(open(tmp_path / "chain.json"))["decay"][1]["to"] == "student"


@pytest.mark.parametrize("teacher, student, shape", [
    ({"model": "cnn", "args": {"channels": [32, 64], "hidden": 256, "dropout": 0.3}},
     {"model": "cnn", "args": {"channels": [8], "hidden": 32}}, (1, 8, 8)),
    ({"model": "seed_cnn_teacher"}, {"model": "seed_cnn_student"}, (1, 28, 28)),
    ({"model": "mlp", "args": {"hidden": [256, 128]}}, {"model": "mlp", "args": {"hidden": [16]}}, (64,)),
    ({"arch": ["Conv2d(1, 32, kernel_size=3, padding=1)", "ReLU()", "MaxPool2d(2)", "Flatten()", "Linear(512, 64)",
               "ReLU()", "Linear(64, 10)"]},
     {"arch": ["Conv2d(1, 4, kernel_size=3, padding=1)", "ReLU()", "MaxPool2d(2)", "Flatten()", "Linear(64, 8)",
               "ReLU()", "Linear(8, 10)"]}, (1, 8, 8)),
])
def test_auto_sizes_lie_strictly_between(teacher, student, shape):
    spec = interpolate(teacher, student, shape)
    sizes = [count_params(build_model(s, shape, 10)) for s in (student, spec, teacher)]
    assert sizes[0] < sizes[1] < sizes[2], sizes


def test_auto_keeps_a_layernorm_over_channels_and_pixels():
    """LayerNorm([32, 8, 8]) normalises each sample over C x H x W: the assistant got LayerNorm(8), over the
    width alone, another layer than the teacher's and the student's."""
    arch = ["Conv2d(1, {c}, 3, padding=1)", "LayerNorm([{c}, 8, 8])", "ReLU()", "Flatten()", "Linear({f}, 10)"]
    teacher, student = ({"arch": [a.format(c=c, f=c * 64) for a in arch]} for c in (32, 8))
    spec = interpolate(teacher, student, (1, 8, 8))
    assert spec["arch"][1] == "LayerNorm([16, 8, 8])", spec["arch"]
    assert count_params(build_model(student, (1, 8, 8), 10)) < count_params(build_model(spec, (1, 8, 8), 10))


GOOD = ("name: t\ndata: {dataset: digits, as_image: true}\nteacher: {model: cnn, args: {channels: [4], hidden: 8}}\n"
        "student: {model: cnn, args: {channels: [2], hidden: 4}}\ntrain: {epochs: 1}\n")


@pytest.mark.parametrize("assistants, message", [
    ("bogus", "distill.assistants: 'bogus' is not auto or a list of models"),
    ("[3]", "distill.assistants[0]: expected a mapping of keys, got int"),
    ("[{model: cnn, widht: 3}]", "distill.assistants[0].widht: unknown key"),
    ("[{args: {hidden: 4}}]", "distill.assistants[0]: give one of `model: NAME` (with args) or `arch: [layers]`"),
    ("[{model: cnn, arch: ['Flatten()']}]", "distill.assistants[0]: give one of"),
    ("[{model: cnnn}]", "distill.assistants[0].model: unknown model 'cnnn'"),
    ("[{model: cnn, args: {widths: 3}}]", "distill.assistants[0].args:"),
    ("[{model: cnn}, {arch: ['Flatten()', 'Linear(63, 10)']}]", "distill.assistants[1].arch[1]"),
])
def test_bad_assistants(assistants, message, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD + f"distill: {{assistants: {assistants}}}\n")
    code = main(["run", str(recipe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_auto_refuses_models_it_cannot_interpolate(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD.replace("student: {model: cnn, args: {channels: [2], hidden: 4}}",
                                   "student: {model: mlp, args: {hidden: [8]}}") + "distill: {assistants: auto}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "distill.assistants: auto needs teacher and student of one model family, got cnn and mlp; list the " \
           "assistant explicitly" in err, err


def test_text_chains_are_refused():
    with pytest.raises(Exception, match="distill.assistants: teacher-assistant chains are not supported for "
                                        "transformers"):
        Recipe.from_dict({"data": {"dataset": "text", "path": "x.csv"}, "teacher": {"hf": "t"},
                          "student": {"hf_config": {"layers": 1, "hidden": 8, "heads": 1, "intermediate": 8}},
                          "distill": {"assistants": "auto"}})


def test_a_chain_whose_metrics_leave_out_accuracy_still_measures_its_decay(chain_run, tmp_path):
    """evaluate.metrics without accuracy: the chain measures the test accuracy itself (it crashed after the
    whole run), the same as evaluate's."""
    import shutil
    out, metrics = chain_run
    shutil.copytree(out, tmp_path / "run")
    again = run(Recipe.load("digits", [*TINY, EXPLICIT, "evaluate.metrics=[macro_f1]"]), out=str(tmp_path / "run"),
                echo=lambda m: None, overwrite=True)
    assert "accuracy" not in again["student"] and again["student"]["macro_f1"] == metrics["student"]["macro_f1"]
    gens = json.load(open(tmp_path / "run" / "chain.json"))["generations"]
    assert [g["test_accuracy"] for g in gens] == [metrics[g["name"]]["accuracy"] for g in gens]


def test_an_explicit_chain_that_does_not_shrink_is_said(tmp_path):
    """An assistant 25 times the teacher's size ran with no word; `auto` is refused outside the gap."""
    from distill import RunDir
    from distill.pipeline.plan import preflight
    said = []
    big = "distill.assistants=[{model: cnn, args: {channels: [32, 64], hidden: 256}}]"
    preflight(RunDir(Recipe.load("digits", [*TINY, big]), str(tmp_path / "big"), said.append))
    [warning] = [m for m in said if m.startswith("warning: distill.assistants")]
    assert "not each smaller than the one before it" in warning and not os.path.exists(tmp_path / "big")
    said.clear()
    preflight(RunDir(Recipe.load("digits", [*TINY, EXPLICIT]), str(tmp_path / "ok"), said.append))
    assert not [m for m in said if "distill.assistants" in m]
    self_kd = "student.args={channels: [16, 32], hidden: 64}"  # (no chain: a student the teacher's size is KD)
    preflight(RunDir(Recipe.load("digits", [*TINY, self_kd]), str(tmp_path / "self"), said.append))
    assert not [m for m in said if "distill.assistants" in m]
