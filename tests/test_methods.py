"""The method zoo against its papers' formulas, computed here by hand (loops over samples, pairs and triplets
in NumPy float64) on small tensors; then each method trained from a recipe."""
import math

import numpy as np
import pytest
import torch

from distill.losses.contrastive import CRD, nce_loss
from distill.losses.kd import kd_loss
from distill.losses.logits import dist_loss, dkd_loss, dkd_parts, standardize
from distill.losses.relations import at_loss, pkt_loss, rkd_angle, rkd_distance, rkd_loss, sp_loss
from distill.registry import LOSSES


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3, torch.tensor([0, 1, 2, 3, 4, 0])


def test_every_method_is_registered_in_its_group():
    assert {"kd", "dkd", "dist"} <= set(LOSSES.names(group="logits"))
    assert {"at", "pkt", "rkd", "rkd_distance", "rkd_angle", "sp", "crd"} <= set(LOSSES.names(group="feature"))


def test_dkd_matches_the_paper_per_sample(logits):
    s, t, y = logits
    T, alpha, beta = 2.0, 1.0, 8.0
    expected = []
    for i in range(len(y)):
        ps, pt = softmax(s[i].double().numpy() / T), softmax(t[i].double().numpy() / T)
        g = int(y[i])
        b_s, b_t = np.array([ps[g], 1 - ps[g]]), np.array([pt[g], 1 - pt[g]])
        rest = [c for c in range(5) if c != g]
        n_s, n_t = ps[rest] / ps[rest].sum(), pt[rest] / pt[rest].sum()
        expected.append(alpha * kl(b_t, b_s) + beta * kl(n_t, n_s))
    got = dkd_loss(s, t, T, labels=y, alpha=alpha, beta=beta)
    assert got.item() == pytest.approx(np.mean(expected) * T * T, rel=1e-5)


def test_kd_decomposes_into_tckd_plus_weighted_nckd(logits):
    """Zhao et al.'s eq. (3): KD = TCKD + (1 - p_t^target) NCKD, per sample."""
    s, t, y = logits
    tckd, nckd = dkd_parts(s, t, y, 3.0)
    p_target = torch.softmax(t / 3.0, -1).gather(1, y[:, None]).squeeze(1)
    per_sample_kd = torch.stack([kd_loss(s[i:i + 1], t[i:i + 1], 3.0) / 9.0 for i in range(len(y))])
    assert torch.allclose(tckd + (1 - p_target) * nckd, per_sample_kd, atol=1e-5)


def test_dkd_takes_the_teachers_class_for_samples_without_a_label(logits):
    s, t, y = logits
    unlabelled = torch.full_like(y, -1)
    assert dkd_loss(s, t, 2.0, labels=unlabelled).item() == pytest.approx(
        dkd_loss(s, t, 2.0, labels=t.argmax(1)).item())


def pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_dist_matches_the_paper(logits):
    s, t, _ = logits
    T, beta, gamma = 4.0, 2.0, 0.5
    ys = np.stack([softmax(r / T) for r in s.double().numpy()])
    yt = np.stack([softmax(r / T) for r in t.double().numpy()])
    inter = 1 - np.mean([pearson(ys[i], yt[i]) for i in range(len(ys))])
    intra = 1 - np.mean([pearson(ys[:, j], yt[:, j]) for j in range(ys.shape[1])])
    got = dist_loss(s, t, T, beta=beta, gamma=gamma)
    assert got.item() == pytest.approx(T * T * (beta * inter + gamma * intra), rel=1e-4)


