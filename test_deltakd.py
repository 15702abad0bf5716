"""deltakd tests, all on the CPU. Oracles: float64 formulas (the loss), transformers' Qwen2ForCausalLM (the
model), Google's rouge-score (ROUGE). Distributed tests run real torch.distributed (gloo) under torchrun."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deltakd import delta_kd_loss
from model import Qwen2, Qwen2Config, load_weights, resolve_model_dir, sample

REPO = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------------
# deltakd.py: the loss, against float64 formulas

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


# ---------------------------------------------------------------------------------------------------------------------
# model.py: Qwen2, against transformers' Qwen2ForCausalLM

_MODEL_CONFIGS = {  # tied/untied, GQA/MQA/MHA, several rope_theta
    "tied-gqa": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
    "untied-mqa": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=1e4, tie_word_embeddings=False),
    "tied-mha": dict(num_attention_heads=2, num_key_value_heads=2, rope_theta=37.0, tie_word_embeddings=True),
}


def _model_oracle(name, seed=0, vocab_size=97, layers=2):
    """A random transformers Qwen2 whose norms and biases are moved off their initial values."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=56, num_hidden_layers=layers,
                   rms_norm_eps=1e-6, attn_implementation="eager", **_MODEL_CONFIGS[name])
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:  # larger weights than the 0.02 init, so logits are not all near zero
                p.mul_(10)
    return hf


def _model_pair(tmp_path, name, **kw):
    hf = _model_oracle(name, **kw)
    hf.save_pretrained(tmp_path / "hf")  # transformers writes the checkpoint; we read it
    return Qwen2.from_pretrained(tmp_path / "hf", dtype=torch.float32), hf


def _model_left_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("name", list(_MODEL_CONFIGS))
def test_model_logits_and_grads_match_transformers(tmp_path, name):
    from transformers import Qwen2ForCausalLM
    ours, hf = _model_pair(tmp_path, name)
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(1))
    a, b = ours(ids), hf(ids).logits
    assert a.dtype == torch.float32 and a.shape == (3, 13, 97)
    assert a.abs().max() > 1  # not a degenerate model
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # padded batch: transformers gets the same mask and our positions (its plain forward counts pads)
    mask = torch.ones_like(ids)
    mask[0, :5], mask[1, :2], mask[2, 9:] = 0, 0, 0
    pos, real = (mask.cumsum(-1) - 1).clamp(min=0), mask.bool()
    a, b = ours(ids, mask), hf(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-4)
    # bf16: the same operations in the same order give the same bits. This catches what fp32 tolerances
    # cannot: RMSNorm's cast order, and positions (RoPE is shift-invariant up to rounding)
    hf16 = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16, attn_implementation="sdpa")
    ours16 = Qwen2.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert ours16(ids).dtype == torch.bfloat16 and torch.equal(ours16(ids), hf16(ids).logits)
    assert torch.equal(ours16(ids, mask)[real], hf16(ids, attention_mask=mask, position_ids=pos).logits[real])
    # gradients, for training
    F.cross_entropy(ours(ids).flatten(0, 1), ids.flatten()).backward()
    F.cross_entropy(hf(ids).logits.flatten(0, 1), ids.flatten()).backward()
    g_ours, g_hf = dict(ours.named_parameters()), dict(hf.named_parameters())
    assert g_ours.keys() == g_hf.keys()
    for n in g_ours:
        torch.testing.assert_close(g_ours[n].grad, g_hf[n].grad, rtol=1e-4, atol=1e-5, msg=n)


