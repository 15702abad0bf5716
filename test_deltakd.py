"""deltakd tests. All run on the CPU; the oracles are float64 formulas (loss), transformers (model) and
rouge-score (ROUGE). Distributed tests use real torch.distributed (gloo) under torchrun."""

import pytest
import torch
import torch.nn.functional as F

from deltakd import delta_kd_loss


def _loss_reference(s, labels, t, t_raw, s_raw, alpha, T, lam, divergence="fkl", vocab=None):
    """The paper's formula written out position by position in float64, in probability space:
    pi* = pi_t_ft * (pi_s_raw / pi_t_raw)^alpha / Z, L = lam * CE + (1 - lam) * T^2 * KL, mean over counted positions."""
    vocab = vocab or min(x.shape[-1] for x in (s, t, t_raw, s_raw))
    s = s.double()
    total, count = 0.0, 0
    for i in range(labels.shape[0]):
        y = int(labels[i])
        if y == -100:
            continue
        softmax = lambda x: torch.softmax(x[i, :vocab].double() / T, dim=0)
        unnormalised = softmax(t) * (softmax(s_raw) / softmax(t_raw)) ** alpha
        target = unnormalised / unnormalised.sum()
        q = softmax(s)
        kl = (target * (target / q).log()).sum() if divergence == "fkl" else (q * (q / target).log()).sum()
        ce = -torch.log_softmax(s[i, :vocab], dim=0)[y]
        total = total + lam * ce + (1 - lam) * T * T * kl
        count += 1
    return total / max(count, 1)


def _loss_inputs(n=9, vocab=13, extra=(2, 3, 1, 0), scale=2.0, seed=0, dtype=torch.float64):
    """Student, labels and the three frozen logits; the last dimensions differ as Qwen's lm_heads do."""
    g = torch.Generator().manual_seed(seed)
    s, t, t_raw, s_raw = (torch.randn(n, vocab + e, generator=g, dtype=dtype) * scale for e in extra)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = -100
    return s.requires_grad_(), labels, t, t_raw, s_raw


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
@pytest.mark.parametrize("alpha,T,lam", [(1.0, 1.0, 0.5), (0.5, 2.0, 0.2), (1.5, 0.5, 0.0), (0.0, 3.0, 0.7)])
def test_loss_matches_float64_formula_value_and_gradient(divergence, alpha, T, lam):
    s, labels, t, t_raw, s_raw = _loss_inputs()
    ours = delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=alpha, temperature=T, lam=lam, divergence=divergence)
    reference = _loss_reference(s, labels, t, t_raw, s_raw, alpha, T, lam, divergence)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(reference, s)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert g_ours[:, 13:].abs().max() == 0  # the student's ids past vocab_size get no gradient


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_loss_gradcheck(divergence):
    s, labels, t, t_raw, s_raw = _loss_inputs(n=5, vocab=6)
    fn = lambda s: delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=0.8, temperature=1.7, lam=0.3,
                                 divergence=divergence, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (s,))


def test_loss_gradient_is_T_times_q_minus_target():
    s, labels, t, t_raw, s_raw = _loss_inputs(n=4, vocab=7, extra=(0, 0, 0, 0))
    labels[:] = torch.tensor([1, 2, 3, 4])
    T, alpha = 2.5, 1.0
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=alpha, temperature=T, lam=0.0)
    (grad,) = torch.autograd.grad(loss, s)
    target = torch.softmax(torch.log_softmax(t / T, -1) + alpha * (torch.log_softmax(s_raw / T, -1)
                                                                   - torch.log_softmax(t_raw / T, -1)), -1)
    torch.testing.assert_close(grad * 4, T * (torch.softmax(s.detach() / T, -1) - target))


def test_loss_alpha0_is_forward_kl_to_teacher_and_needs_no_raw_models():
    s, labels, t, _, _ = _loss_inputs(extra=(0, 0, 0, 0))
    T = 2.0
    ours = delta_kd_loss(s, labels, t, alpha=0.0, temperature=T, lam=0.0)
    keep = labels != -100
    kl = F.kl_div(F.log_softmax(s[keep] / T, -1), F.log_softmax(t[keep] / T, -1), log_target=True,
                  reduction="batchmean")
    torch.testing.assert_close(ours, T * T * kl)