def test_logit_standardisation_is_the_z_score_and_ignores_shift_and_scale(logits):
    s, t, _ = logits
    z = standardize(s).double().numpy()
    for i, row in enumerate(s.double().numpy()):
        assert np.allclose(z[i], (row - row.mean()) / row.std(ddof=1), atol=1e-5)
    # the point of it (Sun et al.): a student whose logits are an affine copy of the teacher's matches it
    same = kd_loss(standardize(3 * t + 7), standardize(t), 2.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(3 * t + 7, t, 2.0).item() > 0.1


def test_at_matches_the_paper():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 7, 5, 5, generator=g)
    expected = []
    for i in range(3):
        qs = (s[i].double().numpy() ** 2).sum(0).ravel()
        qt = (t[i].double().numpy() ** 2).sum(0).ravel()
        expected.append(np.linalg.norm(qs / np.linalg.norm(qs) - qt / np.linalg.norm(qt)))
    assert at_loss(s, t).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_at_pools_the_larger_map_and_refuses_vectors():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    assert at_loss(s, t).item() == pytest.approx(at_loss(torch.nn.functional.avg_pool2d(s, 2), t).item(), rel=1e-6)
    wide, tall = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 8, 4, generator=g)  # (each side the smaller)
    pool = torch.nn.functional.adaptive_avg_pool2d
    assert at_loss(wide, tall).item() == pytest.approx(at_loss(pool(wide, 4), pool(tall, 4)).item(), rel=1e-6)
    from distill.errors import UserError
    with pytest.raises(UserError, match="loss at compares"):
        at_loss(torch.randn(2, 3), torch.randn(2, 3))


def cosine_probabilities(x):
    n = len(x)
    k = np.array([[(np.dot(x[a], x[b]) / np.linalg.norm(x[a]) / np.linalg.norm(x[b]) + 1) / 2
                   for b in range(n)] for a in range(n)])
    p = np.zeros((n, n))
    for j in range(n):
        denom = sum(k[m, j] for m in range(n) if m != j)
        for i in range(n):
            if i != j:
                p[i, j] = k[i, j] / denom
    return p


def test_pkt_matches_the_paper():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 9, generator=g)
    ps, pt = cosine_probabilities(s.double().numpy()), cosine_probabilities(t.double().numpy())
    total = sum(pt[i, j] * math.log(pt[i, j] / ps[i, j]) for i in range(5) for j in range(5) if i != j)
    assert pkt_loss(s, t).item() == pytest.approx(total / 5, rel=1e-4)


def rkd_by_hand(s, t):
    n = len(s)

    def unit(v):  # (a sample twice in the batch: no direction, 0)
        norm = np.linalg.norm(v)
        return v / norm if norm else v * 0

    def psi_d(x):
        d = {(i, j): np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n) if i != j}
        mu = np.mean(list(d.values()))
        return {k: v / mu for k, v in d.items()}

    def psi_a(x):
        out = {}
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    if len({i, j, k}) == 3:
                        e1, e2 = unit(x[i] - x[j]), unit(x[k] - x[j])
                        out[(i, j, k)] = float(np.dot(e1, e2))
        return out
    ds, dt, a_s, a_t = psi_d(s), psi_d(t), psi_a(s), psi_a(t)
    dist = np.mean([huber(ds[k], dt[k]) for k in ds])
    angle = np.mean([huber(a_s[k], a_t[k]) for k in a_s])
    return dist, angle


def test_rkd_matches_the_paper():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 6, generator=g) * 4
    dist, angle = rkd_by_hand(s.double().numpy(), t.double().numpy())
    assert rkd_distance(s, t).item() == pytest.approx(dist, rel=1e-4)
    assert rkd_angle(s, t).item() == pytest.approx(angle, rel=1e-4)
    assert rkd_loss(s, t).item() == pytest.approx(dist + 2 * angle, rel=1e-4)


