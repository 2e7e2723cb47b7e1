"""Knowledge retention: linear CKA has the properties it is used for, and distilled runs log it per epoch
for the logits and every mapped layer pair without changing what is trained."""
import json
import os

import pytest
import torch

from distill import Recipe, run
from distill.monitor import linear_cka


def test_linear_cka_equals_the_feature_space_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = y + x[:, :4]  # related, not equal
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-9)
    x, y = torch.randn(8, 30, generator=g, dtype=torch.float64), torch.randn(8, 20, generator=g, dtype=torch.float64)
    y = y + x[:, :20]  # wider than the batch: computed from the n x n Gram matrices instead
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-9)


def test_linear_cka_is_one_up_to_rotation_and_scale_and_small_for_unrelated():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2
    wide = torch.cat([x, torch.zeros(200, 40)], 1)  # another width, same information
    assert linear_cka(x, wide) == pytest.approx(1.0, abs=1e-6)
    seq = torch.randn(200, 5, 8, generator=g)  # token features are flattened per sample
    assert linear_cka(seq, seq.flatten(1)) == pytest.approx(1.0, abs=1e-6)


def test_distilled_run_logs_retention_per_epoch(tmp_path):
    recipe = Recipe.load("digits", ["train.epochs=3", "teacher.train.epochs=2", "data.as_image=true",
                                    "teacher.model=cnn", "teacher.args={channels: [8, 16], hidden: 32}",
                                    "student.arch=null", "student.model=cnn",
                                    "student.args={channels: [4, 8], hidden: 16}",
                                    "distill.features=[{teacher: body.3, student: body.3, loss: mse}]",
                                    "monitor.measure_every=0"])
    out = str(tmp_path / "run")
    run(recipe, out, echo=lambda m: None)
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    student = [r for r in lines if r.get("model") == "student" and "val_accuracy" in r]
    assert len(student) == 3
    for r in student:
        assert 0.0 <= r["retention_cka/logits"] <= 1.0 + 1e-9
        assert 0.0 <= r["retention_cka/body.3->body.3"] <= 1.0 + 1e-9
    others = [r for r in lines if r.get("model") in ("teacher", "student_scratch") and "val_accuracy" in r]
    assert others and not any(k.startswith("retention") for r in others for k in r)


def _objective(**distill):
    from distill.models import build_model
    from distill.engine.objective import Objective
    student = build_model({"model": "mlp", "args": {"hidden": [8]}}, (4,), 3)
    dcfg = {"alpha": 0.9, "temperature": 4.0, "features": [], **distill}
    return Objective(student, dcfg, lambda x, idx: (torch.zeros(len(x), 3), {}))


def test_schedules_move_alpha_and_temperature_over_training():
    obj = _objective(schedule={"alpha": "linear", "alpha_end": 0.1, "temperature": "cosine", "temperature_end": 1.0})
    seen = []
    for p in (0.0, 0.5, 1.0):
        obj.progress = p
        seen.append((obj.current("alpha"), obj.current("temperature")))
    assert seen[0] == (0.9, 4.0) and seen[2] == pytest.approx((0.1, 1.0))
    assert seen[1] == pytest.approx((0.5, 2.5))  # linear midpoint; cosine is half-way at the middle too
    obj.progress = 0.25
    assert obj.current("temperature") == pytest.approx(4.0 - 3.0 * (1 - 2 ** -0.5) / 2)
    assert _objective().current("alpha") == 0.9  # constant by default


def test_a_schedule_without_its_end_value_is_one_clear_error():
    from distill.errors import UserError
    with pytest.raises(UserError, match="distill.schedule.alpha_end: missing"):
        Recipe.load("digits", ["distill.schedule.alpha=linear"])


@pytest.mark.parametrize("action, key, after", [("lower_temperature", "temperature", 4.0 / 1.5),
                                                ("raise_alpha", "alpha", 1.0),
                                                ("raise_feature_weight", "feature_scale", 1.5)])
