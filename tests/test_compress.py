"""Compression: pruned models really are smaller and give the same output shape, removed units are the
least important ones, layer reduction leaves a loadable model at every step, QAT simulates what dynamic
int8 stores, int8 is really int8 (modules and ONNX nodes), and `distill bench` fills every column."""
import json
import os
import sys

import pytest
import torch
from torch import nn

from distill import Recipe, run
from distill.cli import main
from distill.compress import layers as layer_drop
from distill.compress.bench import pareto
from distill.compress.prune import head_importance, keep_top, prune_channels, prune_ffn, prune_heads
from distill.compress.quantize import dynamic_int8, finish_qat, int8_linear_count, prepare_qat, static_int8
from distill.compress.structure import RemappedEmbedding, fit_to_shapes
from distill.errors import UserError
from distill.models import build_model, count_params
from distill.pipeline.artifacts import load_model_at

QUIET = {"echo": lambda m: None}


# ---------------------------------------------------------------- transformers

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from textkit import tiny_bert  # skips without transformers

    from distill.models.hf import load_classifier
    folder = tiny_bert(str(tmp_path_factory.mktemp("bert") / "b"))
    return folder, load_classifier(folder, ["a", "b"], "t").eval()


def _ids(n=6, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1000, 3000, (n, length), generator=g)
    x[:, 0], x[:, -1] = 101, 102
    return x


@pytest.mark.parametrize("importance", ["l1", "gradient"])
def test_head_pruning_removes_parameters_and_keeps_the_output_shape(bert, importance, tmp_path):
    from distill.models.hf import load_folder, save_folder
    folder, model = bert
    x, y = _ids(), torch.tensor([0, 1, 0, 1, 0, 1])
    scores = head_importance(model, importance, x, y)
    pruned = prune_heads(model, 0.6, scores).eval()
    # 4 layers x 4 heads, keep 60%: 10 heads; each removed head takes 4 projections' worth of 8 columns
    assert sum(len(k) for k in keep_top(scores, 0.6)) == 10
    att = [layer.attention.self for layer in pruned.hf.bert.encoder.layer]
    assert sum(a.num_attention_heads for a in att) == 10
    assert all(a.query.out_features == a.num_attention_heads * 8 for a in att)
    assert count_params(model) - count_params(pruned) == 6 * (4 * 8 * 32 + 3 * 8)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    save_folder(pruned, str(tmp_path / "p"), folder, {})
    config = json.load(open(tmp_path / "p" / "config.json"))
    assert config["distill_pruned"] and sum(config["distill_heads_per_layer"]) == 10
    again = load_folder(str(tmp_path / "p"), "p").eval()
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_gradient_head_importance_is_the_loss_sensitivity(bert):
    """|dL/d gate| per head, checked against a finite difference of the loss when one head is scaled."""
    from distill.compress.prune import attention_parts
    _, model = bert
    x, y = _ids(4), torch.tensor([0, 1, 1, 0])
    parts = attention_parts(model)
    raw = [s * 0 for s in head_importance(model, "l1")]

    def loss_with(layer, head, scale):
        def hook(_m, _i, out):
            o = out[0].clone().view(*out[0].shape[:-1], 4, -1)
            o[..., head, :] *= scale
            return (o.view_as(out[0]),) + tuple(out[1:])
        h = parts[layer][1].register_forward_hook(hook)
        with torch.no_grad():
            loss = sum(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) for i in range(len(x)))
        h.remove()
        return float(loss)
    for layer, head in ((0, 1), (3, 2)):
        eps = 1e-3
        raw[layer][head] = abs(loss_with(layer, head, 1 + eps) - loss_with(layer, head, 1 - eps)) / (2 * eps)
    from distill.compress.prune import _gradient_importance
    grads = _gradient_importance(model, parts, x, y, batch_size=1)  # per-sample |dL/dg| summed
    for layer, head in ((0, 1), (3, 2)):
        assert grads[layer][head] >= raw[layer][head] * 0.99  # sum of |per-sample| >= |sum|
        assert grads[layer][head] > 0
    # a batch of samples without labels (data.label_fraction) adds nothing, where it made every score NaN
    unlabelled = _gradient_importance(model, parts, _ids(6), torch.tensor([0, 1, 1, 0, -1, -1]), batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(unlabelled, _gradient_importance(model, parts, x, y, 4)))


def test_calibration_and_head_importance_read_a_fixed_random_sample_not_the_first_rows():
    from distill.compress.measure import calibration
    from distill.data import load_data
    data = load_data(Recipe.load("breast_cancer").cfg["data"])
    pick = data.training_sample(64)
    assert torch.equal(pick, data.training_sample(64)) and len(set(pick.tolist())) == 64
    assert pick.tolist() == sorted(pick.tolist()) and pick.max() > 64  # not the first 64 rows
    assert torch.equal(calibration(data, 64), data.x_train[pick])
    assert len(data.training_sample(10 ** 6)) == len(data.y_train)


def test_ffn_pruning_and_vocabulary_trimming(bert, tmp_path):
    from distill.compress.vocab import trim_vocabulary
    from distill.models.hf import load_folder, save_folder
    folder, model = bert
    x = _ids()
    ffn = prune_ffn(model, 0.5).eval()
    assert all(layer.intermediate.dense.out_features == 32 for layer in ffn.hf.bert.encoder.layer)
    assert count_params(model) - count_params(ffn) == 4 * (32 * 32 + 32 + 32 * 32)
    trimmed = trim_vocabulary(ffn, [x], unk_id=100).eval()
    emb = trimmed.hf.get_input_embeddings()
    assert isinstance(emb, RemappedEmbedding) and emb.num_embeddings < 70 < 30522
    with torch.no_grad():
        assert torch.equal(trimmed(x), ffn(x))  # exact on seen tokens
        unseen = x.clone()
        unseen[:, 3] = 5000
        as_unk = x.clone()
        as_unk[:, 3] = 100
        assert torch.equal(trimmed(unseen), ffn(as_unk))  # unseen tokens read as [UNK]
    save_folder(trimmed, str(tmp_path / "v"), folder, {})
    with torch.no_grad():
        assert torch.equal(load_folder(str(tmp_path / "v"), "v")(unseen), trimmed(unseen))
    assert os.path.getsize(tmp_path / "v" / "model.safetensors") < 0.1 * os.path.getsize(
        os.path.join(folder, "model.safetensors"))


