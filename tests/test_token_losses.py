"""The per-position divergences (forward/reverse KL, JSD(beta), skew KL, skew reverse KL, TVD) against NumPy
float64 values written from their formulas, with masks, temperature and T^2; chunked equals unchunked."""
import numpy as np
import pytest
import torch

from distill.errors import UserError
from distill.losses.tokens import token_divergence
from distill.registry import LOSSES

NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def reference(name, s, t, T, mask, beta=0.5, alpha=0.1):
    """The formula per position, then the mean over the masked positions, times T^2 (float64)."""
    ps, pt = softmax(s / T), softmax(t / T)
    if name == "forward_kl":
        d = kl(pt, ps)
    elif name == "reverse_kl":
        d = kl(ps, pt)
    elif name == "jsd":
        m = beta * pt + (1 - beta) * ps
        d = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    elif name == "skew_kl":
        d = kl(pt, alpha * pt + (1 - alpha) * ps)
    elif name == "skew_reverse_kl":
        d = kl(ps, alpha * ps + (1 - alpha) * pt)
    else:
        d = 0.5 * np.abs(pt - ps).sum(-1)
    return (d * mask).sum() / mask.sum() * T * T


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 7, generator=g) * 2, torch.randn(3, 4, 7, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)  # e.g. prompt / padding off
    return s, t, mask


def test_every_divergence_is_a_logits_method_of_the_registry():
    assert set(NAMES) <= set(LOSSES.names(group="logits"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_matches_the_formula_with_mask_and_temperature(logits, name, T):
    s, t, mask = logits
    got = token_divergence(name, s, t, T, mask=mask)
    want = reference(name, s.double().numpy(), t.double().numpy(), T, mask.double().numpy())
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_jsd_beta_and_skew_alpha_are_used(logits, beta):
    s, t, mask = logits
    n = lambda a: a.double().numpy()  # noqa: E731
    got = token_divergence("jsd", s, t, 1.0, mask=mask, beta=beta).item()
    assert got == pytest.approx(reference("jsd", n(s), n(t), 1.0, n(mask), beta=beta), rel=1e-5)
    got = token_divergence("skew_kl", s, t, 1.0, mask=mask, alpha=beta).item()
    assert got == pytest.approx(reference("skew_kl", n(s), n(t), 1.0, n(mask), alpha=beta), rel=1e-5)


def test_jsd_ends_are_forward_and_reverse_kl_and_its_middle_is_symmetric(logits):
    s, t, mask = logits
    assert torch.equal(token_divergence("jsd", s, t, 2.0, mask=mask, beta=0.0),
                       token_divergence("forward_kl", s, t, 2.0, mask=mask))
    assert torch.equal(token_divergence("jsd", s, t, 2.0, mask=mask, beta=1.0),
                       token_divergence("reverse_kl", s, t, 2.0, mask=mask))
    torch.testing.assert_close(token_divergence("jsd", s, t, 1.0, mask=mask, beta=0.5),
                               token_divergence("jsd", t, s, 1.0, mask=mask, beta=0.5))
    # skew with alpha 0 is the plain divergence; forward KL equals Hinton's kd on the same positions
    torch.testing.assert_close(token_divergence("skew_kl", s, t, 1.0, mask=mask, alpha=0.0),
                               token_divergence("forward_kl", s, t, 1.0, mask=mask))
    torch.testing.assert_close(token_divergence("forward_kl", s, t, 2.0, mask=mask),
                               LOSSES.get("kd")(s, t, 2.0, mask=mask))


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked_in_value_and_gradient(logits, name):
    s, t, mask = logits
    grads = []
    for chunk in (3, 10_000):  # 12 positions in chunks of 3 (recomputed in backward), or all at once
        leaf = s.clone().requires_grad_(True)
        loss = token_divergence(name, leaf, t, 2.0, mask=mask, chunk=chunk)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_neither_count_nor_get_gradient(logits, name):
    s, t, mask = logits
    leaf = s.clone().requires_grad_(True)
    loss = token_divergence(name, leaf, t, 1.0, mask=mask)
    loss.backward()
    assert torch.all(leaf.grad[~mask] == 0) and torch.any(leaf.grad[mask] != 0)
    changed = s.clone()
    changed[~mask] = 100.0  # whatever the student says at a masked position
    assert torch.equal(token_divergence(name, changed, t, 1.0, mask=mask), loss.detach())


def test_teacher_gets_no_gradient_and_classifier_logits_work(logits):
    s, t, _ = logits
    t = t.clone().requires_grad_(True)
    token_divergence("jsd", s[:, 0].requires_grad_(True), t[:, 0], 1.0).backward()  # (N, C): a sample each
    assert t.grad is None


def test_different_vocabularies_are_refused(logits):
    s, t, mask = logits
    with pytest.raises(UserError, match=r"student gives 7 logits per token and the teacher 6; .*vocab_align: truncate"):
        token_divergence("forward_kl", s, t[..., :6], 1.0, mask=mask)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"])
def test_gradcheck(name):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(lambda z: token_divergence(name, z, t, 2.0, mask=mask), (s,))


def _buckets_reference(z, ids):
    """log p over the teacher's ids, then log of the mass outside them (float64, from the formula)."""
    p = softmax(z)
    kept = np.take_along_axis(p, ids, -1)
    outside = p.sum(-1) - kept.sum(-1)
    return np.concatenate([np.log(kept), np.log(outside)[..., None]], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_buckets_match_the_formula_and_gradcheck(dtype):
    from distill.losses.tokens import topk_buckets
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(6, 9, generator=g) * 3).to(dtype)
    ids = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(6)])
    z64 = z.double().numpy()
    got = topk_buckets(z, ids).double().numpy()
    want = np.concatenate([np.take_along_axis(z64, ids.numpy(), -1) - np.log(np.exp(z64).sum(-1, keepdims=True)),
                           _buckets_reference(z64, ids.numpy())[..., 3:]], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: topk_buckets(x, ids), (z.clone().requires_grad_(True),))


def test_topk_tail_below_float_range_is_summed_exactly_with_its_gradient():
    """Ids holding all but e^-200 of the mass: exp underflows in fp32, and the row is summed again at its
    own scale; its value and gradient match float64."""
    from distill.losses.tokens import topk_buckets
    z = torch.zeros(2, 8)
    z[:, 3:] = -200.0
    ids = torch.arange(3).repeat(2, 1)
    z32, z64 = z.clone().requires_grad_(True), z.double().requires_grad_(True)
    a, b = topk_buckets(z32, ids), topk_buckets(z64, ids)
    assert abs(float(a.detach()[0, 3]) - (-200 + np.log(5) - np.log(3))) < 1e-3  # the tail: 5 e^-200 over 3
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    (ga,), (gb,) = torch.autograd.grad((a * w).sum(), z32), torch.autograd.grad((b * w.double()).sum(), z64)
    assert torch.allclose(ga.double(), gb, atol=1e-5) and torch.isfinite(ga).all()
    assert torch.autograd.gradcheck(lambda x: topk_buckets(x, ids), (z64,))


@pytest.mark.parametrize("name", NAMES)
def test_topk_gradcheck(name):
    from distill.engine.batch import TeacherOutputs
    from distill.teachers.topk import topk_of
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    ids, lp, tail = topk_of(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), 2, 1.0)
    top = TeacherOutputs(topk_ids=ids, topk_logprobs=lp, tail_mass=tail.unsqueeze(-1))
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(lambda z: token_divergence(name, z, top, 2.0, mask=mask), (s,))
