"""Export: ONNX checked in ONNX Runtime (dynamic batch, and sequence length for text), TorchScript, safetensors;
each written only after its outputs match PyTorch, and user mistakes as one line with exit code 2."""
import json
import os

import numpy as np
import pytest
import torch

from distill import Recipe, run
from distill.cli import main
from distill.compress.export import signature
from distill.data import load_data
from distill.io import load_weights
from distill.runner import load_model_at

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exp") / "run")
    run(Recipe.load("digits", ["train.epochs=1", "teacher.train.epochs=1"]), out, echo=lambda m: None)
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_cnn_export_matches_pytorch(digits_run, fmt, capsys):
    assert main(["export", digits_run, "--format", fmt]) == 0
    assert "outputs match PyTorch" in capsys.readouterr().out
    info = json.load(open(os.path.join(digits_run, "export", "exports.json")))[f"student.{fmt}"]
    assert info["max_abs_diff"] <= info["tolerance"] and os.path.getsize(info["path"]) == info["size_bytes"]
    student = load_model_at(os.path.join(digits_run, "student.safetensors"), "student").eval()
    recipe = Recipe.load(os.path.join(digits_run, "recipe.yaml"))
    x = load_data(recipe.cfg["data"]).x_test[:37]  # another batch size than the export's example
    with torch.no_grad():
        want = student(x)
    if fmt == "onnx":
        session = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert {n.op_type for n in __import__("onnx").load(info["path"]).graph.node} >= {"Conv", "Gemm"}
    elif fmt == "torchscript":
        got = torch.jit.load(info["path"])(x)
    else:
        fresh = load_model_at(os.path.join(digits_run, "student.safetensors"), "student")
        load_weights(fresh, info["path"], "export")
        got = fresh.eval()(x)
    assert torch.allclose(got, want, atol=1e-4)


def test_text_export_has_dynamic_batch_and_sequence(tmp_path):
    from textkit import text_recipe
    recipe = text_recipe(str(tmp_path), teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}})
    run(Recipe.from_dict(recipe), echo=lambda m: None)
    out = recipe["output"]["dir"]
    assert main(["export", out, "--format", "onnx"]) == 0
    student = load_model_at(os.path.join(out, "student"), "student").eval()
    data = load_data(Recipe.load(os.path.join(out, "recipe.yaml")).cfg["data"])
    module, inputs, _ = signature(student, data.x_test[10:15])  # other texts, batch and length than the export's
    session = ort.InferenceSession(os.path.join(out, "export", "student.onnx"), providers=["CPUExecutionProvider"])
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