def test_model_padding_gives_unpadded_logits(tmp_path):
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    rows = [[5, 9, 1, 33, 7, 60, 2, 8], [4, 4, 90], [11, 12, 13, 14, 15], [3]]
    alone = [ours(torch.tensor([r]))[0] for r in rows]
    left, lmask = _model_left_pad(rows, pad=7)
    right = torch.stack([F.pad(torch.tensor(r), (0, 8 - len(r)), value=0) for r in rows])
    rmask = (torch.arange(8)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    for ids, mask in ((left, lmask), (right, rmask)):
        out = ours(ids, mask)
        assert torch.isfinite(out).all()  # padding queries too
        for i, r in enumerate(rows):
            torch.testing.assert_close(out[i][mask[i].bool()], alone[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tied-gqa", "untied-mqa"])
def test_model_greedy_generation_follows_oracle_argmax(tmp_path, name):
    ours, hf = _model_pair(tmp_path, name)
    rows = [[5, 9, 1, 33, 7, 60, 2, 8], [4, 4, 90], [11, 12, 13, 14, 15]]
    ids, mask = _model_left_pad(rows)
    N = 12
    out = ours.generate(ids, mask, max_new_tokens=N)
    assert out.shape == (3, ids.size(1) + N) and torch.equal(out[:, :ids.size(1)], ids)
    for i, r in enumerate(rows):
        seq = torch.cat([torch.tensor(r), out[i, ids.size(1):]])
        logits = hf(seq[None]).logits[0]
        # every generated token is the oracle's argmax given the tokens before it
        assert torch.equal(logits[len(r) - 1:-1].argmax(-1), seq[len(r):])
        # and a row generated alone is the same row
        assert torch.equal(ours.generate(torch.tensor([r]), max_new_tokens=N)[0, len(r):], out[i, ids.size(1):])
    hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, hf_out)


def test_model_generation_eos_fill_and_early_stop(tmp_path):
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    ids, mask = _model_left_pad([[5, 9, 1, 33], [4, 4, 90], [11, 12]])
    T, N = ids.size(1), 10
    free = ours.generate(ids, mask, max_new_tokens=N)
    eos = int(free[0, T + 2])  # row 0 emits this token third
    out = ours.generate(ids, mask, max_new_tokens=N, eos_token_id=eos)
    for row_free, row in zip(free[:, T:], out[:, T:]):
        hits = (row_free == eos).nonzero()
        k = int(hits[0]) if len(hits) else N  # first eos of the unconstrained run
        assert torch.equal(row[:k + 1], row_free[:k + 1])
        assert (row[k + 1:] == eos).all()
    # every row ends at once: early stop, full width, eos after; a list of eos ids works too
    firsts = [int(t) for t in free[:, T]]
    out = ours.generate(ids, mask, max_new_tokens=N, eos_token_id=[96] + firsts)
    assert out.shape == (3, T + N)
    assert torch.equal(out[:, T], free[:, T]) and (out[:, T + 1:] == 96).all()
    # the returned ids can be trained on (not inference tensors)
    assert not out.is_inference()
    ours(out).sum().backward()


def test_model_sampling(tmp_path):
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    ids = torch.tensor([[5, 9, 1, 33], [4, 4, 90, 2]])
    greedy = ours.generate(ids, max_new_tokens=8)
    tiny_p = ours.generate(ids, max_new_tokens=8, temperature=1.0, top_p=1e-6)
    assert torch.equal(tiny_p, greedy)  # the nucleus of a tiny top_p is the argmax alone

    def run(seed):
        return ours.generate(ids, max_new_tokens=8, temperature=1.5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    # top-p keeps the most likely tokens until their mass reaches p; check against a float64 formula
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    p = torch.softmax(logits, -1)
    for i in range(2):
        sp, order = p[i].sort(descending=True)
        nucleus = set(order[:int((sp.cumsum(0) < 0.6).sum()) + 1].tolist())
        drawn = sample(logits[i:i + 1].float().expand(2000, -1), 1.0, 0.6, torch.Generator().manual_seed(i))
        assert set(drawn.tolist()) == nucleus


def _model_tokenizer_files(folder):
    from tokenizers import Tokenizer, models
    folder.mkdir(parents=True, exist_ok=True)
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))


@pytest.mark.parametrize("name", ["tied-gqa", "untied-mqa"])
def test_model_save_round_trip_through_transformers(tmp_path, name):
    from transformers import Qwen2ForCausalLM
    ours, hf = _model_pair(tmp_path, name)
    _model_tokenizer_files(tmp_path / "tok")
    ours.save_pretrained(tmp_path / "ours", tokenizer_dir=tmp_path / "tok")
    out = tmp_path / "ours"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["torch_dtype"] == "float32"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tmp_path / "tok" / f).read_bytes()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) == (name == "untied-mqa")
    back, info = Qwen2ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
    # bf16 load keeps the tie and the dtype
    m = Qwen2.from_pretrained(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == (name == "tied-gqa")
    assert m.name_or_path == str(out)
    m.save_pretrained(tmp_path / "again")  # tokenizer files follow from name_or_path
    assert (tmp_path / "again" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "again" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_model_sharded_checkpoints_load(tmp_path):
    from transformers import Qwen2ForCausalLM
    ours, hf = _model_pair(tmp_path, "untied-mqa", layers=3)
    ours.save_pretrained(tmp_path / "ours", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert "model.safetensors" not in files
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")  # transformers' own sharding
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    for folder in ("ours", "hf_sharded"):
        torch.testing.assert_close(Qwen2.from_pretrained(tmp_path / folder, dtype=torch.float32)(ids),
                                   hf(ids).logits, rtol=0, atol=1e-4)
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_model_bad_checkpoints_raise_clear_errors(tmp_path):
    _model_oracle("tied-gqa").save_pretrained(tmp_path / "good")
    good = tmp_path / "good"
    config = json.loads((good / "config.json").read_text())

    def folder(name, tensors=None, **config_changes):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**config, **config_changes}))
        if tensors is not None:
            save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return d

    sd = load_file(good / "model.safetensors")
    broken = dict(sd)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(3)
    broken["model.layers.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as e:
        Qwen2.from_pretrained(folder("broken", broken), dtype=torch.float32)
    msg = str(e.value)  # one error listing all three problems
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.0.extra.weight" in msg
    assert "model.layers.0.self_attn.k_proj.bias: checkpoint (3,)" in msg
    for bad, field in [(dict(model_type="llama"), "model_type"),
                       (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
                       (dict(use_sliding_window=True), "use_sliding_window"),
                       (dict(hidden_act="gelu"), "hidden_act"),
                       (dict(hidden_size=None), "hidden_size")]:
        d = folder(f"bad-{field}", sd, **bad)
        if bad.get("hidden_size", 1) is None:
            cfg = json.loads((d / "config.json").read_text())
            del cfg["hidden_size"]
            (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=field):
            Qwen2.from_pretrained(d)
    squeezed = {**sd, "model.layers.0.self_attn.k_proj.bias": torch.zeros(1)}  # would broadcast in copy_
    with pytest.raises(ValueError, match=r"k_proj.bias: checkpoint \(1,\)"):
        Qwen2.from_pretrained(folder("squeezed", squeezed))
    torch.save(sd, folder("pickle") / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"\.bin"):
        Qwen2.from_pretrained(tmp_path / "pickle")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Qwen2.from_pretrained(folder("empty"))
    # a model already built (e.g. for FSDP) is loaded with the same checks
    m = Qwen2(Qwen2Config.from_json(good))
    with pytest.raises(ValueError, match="up_proj"):
        load_weights(m, tmp_path / "broken")


def test_model_save_is_atomic(tmp_path):
    a, _ = _model_pair(tmp_path, "tied-gqa", seed=1)
    b = _model_oracle("tied-gqa", seed=2)
    b.save_pretrained(tmp_path / "b_hf")
    b = Qwen2.from_pretrained(tmp_path / "b_hf", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    dest = tmp_path / "ckpt"
    a.save_pretrained(dest)
    bad_tok = tmp_path / "bad_tok"
    (bad_tok / "tokenizer.json").mkdir(parents=True)  # copying it fails after the weights are written
    with pytest.raises(OSError):
        b.save_pretrained(dest, tokenizer_dir=bad_tok, max_shard_size=10_000)
    torch.testing.assert_close(Qwen2.from_pretrained(dest, dtype=torch.float32)(ids), a(ids))  # old one intact
    with pytest.raises(OSError):
        b.save_pretrained(tmp_path / "fresh", tokenizer_dir=bad_tok)
    assert not (tmp_path / "fresh").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    b.save_pretrained(dest)  # a successful save replaces the old checkpoint
    torch.testing.assert_close(Qwen2.from_pretrained(dest, dtype=torch.float32)(ids), b(ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError):  # never replaces a folder that is not a checkpoint
        b.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_model_hub_id_resolves_without_network(tmp_path):
    """Hub ids go through huggingface_hub's real cache layout, offline or with the Hub unreachable."""
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    _model_tokenizer_files(tmp_path / "tok")
    ours.save_pretrained(tmp_path / "saved", tokenizer_dir=tmp_path / "tok")
    ours.save_pretrained(tmp_path / "local", tokenizer_dir=tmp_path / "tok")
    repo = tmp_path / "cache" / "models--tiny-org--tiny-qwen"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for f in (tmp_path / "saved").iterdir():  # blobs named by hash, symlinked from the snapshot, as the Hub does
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blob)
        (repo / "snapshots" / sha / f.name).symlink_to(os.path.relpath(blob, repo / "snapshots" / sha))
    torch.save(ours(torch.tensor([[1, 2, 3, 4, 5]])).detach(), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from model import Qwen2, resolve_model_dir
expected = torch.load({str(tmp_path / "expected.pt")!r})
for name in ("tiny-org/tiny-qwen", {str(tmp_path / "local")!r}):
    m = Qwen2.from_pretrained(name, dtype=torch.float32)
    torch.testing.assert_close(m(torch.tensor([[1, 2, 3, 4, 5]])), expected)
assert resolve_model_dir("tiny-org/tiny-qwen") == resolve_model_dir("tiny-org/tiny-qwen")
assert resolve_model_dir("tiny-org/tiny-qwen").name == {sha!r}
assert (resolve_model_dir("tiny-org/tiny-qwen") / "tokenizer.json").exists()
try:
    resolve_model_dir("tiny-org/not-cached")
except FileNotFoundError as e:
    assert "tiny-org/not-cached" in str(e)
else:
    raise AssertionError("an uncached id resolved without network")
print("ok")
"""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base["HF_HUB_CACHE"] = str(tmp_path / "cache")
    # offline mode, then a dead endpoint (connection refused): both must fall back to the cache
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}):
        r = subprocess.run([sys.executable, "-c", script], env={**base, **extra}, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (extra, r.stderr[-3000:])
    assert resolve_model_dir(tmp_path / "local") == tmp_path / "local"
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model_dir(tmp_path / "does-not-exist")


def test_model_config_json_round_trip(tmp_path):
    qwen = {  # the shape of Qwen/Qwen2.5-1.5B's config.json
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
        "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 151936}
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    cfg = Qwen2Config.from_json(tmp_path)
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (1536, 2, 1e6, True)
    assert cfg.max_position_embeddings == 131072 and cfg.eos_token_id == 151643
    (tmp_path / "again.json").write_text(json.dumps(cfg.to_dict()))
    assert Qwen2Config.from_json(tmp_path / "again.json") == cfg
    from transformers import Qwen2Config as HFConfig  # transformers reads what we write
    hf = HFConfig.from_dict(cfg.to_dict())
    assert hf.rope_parameters["rope_theta"] == 1e6 and hf.num_key_value_heads == 2


def test_model_init_weights_on_meta(tmp_path):
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.05)

    def build(seed):
        with torch.device("meta"):
            m = Qwen2(cfg)
        m.to_empty(device="cpu")
        m.init_weights(torch.Generator().manual_seed(seed))
        return m
    m = build(0)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(m.model.layers[0].mlp.up_proj.weight, build(0).model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(m.model.embed_tokens.weight, build(1).model.embed_tokens.weight)
    assert abs(m.model.embed_tokens.weight.std().item() - 0.05) < 0.005
    assert (m.model.layers[1].self_attn.q_proj.bias == 0).all() and (m.model.norm.weight == 1).all()
    assert torch.isfinite(m(torch.tensor([[1, 2, 3]]))).all()