def test_loss_alpha0_rkl_is_reverse_kl_to_teacher():
    s, labels, t, _, _ = _loss_inputs(extra=(0, 0, 0, 0))
    ours = delta_kd_loss(s, labels, t, alpha=0.0, lam=0.0, divergence="rkl")
    keep = labels != -100
    kl = F.kl_div(F.log_softmax(t[keep], -1), F.log_softmax(s[keep], -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(ours, kl)


def test_loss_alpha1_is_normalised_product():
    s, labels, t, t_raw, s_raw = _loss_inputs(extra=(0, 0, 0, 0))
    # the student equal to the normalised product makes KL(pi* || q) zero, and its gradient too
    product = torch.softmax(t, -1) * torch.softmax(s_raw, -1) / torch.softmax(t_raw, -1)
    student = (product / product.sum(-1, keepdim=True)).log().requires_grad_()
    loss = delta_kd_loss(student, labels, t, t_raw, s_raw, alpha=1.0, lam=0.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(loss.item()) < 1e-12 and grad.abs().max() < 1e-12
    other = delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=1.0, lam=0.0)
    assert other.item() > 1e-3  # and any other student is penalised


def test_loss_lam1_is_sft_cross_entropy_without_a_teacher():
    s, labels, t, t_raw, s_raw = _loss_inputs(extra=(0, 0, 0, 0))
    torch.testing.assert_close(delta_kd_loss(s, labels, None, lam=1.0), F.cross_entropy(s, labels))
    torch.testing.assert_close(delta_kd_loss(s, labels, t, t_raw, s_raw, temperature=3.0, lam=1.0),
                               F.cross_entropy(s, labels))


def test_loss_parts_add_up():
    s, labels, t, t_raw, s_raw = _loss_inputs()
    loss, parts = delta_kd_loss(s, labels, t, t_raw, s_raw, lam=0.3, temperature=2.0, return_parts=True)
    torch.testing.assert_close(loss, 0.3 * parts["sft"] + 0.7 * parts["kd"])
    keep = labels != -100
    torch.testing.assert_close(parts["sft"], F.cross_entropy(s[keep, :13], labels[keep]))
    assert not parts["sft"].requires_grad and not parts["kd"].requires_grad


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
def test_loss_chunked_equals_unchunked(chunk_size):
    s, labels, t, t_raw, s_raw = _loss_inputs(n=23, dtype=torch.float32)
    whole = delta_kd_loss(s, labels, t, t_raw, s_raw, chunk_size=10**6)
    (g_whole,) = torch.autograd.grad(whole, s)
    chunked = delta_kd_loss(s, labels, t, t_raw, s_raw, chunk_size=chunk_size)
    (g_chunked,) = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-6, atol=1e-9)


def test_loss_leading_shapes_and_views():
    s, labels, t, t_raw, s_raw = _loss_inputs(n=12)
    flat = delta_kd_loss(s, labels, t, t_raw, s_raw)
    shaped = delta_kd_loss(s.view(3, 4, -1), labels.view(3, 4), t.view(3, 4, -1), t_raw.view(3, 4, -1),
                           s_raw.view(3, 4, -1))
    torch.testing.assert_close(shaped, flat)
    # a shifted, non-contiguous view of bigger logits, as a trainer passes them: logits[:, :-1] predicts labels[:, 1:]
    big = [torch.cat([x.view(3, 4, -1), torch.randn(3, 1, x.shape[-1], dtype=x.dtype)], 1) for x in (s, t, t_raw, s_raw)]
    views = [x[:, :-1] for x in big]
    assert not views[0].is_contiguous()
    torch.testing.assert_close(delta_kd_loss(views[0], labels.view(3, 4), *views[1:]), flat)


def test_loss_mismatched_vocab_sizes_compare_the_first_vocab_size_ids():
    s, labels, t, t_raw, s_raw = _loss_inputs(vocab=13, extra=(3, 8, 5, 0))  # last dims 16, 21, 18, 13
    default = delta_kd_loss(s, labels, t, t_raw, s_raw)
    cut = [x[:, :13].detach() for x in (s, t, t_raw, s_raw)]
    torch.testing.assert_close(default, delta_kd_loss(cut[0], labels, *cut[1:]))
    labels[labels > 9] = 9
    ten = delta_kd_loss(s, labels, t, t_raw, s_raw, vocab_size=10)
    torch.testing.assert_close(ten, _loss_reference(s, labels, t, t_raw, s_raw, 1.0, 1.0, 0.5, vocab=10))
    with pytest.raises(ValueError, match="vocab_size=14 but student_raw_logits has only 13"):
        delta_kd_loss(s, labels, t, t_raw, s_raw, vocab_size=14)


def test_loss_bf16_inputs_computed_in_fp32():
    s, labels, t, t_raw, s_raw = _loss_inputs(n=40, vocab=300, dtype=torch.bfloat16, scale=4.0)
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw, temperature=0.5)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    as_fp32 = [x.detach().float().requires_grad_(x.requires_grad) for x in (s, t, t_raw, s_raw)]
    expected = delta_kd_loss(as_fp32[0], labels, *as_fp32[1:], temperature=0.5)
    (g_expected,) = torch.autograd.grad(expected, as_fp32[0])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), g_expected, rtol=1e-2, atol=1e-5)  # bf16 rounding of the gradient only


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_loss_extreme_and_infinite_logits_stay_finite(divergence):
    s, labels, t, t_raw, s_raw = _loss_inputs(n=8, vocab=10, extra=(0, 0, 0, 0), dtype=torch.float32)
    signs = lambda x: torch.where(x > 0, 1e4, -1e4)
    s = signs(s.detach()).requires_grad_()
    t, t_raw, s_raw = signs(t), signs(t_raw), signs(s_raw)
    for T in (1.0, 0.1):
        loss = delta_kd_loss(s, labels, t, t_raw, s_raw, temperature=T, divergence=divergence)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # -inf in the teachers (masked vocab rows, or a top-k teacher service): the target gives those ids zero mass
    s, labels, t, t_raw, s_raw = _loss_inputs(n=8, vocab=10, extra=(0, 0, 0, 0), dtype=torch.float32)
    t[:, 7:] = float("-inf")
    t_raw[:, 5:] = float("-inf")
    labels[labels >= 7] = 0
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw, divergence=divergence)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if divergence == "fkl":  # read pi* back from the gradient q - pi* at lam = 0, T = 1
        loss0 = delta_kd_loss(s, labels, t, t_raw, s_raw, lam=0.0)
        (g0,) = torch.autograd.grad(loss0, s)
        keep = labels != -100
        target = (torch.softmax(s.detach(), -1) - g0 * keep.sum())[keep]
        assert target[:, 7:].abs().max() < 1e-6  # the fine-tuned teacher's zeros stay zeros
        # where only the raw teacher has zeros, the ratio pi_s_raw / pi_t_raw is unbounded: those ids take the mass
        torch.testing.assert_close(target[:, 5:7].sum(-1), torch.ones(int(keep.sum())), atol=1e-5, rtol=0)