def test_rkd_is_zero_for_a_scaled_rotated_copy():
    """Distances over their mean and angles do not change under rotation and scale."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(6, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    assert rkd_loss(3 * t @ q, t).item() == pytest.approx(0.0, abs=1e-5)


def test_rkd_on_two_samples_is_zero_not_nan():
    """Two samples have no triplet of distinct ones: the angle term averaged an empty tensor to NaN, and the
    step was skipped without a word (a last batch of 2, or batch_size 2, stopped the run blaming the lr)."""
    s = torch.randn(2, 4, requires_grad=True)
    loss = rkd_loss(s, torch.randn(2, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert rkd_angle(s, torch.randn(2, 4)).item() == 0.0


def test_rkd_angle_of_a_sample_drawn_twice_keeps_a_normal_gradient():
    """F.normalize of x_i - x_j = 0 has the gradient 1/eps: a sample twice in a batch (drawn with replacement)
    multiplied the student's gradient by a thousand. The coinciding pair is left out of the angles instead."""
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 5)
    x, t = torch.randn(8, 6), torch.randn(8, 5)
    twice = x.clone()
    twice[3] = twice[1]
    norms = []
    for inputs in (x, twice):
        net.zero_grad()
        rkd_loss(net(inputs), t).backward()
        norms.append(torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item())
    assert norms[1] < 10 * norms[0]
    s = torch.randn(5, 4, dtype=torch.float64)
    s[4] = s[0]
    dist, angle = rkd_by_hand(s.numpy(), t[:5].double().numpy())  # (the value: the pair's angle counts as 0)
    assert rkd_angle(s, t[:5]).item() == pytest.approx(angle, rel=1e-6)


def test_dist_weights_each_position_of_a_sequence():
    """Confidence weights on (N, L, V) logits were left (N, L) while the rows were flattened and masked: a
    traceback for DIST on a GPT student."""
    from distill.losses.kd import confidence_weights
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, 10, generator=g), torch.randn(4, 6, 10, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    w = confidence_weights(t)
    got = dist_loss(s, t, 2.0, weights=w, mask=mask)
    keep = mask.reshape(-1)
    rows = dist_loss(s.reshape(-1, 10)[keep], t.reshape(-1, 10)[keep], 2.0, weights=w.reshape(-1)[keep])
    assert got.item() == pytest.approx(rows.item(), rel=1e-6)


def test_sp_matches_the_paper():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 5, 2, 2, generator=g)
    qs, qt = s.reshape(4, -1).double().numpy(), t.reshape(4, -1).double().numpy()
    gs, gt = qs @ qs.T, qt @ qt.T
    gs = gs / np.linalg.norm(gs, axis=1, keepdims=True)
    gt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
    assert sp_loss(s, t).item() == pytest.approx(np.sum((gt - gs) ** 2) / 16, rel=1e-5)


def test_crd_scores_rows_drawn_or_the_whole_bank_alike():
    losses = []
    for whole in (2 ** 24, 0):
        torch.manual_seed(0)
        crd = CRD(s_dim=3, t_dim=4, n_data=50, embed_dim=8, negatives=16)
        crd.whole_bank = whole
        losses.append(crd(torch.randn(6, 3), torch.randn(6, 4), torch.arange(6)))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)