def test_reaction_adjusts_strength_logs_it_and_checkpoints_it(action, key, after):
    from distill.monitor import with_reaction
    obj, warnings = _objective(), []
    mcfg = {"retention_min": 0.85, "watch": "mean", "action": action, "factor": 1.5}
    signals = with_reaction(lambda: {"retention_cka/logits": 0.80, "retention_cka/a->b": 0.84}, obj, mcfg,
                            warnings.append)()
    assert signals["retention_watched"] == pytest.approx(0.82)
    assert obj.strength[key] == pytest.approx(after) and signals["adjusted"][key][1] == pytest.approx(after)
    assert len(warnings) == 1 and "retention 0.820 < 0.85" in warnings[0]
    again = _objective()
    again.load_state_dict(obj.state_dict())  # a resumed run continues with the adjusted strength
    assert again.strength == obj.strength
    calm = with_reaction(lambda: {"retention_cka/logits": 0.9}, again, mcfg, warnings.append)()
    assert "adjusted" not in calm and len(warnings) == 1


def test_a_reaction_at_its_bound_says_so_not_that_it_only_warns():
    from distill.monitor import with_reaction
    obj, warnings = _objective(), []
    obj.strength["temperature"] = 1.0
    mcfg = {"retention_min": 0.85, "watch": "logits", "action": "lower_temperature", "factor": 1.5}
    at_floor = with_reaction(lambda: {"retention_cka/logits": 0.80}, obj, mcfg, warnings.append)
    for _ in range(3):  # (said once: it was the same line every epoch, 150 times in a 150-epoch run)
        assert at_floor()["adjusted"] == {}
    assert warnings == ["monitor: retention 0.800 < 0.85: no adjustment (action: lower_temperature; the temperature "
                        "is at its floor, 1) (said once; each epoch's log line records it)"]
    with_reaction(lambda: {"retention_cka/logits": 0.80}, obj, {**mcfg, "action": "warn"}, warnings.append)()
    assert warnings[-1].endswith("no adjustment (action: warn)")
    # the feature weights stop at 10 times the recipe's (they grew 1.5 times an epoch, to 1e7 in 40 epochs)
    raise_features = {**mcfg, "action": "raise_feature_weight"}
    for _ in range(8):
        with_reaction(lambda: {"retention_cka/logits": 0.80}, obj, raise_features, warnings.append)()
    assert obj.strength["feature_scale"] == 10.0 and warnings[-1].endswith(
        "no adjustment (action: raise_feature_weight; the feature scale is at its ceiling, 10) (said once; each "
        "epoch's log line records it)")


def test_run_with_a_retention_rule_logs_every_adjustment(tmp_path):
    recipe = Recipe.load("digits", ["train.epochs=3", "teacher.train.epochs=2", "monitor.retention_min=0.999",
                                    "monitor.action=lower_temperature", "distill.temperature=4"])
    out = str(tmp_path / "run")
    run(recipe, out, echo=lambda m: None)
    student = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    student = [r for r in student if r.get("model") == "student" and "val_accuracy" in r]
    temps = [r["adjusted"]["temperature"] for r in student]
    assert temps[0][0] == 4.0 and all(a[1] == pytest.approx(a[0] / 1.5) for a in temps)
    assert all(temps[i][1] == temps[i + 1][0] for i in range(len(temps) - 1))  # each change starts from the last


# ---------------------------------------------------------------- gradient consistency, cosine, weights, logs

def _tiny_cnn(seed, channels=(4, 8)):
    from distill.models import build_model
    torch.manual_seed(seed)
    return build_model({"model": "cnn", "args": {"channels": list(channels), "hidden": 16}}, (1, 8, 8), 10)