def test_loss_all_positions_ignored_is_zero_attached_with_zero_grad():
    s, labels, t, t_raw, s_raw = _loss_inputs()
    labels[:] = -100
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_loss_num_tokens_halves_sum_to_whole():
    s, labels, t, t_raw, s_raw = _loss_inputs(n=16)
    whole = delta_kd_loss(s, labels, t, t_raw, s_raw, temperature=2.0)
    (g_whole,) = torch.autograd.grad(whole, s)
    count = int((labels != -100).sum())
    halves = [slice(0, 5), slice(5, 16)]  # unequal counts, so a mean of means would differ
    parts = [delta_kd_loss(s[h], labels[h], t[h], t_raw[h], s_raw[h], temperature=2.0, num_tokens=count) for h in halves]
    (g_halves,) = torch.autograd.grad(sum(parts), s)
    torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(g_halves, g_whole)
    mean_of_means = sum(delta_kd_loss(s[h], labels[h], t[h], t_raw[h], s_raw[h], temperature=2.0) for h in halves) / 2
    assert abs(mean_of_means.item() - whole.item()) > 1e-4
    as_tensor = delta_kd_loss(s[halves[0]], labels[halves[0]], t[halves[0]], t_raw[halves[0]], s_raw[halves[0]],
                              temperature=2.0, num_tokens=torch.tensor(count))
    torch.testing.assert_close(as_tensor, parts[0])


def test_loss_backward_scales_and_repeats():
    s, labels, t, t_raw, s_raw = _loss_inputs()
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g3,) = torch.autograd.grad(3 * loss, s)
    torch.testing.assert_close(g3, 3 * g1)


def test_loss_bad_arguments_are_named():
    s, labels, t, t_raw, s_raw = _loss_inputs()
    with pytest.raises(ValueError, match="teacher_raw_logits and student_raw_logits"):
        delta_kd_loss(s, labels, t, alpha=1.0)
    with pytest.raises(ValueError, match="teacher_logits is None"):
        delta_kd_loss(s, labels, None, lam=0.5)
    with pytest.raises(ValueError, match="divergence"):
        delta_kd_loss(s, labels, t, t_raw, s_raw, divergence="jsd")
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        delta_kd_loss(s, labels, t[:-1], t_raw, s_raw)
    bad = labels.clone()
    bad[1] = 13
    with pytest.raises(ValueError, match="labels hold ids outside"):
        delta_kd_loss(s, bad, t, t_raw, s_raw)