def test_crd_matches_the_nce_formula_and_updates_its_banks():
    torch.manual_seed(0)
    crd = CRD(s_dim=3, t_dim=4, n_data=10, embed_dim=2, negatives=4, temperature=0.5, momentum=0.5)
    s, t, idx = torch.randn(3, 3), torch.randn(3, 4), torch.tensor([1, 5, 9])
    mem_s, mem_t = crd.memory_s.clone(), crd.memory_t.clone()
    state = torch.get_rng_state()
    loss = crd(s, t, idx)
    torch.set_rng_state(state)
    neg = crd.negatives(idx)  # the same draw
    assert not (neg == idx[:, None]).any() and neg.min() >= 0 and neg.max() < 10
    with torch.no_grad():
        v_s = torch.nn.functional.normalize(crd.embed_s(s), dim=1).double().numpy()
        v_t = torch.nn.functional.normalize(crd.embed_t(t), dim=1).double().numpy()

    def side(anchor, memory):
        p = np.array([[math.exp(np.dot(memory[c], anchor[b]) / 0.5) for c in [int(idx[b])] + neg[b].tolist()]
                      for b in range(3)])
        p = p / (p.mean() * 10)  # Z from this (first) batch
        noise = 4 / 10
        return -np.mean([math.log(p[b, 0] / (p[b, 0] + noise)) + sum(math.log(noise / (p[b, k] + noise))
                                                                     for k in range(1, 5)) for b in range(3)])
    expected = side(v_t, mem_s.double().numpy()) + side(v_s, mem_t.double().numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    for b, i in enumerate(idx.tolist()):  # momentum update of the seen samples only
        want = 0.5 * mem_s[i].double().numpy() + 0.5 * v_s[b]
        assert np.allclose(crd.memory_s[i].double().numpy(), want / np.linalg.norm(want), atol=1e-5)
    loss.backward()  # (the banks were updated in place after the scores: the graph kept its own copy)
    assert crd.embed_s.weight.grad is not None and crd.embed_t.weight.grad.abs().sum() > 0
    untouched = [i for i in range(10) if i not in idx.tolist()]
    assert torch.equal(crd.memory_s[untouched], mem_s[untouched])
    assert nce_loss(torch.tensor([[1.0, 1e-9, 1e-9]]), 10).item() < nce_loss(torch.tensor([[1e-9, 1.0, 1.0]]), 10).item()


# ---------------------------------------------------------------- each method trained from a recipe

from distill import Recipe, run  # noqa: E402
from distill.errors import UserError  # noqa: E402

TINY = ["teacher.train.epochs=2", "train.epochs=2", "data.label_fraction=1", "monitor=off", "baseline=false",
        "train.checkpoint_seconds=0"]
# student conv16-fc32 (body.2: 16x4x4 maps, body.5: 32 wide), teacher conv32-conv64-fc256
FEATURE = {"at": ("body.2", "body.2"), "pkt": ("body.5", "body.8"), "rkd": ("body.5", "body.8"),
           "rkd_distance": ("body.5", "body.8"), "rkd_angle": ("body.5", "body.8"), "sp": ("body.5", "body.8"),
           "crd": ("body.5", "body.8")}


def feature_recipe(loss, extra=()):
    s, t = FEATURE[loss]
    return Recipe.load("digits", TINY + [f"distill.features=[{{student: {s}, teacher: {t}, loss: {loss}}}]",
                                         *(["distill.crd.negatives=64"] if loss == "crd" else []), *extra])


def read_log(out):
    import json
    with open(out / "log.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("method", ["dkd", "dist"])
@pytest.mark.parametrize("standardize", [False, True])
def test_logit_methods_train_from_a_recipe(tmp_path, method, standardize):
    recipe = Recipe.load("digits", TINY + [f"distill.method={method}", f"distill.logit_standardize={standardize}"]
                         + (["distill.dkd.warmup_epochs=0"] if method == "dkd" else []))
    metrics = run(recipe, str(tmp_path), echo=lambda m: None)
    assert metrics["student"]["accuracy"] > 0.2  # (chance: 0.1; two epochs from a two-epoch teacher)
    kd = [r["loss_kd"] for r in read_log(tmp_path) if r.get("model") == "student" and "val_accuracy" in r]
    assert len(kd) == 2 and all(math.isfinite(v) and v > 0 for v in kd) and kd[1] < kd[0]


def test_dkd_warms_up_linearly_over_its_epochs(logits):
    from distill.engine.objective import Objective
    s, t, y = logits
    dcfg = Recipe.load("digits", ["distill.method=dkd", "distill.dkd.warmup_epochs=4"]).cfg["distill"]
    objective = Objective(torch.nn.Identity(), dcfg, lambda x, idx: None)
    full = dkd_loss(s, t, dcfg["temperature"], labels=y, alpha=1.0, beta=8.0)
    for epoch, share in ((0.0, 0.0), (1.0, 0.25), (4.0, 1.0), (9.0, 1.0)):
        objective.epoch = epoch
        assert objective.logit_term(s, t, y, None, None).item() == pytest.approx(share * full.item(), rel=1e-6)


@pytest.mark.parametrize("loss", sorted(FEATURE))
def test_feature_methods_train_from_a_recipe_and_stay_out_of_the_student(tmp_path, loss):
    from safetensors import safe_open
    metrics = run(feature_recipe(loss), str(tmp_path), echo=lambda m: None)
    assert metrics["student"]["accuracy"] > 0.2
    term = [r[f"loss_feat0_{loss}"] for r in read_log(tmp_path) if r.get("model") == "student" and "val_accuracy" in r]
    assert len(term) == 2 and all(math.isfinite(v) for v in term)
    with safe_open(str(tmp_path / "student.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("body.", "head.")) for k in keys)  # no embeddings, banks or projectors


@pytest.mark.parametrize("loss", ["crd", "rkd"])
def test_the_monitor_watches_methods_without_a_projector(tmp_path, loss):
    recipe = Recipe.load("digits", [t for t in TINY if t != "monitor=off"] + [
        f"distill.features=[{{student: body.5, teacher: body.8, loss: {loss}}}]",
        *(["distill.crd.negatives=64"] if loss == "crd" else []), "monitor.measure_every=0"])
    run(recipe, str(tmp_path), echo=lambda m: None)
    epochs = [r for r in read_log(tmp_path) if r.get("model") == "student" and "val_accuracy" in r]
    assert all(-1 <= r["retention_cka/body.8->body.5"] <= 1 for r in epochs) and len(epochs) == 2
    assert not any(k.startswith("retention_cos/") for r in epochs for k in r)  # widths 256 vs 32: no cosine


def test_crd_banks_and_embeddings_resume_bitwise(tmp_path):
    """Stopped after the first of three student epochs and resumed: the same student, bit for bit, as a run
    that never stopped (the banks, Z, the embeddings and the negatives' RNG all come back)."""
    recipe = feature_recipe("crd", ["train.epochs=3"])
    run(recipe, str(tmp_path / "whole"), echo=lambda m: None)

    class Stop(Exception):
        pass

    from distill.pipeline.plan import execute
    from distill.pipeline.rundir import RunDir
    rd = RunDir(recipe, str(tmp_path / "cut"), echo=lambda m: None)

    def stop(epoch, record):
        if epoch == 1:
            raise Stop()
    rd.on_epoch = stop
    with pytest.raises(Stop):
        execute(rd)
    saved = torch.load(sorted((tmp_path / "cut" / "checkpoints" / "student").glob("step-*.pt"))[-1],
                       weights_only=True)
    assert any(k.endswith("memory_s") for k in saved["objective"])  # the bank is in the checkpoint
    run(recipe, str(tmp_path / "cut"), echo=lambda m: None, resume=True)
    assert (tmp_path / "cut" / "student.safetensors").read_bytes() == \
        (tmp_path / "whole" / "student.safetensors").read_bytes()


def test_an_unknown_method_is_one_clear_error():
    with pytest.raises(UserError, match="distill.method.*not a logits loss of the registry; choose from dist, dkd, "
                                        "forward_kl, jsd, kd, reverse_kl"):
        Recipe.load("digits", ["distill.method=fitnet"])


def test_a_nan_batch_leaves_the_crd_banks_and_normalisers_finite():
    """The trainer skips a step whose loss is NaN, but CRD had written the batch's NaN embeddings into its
    memory banks (and a first NaN batch fixed Z at NaN): every later step that drew those rows was NaN too."""
    torch.manual_seed(0)
    crd = CRD(s_dim=3, t_dim=4, n_data=20, embed_dim=8, negatives=4)
    bad = torch.randn(6, 3)
    bad[2] = float("nan")
    assert not torch.isfinite(crd(bad, torch.randn(6, 4), torch.arange(6)))
    assert torch.isfinite(crd.memory_s).all() and torch.isfinite(crd.memory_t).all()
    assert torch.isfinite(crd(torch.randn(6, 3), torch.randn(6, 4), torch.arange(6)))  # (Z fixed on this one)
    assert torch.isfinite(crd.z).all() and (crd.z > 0).all()
