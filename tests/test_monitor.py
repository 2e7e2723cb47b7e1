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
                                    "distill.features=[{teacher: body.3, student: body.3, loss: mse}]"])
    out = str(tmp_path / "run")
    run(recipe, out, echo=lambda m: None)
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    student = [r for r in lines if r.get("model") == "student" and "epoch" in r]
    assert len(student) == 3
    for r in student:
        assert 0.0 <= r["retention_cka/logits"] <= 1.0 + 1e-9
        assert 0.0 <= r["retention_cka/body.3->body.3"] <= 1.0 + 1e-9
    others = [r for r in lines if r.get("model") in ("teacher", "student_scratch") and "epoch" in r]
    assert others and not any(k.startswith("retention") for r in others for k in r)


def _objective(**distill):
    from distill.models import build_model
    from distill.train import Objective
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


def test_run_with_a_retention_rule_logs_every_adjustment(tmp_path):
    recipe = Recipe.load("digits", ["train.epochs=3", "teacher.train.epochs=2", "monitor.retention_min=0.999",
                                    "monitor.action=lower_temperature"])
    out = str(tmp_path / "run")
    run(recipe, out, echo=lambda m: None)
    student = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    student = [r for r in student if r.get("model") == "student" and "epoch" in r]
    temps = [r["adjusted"]["temperature"] for r in student]
    assert temps[0][0] == 4.0 and all(a[1] == pytest.approx(a[0] / 1.5) for a in temps)
    assert all(temps[i][1] == temps[i + 1][0] for i in range(len(temps) - 1))  # each change starts from the last