def test_retention_reads_the_same_outputs_with_the_faster_pooling():
    from distill.models import MODELS
    from distill.monitor import retention_monitor
    torch.manual_seed(0)
    teacher = MODELS.get("seed_cnn_teacher")((3, 16, 16), 5).eval()
    student = MODELS.get("seed_cnn_student")((3, 16, 16), 5).train()
    probe = torch.randn(24, 3, 16, 16)
    pools = [m for m in student.modules() if isinstance(m, torch.nn.MaxPool2d)]
    measure = retention_monitor(teacher, student, probe, [("body", "body")])
    got = measure()
    with torch.no_grad():  # the same CKA from a plain eval forward of each model (max-pooling channels-first)
        t_logits, s_logits = teacher(probe), student.eval()(probe)
    student.train()
    assert pools and got["retention_cka/logits"] == linear_cka(t_logits, s_logits)
    assert student.training and not any(m._forward_hooks or m._forward_pre_hooks for m in pools)  # left as it was


def test_input_gradient_cosine_is_one_for_one_model_and_compares_other_widths():
    from distill.monitor import gradient_cosine, input_gradient
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    a, b = _tiny_cnn(0), _tiny_cnn(1, channels=(8, 16))
    a.train()
    ga = input_gradient(a, x, y)
    assert a.training and all(p.grad is None for p in a.parameters())  # mode kept, parameters untouched
    assert gradient_cosine(ga, input_gradient(a, x, y)) == pytest.approx(1.0)
    manual = x.clone().requires_grad_(True)
    a.eval()
    torch.nn.functional.cross_entropy(a(manual), y, reduction="sum").backward()
    assert torch.allclose(ga.grad.float(), manual.grad.flatten(1), atol=1e-6)
    cos = gradient_cosine(ga, input_gradient(b, x, y))
    assert -1.0 <= cos <= 1.0 and cos != pytest.approx(1.0)


def test_token_input_gradients_compare_through_the_vocabulary_whatever_the_widths():
    transformers = pytest.importorskip("transformers")
    from distill.models.hf import HFClassifier
    from distill.monitor import gradient_cosine, input_gradient

    def bert(hidden, seed):
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=hidden, max_position_embeddings=16, num_labels=3)
        return HFClassifier(transformers.BertForSequenceClassification(cfg), pad_id=0, mask_id=None, special_ids=[])
    x, y = torch.randint(1, 50, (6, 10)), torch.randint(0, 3, (6,))
    ga, gb = input_gradient(bert(16, 0), x, y), input_gradient(bert(8, 1), x, y)
    # the same cosine computed on the explicit (tokens x vocabulary) one-hot gradients
    oa, ob = (g.grad @ g.embedding.T for g in (ga, gb))
    explicit = torch.nn.functional.cosine_similarity(oa.flatten(1), ob.flatten(1), dim=1).mean().item()
    assert gradient_cosine(ga, gb) == pytest.approx(explicit, rel=1e-9)
    assert gradient_cosine(ga, ga) == pytest.approx(1.0)


def test_a_character_gpt_s_input_gradient_is_by_its_embedded_tokens():
    """The registry GPT (text_lm, where monitor.gradients is on by default) was differentiated by its float
    ids, which its embedding never reads: a traceback at the first probe."""
    from distill.models import build_model
    from distill.monitor import gradient_cosine, input_gradient, retention_monitor
    torch.manual_seed(0)
    gpt = lambda width: build_model({"model": "gpt", "args": {"layers": 1, "width": width, "heads": 2}},  # noqa
                                    (12,), 20)
    a, b = gpt(16), gpt(8)
    x, y = torch.randint(0, 20, (4, 12)), torch.randint(0, 20, (4, 12))
    y[:, :3] = -1  # (positions without a target are left out)
    ga = input_gradient(a, x, y)
    assert ga.grad.shape == (4, 12, 16) and ga.embedding.shape == (20, 16)
    assert gradient_cosine(ga, input_gradient(a, x, y)) == pytest.approx(1.0)
    assert -1.0 <= gradient_cosine(ga, input_gradient(b, x, y)) <= 1.0
    assert "grad_input_cos" in retention_monitor(a, b, x, [], labels=y)()