def test_a_classifier_with_a_scaled_word_embedding_is_not_trimmed():
    """Gemma's word embedding multiplies by sqrt(width): a plain remapped table in its place dropped that, and
    the logits changed on the very tokens kept (README: exact on seen tokens)."""
    import transformers
    from distill.compress.vocab import trim_vocabulary
    from distill.models.hf import HFClassifier
    cfg = transformers.GemmaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, intermediate_size=64, num_labels=3,
                                   pad_token_id=0)
    hf = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    assert type(hf.get_input_embeddings()) is not torch.nn.Embedding
    with pytest.raises(UserError, match=r"^compress.vocab: this model's word embedding is a \w+, not a plain "
                                        r"Embedding; .* remove vocab from compress.steps"):
        trim_vocabulary(HFClassifier(hf, 0, None, [0, 1, 2]), [torch.randint(3, 100, (4, 10))], unk_id=2)


def test_layer_reduction_drops_the_layer_whose_removal_hurts_least(bert):
    _, model = bert
    x, y = _ids(8), torch.tensor([0, 1] * 4)
    unit, losses = layer_drop.least_important(model, x, y, batch_size=8)
    assert set(losses) == {"0", "1", "2", "3"} and losses[str(unit)] == min(losses.values())
    expected = layer_drop.val_loss(layer_drop.without(model, 2), x, y, 8)
    assert losses["2"] == pytest.approx(expected)
    smaller = layer_drop.without(model, unit)
    assert smaller.num_layers == 3 and count_params(smaller) < count_params(model)


# ---------------------------------------------------------------- CNNs

@pytest.mark.parametrize("name", ["seed_cnn_student", "resnet32x4", "wrn_16_2"])
def test_channel_pruning_removes_filters_and_resizes_the_next_layer(name):
    torch.manual_seed(0)
    model = build_model({"model": name}, (3, 32, 32), 10).eval()
    pruned = prune_channels(model, 0.5).eval()
    assert count_params(pruned) < 0.6 * count_params(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    # the saved shapes rebuild the same model from the original spec
    fresh = build_model({"model": name}, (3, 32, 32), 10)
    fit_to_shapes(fresh, {k: tuple(v.shape) for k, v in pruned.state_dict().items()})
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))


@pytest.mark.parametrize("stats", [True, False])
def test_channel_pruning_of_a_cnn_whose_batchnorm_has_no_weights(stats):
    """BatchNorm2d(affine=False) has no weight: pruning read its shape from it (a traceback)."""
    torch.manual_seed(0)
    arch = ["Conv2d(1, 8, 3, padding=1)", f"BatchNorm2d(8, affine=False, track_running_stats={stats})", "ReLU()",
            "Conv2d(8, 8, 3, padding=1)", "ReLU()", "Flatten()", "Linear(512, 10)"]
    model = build_model({"arch": arch}, (1, 8, 8), 10).eval()
    pruned = prune_channels(model, 0.5).eval()
    assert pruned[0].out_channels == 4 and pruned[1].num_features == 4
    fresh = build_model({"arch": arch}, (1, 8, 8), 10)
    fit_to_shapes(fresh, {k: tuple(v.shape) for k, v in pruned.state_dict().items()})
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))


def test_channel_pruning_reads_only_a_channel_major_flatten():
    """Flatten(2) keeps the channels apart: a Linear after it reads one channel's pixels, not each channel's
    block of inputs. Its inputs were sliced as if (64 -> 32 of them), and the pruned model failed to run."""
    arch = ["Conv2d(1, 4, 3, padding=1)", "ReLU()", "Flatten(2)", "Linear(64, 8)", "ReLU()", "Flatten()",
            "Linear(32, 10)"]
    model = build_model({"arch": arch}, (1, 8, 8), 10)
    with pytest.raises(UserError, match="compress.channels: the model has no conv layer whose filters can be pruned"):
        prune_channels(model, 0.5)


def test_channel_pruning_keeps_the_filters_with_the_largest_l1_norm():
    model = build_model({"model": "cnn", "args": {"channels": [4], "hidden": 8}}, (1, 8, 8), 3)
    conv = model.body[0]
    with torch.no_grad():
        for i, scale in enumerate([0.1, 3.0, 0.2, 2.0]):
            conv.weight[i] = scale
    pruned = prune_channels(model, 0.5)
    assert pruned.body[0].out_channels == 2
    assert torch.equal(pruned.body[0].weight, conv.weight[[1, 3]])
    # the Linear after Flatten keeps the 16 inputs of each kept channel (channel-major order)
    linear = model.body[4]
    assert torch.equal(pruned.body[4].weight, torch.cat([linear.weight[:, 16:32], linear.weight[:, 48:64]], 1))


