"""Export: ONNX checked in ONNX Runtime (dynamic batch, and sequence length for text), TorchScript, safetensors;
each written only after its outputs match PyTorch, and user mistakes as one line with exit code 2."""
import json
import os

import numpy as np
import pytest
import torch

from distill import Recipe, run
from distill.cli import main
from distill.compress.export import export_model, signature
from distill.data import load_data
from distill.errors import UserError
from distill.io import load_meta, load_weights
from distill.pipeline.artifacts import load_model_at

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exp") / "run")
    run(Recipe.load("digits", ["train.epochs=1", "teacher.train.epochs=1"]), out, echo=lambda m: None)
    return out


def raw_and_normalised(run_dir, n=37):
    """The run's test inputs un-normalised, loaded independently of the export (the same recipe with
    data.transforms.normalize off: the split comes before normalisation), and as the pipeline feeds them."""
    recipe = os.path.join(run_dir, "recipe.yaml")
    raw = load_data(Recipe.load(recipe, ["data.transforms.normalize=false"]).cfg["data"])
    data = load_data(Recipe.load(recipe).cfg["data"])
    assert not raw.stats and data.stats
    return raw.x_test[:n], data.x_test[:n]  # another batch size than the export's example


def run_exported(fmt, path, x):
    if fmt == "onnx":
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(path)(x)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_cnn_export_matches_pytorch(digits_run, fmt, capsys):
    assert main(["export", digits_run, "--format", fmt]) == 0
    printed = capsys.readouterr().out
    assert "outputs match PyTorch" in printed
    info = json.load(open(os.path.join(digits_run, "export", "exports.json")))[f"student.{fmt}"]
    assert info["max_abs_diff"] <= info["tolerance"] and os.path.getsize(info["path"]) == info["size_bytes"]
    # (which version of the student: stages.json's fingerprint changes when it is trained again)
    assert info["fingerprint"] == json.load(open(os.path.join(digits_run, "stages.json")))["student"]["fingerprint"]
    student = load_model_at(os.path.join(digits_run, "student.safetensors"), "student").eval()
    raw, x = raw_and_normalised(digits_run)
    with torch.no_grad():
        want = student(x)
    if fmt == "safetensors":  # weights only: fed normalised inputs; the statistics stay in its metadata
        assert info["preprocessing"] == "none" and "weights only" in printed
        assert load_meta(info["path"])["preprocessing"] == load_meta(
            os.path.join(digits_run, "student.safetensors"))["preprocessing"]
        fresh = load_model_at(os.path.join(digits_run, "student.safetensors"), "student")
        load_weights(fresh, info["path"], "export")
        with torch.no_grad():
            got = fresh.eval()(x)
    else:  # the normalisation is baked in: RAW pixels in, the pipeline's logits out
        assert info["preprocessing"] == "baked" and "takes raw inputs (normalisation baked in)" in printed
        got = run_exported(fmt, info["path"], raw)
        if fmt == "onnx":
            assert {n.op_type for n in __import__("onnx").load(info["path"]).graph.node} >= {"Conv", "Gemm", "Sub", "Div"}
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert torch.allclose(got, want, atol=1e-4)