def test_kd_ce_consistency_matches_separate_backward_passes_per_layer():
    from distill.monitor import kd_ce_consistency
    from distill.losses import ce_loss, kd_loss
    model, x, y = _tiny_cnn(0), torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    t_logits = torch.randn(16, 10)

    def grads(which):
        model.zero_grad()
        logits = model(x)
        (kd_loss(logits, t_logits, 4.0) if which == "kd" else ce_loss(logits, y)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    g_kd, g_ce = grads("kd"), grads("ce")
    model.zero_grad()
    logits = model(x)
    out = kd_ce_consistency(model, kd_loss(logits, t_logits, 4.0), ce_loss(logits, y))
    flat = lambda g, keep=lambda n: True: torch.cat([v.flatten() for n, v in g.items() if keep(n)])  # noqa: E731
    expected = torch.nn.functional.cosine_similarity(flat(g_kd), flat(g_ce), dim=0).item()
    assert out["grad_kd_ce_cos"] == pytest.approx(expected, abs=1e-5)
    layer = next(k for k in out if k != "grad_kd_ce_cos").split("/", 1)[1]
    in_layer = lambda n: n.startswith(layer + ".")  # noqa: E731
    assert out[f"grad_kd_ce_cos/{layer}"] == pytest.approx(
        torch.nn.functional.cosine_similarity(flat(g_kd, in_layer), flat(g_ce, in_layer), dim=0).item(), abs=1e-5)
    assert all(p.grad is None for p in model.parameters())  # measured without touching .grad


def test_projected_cosine_is_one_for_equal_features_and_uses_the_projector():
    from distill.losses import Projector
    from distill.monitor import projected_cosine
    f = torch.randn(8, 6)
    assert projected_cosine(f, f, Projector("identity", 6, 6)) == pytest.approx(1.0)
    proj = Projector("linear", 6, 4)
    with torch.no_grad():
        target = proj(f)
    assert projected_cosine(f, target, proj) == pytest.approx(1.0)
    assert projected_cosine(f, -target, proj) == pytest.approx(-1.0)


def test_confidence_weights_average_one_and_reduce_to_plain_kd_for_an_equally_sure_teacher():
    from distill.losses import confidence_weights, kd_loss
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    w = confidence_weights(t)
    assert w.mean().item() == pytest.approx(1.0) and bool((w > 0).all())
    assert int(w.argmax()) == int(t.softmax(-1).max(-1).values.argmax())  # the surest sample weighs most
    same = torch.eye(5)[torch.arange(8) % 5] * 3.0  # every sample equally confident
    assert kd_loss(s, same, 2.0, confidence_weights(same)).item() == pytest.approx(kd_loss(s, same, 2.0).item())
    per = torch.nn.functional.kl_div((s / 2).log_softmax(-1), (t / 2).log_softmax(-1), reduction="none",
                                     log_target=True).sum(-1)
    assert kd_loss(s, t, 2.0, w).item() == pytest.approx(((per * w).mean() * 4).item(), rel=1e-6)


TINY_CNN_PAIR = ["train.epochs=3", "data.label_fraction=1", "teacher.train.epochs=2", "data.as_image=true",
                 "teacher.model=cnn",
                 "teacher.args={channels: [8, 16], hidden: 32}", "student.arch=null", "student.model=cnn",
                 "student.args={channels: [4, 8], hidden: 16}",
                 "distill.features=[{teacher: body.3, student: body.3, loss: mse}]", "monitor.every=5",
                 "monitor.gradients_every=5", "monitor.measure_every=0"]


def test_run_logs_gradient_consistency_cosine_and_step_lines(tmp_path):
    out = str(tmp_path / "run")
    run(Recipe.load("digits", TINY_CNN_PAIR), out, echo=lambda m: None)
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    epochs = [r for r in lines if r.get("model") == "student" and "val_accuracy" in r]
    for r in epochs:
        assert -1 <= r["grad_input_cos"] <= 1 and -1 <= r["grad_kd_ce_cos"] <= 1
        assert -1 <= r["retention_cos/body.3->body.3"] <= 1
        assert any(k.startswith("grad_kd_ce_cos/") for k in r)
        assert 0 <= r["train_accuracy"] <= 1 and r["val_loss"] > 0
    for model in ("teacher", "student_scratch", "student"):
        steps = [r for r in lines if r.get("model") == model and "step" in r and "val_accuracy" not in r]
        assert steps and [r["step"] for r in steps] == list(range(5, 5 * len(steps) + 1, 5))
        assert all(r["loss_total_max"] >= r["loss_total"] for r in steps)
        assert all(("grad_kd_ce_cos" in r) == (model == "student") for r in steps)


def test_epoch_lines_only_still_hold_the_kd_ce_gradient_cosine(tmp_path):
    """monitor.every: 0 leaves the step lines out, not the gradient signals measured on steps (their means are
    in the epoch lines)."""
    out = str(tmp_path / "run")
    run(Recipe.load("digits", [*TINY_CNN_PAIR, "monitor.every=0", "baseline=false"]), out, echo=lambda m: None)
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert not [r for r in lines if "step" in r and "val_accuracy" not in r]
    epochs = [r for r in lines if r.get("model") == "student" and "val_accuracy" in r]
    assert len(epochs) == 3 and all(-1 <= r["grad_kd_ce_cos"] <= 1 for r in epochs)


def test_retention_is_measured_in_epochs_that_pass_a_multiple_of_measure_every(tmp_path):
    """Tiny epochs are measured every few epochs (and the last always); the weights do not depend on it."""
    from safetensors.torch import load_file
    from distill.engine.sampling import steps_per_epoch
    per_epoch = steps_per_epoch(1221, 64, 1)  # (digits: 1,221 training images, batch 64)
    every = 2 * per_epoch + 1  # passed during epochs 3 and 5 of 6
    weights = {}
    for name, sets in (("sparse", [f"monitor.measure_every={every}"]), ("dense", ["monitor.measure_every=0"])):
        out = tmp_path / name
        run(Recipe.load("digits", [*TINY_CNN_PAIR, "train.epochs=6", *sets]), str(out), echo=lambda m: None)
        lines = [json.loads(line) for line in open(out / "log.jsonl")]
        epochs = [r for r in lines if r.get("model") == "student" and "val_accuracy" in r]
        measured = [r["epoch"] for r in epochs if "retention_cka/logits" in r]
        assert measured == ([3, 5, 6] if name == "sparse" else [1, 2, 3, 4, 5, 6]), measured
        assert all(("grad_input_cos" in r) == (r["epoch"] in measured) for r in epochs)
        weights[name] = load_file(str(out / "student.safetensors"))
        # what the monitor cost is reported beside the training time, which includes it
        stage, metrics = (json.load(open(out / f))["student"] for f in ("stages.json", "metrics.json"))
        assert 0 < stage["monitor_s"] < stage["train_time_s"] and metrics["monitor_s"] == stage["monitor_s"]
    assert all(torch.equal(weights["sparse"][k], weights["dense"][k]) for k in weights["dense"])


def test_the_monitor_callbacks_time_themselves_in_the_progress_a_checkpoint_keeps():
    """A resumed stage's monitor_s counts the earlier attempts' time too (it was this attempt's alone)."""
    from types import SimpleNamespace
    from distill.engine.callbacks import Monitor
    import time
    cb = Monitor(lambda: time.sleep(0.02) or {"retention_cka/logits": 1.0}, every=0)
    for earlier in ({}, {"monitor_s": 5.0}):  # (a fresh stage; one resumed from a checkpoint's progress)
        t = SimpleNamespace(prog={"step": 10, **earlier}, tcfg={"epochs": 2}, per_epoch=10,
                            runtime=SimpleNamespace(distributed=False))
        record = {"epoch": 1}
        cb.on_epoch_end(t, record)
        start = earlier.get("monitor_s", 0.0)
        assert record["retention_cka/logits"] == 1.0 and start + 0.02 <= t.prog["monitor_s"] < start + 1.0


def test_measuring_gradients_does_not_change_training(tmp_path):
    from safetensors.torch import load_file
    weights = []
    for on in ("true", "false"):
        out = str(tmp_path / on)
        run(Recipe.load("digits", [*TINY_CNN_PAIR, f"monitor.gradients={on}", "monitor.every=2",
                                   "monitor.gradients_every=2"]), out,
            echo=lambda m: None)
        weights.append(load_file(os.path.join(out, "student.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_tensorboard_gets_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from distill.cli import main
    out = str(tmp_path / "run")
    assert main(["run", "digits", "--set", "train.epochs=2", "--set", "teacher.train.epochs=1", "--out", out,
                 "--set", "monitor.gradients_every=10", "--tensorboard"]) == 0
    events = EventAccumulator(os.path.join(out, "tensorboard", "student"), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"epoch/val_accuracy", "epoch/retention_cka/logits", "epoch/grad_input_cos", "step/loss_total",
            "step/grad_kd_ce_cos"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("epoch/val_accuracy")] == [1, 2]
    assert any(t.startswith("weights/") for t in tags["histograms"])
    assert os.path.isdir(os.path.join(out, "tensorboard", "teacher"))


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch, capsys):
    import sys
    from distill.cli import main
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert main(["run", "digits", "--out", str(tmp_path / "run"), "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[tensorboard]'" in err
    assert not os.path.exists(tmp_path / "run")  # nothing written


@pytest.mark.parametrize("sets, message", [
    (["monitor.action=lower_temperature", "monitor.factor=0.5"],
     "monitor.factor: 0.5: the reaction multiplies by it (T / factor, alpha x factor, feature weights x factor); "
     "give a number above 1"),
    (["monitor.action=raise_feature_weight"],
     "monitor.action: raise_feature_weight scales the feature losses (distill.features, distill.layers), and the "
     "recipe has none"),
    (["monitor.action=raise_alpha", "distill.alpha=0"],
     "monitor.action: raise_alpha multiplies distill.alpha, which is 0 and stays 0")])
def test_a_reaction_that_cannot_move_what_it_adjusts_is_refused(sets, message):
    """factor <= 1 would turn each action around (T / 0.5 doubles the temperature); a feature weight with no
    feature loss, or alpha 0, stay where they are however often the reaction fires."""
    from distill.errors import UserError
    with pytest.raises(UserError) as e:
        Recipe.load("breast_cancer", ["monitor.retention_min=0.9", *sets])
    assert str(e.value).startswith(message), str(e.value)
    Recipe.load("breast_cancer", [*sets])  # (no retention_min: no reaction, nothing refused)
    Recipe.load("breast_cancer", ["monitor.retention_min=0.9", "monitor.action=warn", *sets[1:]])


@pytest.mark.parametrize("sets, warning", [
    (["monitor.action=raise_alpha", "distill.alpha=1"], "monitor.action: raise_alpha does nothing at distill.alpha 1"),
    (["monitor.action=lower_temperature", "distill.temperature=0.5"],  # (it was raised to 1: the reverse)
     "monitor.action: lower_temperature does nothing at distill.temperature 0.5"),
    (["monitor.action=raise_alpha", "distill.schedule.alpha=linear", "distill.schedule.alpha_end=0.1"],
     "monitor.action: raise_alpha scales the start of distill.schedule.alpha: linear, not the alpha in use"),
])
def test_a_reaction_that_cannot_move_or_that_a_schedule_overrides_is_said(sets, warning):
    """Said as a warning when a run starts (a search may cross the reaction with these values)."""
    said = Recipe.load("breast_cancer", ["monitor.retention_min=0.9", *sets]).warnings
    assert len(said) == 1 and said[0].startswith(warning), said
    assert Recipe.load("breast_cancer", sets).warnings == [  # (no retention_min: no reaction)
        "monitor.action: does nothing without monitor.retention_min (the retention under which the monitor reacts)"]


def test_lower_temperature_never_raises_the_temperature():
    from distill.monitor import with_reaction
    obj, warnings = _objective(), []
    obj.strength["temperature"] = 0.5
    mcfg = {"retention_min": 0.85, "watch": "logits", "action": "lower_temperature", "factor": 1.5}
    with_reaction(lambda: {"retention_cka/logits": 0.80}, obj, mcfg, warnings.append)()
    assert obj.strength["temperature"] == 0.5