def test_qat_simulates_the_weights_that_dynamic_int8_stores():
    torch.manual_seed(0)
    model = build_model({"model": "mlp", "args": {"hidden": [32]}}, (16,), 4)
    prepare_qat(model)
    simulated = model.body[1].weight.detach().clone()  # through the fake-quant parametrization
    finish_qat(model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    q = dynamic_int8(model)
    assert int8_linear_count(q) == 2
    stored = q.body[1].weight().dequantize()
    assert torch.allclose(simulated, stored, atol=1e-6)


def test_static_int8_really_quantizes_convolutions():
    torch.manual_seed(0)
    model = build_model({"model": "seed_cnn_student"}, (1, 16, 16), 10).eval()
    q = static_int8(model, torch.randn(32, 1, 16, 16))
    kinds = {type(m).__module__ for m in q.modules()}
    assert any(k.startswith("torch.ao.nn.intrinsic.quantized") or k.startswith("torch.ao.nn.quantized") for k in kinds)
    assert not any(type(m) is nn.Conv2d for m in q.modules())
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        assert (q(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.75


def test_pareto_front():
    points = [(1.0, 0.90), (2.0, 0.95), (3.0, 0.94), (0.5, 0.80), (2.0, 0.90)]
    assert pareto(points) == [3, 0, 1]


# ---------------------------------------------------------------- the commands, end to end

def test_the_model_qat_started_from_is_benched_as_int8_also_when_it_is_the_source(tmp_path, monkeypatch):
    from distill.compress import bench
    os.makedirs(tmp_path / "compress")
    (tmp_path / "compress" / "compress.json").write_text(json.dumps({"source": "teacher", "models": [{"name": "qat"}]}))
    monkeypatch.setattr("distill.pipeline.artifacts.require_saved", lambda folder, name: name)
    rows = bench.plan(str(tmp_path), ["fp32", "dynamic", "onnx_dynamic"])
    assert [v for m, _, v in rows if m == "teacher"] == ["fp32", "dynamic", "onnx_dynamic"]
    assert [v for m, _, v in rows if m == "compress/qat"] == ["fp32", "dynamic", "onnx_dynamic"]


def test_a_compressed_model_bench_models_names_is_measured_in_every_variant(tmp_path, monkeypatch):
    """Only the last model of the chain was: bench.models=[compress/channels] measured it in fp32 alone."""
    from distill.compress import bench
    os.makedirs(tmp_path / "compress")
    (tmp_path / "compress" / "compress.json").write_text(json.dumps({"models": [{"name": "channels"},
                                                                                {"name": "layers"}]}))
    monkeypatch.setattr("distill.pipeline.artifacts.require_saved", lambda folder, name: name)
    rows = bench.plan(str(tmp_path), ["fp32", "static", "onnx_static"], only=["compress/channels", "teacher"])
    assert [(m, v) for m, _, v in rows] == [("teacher", "fp32"), *[(m, v) for m in ("student", "compress/channels")
                                                                  for v in ("fp32", "static", "onnx_static")]]


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A tiny run whose student is a wide ResNet (residual blocks to drop, channels to prune)."""
    tmp = tmp_path_factory.mktemp("cnnrun")
    recipe = tmp / "r.yaml"
    recipe.write_text("name: c\ndata: {dataset: digits, as_image: true, train_subset: 256}\n"
                      "teacher: {model: cnn, args: {channels: [8, 16], hidden: 32}}\n"
                      "student: {model: wrn_16_2}\ntrain: {epochs: 1}\nevaluate: {latency_runs: 5}\n"
                      "bench: {latency_runs: 5, calibration: 32}\n")
    out = str(tmp / "run")
    run(Recipe.load(str(recipe)), out, **QUIET)
    return out


def test_compress_cnn_every_step_saves_a_smaller_loadable_model(cnn_run, capsys):
    assert main(["compress", cnn_run, "--set", "compress.steps=[layers, channels, qat]",
                 "--set", "compress.layers.to=1"]) == 0
    assert "val accuracy" in capsys.readouterr().out
    record = json.load(open(os.path.join(cnn_run, "compress", "compress.json")))
    names = [m["name"] for m in record["models"]]
    assert names == ["layers2", "layers1", "channels", "qat"]
    params = [m["params"] for m in record["models"]]
    assert params[0] < 691_674 and params[1] < params[0] and params[2] < params[1] and params[3] == params[2]
    pruned = record["models"][2]  # (what was removed, and why, as for the other steps)
    assert set(pruned["widths_after"]) == set(pruned["widths_before"]) and "L1 norm" in pruned["ranked_by"]
    cut = {k for k, w in pruned["widths_before"].items() if pruned["widths_after"][k] < w}  # (a residual block's
    assert "block1.0.conv1" in cut and "block1.0.conv2" not in cut  # inner conv: its output joins no sum)
    assert all(pruned["widths_after"][k] <= w for k, w in pruned["widths_before"].items())
    recipe = Recipe.load(os.path.join(cnn_run, "recipe.yaml"))
    from distill.data import load_data
    from distill.engine.inference import accuracy
    data = load_data(recipe.cfg["data"])
    for m in record["models"]:  # every step reloads from its file, and is the model that was measured
        model = load_model_at(os.path.join(cnn_run, m["path"]), m["name"])
        assert count_params(model) == m["params"]
        assert layer_drop.depth(model) == {"layers2": 2, "layers1": 1}.get(m["name"], 1)
        assert accuracy(model, data.x_val, data.y_val) == pytest.approx(m["val_accuracy"])
    qat = record["models"][3]  # (deployed as dynamic int8: measured so too, beside its float weights')
    int8 = dynamic_int8(load_model_at(os.path.join(cnn_run, qat["path"]), "qat"))
    assert accuracy(int8, data.x_val, data.y_val) == pytest.approx(qat["int8_val_accuracy"])
    assert "int8_val_accuracy" not in record["models"][2]
    from distill.io import load_meta  # (no timing in a weights file: the same weights make the same bytes; a
    for m in record["models"]:  # fine-tune's monitor time, nested in the step's record, was kept)
        header = json.dumps(load_meta(os.path.join(cnn_run, m["path"])))
        assert not [k for k in ("monitor_s", "time_s", "train_time_s") if f'"{k}"' in header], header
    # exported, it says how it was trained to run: TorchScript holds that int8 model, the others its float weights
    capsys.readouterr()
    assert main(["export", cnn_run, "--model", "compress/qat", "--format", "torchscript"]) == 0
    assert "as dynamic int8 (Linear layers), as it was trained to run" in capsys.readouterr().out
    scripted = torch.jit.load(os.path.join(cnn_run, "export", "compress-qat.pt"))
    assert "quantized::linear_dynamic" in str(scripted.inlined_graph)
    x = data.x_test[:16]
    from distill.compress.export import raw_inputs  # (it takes raw inputs, the normalisation baked in)
    assert torch.allclose(scripted(raw_inputs(x, data.stats, data.image)), int8(x), atol=1e-3)
    assert main(["export", cnn_run, "--model", "compress/qat", "--format", "safetensors"]) == 0
    said = capsys.readouterr().out
    assert "trained to run as dynamic int8 (Linear layers): the file holds its float weights" in said, said
    saved = os.path.join(cnn_run, "export", "compress-qat.safetensors")
    assert load_meta(saved)["deploy"] == "dynamic int8 (Linear layers)"
    exports = json.load(open(os.path.join(cnn_run, "export", "exports.json")))
    assert exports["compress/qat.torchscript"]["deploy"] == exports["compress/qat.safetensors"]["deploy"]
    assert exports["compress/qat.torchscript"]["int8"] and not exports["compress/qat.safetensors"]["int8"]
    assert "deploy" not in load_meta(os.path.join(cnn_run, record["models"][2]["path"]))
    # unchanged inputs: nothing is redone
    assert main(["compress", cnn_run, "--set", "compress.steps=[layers, channels, qat]",
                 "--set", "compress.layers.to=1"]) == 0
    assert capsys.readouterr().err.count("inputs unchanged") == 4
    # how the fine-tunes train is an input: another compress.lr redoes the steps (it reused them, then trained
    # the next changed step at that lr); a stopped compress lists the steps it made since, not older ones after
    from distill.compress.pipeline import Compressor

    def stop(self, *args):
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Compressor, "qat", stop)
        assert main(["compress", cnn_run, "--set", "compress.steps=[layers, channels, qat]",
                     "--set", "compress.layers.to=1", "--set", "compress.lr=0.0001"]) != 0
    assert "inputs unchanged" not in capsys.readouterr().err
    stopped = json.load(open(os.path.join(cnn_run, "compress", "compress.json")))
    assert [m["name"] for m in stopped["models"]] == ["layers2", "layers1", "channels"]
    assert stopped["finished"] is False and record["finished"] is True  # (the report says it stopped midway)
    assert stopped["models"][2]["val_accuracy"] != record["models"][2]["val_accuracy"]
    # stopped as a step's file is replaced: compress.json names no later step of the older chain, made from
    # other models
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Compressor, "save", stop)
        assert main(["compress", cnn_run, "--set", "compress.steps=[layers, channels, qat]",
                     "--set", "compress.layers.to=1", "--set", "compress.lr=0.0002"]) != 0
    assert json.load(open(os.path.join(cnn_run, "compress", "compress.json")))["models"] == []
    assert main(["compress", cnn_run, "--set", "compress.steps=[layers, channels, qat]",
                 "--set", "compress.layers.to=1", "--set", "compress.lr=null"]) == 0  # (the run's recipe kept 1e-4)
    again = json.load(open(os.path.join(cnn_run, "compress", "compress.json")))["models"]
    assert [(m["name"], m["val_accuracy"]) for m in again] == [(m["name"], m["val_accuracy"]) for m in record["models"]]
    # bench finds the compressed models in the folder it is given (copied or moved), and writes every file of a
    # model anew: onnx_dynamic quantizes this version's ONNX file, not one an earlier bench left
    import shutil
    from distill.compress.bench import _write_variant_file, compressed_models
    copy = os.path.join(os.path.dirname(cnn_run), "copied")
    shutil.copytree(cnn_run, copy)
    assert compressed_models(copy) == [(f"compress/{n}", os.path.join(copy, "compress", f"{n}.safetensors"))
                                       for n in ("layers2", "layers1", "channels", "qat")]
    pytest.importorskip("onnxruntime")
    files = os.path.join(copy, "bench", "files")
    os.makedirs(files)
    with open(os.path.join(files, "compress-qat-onnx.onnx"), "wb") as fh:
        fh.write(b"an earlier version")
    cfg = Recipe.load(os.path.join(copy, "recipe.yaml")).cfg
    assert _write_variant_file(cfg, copy, "compress/qat", compressed_models(copy)[3][1], "onnx_dynamic", {}) is None
    assert os.path.getsize(os.path.join(files, "compress-qat-onnx.onnx")) > 1000
    # the student compressed here trained again: the chain is out of date, in the report and for bench
    from distill.compress.bench import compressed_out_of_date
    from distill.report import compression_section
    assert compressed_out_of_date(copy) is None and "Out of date" not in compression_section(copy)
    stages = json.load(open(os.path.join(copy, "stages.json")))
    stages["student"]["fingerprint"] = "0" * 64
    json.dump(stages, open(os.path.join(copy, "stages.json"), "w"))
    assert compressed_out_of_date(copy) == "compressed from earlier versions of student, trained again since"
    assert "Out of date: these models were compressed from earlier versions of student" in compression_section(copy)
    assert main(["export", copy, "--model", "compress/channels", "--format", "onnx"]) == 2  # (it exported them)
    assert "--model compress/channels: compressed from earlier versions of student, trained again since; compress " \
        "again first" in capsys.readouterr().err
    # ... and so when the student trained again by another recipe (which the compressed models were not made
    # by: export said a rerun had stopped before making them again, and to resume it)
    recipe = open(os.path.join(copy, "recipe.yaml")).read()
    assert "epochs: 1" in recipe
    open(os.path.join(copy, "recipe.yaml"), "w").write(recipe.replace("epochs: 1", "epochs: 2"))
    assert main(["export", copy, "--model", "compress/qat", "--format", "onnx"]) == 2
    assert "--model compress/qat: compressed from earlier versions of student, trained again since; compress " \
        "again first" in capsys.readouterr().err
    shutil.rmtree(copy)
    # a compressed model exports like any other (ONNX checked in ONNX Runtime)
    pytest.importorskip("onnxruntime")
    assert main(["export", cnn_run, "--model", "compress/channels", "--format", "onnx"]) == 0
    assert os.path.isfile(os.path.join(cnn_run, "export", "compress-channels.onnx"))
    assert main(["export", cnn_run, "--model", "compress/../teacher", "--format", "onnx"]) == 2
    # as safetensors, with the architecture and the dropped blocks: distill rebuilds it (it could not)
    assert main(["export", cnn_run, "--model", "compress/layers1", "--format", "safetensors"]) == 0
    exported = load_model_at(os.path.join(cnn_run, "export", "compress-layers1.safetensors"), "x").eval()
    original = load_model_at(os.path.join(cnn_run, "compress", "layers1.safetensors"), "x").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(exported(x), original(x))


def test_compress_fine_tunes_on_what_the_student_learnt_from(tmp_path):
    """The default recipe's student learns from the teacher on every training image, labelled or not (a fifth
    keep their labels): a compress fine-tune distils on the same images, not on the labelled fifth alone."""
    out = str(tmp_path / "run")
    run(Recipe.load("digits", ["train.epochs=1", "teacher.train.epochs=1", "compress.steps=[qat]",
                               "compress.qat.epochs=1"]), out, **QUIET)
    assert main(["compress", out]) == 0
    with open(os.path.join(out, "log.jsonl")) as fh:
        added = {r["event"].split(":")[0]: r["added"] for r in map(json.loads, fh) if "added" in r}
    assert added["compress"] == added["student"] and added["student"]["unlabelled"] > 900


def test_a_missing_baseline_says_how_to_make_it(tmp_path):
    from distill.errors import UserError
    from distill.pipeline.artifacts import require_saved
    with pytest.raises(UserError, match=r"distill train-student\) with the baseline \(baseline: true, and without "
                                        r"--no-baseline\)"):
        require_saved(str(tmp_path), "student_scratch")
    with pytest.raises(UserError, match=r"distill train-student\)$"):
        require_saved(str(tmp_path), "student")


def test_a_missing_quantization_api_is_one_clear_line(monkeypatch):
    import torch.ao.quantization as tq

    from distill.errors import UserError
    monkeypatch.delattr(tq, "quantize_dynamic")
    with pytest.raises(UserError, match=r"dynamic int8: torch.ao.quantization.quantize_dynamic is not available"):
        dynamic_int8(build_model({"model": "mlp"}, (8,), 3))
    with pytest.raises(UserError, match=r"torchao.*not available.*pip install torchao"):
        from distill.compress import quantize
        for name in ("torchao", "torchao.quantization"):  # as if not installed (even if imported already)
            monkeypatch.setitem(sys.modules, name, None)
        quantize.torchao_int8(build_model({"model": "mlp"}, (8,), 3))


def test_bench_fills_every_column_and_plots_the_pareto_front(cnn_run, capsys, tmp_path):
    import shutil
    pytest.importorskip("onnxruntime")
    folder = str(tmp_path / "run")  # the run without its compressed models: the student's variants only
    shutil.copytree(cnn_run, folder, ignore=shutil.ignore_patterns("compress", "bench", "export"))
    variants = "[fp32, dynamic, static, fp16, onnx, onnx_dynamic, onnx_static]"
    # a training key would be ignored (the models are made): refused; how the models are measured may change
    assert main(["bench", folder, "--set", "student.train.epochs=3"]) == 2
    assert "student.train.epochs: distill bench measures the folder's models as they were trained" in \
        capsys.readouterr().err
    assert main(["bench", folder, "--set", f"bench.variants={variants}", "--set", "evaluate.throughput_batch=16"]) == 0
    out = capsys.readouterr().out
    assert "| model | variant | accuracy" in out and "Machine:" in out and "Recommended" in out
    result = json.load(open(os.path.join(folder, "bench", "bench.json")))
    rows = {(r["model"], r["variant"]): r for r in result["results"]}
    for v in ("fp32", "dynamic", "static", "fp16", "onnx", "onnx_dynamic", "onnx_static"):
        r = rows[("student", v)]
        assert "error" not in r, r
        for key in ("accuracy", "params", "size_bytes", "p50_ms", "p95_ms", "throughput", "peak_mb", "speedup"):
            assert r[key] is not None and r[key] >= 0, (v, key)
        assert r["p95_ms"] >= r["p50_ms"] > 0 and 0 <= r["accuracy"] <= 1
        assert os.path.getsize(r["file"]) == r["size_bytes"]
    assert ("teacher", "fp32") in rows and ("student_scratch", "fp32") in rows
    assert rows[("student", "fp32")]["speedup"] == 1.0
    assert rows[("student", "fp16")]["size_bytes"] < 0.6 * rows[("student", "fp32")]["size_bytes"]
    import onnx
    nodes = {n.op_type for n in onnx.load(rows[("student", "onnx_dynamic")]["file"]).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= nodes or "ConvInteger" in nodes
    static_nodes = {n.op_type for n in onnx.load(rows[("student", "onnx_static")]["file"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= static_nodes
    # the deployable ONNX file takes raw inputs, its normalisation baked in, as distill export writes it (it
    # took normalised ones: fed what the reader gives, the recommended file scored 0.525 where its model 0.897)
    import onnxruntime as ort
    from distill.compress.export import raw_inputs
    from distill.data import load_data
    data = load_data(Recipe.load_run_folder(folder).cfg["data"])
    assert data.stats  # (the inputs are normalised, so the file has something to bake in)
    session = ort.InferenceSession(rows[("student", "onnx")]["file"], providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": raw_inputs(data.x_test[:16], data.stats, data.image).numpy()})[0]
    with torch.no_grad():
        want = load_model_at(os.path.join(folder, "student.safetensors"), "student").eval()(data.x_test[:16])
    assert abs(got - want.numpy()).max() < 1e-3
    assert rows[("student", "onnx")]["accuracy"] == rows[("student", "fp32")]["accuracy"]
    with open(os.path.join(folder, "bench", "pareto.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["recommended"]["model"] != "teacher" and result["recommended"]["chosen_on"] == "validation"
    assert all(0 <= r["val_accuracy"] <= 1 for r in rows.values())
    half = load_model_at(rows[("student", "fp16")]["file"], "student")  # (its header names the architecture)
    assert count_params(half) == rows[("student", "fp32")]["params"]
    # each row records which version of its model it measured: once the model is trained again, the report
    # marks the row out of date
    from distill.report import compression_section
    stages = json.load(open(os.path.join(folder, "stages.json")))
    assert {r["fingerprint"] for (m, _), r in rows.items() if m == "student"} == {stages["student"]["fingerprint"]}
    assert "†" not in compression_section(folder)
    stages["student"]["fingerprint"] = "0" * 64
    json.dump(stages, open(os.path.join(folder, "stages.json"), "w"))
    page = compression_section(folder)
    assert page.count("student †") == 7 and "teacher †" not in page and f"run `distill bench {folder}` again" in page
    # a bench stopped midway (having removed an earlier bench's files) leaves no record recommending them
    from distill.compress import bench as bench_module

    def stop(*args):
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_module, "_measure_in_child", stop)
        assert main(["bench", folder, "--set", "bench.variants=[fp32, onnx]"]) != 0
    assert not any(os.path.exists(os.path.join(folder, "bench", f)) for f in ("bench.json", "bench.md", "pareto.png"))


def test_the_recommendation_is_chosen_on_validation_accuracy_not_test():
    from distill.compress.bench import format_bench, summarise

    def row(model, variant, test, val, ms):
        return {"model": model, "variant": variant, "accuracy": test, "val_accuracy": val, "p50_ms": ms,
                "size_bytes": 100, "file": f"{model}.{variant}"}
    rows = [row("teacher", "fp32", 0.99, 0.99, 9.0), row("student", "fp32", 0.95, 0.95, 4.0),
            row("student", "dynamic", 0.95, 0.90, 1.0),  # fastest and as good on test, but not on validation
            row("student", "onnx", 0.90, 0.95, 2.0)]     # within the budget on validation, not on test
    out = summarise([dict(r) for r in rows], 0.01)
    assert out["recommended"] == {"model": "student", "variant": "onnx", "file": "student.onnx",
                                  "chosen_on": "validation"}
    assert "Recommended (fastest within the accuracy budget, chosen on validation accuracy): student onnx" in \
        format_bench({"results": [], "machine": {"cpu": "x", "cores": 2, "torch": "t", "onnxruntime": None},
                      "threads": 1, **out})
    # data without a validation split: chosen on test, and it says so
    out = summarise([{k: v for k, v in r.items() if k != "val_accuracy"} for r in rows], 0.01)
    assert (out["recommended"]["variant"], out["recommended"]["chosen_on"]) == ("dynamic", "test")


def test_the_measuring_server_answers_each_job_and_a_death_is_a_row(tmp_path, monkeypatch):
    import signal
    import threading
    import time
    from distill.compress.bench import _Server
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        pytest.skip("this kernel does not list a process's children in /proc")
    monkeypatch.chdir(tmp_path)  # (the server measures in the bench's directory: a relative path is read here)
    (tmp_path / "student.safetensors").write_bytes(b"not weights")
    job = {"cfg": Recipe.load("digits").cfg, "folder": ".", "name": "student", "path": "student.safetensors",
           "variant": "fp32"}
    os.mkfifo(tmp_path / "rows.csv")  # (a data file that never answers: the measurement waits on it)
    stuck = {**job, "cfg": {**job["cfg"], "data": {**job["cfg"]["data"], "dataset": "csv", "path": "rows.csv",
                                                   "as_image": False}}}
    with _Server() as server:
        error = server.ask(job)["error"]  # an exception: one line
        assert error.startswith("n/a: student.safetensors: not a readable safetensors file") and "No such" not in error
        children = f"/proc/{server.proc.pid}/task/{server.proc.pid}/children"

        def kill_the_measurement():  # (as the kernel's OOM killer would)
            for _ in range(600):
                pids = open(children).read().split()
                if pids:
                    return os.kill(int(pids[0]), signal.SIGKILL)
                time.sleep(0.05)
            try:  # (none found in 30 s: let it go, and the assertion fail)
                os.close(os.open(tmp_path / "rows.csv", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # (no reader yet)
                pass
        killer = threading.Thread(target=kill_the_measurement)
        killer.start()
        assert server.ask(stuck) == {"error": "exit code -9"}  # a crash: this row fails, the bench goes on
        killer.join()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        assert server.ask(job) == {"error": "the measuring process ended (exit code -9)"}


def test_compress_text_heads_vocab_layers(tmp_path, capsys):
    from textkit import text_recipe

    from distill.models.hf import load_folder
    from distill.models.hf import load_tokenizer
    (tmp_path / "u.txt").write_text("the zebra was quantum\nan orchestra film\n")
    recipe = Recipe.from_dict(text_recipe(str(tmp_path), teacher={"train": {"epochs": 1}},
                                          student={"from_teacher": {"layers": [0, 1, 2]}, "train": {"epochs": 1}},
                                          distill={"data": {"unlabeled": str(tmp_path / "u.txt")}}, baseline=False))
    out = str(tmp_path / "run")
    run(recipe, out, **QUIET)
    assert main(["compress", out, "--set", "compress.steps=[vocab, heads, channels, layers, qat]",
                 "--set", "compress.layers.to=2", "--set", "compress.heads.importance=l1"]) == 0
    record = json.load(open(os.path.join(out, "compress", "compress.json")))
    # the words of the texts without labels, which the student learnt from, keep their rows (were [UNK])
    remap = load_folder(os.path.join(out, "compress", "vocab"), "v").hf.get_input_embeddings().remap
    tok = load_tokenizer(str(tmp_path / "bert"), "t")
    words = torch.tensor(tok.convert_tokens_to_ids(["zebra", "quantum", "orchestra"]))
    assert tok.unk_token_id not in words.tolist() and len(set(remap[words].tolist())) == 3
    assert [m["name"] for m in record["models"]] == ["vocab", "heads", "channels", "layers2", "qat"]
    params = [m["params"] for m in record["models"]]
    assert params == sorted(params, reverse=True) and params[1] < params[0] and params[3] < params[2]
    assert sum(record["models"][1]["heads_per_layer"]) == 7  # 60% of 3 x 4 heads
    for m in record["models"]:  # (paths within the run folder)
        model = load_folder(os.path.join(out, m["path"]), m["name"])
        assert count_params(model) == m["params"]
    assert load_folder(os.path.join(out, record["models"][3]["path"]), "l").num_layers == 2
    assert main(["bench", out, "--set", "bench.variants=[fp32, fp16, onnx_dynamic]",
                 "--set", "bench.models=[compress/qat]", "--set", "bench.latency_runs=5"]) == 0
    result = json.load(open(os.path.join(out, "bench", "bench.json")))
    rows = {(r["model"], r["variant"]): r for r in result["results"]}
    assert {m for m, _ in rows} == {"student", "compress/qat"}  # the models named, and the reference
    assert "error" not in rows[("compress/qat", "onnx_dynamic")], rows[("compress/qat", "onnx_dynamic")]
    assert "error" not in rows[("student", "fp16")], rows[("student", "fp16")]  # (a transformer: its folder)
    assert rows[("compress/qat", "onnx_dynamic")]["size_bytes"] < rows[("student", "fp32")]["size_bytes"] / 4


def _small_run(tmp_path, student="{arch: ['Flatten()', 'Linear(64, 10)']}", data="{dataset: digits}"):
    """tmp_path/run: one epoch on digits, a small MLP teacher and `student`."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: m\ndata: {data}\nteacher: {{model: mlp, args: {{hidden: [16]}}}}\nstudent: {student}\n"
                      f"train: {{epochs: 1}}\nevaluate: {{latency_runs: 2}}\n")
    run(Recipe.load(str(recipe)), str(tmp_path / "run"), **QUIET)
    return str(tmp_path / "run")


@pytest.mark.parametrize("args, message", [
    (["compress", "nope"], "nope: not a run folder"),
    (["bench", "nope"], "nope: not a run folder"),
    (["compress", "RUN"], "compress.steps: empty"),
    (["compress", "RUN", "--set", "compress.steps=[prune]"], "compress.steps[0]: unknown step 'prune'"),
    (["compress", "RUN", "--set", "compress.steps=[heads]"],
     "'heads' applies to transformers only, and the student is not one"),
    (["compress", "RUN", "--set", "compress.steps=[layers]"], "compress.layers.to: missing"),
    (["compress", "RUN", "--set", "compress.steps=[layers]", "--set", "compress.layers.to=1"],
     "compress.layers: the student (arch) has no layer or block that can be dropped"),
    (["compress", "RUN", "--set", "compress.steps=[channels]"],
     "compress.channels: the student (arch) has no conv layer whose filters can be pruned"),
    (["compress", "RUN", "--set", "compress.steps=[channels]", "--set", "compress.source=teacher"],
     "compress.channels: the teacher ('mlp') has no conv layer"),
    (["compress", "RUN", "--set", "compress.heads.keep=1.5"], "compress.heads.keep: must be between 0 and 1"),
    (["compress", "RUN", "--set", "compress.steps=[qat, channels]"], "compress.steps: ['qat', 'channels']: put qat "
                                                                     "last (only vocab may follow it)"),
    (["compress", "RUN", "--set", "compress.steps=[qat]", "--set", "distill.temperature=7"],  # (it said to give
     "distill.temperature: distill compress changes only output.*, compress.*, bench.*, baseline of the folder's"),
    (["bench", "RUN", "--set", "bench.variants=[int4]"], "bench.variants[0]: unknown variant 'int4'"),
    (["bench", "RUN", "--set", "bench.models=[studnet]"], "bench.models[0]: 'studnet' is not a model of"),
])
def test_compress_mistakes_are_one_line(tmp_path, capsys, args, message):
    folder = _small_run(tmp_path) if "RUN" in args else str(tmp_path / "run")
    before = sorted(os.listdir(folder)) if os.path.isdir(folder) else None
    assert main([folder if a == "RUN" else a for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    if before is not None:
        assert not os.path.isdir(os.path.join(folder, "compress"))


def test_a_later_steps_mistake_is_found_before_the_first_step_fine_tunes(tmp_path, capsys):
    """[channels, layers] on a plain CNN (no block to drop): layers was refused only after channels had
    fine-tuned and replaced the earlier chain's models and records."""
    folder = _small_run(tmp_path, "{model: cnn, args: {channels: [4], hidden: 8}}",
                        "{dataset: digits, as_image: true, train_subset: 200}")
    assert main(["compress", folder, "--set", "compress.steps=[channels, layers]", "--set", "compress.layers.to=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("compress.layers: the student ('cnn') has no layer or block that can be dropped (transformer "
                        "encoders with 2+ layers, or residual blocks with an identity shortcut)"), err
    assert not os.path.isdir(os.path.join(folder, "compress"))


def test_run_folder_records_that_are_not_what_distill_wrote_are_one_line(tmp_path, capsys):
    from distill.compress.bench import plan
    folder = _small_run(tmp_path)
    # with no variant named, the distilled student is still measured in fp32: every ratio is against it
    assert ("student", os.path.join(folder, "student.safetensors"), "fp32") in plan(folder, [])
    for name, text, command, message in [
            ("compress/compress.json", "[1]", ["bench", folder], "compress.json: holds list, not a JSON object"),
            ("compress/compress.json", '{"models": ["x"]}', ["bench", folder],
             "compress.json: 'models' is not a list of records with a step's name; run distill compress again"),
            ("compress/compress.json", '{"models": [{"name": "../teacher"}]}', ["bench", folder],  # (benched the
             "compress.json: 'models' is not a list of records with a step's name"),  # teacher as deployable)
            ("compress/compress.json", '{"models": [{"name": "gone"}]}', ["bench", folder],
             "compress/gone (.safetensors, or a Hugging Face folder): missing; run the stage that makes it first "
             "(distill run, or distill compress)"),
            ("export/exports.json", "{bad", ["export", folder, "--format", "safetensors"],
             "exports.json: not readable JSON"),
            ("stages.json", '{"teacher": 5}', ["evaluate", folder],
             "stages.json: the record of teacher is not one distill wrote")]:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as fh:
            fh.write(text)
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert os.listdir(os.path.join(folder, "export")) == ["exports.json"]  # refused before the export was written
    os.makedirs(tmp_path / "empty")
    for command in ("bench", "compress", "export"):
        assert main([command, str(tmp_path / "empty")] + (["--format", "onnx"] if command == "export" else [])) == 2
        assert "not a run folder (no recipe.yaml); give the folder that `distill run` wrote" in capsys.readouterr().err


def test_compress_sigterm_then_resume_is_bitwise_identical(cnn_run, tmp_path, capsys):
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from distill.roles import compressed, log_name
    env = {**os.environ, "DISTILL_QUIET": "1", "OMP_NUM_THREADS": "1"}
    sets = ["--set", "compress.steps=[channels]", "--set", "compress.channels.epochs=4"]  # (4 steps each)
    folders = []
    for name in ("ref", "stopped"):
        folders.append(str(tmp_path / name))
        shutil.copytree(cnn_run, folders[-1], ignore=shutil.ignore_patterns("compress", "bench"))
    cmd = [sys.executable, "-m", "distill", "compress"]
    ref = subprocess.Popen(cmd + [folders[0], *sets], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)  # (beside the stopped one: one thread each, on 2 cores)
    log, deadline = os.path.join(folders[1], "log.jsonl"), time.time() + 120
    seen = os.path.getsize(log) if os.path.isfile(log) else 0  # (the copied run's log may hold earlier lines)
    p = subprocess.Popen(cmd + [folders[1], *sets], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def training():  # a training line of this fine-tune (epoch or step): its stop-signal handler is in place
        import json
        if not os.path.isfile(log):
            return False
        with open(log) as fh:
            fh.seek(seen)
            lines = [json.loads(line) for line in fh if line.strip().endswith("}")]
        return any(r.get("model") == log_name(compressed("channels")) and "epoch" in r for r in lines)
    while not training() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and f"continue with: distill compress {folders[1]} --resume" in err, err
    from test_bad_inputs import files
    kept = files(folders[1])
    capsys.readouterr()
    assert main(["compress", folders[1], *sets]) == 2  # again without --resume: refused, the checkpoint kept
    assert "stopped at step" in capsys.readouterr().err
    assert main(["compress", folders[1], "--overwrite", *sets, "--set", "student.train.epochs=50"]) == 2  # (--overwrite
    # drops a fine-tune's checkpoints, and does not let the run's own recipe change)
    err = capsys.readouterr().err
    assert "student.train.epochs: distill compress changes only output.*, compress.*, bench.*, baseline" in err, err
    assert files(folders[1]) == kept
    done = subprocess.run(cmd + [folders[1], "--resume", *sets], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    a, b = (load_file(os.path.join(f, "compress", "channels.safetensors")) for f in folders)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(os.path.join(folders[1], "checkpoints"))  # cleaned up once the step is saved


def test_a_compress_that_makes_no_model_leaves_no_earlier_chain_behind(cnn_run, tmp_path, capsys):
    """compress.json kept the earlier chain when the new one made nothing (layers.to already met): bench then
    measured the earlier chain's models as this recipe's."""
    import shutil
    folder = str(tmp_path / "run")
    shutil.copytree(cnn_run, folder, ignore=shutil.ignore_patterns("compress", "bench", "export"))
    assert main(["compress", folder, "--set", "compress.steps=[channels]"]) == 0
    assert [m["name"] for m in json.load(open(os.path.join(folder, "compress", "compress.json")))["models"]] == \
        ["channels"]
    assert main(["compress", folder, "--set", "compress.steps=[layers]", "--set", "compress.layers.to=50"]) == 0
    record = json.load(open(os.path.join(folder, "compress", "compress.json")))
    assert record["steps"] == ["layers"] and record["models"] == []
    # the earlier chain's file is still there, but no model of this one: not exported (bench leaves it out)
    assert os.path.isfile(os.path.join(folder, "compress", "channels.safetensors"))
    assert main(["export", folder, "--model", "compress/channels", "--format", "safetensors"]) == 2
    assert "--model compress/channels: not a model of the last compress" in capsys.readouterr().err


def test_a_model_made_from_an_unfinished_step_of_the_chain_is_left_out(cnn_run, tmp_path, capsys):
    """A compress killed in its channels step left the chain's qat (made from the earlier channels model)
    finished: bench recommended it, export wrote it. Each step distils the model before it."""
    import shutil
    from distill.pipeline.rundir import UNFINISHED
    folder = str(tmp_path / "run")
    shutil.copytree(cnn_run, folder, ignore=shutil.ignore_patterns("compress", "bench", "export"))
    assert main(["compress", folder, "--set", "compress.steps=[channels, qat]"]) == 0
    stages = json.load(open(os.path.join(folder, "stages.json")))
    stages["compress/channels"]["fingerprint"] = UNFINISHED  # (as a compress killed while making it leaves it)
    json.dump(stages, open(os.path.join(folder, "stages.json"), "w"))
    capsys.readouterr()
    assert main(["export", folder, "--model", "compress/qat", "--format", "safetensors"]) == 2
    assert f"finish the run first (export needs it): distill compress {folder} --resume" in capsys.readouterr().err
    assert main(["bench", folder, "--set", "bench.variants=[fp32]", "--set", "bench.latency_runs=2"]) == 0
    err = capsys.readouterr().err
    assert "bench: compress/qat: made from a model of the chain that is left out; left out" in err, err
    rows = json.load(open(os.path.join(folder, "bench", "bench.json")))["results"]
    assert not [r for r in rows if r["model"].startswith("compress/")]


def test_a_stop_whose_exception_torch_dropped_still_stops_the_bench(cnn_run, tmp_path, capsys, monkeypatch):
    """SIGTERM while FX tracing wrote a static int8 file raised inside Python code that C++ called, which
    dropped the exception: the bench measured on to the end and exited 0. The signal is kept and asked for."""
    import shutil
    import signal
    from distill.compress import bench as bench_module
    from distill.errors import SIGNALLED
    folder = str(tmp_path / "run")
    shutil.copytree(cnn_run, folder, ignore=shutil.ignore_patterns("compress", "bench", "export"))
    real, calls = bench_module._write_variant_file, []

    def swallowed(*args):  # (the handler ran, and its exception went nowhere)
        calls.append(args)
        if len(calls) == 2:
            SIGNALLED.append(signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(bench_module, "_write_variant_file", swallowed)
    capsys.readouterr()
    assert main(["bench", folder, "--set", "bench.variants=[fp32]", "--set", "bench.latency_runs=2"]) == 128 + 15
    assert capsys.readouterr().err.strip().endswith("interrupted (SIGTERM)")
    assert len(calls) == 2 and not os.path.exists(os.path.join(folder, "bench", "bench.json")) and not SIGNALLED
