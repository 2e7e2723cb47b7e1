"""Losses against values computed by hand, and the bugs that silently ruin KD."""
import math

import pytest
import torch
from torch import nn

from distill.losses import Projector, align, ce_loss, feature_cosine, feature_mse, kd_loss
from distill.registry import LOSSES
from distill.engine.objective import Objective


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_registry_lists_all_losses():
    assert LOSSES.names() == ["at", "attention_kl", "attention_mse", "ce", "cosine", "crd", "dist", "dkd", "forward_kl",
                              "jsd", "kd", "mse", "pkt", "reverse_kl", "rkd", "rkd_angle", "rkd_distance",
                              "skew_kl", "skew_reverse_kl", "sp", "tvd"]


def test_kd_matches_hand_computed_kl_times_t_squared():
    s, t, T = [1.0, 2.0, 0.5], [3.0, 0.0, 1.0], 2.0
    ps, pt = softmax([x / T for x in s]), softmax([x / T for x in t])
    expected = sum(a * math.log(a / b) for a, b in zip(pt, ps)) * T * T  # KL(teacher || student) * T^2
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), T).item()
    assert got == pytest.approx(expected, rel=1e-5)
    wrong_side = sum(b * math.log(b / a) for a, b in zip(pt, ps)) * T * T
    assert abs(got - wrong_side) > 1e-3  # the two directions differ here, and we use the teacher as target


def test_kd_t_squared_scaling_and_batch_mean():
    s, t = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]), torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    per = [kd_loss(s[i:i + 1], t[i:i + 1], 3.0).item() for i in range(2)]
    assert kd_loss(s, t, 3.0).item() == pytest.approx(sum(per) / 2, rel=1e-6)
    raw = torch.nn.functional.kl_div(torch.log_softmax(s / 3, 1), torch.softmax(t / 3, 1), reduction="batchmean")
    assert kd_loss(s, t, 3.0).item() == pytest.approx(raw.item() * 9, rel=1e-5)


def test_kd_zero_when_equal_and_t1_is_plain_kl():
    x = torch.randn(4, 5)
    assert kd_loss(x, x.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    ps, pt = softmax([0.0, 1.0]), softmax([1.0, 0.0])
    assert kd_loss(s, t, 1.0).item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(pt, ps)), rel=1e-5)


def test_ce_hand_computed():
    logits = [2.0, 1.0, 0.1]
    expected = -math.log(softmax(logits)[0])
    assert ce_loss(torch.tensor([logits]), torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_feature_losses_hand_computed():
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert feature_mse(a, b).item() == pytest.approx((1 + 1 + 1 + 1) / 4)
    # cos = 0 for the first pair, 1 for the second -> mean(1 - cos) = 0.5
    assert feature_cosine(a, b).item() == pytest.approx(0.5, abs=1e-6)


def test_projector_maps_widths_and_conv_maps_by_channel():
    proj = Projector("linear", 8, 16)
    s, t = align(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2), proj)  # spatial sizes pooled to match
    assert s.shape == t.shape == (2, 2, 2, 16)
    assert Projector("mlp", 8, 16)(torch.randn(3, 8)).shape == (3, 16)


def test_identity_projector_refuses_width_mismatch():
    from distill.errors import UserError
    with pytest.raises(UserError, match="student width 8 != teacher width 16"):
        Projector("identity", 8, 16)


class _Recorder(nn.Module):
    """A student that records whether it was in training mode for each forward pass."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.head(torch.relu(self.body(x)))


def _teacher_source(teacher):
    from distill.engine.batch import TeacherOutputs
    from distill.teachers import teacher_forward
    return lambda x, idx: TeacherOutputs(*teacher_forward(teacher, x))


def test_objective_alpha_0_is_ce_and_alpha_1_is_kd():
    torch.manual_seed(0)
    student, teacher = _Recorder(), nn.Sequential(nn.Linear(4, 3))
    x, y, idx = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)
    for alpha, expect in ((0.0, lambda s, t: ce_loss(s, y)), (1.0, lambda s, t: kd_loss(s, t, 3.0))):
        obj = Objective(student, {"alpha": alpha, "temperature": 3.0, "features": []}, _teacher_source(teacher))
        loss, parts = obj(x, y, idx)
        with torch.no_grad():
            assert loss.item() == pytest.approx(expect(student(x), teacher(x)).item(), rel=1e-6)
    obj = Objective(student, {"alpha": 0.25, "temperature": 3.0, "features": []}, _teacher_source(teacher))
    loss, parts = obj(x, y, idx)
    assert loss.item() == pytest.approx(0.75 * float(parts["ce"]) + 0.25 * float(parts["kd"]), rel=1e-6)


def test_teacher_builds_no_graph_and_gets_no_gradient():
    teacher, student = nn.Sequential(nn.Linear(4, 3)), _Recorder()
    obj = Objective(student, {"alpha": 0.9, "temperature": 4.0, "features": []}, _teacher_source(teacher))
    loss, _ = obj(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.arange(5))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not teacher.training  # eval mode: no dropout, frozen batch-norm statistics
    assert not any(p in set(teacher.parameters()) for p in obj.parameters())


def test_student_is_in_train_mode_every_epoch_after_evaluation():
    from distill.data.datasets import DataBundle
    from distill.recipe import SCHEMA, TRAIN, validate_section
    from distill.engine.trainer import fit
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.arange(40) % 3
    data = DataBundle(x, y, x[:10], y[:10], x[:10], y[:10], 3, ["a", "b", "c"], (4,), False, "fp")
    student = _Recorder()
    tcfg = validate_section({"epochs": 3}, TRAIN, "train")
    dcfg = validate_section({"batch_size": 8}, SCHEMA["data"], "data")
    fit("student", Objective(student), data, dcfg, tcfg)
    train_passes = [m for m in student.modes if m]
    assert len(train_passes) == 3 * 5  # 5 batches an epoch, all in train mode, epoch after epoch
    # the order is: 5 training passes, then validation (eval mode), repeated
    assert student.modes[:6] == [True] * 5 + [False]
    assert student.modes[6] is True


def test_lr_schedules():
    from distill.engine.trainer import lr_factor
    cos = {"name": "cosine", "warmup_epochs": 0, "milestones": [], "gamma": 0.1}
    assert [round(lr_factor(e, cos, 4), 4) for e in range(4)] == [1.0, 0.8536, 0.5, 0.1464]
    step = {"name": "multistep", "warmup_epochs": 0, "milestones": [2, 3], "gamma": 0.1}
    assert [round(lr_factor(e, step, 5), 6) for e in range(5)] == [1.0, 1.0, 0.1, 0.01, 0.01]
    warm = {"name": "constant", "warmup_epochs": 3, "milestones": [], "gamma": 0.1}
    assert [lr_factor(e, warm, 6) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_optimizers_from_the_recipe():
    from distill.engine.trainer import make_optimizer
    p = [torch.nn.Parameter(torch.zeros(2))]
    base = {"lr": 0.1, "weight_decay": 0.01, "momentum": 0.8, "nesterov": True}
    sgd = make_optimizer(p, {**base, "name": "sgd"})
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"]
    assert isinstance(make_optimizer(p, {**base, "name": "adam"}), torch.optim.Adam)
    assert isinstance(make_optimizer(p, {**base, "name": "adamw"}), torch.optim.AdamW)