def test_raw_inputs_are_really_raw(digits_run):
    """The independent raw inputs are sklearn's digits pixels (/16), and the pipeline's are their normalisation."""
    raw, x = raw_and_normalised(digits_run)
    assert raw.min() >= 0 and raw.max() <= 1 and torch.equal(raw * 16, (raw * 16).round())
    norm = load_meta(os.path.join(digits_run, "student.safetensors"))["preprocessing"]["normalize"]
    assert norm["image"] and norm["axis"] == 1 and len(norm["mean"]) == raw.shape[1] == 1
    mean, std = (torch.tensor(norm[k]).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    assert torch.allclose((raw - mean) / std, x, atol=1e-5) and not torch.allclose(raw, x, atol=1e-2)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_no_preprocessing_takes_normalised_inputs(digits_run, fmt, tmp_path, capsys):
    out = str(tmp_path / f"plain.{fmt}")
    assert main(["export", digits_run, "--format", fmt, "--no-preprocessing", "--out", out]) == 0
    assert "takes normalised inputs" in capsys.readouterr().out
    info = json.load(open(os.path.join(digits_run, "export", "exports.json")))[f"student.{fmt}"]
    assert info["preprocessing"] == "none" and info["path"] == out
    student = load_model_at(os.path.join(digits_run, "student.safetensors"), "student").eval()
    raw, x = raw_and_normalised(digits_run)
    with torch.no_grad():
        want = student(x)
    assert torch.allclose(run_exported(fmt, out, x), want, atol=1e-4)
    assert not torch.allclose(run_exported(fmt, out, raw), want, atol=1e-2)  # raw pixels are the wrong input
    if fmt == "onnx":
        assert not {"Sub", "Div"} & {n.op_type for n in __import__("onnx").load(out).graph.node}


def test_run_without_saved_preprocessing_exports_as_before(digits_run, tmp_path, capsys):
    """A model file saved before the statistics were recorded: nothing to bake in, normalised inputs."""
    import shutil
    from safetensors.torch import load_file, save_file
    old = str(tmp_path / "old")
    shutil.copytree(digits_run, old, ignore=shutil.ignore_patterns("export"))
    path = os.path.join(old, "student.safetensors")
    meta = {k: v for k, v in load_meta(path).items() if k != "preprocessing"}
    save_file(load_file(path), path, metadata={"distill": json.dumps(meta)})
    assert main(["export", old, "--format", "onnx"]) == 0
    assert "predates saved normalisation" in capsys.readouterr().out
    info = json.load(open(os.path.join(old, "export", "exports.json")))["student.onnx"]
    assert info["preprocessing"] == "none"
    student = load_model_at(path, "student").eval()
    _, x = raw_and_normalised(old)
    with torch.no_grad():
        assert torch.allclose(run_exported("onnx", info["path"], x), student(x), atol=1e-4)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_a_layer_list_exports_without_preprocessing(tmp_path, fmt):
    """A layer list (`arch:`, as digits_layers) is a bare nn.Sequential, whose forward names its input `input`
    (its safetensors export, or any without baked normalisation, called it with x= and failed)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)).eval()
    info = export_model(model, torch.randn(5, 6), fmt, str(tmp_path / f"m.{fmt}"), {})
    assert info["preprocessing"] == "none" and info["max_abs_diff"] <= info["tolerance"]


def test_a_layer_onnx_cannot_export_is_one_line_and_no_file(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool2d(3),
                                torch.nn.Flatten(), torch.nn.Linear(18, 3)).eval()
    with pytest.raises(UserError, match=r"^--format onnx: the model cannot be exported to ONNX \(Unsupported: "
                                        r"ONNX export of operator adaptive_avg_pool2d.*\); --format torchscript"):
        export_model(model, torch.randn(4, 1, 8, 8), "onnx", str(tmp_path / "m.onnx"), {})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shape", [(6,), (3, 5, 5)], ids=["vector", "image"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_normalisation_is_per_feature_or_per_channel(tmp_path, shape, fmt):
    """(N, D) vectors get D statistics, (N, C, H, W) images C, broadcast the way load_data normalises."""
    torch.manual_seed(0)
    image, dims = len(shape) == 3, shape[0]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(shape)), 4)).eval()
    mean, std = torch.randn(dims) * 3, torch.rand(dims) * 4 + 0.5
    prep = {"normalize": {"mean": mean.tolist(), "std": std.tolist(), "axis": 1, "image": image}}
    raw = torch.randn(9, *shape) * 5 + 2
    path = str(tmp_path / f"m.{fmt}")
    info = export_model(model, raw[:8], fmt, path, {}, prep)
    assert info["preprocessing"] == "baked"
    b = (1, -1, 1, 1) if image else (1, -1)
    with torch.no_grad():
        want = model((raw - mean.reshape(b)) / std.reshape(b))
    assert torch.allclose(run_exported(fmt, path, raw), want, atol=1e-4)
    with pytest.raises(UserError, match="do not fit inputs"):  # statistics for another number of features
        export_model(model, raw[:8], fmt, str(tmp_path / f"bad.{fmt}"), {},
                     {"normalize": {**prep["normalize"], "mean": [0.0] * (dims + 1), "std": [1.0] * (dims + 1)}})
    assert not os.path.exists(tmp_path / f"bad.{fmt}")


def test_text_export_has_dynamic_batch_and_sequence(tmp_path, capsys):
    from textkit import text_recipe
    recipe = text_recipe(str(tmp_path), teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}})
    run(Recipe.from_dict(recipe), echo=lambda m: None)
    out = recipe["output"]["dir"]
    assert main(["export", out, "--format", "onnx"]) == 0
    assert "no normalisation" in capsys.readouterr().out  # token ids: nothing to bake in, signature unchanged
    assert json.load(open(os.path.join(out, "export", "exports.json")))["student.onnx"]["preprocessing"] == "none"
    student = load_model_at(os.path.join(out, "student"), "student").eval()
    data = load_data(Recipe.load(os.path.join(out, "recipe.yaml")).cfg["data"])
    module, inputs, _ = signature(student, data.x_test[10:15])  # other texts, batch and length than the export's
    session = ort.InferenceSession(os.path.join(out, "export", "student.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("input_ids", "tensor(int64)"),
                                                                ("attention_mask", "tensor(int64)")]
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        assert np.allclose(got, student(data.x_test[10:15]).numpy(), atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx"], "not a run folder"),
    (["--format", "onnx", "--model", "teacher"], "missing; run the stage that makes it first"),
])
def test_export_mistakes_are_one_line(tmp_path, capsys, args, message):
    target = tmp_path / "r"
    target.mkdir()
    if "--model" in args:  # a run folder whose teacher was never trained
        (target / "recipe.yaml").write_text("name: x\nteacher: {model: mlp}\nstudent: {model: mlp}\n")
    assert main(["export", str(target), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (target / "export").exists()


def test_onnx_without_the_onnx_package_is_one_line(digits_run, capsys, monkeypatch):
    """The exporter needs the onnx package (the deploy extra): without it, one line naming the extra, exit 2,
    and no file (not torch's traceback from deep inside the exporter)."""
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)  # (an import of it raises ImportError)
    assert main(["export", digits_run, "--format", "onnx", "--out", os.path.join(digits_run, "no.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the onnx package is not installed (pip install -e '.[deploy]')" in err[0], err
    assert not os.path.exists(os.path.join(digits_run, "no.onnx"))


@pytest.mark.parametrize("command,target", [("export", "student.safetensors"), ("export", "."),
                                            ("report", "metrics.json"), ("report", "recipe.yaml"),
                                            ("export", "checkpoints/teacher/new.onnx")])  # (not there yet: written)
def test_out_may_not_replace_what_the_run_made(digits_run, capsys, command, target):
    from test_bad_inputs import files
    before = files(digits_run)
    fmt = ["--format", "onnx"] if command == "export" else []
    assert main([command, digits_run, *fmt, "--out", os.path.join(digits_run, target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part of the run folder" in err[0], err
    assert files(digits_run) == before


def test_an_earlier_export_inside_the_run_folder_may_be_written_again(digits_run, capsys):
    out = os.path.join(digits_run, "student.onnx")  # (an export of the student, not the student)
    try:
        for _ in range(2):
            assert main(["export", digits_run, "--format", "onnx", "--out", out]) == 0
    finally:
        if os.path.exists(out):
            os.remove(out)


def test_a_model_file_replaced_by_another_is_one_line(digits_run, tmp_path, capsys):
    import shutil
    from safetensors.torch import save_file
    copy = str(tmp_path / "run")
    shutil.copytree(digits_run, copy)
    save_file({"w": torch.zeros(2)}, os.path.join(copy, "student.safetensors"))  # (weights, but no architecture)
    assert main(["export", copy, "--format", "safetensors", "--out", str(tmp_path / "s.safetensors")]) == 2
    assert "not a model file that distill saved" in capsys.readouterr().err


def test_out_may_not_replace_the_records_of_a_seeds_or_search_folder(digits_run, tmp_path, capsys):
    """Their tops hold no run of their own (no recipe.yaml), and report and export wrote over summary.json,
    best.yaml or search.png."""
    seeds, search = tmp_path / "seeds", tmp_path / "search"
    (seeds / "seed_0").mkdir(parents=True)
    (search / "trials").mkdir(parents=True)
    for path in (seeds / "summary.json", search / "search.json", search / "best.yaml", search / "search.png"):
        path.write_text("{}")
    for command, target in [("report", seeds / "summary.json"), ("report", search / "best.yaml"),
                            ("export", search / "search.png"), ("export", search / "trials" / "s.onnx"),
                            ("report", seeds / "seed_1")]:
        fmt = ["--format", "onnx"] if command == "export" else []
        assert main([command, digits_run, *fmt, "--out", str(target)]) == 2, target
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "part of the folder of several runs" in err[0], err
    assert (search / "best.yaml").read_text() == "{}" and (seeds / "summary.json").read_text() == "{}"
    for mine in ("mine.html", "seed_0_report.html"):  # (a new name: the user's)
        assert main(["report", digits_run, "--out", str(seeds / mine)]) == 0


def test_hf_format_of_a_classifier_is_one_line_naming_its_model(digits_run, capsys):
    assert main(["export", digits_run, "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student is a 'cnn' model" in err[0] and "export it as onnx" in err[0], err


def test_out_may_not_replace_what_another_run_made(digits_run, tmp_path, capsys):
    """Not this run's folder, but another's: its model, records and recipe are as much a run's own."""
    import shutil
    from test_bad_inputs import files
    other = shutil.copytree(digits_run, str(tmp_path / "other"), ignore=shutil.ignore_patterns("export"))
    before = files(other)
    for command, target in [("export", "student.safetensors"), ("export", "metrics.json"), ("report", "recipe.yaml"),
                            ("export", "."), ("report", "stages.json")]:
        fmt = ["--format", "safetensors"] if command == "export" else []
        assert main([command, digits_run, *fmt, "--out", os.path.join(other, target)]) == 2, target
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"part of the run folder {os.path.realpath(other)}" in err[0], err
    assert files(other) == before
    out = os.path.join(other, "mine.safetensors")  # a new name beside another run's files is the user's to write
    assert main(["export", digits_run, "--format", "safetensors", "--out", out]) == 0 and os.path.isfile(out)
    project = tmp_path / "project"  # a project that keeps its own recipe.yaml is not a run folder
    (project / "export").mkdir(parents=True)
    (project / "recipe.yaml").write_text("name: mine\n")
    for _ in range(2):
        assert main(["report", digits_run, "--out", str(project / "report.html")]) == 0
        assert main(["export", digits_run, "--format", "onnx", "--out", str(project / "export" / "s.onnx")]) == 0


def test_out_that_is_a_device_or_a_link(digits_run, tmp_path, capsys):
    """A device or pipe is refused (the rename would put a plain file in its place: `--out /dev/null` run as
    root replaced it); a symbolic link is written through, the link kept."""
    fifo = str(tmp_path / "pipe.onnx")
    os.mkfifo(fifo)
    assert main(["export", digits_run, "--format", "onnx", "--out", fifo]) == 2
    assert "pipe.onnx: not a regular file" in capsys.readouterr().err
    import stat
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    target, link = tmp_path / "real.onnx", tmp_path / "latest.onnx"
    target.write_bytes(b"old")
    os.symlink(target, link)
    assert main(["export", digits_run, "--format", "onnx", "--out", str(link)]) == 0
    assert os.path.islink(link) and target.read_bytes()[:3] != b"old"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    from distill.io import write_text  # a run's own files are replaced, links too: never written through
    os.symlink(target, tmp_path / "shared.json")
    write_text(str(tmp_path / "shared.json"), "{}")
    assert not os.path.islink(tmp_path / "shared.json") and target.read_bytes()[:3] != b"{}"


def test_out_named_for_another_format_is_one_line(digits_run, tmp_path, capsys):
    for fmt, name in [("torchscript", "m.onnx"), ("safetensors", "m.pt"), ("onnx", "m.safetensors")]:
        assert main(["export", digits_run, "--format", fmt, "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the name of a" in err[0] and f"--format is {fmt}" in err[0], err
    assert not os.listdir(tmp_path)


def test_models_of_an_earlier_recipe_are_not_benched_compressed_or_exported(digits_run, tmp_path, capsys):
    """A stage command that rewrote recipe.yaml (here the teacher, trained again on other settings) leaves the
    students of the earlier recipe: evaluate, report and doctor refused them, but bench measured them and
    recommended one, compress fine-tuned one, and export wrote it."""
    import shutil
    folder = shutil.copytree(digits_run, str(tmp_path / "r"), ignore=shutil.ignore_patterns("bench", "export"))
    assert main(["train-teacher", folder, "--set", "teacher.train.epochs=2", "--overwrite"]) == 0
    capsys.readouterr()
    for argv in (["bench", folder], ["compress", folder, "--set", "compress.steps=[qat]"],
                 ["export", folder, "--format", "safetensors"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "made by a run of another recipe than" in err and "distill run" in err and "\n" not in err, err
    assert not os.path.exists(os.path.join(folder, "bench")) and not os.path.exists(os.path.join(folder, "export"))


def test_an_export_over_another_models_file_replaces_its_entry(digits_run, tmp_path, capsys):
    """The teacher exported to x.onnx, then the student to the same file: exports.json kept the teacher's
    entry (its size and fingerprint) for a file that was now the student's."""
    out = str(tmp_path / "x.onnx")
    assert main(["export", digits_run, "--model", "teacher", "--format", "onnx", "--out", out]) == 0
    assert json.load(open(os.path.join(digits_run, "export", "exports.json")))["teacher.onnx"]["path"] == out
    assert main(["export", digits_run, "--model", "student", "--format", "onnx", "--out", out]) == 0
    exports = json.load(open(os.path.join(digits_run, "export", "exports.json")))
    assert "teacher.onnx" not in exports and exports["student.onnx"]["size_bytes"] == os.path.getsize(out)


def test_a_relative_out_is_recorded_as_the_file_it_named(digits_run, tmp_path, capsys, monkeypatch):
    """rel.onnx from two directories is two files: the second export kept the first's entry (it dropped it when
    the record's relative path was read from where the second ran)."""
    record = os.path.join(digits_run, "export", "exports.json")
    for where, model in (("a", "teacher"), ("b", "student")):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        assert main(["export", digits_run, "--model", model, "--format", "onnx", "--out", "rel.onnx"]) == 0
    exports = json.load(open(record))
    assert exports["teacher.onnx"]["path"] == str(tmp_path / "a" / "rel.onnx")
    assert exports["student.onnx"]["path"] == str(tmp_path / "b" / "rel.onnx")
    before = open(record).read()
    assert main(["export", digits_run, "--format", "onnx", "--out", record]) == 2  # (the record itself)
    assert "the record of the run's exports" in capsys.readouterr().err and open(record).read() == before
