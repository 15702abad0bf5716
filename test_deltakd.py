"""deltakd tests, all on the CPU. Oracles: float64 formulas (the loss), transformers' Qwen2ForCausalLM (the
model), Google's rouge-score (ROUGE). Distributed tests run real torch.distributed (gloo) under torchrun."""
import concurrent.futures
import copy
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

# torch.compile's on-disk cache is not keyed by ATEN_CPU_CAPABILITY: a kernel cached under AVX2 then fails to build
# under `default` ("'at::vec' has not been declared"). One cache per setting, shared by this suite's subprocesses;
# set before importing torch, which fills in its default.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    "/tmp", f"torchinductor-deltakd-{os.environ.get('ATEN_CPU_CAPABILITY', 'auto')}"))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_score_tokenize
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import diagnose
import evaluate
import minillm
import parallel
import targets
import toy
import train
from deltakd import delta_kd_loss, delta_kd_loss_reference, delta_kd_target, topk_target
from evaluate import main, write_seqkd_data
from generate import Decoder, generate, gumbel, sample, seed_of
from model import Qwen2, Qwen2Config, attend, attention_mask_4d, load_weights, resolve_model_dir, rope_inv_freq
from rouge import corpus_rouge, porter_stem, rouge, tokenize

REPO = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------------
# measure.py's host-sync counter: the instrument that the step and decoding tests count with

def test_host_sync_counter_sees_every_data_dependent_op():
    from measure import HostSyncs
    x = torch.arange(6.0).view(2, 3)
    mask = x > 2
    syncing = {".item() / bool() / int() / float()": [lambda: x.sum().item(), lambda: bool((x > 0).all()),
                                                      lambda: x[:, torch.tensor(1)].fill_(5.0) if x.sum() else 0],
               ".tolist()": [lambda: x.tolist()], ".cpu()": [lambda: x.cpu()], ".numpy()": [lambda: x.numpy()],
               "nonzero": [lambda: mask.nonzero()],
               "boolean-mask indexing": [lambda: x[mask], lambda: x.__setitem__(mask, 0.0)],
               "repeat_interleave": [lambda: torch.repeat_interleave(torch.tensor([1, 2]))]}
    for kind, fns in syncing.items():
        for fn in fns:
            with HostSyncs() as syncs:
                fn()
            assert kind in syncs.counts and syncs.total >= 1, (kind, syncs.counts)
    with HostSyncs() as syncs:  # what a sync-free step does instead
        (x * 2).argmax(-1), x[torch.tensor([0, 1])], x.masked_fill(mask, 0.0), x.where(mask, 1.0)
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
    assert syncs.counts == {}
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # restored on exit


# ---------------------------------------------------------------------------------------------------------------------
# deltakd.py: the reference against the paper's product form in float64; the production loss against the reference

def _loss_oracle(s, labels, t, t_raw, s_raw, alpha, T, lam, divergence="fkl"):
    """The paper's formula written out position by position in float64, in probability space, as its (1) gives it:
    pi* = pi_t_ft * (pi_s_raw / pi_t_raw)^alpha / Z, L = lam * CE + (1 - lam) * T^2 * KL, mean over counted positions.
    Independent of deltakd.py's log-space code, which it checks."""
    s = s.double()
    total, count = 0.0, 0
    for i in range(labels.shape[0]):
        y = int(labels[i])
        if y == -100:
            continue
        def softmax(x):
            return torch.softmax(x[i].double() / T, dim=0)
        unnormalised = softmax(t) * (softmax(s_raw) / softmax(t_raw)) ** alpha
        target = unnormalised / unnormalised.sum()
        q = softmax(s)
        kl = (target * (target / q).log()).sum() if divergence == "fkl" else (q * (q / target).log()).sum()
        ce = -torch.log_softmax(s[i], dim=0)[y]
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


def _loss_reference(s, labels, t, t_raw, s_raw, alpha=1.0, T=1.0, lam=0.5, divergence="fkl", vocab=None,
                    ignore_index=-100):
    """deltakd.delta_kd_loss_reference on every input cut to the first `vocab` ids (the reference takes them so)."""
    vocab = vocab or min(x.shape[-1] for x in (s, t, t_raw, s_raw))
    s, t, t_raw, s_raw = (x[..., :vocab] for x in (s, t, t_raw, s_raw))
    return delta_kd_loss_reference(s, labels, t, t_raw, s_raw, alpha=alpha, temperature=T, lam=lam,
                                   divergence=divergence, ignore_index=ignore_index)


PAPER_SETTINGS = [(1.0, 1.0, 0.5), (0.5, 2.0, 0.2), (1.5, 0.5, 0.0), (0.0, 3.0, 0.7)]  # alpha, T, lam


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
@pytest.mark.parametrize("alpha,T,lam", PAPER_SETTINGS)
def test_loss_reference_is_the_papers_product_form(divergence, alpha, T, lam):
    s, labels, t, t_raw, s_raw = _loss_inputs(extra=(0, 0, 0, 0))
    reference = delta_kd_loss_reference(s, labels, t, t_raw, s_raw, alpha, T, lam, divergence)
    oracle = _loss_oracle(s, labels, t, t_raw, s_raw, alpha, T, lam, divergence)
    assert reference.dtype == torch.float64
    torch.testing.assert_close(reference, oracle, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(reference, s), torch.autograd.grad(oracle, s), rtol=1e-9,
                               atol=1e-12)
    if alpha == 0:  # the raw models take no part
        torch.testing.assert_close(delta_kd_loss_reference(s, labels, t, None, None, 0.0, T, lam, divergence),
                                   reference)
    counted = labels != -100
    torch.testing.assert_close(delta_kd_loss_reference(s, labels, None, None, None, alpha, T, 1.0, divergence),
                               F.cross_entropy(s[counted], labels[counted]))  # lam = 1: SFT, no teacher


def test_loss_target_is_the_papers_product_form_at_any_shape():
    _, _, t, t_raw, s_raw = _loss_inputs(n=12, extra=(0, 0, 0, 0))
    for alpha, T in ((1.0, 1.0), (0.4, 2.5), (0.0, 0.7)):
        def p(x):
            return torch.softmax(x / T, -1)
        product = p(t) * (p(s_raw) / p(t_raw)) ** alpha  # (1)
        log_target = delta_kd_target(t.view(3, 4, -1), t_raw.view(3, 4, -1), s_raw.view(3, 4, -1), alpha, T)
        assert log_target.shape == (3, 4, 13) and log_target.dtype == torch.float64
        torch.testing.assert_close(log_target.view(12, -1).exp(), product / product.sum(-1, keepdim=True))
        # the temperature once, on the "effective teacher logits" (the derivation's (3))
        torch.testing.assert_close(log_target.view(12, -1), torch.log_softmax((t + alpha * (s_raw - t_raw)) / T, -1))
    torch.testing.assert_close(delta_kd_target(t, None, None, 0.0, 2.0), torch.log_softmax(t / 2.0, -1))
    assert delta_kd_target(t.bfloat16(), None, None, 0.0, 1.0).dtype == torch.float32


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
@pytest.mark.parametrize("alpha,T,lam", PAPER_SETTINGS)
def test_loss_equals_the_reference_values_and_gradients(divergence, alpha, T, lam):
    s, labels, t, t_raw, s_raw = _loss_inputs()  # last dimensions 15, 16, 14, 13: the first 13 ids compared
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
    def fn(s):
        return delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=0.8, temperature=1.7, lam=0.3, divergence=divergence,
                             chunk_size=2)
    assert torch.autograd.gradcheck(fn, (s,))


def test_loss_gradient_is_T_times_q_minus_target():
    s, labels, t, t_raw, s_raw = _loss_inputs(n=4, vocab=7, extra=(0, 0, 0, 0))
    labels[:] = torch.tensor([1, 2, 3, 4])
    T, alpha = 2.5, 1.0
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=alpha, temperature=T, lam=0.0)
    (grad,) = torch.autograd.grad(loss, s)
    target = delta_kd_target(t, t_raw, s_raw, alpha, T).exp()
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
    expected = _loss_reference(s, labels, t, t_raw, s_raw, 1.0, 1.0, 0.0)
    assert expected > 0.1 and other.item() == pytest.approx(expected.item(), rel=1e-10)  # any other is penalised


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
    torch.testing.assert_close(parts["kd"], _loss_reference(s, labels, t, t_raw, s_raw, 1.0, 2.0, 0.0))  # T^2 KL
    assert not parts["sft"].requires_grad and not parts["kd"].requires_grad


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
def test_loss_chunked_equals_unchunked(chunk_size):
    s, labels, t, t_raw, s_raw = _loss_inputs(n=23, dtype=torch.float32)
    whole = delta_kd_loss(s, labels, t, t_raw, s_raw, chunk_size=10**6)
    (g_whole,) = torch.autograd.grad(whole, s)
    chunked = delta_kd_loss(s, labels, t, t_raw, s_raw, chunk_size=chunk_size)
    (g_chunked,) = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)  # one fp32 sum vs a sum of chunk sums
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-6, atol=1e-9)


def test_loss_leading_shapes_and_views():
    s, labels, t, t_raw, s_raw = _loss_inputs(n=12)
    flat = delta_kd_loss(s, labels, t, t_raw, s_raw)
    shaped = delta_kd_loss(s.view(3, 4, -1), labels.view(3, 4), t.view(3, 4, -1), t_raw.view(3, 4, -1),
                           s_raw.view(3, 4, -1))
    torch.testing.assert_close(shaped, flat)
    # a shifted, non-contiguous view of bigger logits, as a trainer passes them: logits[:, :-1] predicts labels[:, 1:]
    big = [torch.cat([x.view(3, 4, -1), torch.randn(3, 1, x.shape[-1], dtype=x.dtype)], 1)
           for x in (s, t, t_raw, s_raw)]
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
    def signs(x):
        return torch.where(x > 0, 1e4, -1e4)
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
    parts = [delta_kd_loss(s[h], labels[h], t[h], t_raw[h], s_raw[h], temperature=2.0, num_tokens=count)
             for h in halves]
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
    (g,) = torch.autograd.grad(delta_kd_loss(s, labels, t, t_raw, s_raw), s)
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw)
    (g3,) = torch.autograd.grad(3 * loss, s, retain_graph=True)  # the first backward scales the buffer in place
    torch.testing.assert_close(g3, 3 * g)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    torch.testing.assert_close(g1, g)
    (g2,) = torch.autograd.grad(2 * loss, s)  # every later backward scales a copy of the first one's gradient
    torch.testing.assert_close(g2, 2 * g1)
    torch.testing.assert_close(g3, 3 * g1)  # and leaves the earlier results alone


def test_loss_scaled_backward_needs_no_second_buffer_and_no_host_sync():
    """A scaled loss (lam * loss, loss * scale) multiplies the gradient buffer in place on the device: backward makes
    no new tensor the size of the logits and reads nothing back to the host."""
    from measure import HostSyncs
    s, labels, t, t_raw, s_raw = _loss_inputs(n=12, dtype=torch.float32)
    expected = 0.25 * torch.autograd.grad(delta_kd_loss(s, labels, t, t_raw, s_raw), s)[0]
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw)
    made = []

    class NewLogitsSized(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {x.untyped_storage().data_ptr() for x in args if isinstance(x, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.numel() >= s.numel() and \
                    out.untyped_storage().data_ptr() not in inputs:  # new memory, not a view or an in-place result
                made.append(func)
            return out
    with NewLogitsSized(), HostSyncs() as syncs:
        (0.25 * loss).backward()
    assert made == [] and syncs.counts == {}
    torch.testing.assert_close(s.grad, expected)


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


def test_loss_custom_ignore_index():
    s, labels, t, t_raw, s_raw = _loss_inputs(extra=(0, 0, 0, 0))
    labels[labels == -100] = -1
    ours = delta_kd_loss(s, labels, t, t_raw, s_raw, temperature=2.0, ignore_index=-1)
    torch.testing.assert_close(ours, _loss_reference(s, labels, t, t_raw, s_raw, 1.0, 2.0, 0.5, ignore_index=-1))


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_extreme_logits_match_float64_by_value(dtype, divergence):
    s, labels, t, t_raw, s_raw = _loss_inputs(n=8, vocab=10, extra=(0, 0, 0, 0), dtype=torch.float32)
    def big(x):  # logits up to about +-1e4, exact in fp32, rounded in bf16
        return (x.detach() * 1e4 / 3).to(dtype)
    s, t, t_raw, s_raw = big(s).requires_grad_(), big(t), big(t_raw), big(s_raw)
    for T in (1.0, 0.1):
        ours = delta_kd_loss(s, labels, t, t_raw, s_raw, temperature=T, divergence=divergence)
        s64, t64, t_raw64, s_raw64 = (x.detach().double() for x in (s, t, t_raw, s_raw))
        expected = _loss_reference(s64, labels, t64, t_raw64, s_raw64, 1.0, T, 0.5, divergence=divergence)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-3)


def test_loss_minus_inf_in_the_raw_student_gives_zero_target_mass():
    s, labels, t, t_raw, s_raw = _loss_inputs(n=6, vocab=8, extra=(0, 0, 0, 0), dtype=torch.float32)
    s_raw[:, :3] = float("-inf")  # the raw student never says ids 0..2: pi* (alpha > 0) follows it
    labels[:] = 4
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=0.5, lam=0.0)
    (grad,) = torch.autograd.grad(loss, s)
    target = torch.softmax(s.detach(), -1) - grad * len(labels)  # q - (q - pi*) at T = 1, lam = 0
    assert torch.isfinite(loss) and target[:, :3].abs().max() < 1e-6
    torch.testing.assert_close(target.sum(-1), torch.ones(6))


@pytest.mark.parametrize("which", ["t_ft", "t_raw", "s_raw"])
def test_loss_nan_in_a_frozen_model_gives_nan(which):
    s, labels, t, t_raw, s_raw = _loss_inputs(extra=(0, 0, 0, 0))
    frozen = {"t_ft": t, "t_raw": t_raw, "s_raw": s_raw}
    frozen[which][1, 3] = float("nan")  # row 1 is counted (labels[::4] are ignored)
    assert torch.isnan(delta_kd_loss(s, labels, frozen["t_ft"], frozen["t_raw"], frozen["s_raw"]))


def test_loss_rkl_against_a_zero_mass_target_is_huge_but_finite():
    s, labels, t, t_raw, s_raw = _loss_inputs(extra=(0, 0, 0, 0))
    t[:, 0] = float("-inf")
    loss = delta_kd_loss(s, labels, t, alpha=0.0, lam=0.0, divergence="rkl")
    assert torch.isfinite(loss) and loss > 1e20


def test_loss_default_chunking_splits_positions(monkeypatch):
    import deltakd
    s, labels, t, t_raw, s_raw = _loss_inputs(n=23, dtype=torch.float32)
    whole = delta_kd_loss(s, labels, t, t_raw, s_raw)
    (g_whole,) = torch.autograd.grad(whole, s)
    seen = []
    chunk = deltakd._chunk
    monkeypatch.setitem(deltakd._CHUNK_BYTES, "cpu", 4 * 13 * 3)  # three positions of 13 fp32 log-probs per chunk
    monkeypatch.setattr(deltakd, "_chunk", lambda s, *a: seen.append(len(s)) or chunk(s, *a))
    chunked = delta_kd_loss(s, labels, t, t_raw, s_raw)
    (g_chunked,) = torch.autograd.grad(chunked, s)
    assert max(seen) == 3 and len(seen) > 5
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(g_chunked, g_whole)


def test_loss_fp16_gradient_survives_loss_scaling():
    s, labels, t, t_raw, s_raw = _loss_inputs(n=64, vocab=300, dtype=torch.float32)
    expected = delta_kd_loss(s, labels, t, t_raw, s_raw)
    (g_expected,) = torch.autograd.grad(expected, s)
    half = [x.detach().half() for x in (s, t, t_raw, s_raw)]
    half[0].requires_grad_()
    loss = delta_kd_loss(half[0], labels, *half[1:])
    (grad,) = torch.autograd.grad(loss * 65536, half[0])  # GradScaler's initial scale
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    assert (grad == 0).float().mean() < 0.05 + (g_expected == 0).float().mean()
    torch.testing.assert_close(grad.float() / 65536, g_expected, rtol=2e-2, atol=1e-6)


def test_loss_needs_no_gradient_buffer_in_evaluation_and_none_for_teachers():
    s, labels, t, t_raw, s_raw = _loss_inputs()
    with torch.no_grad():
        assert not delta_kd_loss(s, labels, t, t_raw, s_raw).requires_grad
    t = t.clone().requires_grad_()  # a teacher that forgot no_grad: it is a constant all the same
    loss = delta_kd_loss(s, labels, t, t_raw, s_raw)
    (2 * loss).backward()
    assert t.grad is None and s.grad is not None


def test_loss_negative_label_is_refused():
    s, labels, t, t_raw, s_raw = _loss_inputs()
    labels[1] = -5
    with pytest.raises(ValueError, match="labels hold ids outside"):
        delta_kd_loss(s, labels, t, t_raw, s_raw)


def test_loss_given_positions_spare_the_search_and_every_host_sync():
    """positions, the flat indices of the counted positions, give today's values and gradients for any leading shape
    and view, with no host sync in forward or backward; a bad label there is still caught, on the device."""
    from measure import HostSyncs
    s, labels, t, t_raw, s_raw = _loss_inputs(n=12, dtype=torch.float32)
    # (2, 6): rows of 6, so that a flat index read without the row stride lands on another position
    big = [torch.cat([x.detach().view(2, 6, -1), torch.randn(2, 1, x.shape[-1])], 1) for x in (s, t, t_raw, s_raw)]
    views = [x[:, :-1] for x in big]  # non-contiguous, as a trainer's shifted logits are
    views[0].requires_grad_()
    kw = dict(temperature=1.5, lam=0.3, return_parts=True)
    expected, expected_parts = delta_kd_loss(views[0], labels.view(2, 6), *views[1:], **kw)
    (g_expected,) = torch.autograd.grad(expected, views[0])
    positions = (labels != -100).nonzero()[:, 0]
    with HostSyncs() as syncs:
        loss, parts = delta_kd_loss(views[0], labels.view(2, 6), *views[1:], **kw, positions=positions)
        (grad,) = torch.autograd.grad(loss, views[0])
    assert syncs.counts == {}
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts, expected_parts, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, g_expected, rtol=1e-6, atol=0)
    bad = labels.clone()
    bad[positions[1]] = 99
    with pytest.raises(RuntimeError, match="labels hold ids outside"):
        delta_kd_loss(s, bad, t, t_raw, s_raw, positions=positions)
    with pytest.raises(ValueError, match="positions must be a 1-D LongTensor"):
        delta_kd_loss(s, labels, t, t_raw, s_raw, positions=labels != -100)


def test_loss_fused_chunks_equal_eager_and_pass_gradcheck():
    """fused=True runs each chunk's body compiled, for one fixed shape (the last chunk padded): the same values and
    gradients as the eager chunks within 1e-6, and float64 gradcheck. Each setting compiles (seconds): two here, with
    values of their own, so that each must compile in this test (or it could silently run eagerly)."""
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    s, labels, t, t_raw, s_raw = _loss_inputs(n=5, vocab=6)  # float64; 3 counted positions: chunks of 2, then 1
    kw = dict(alpha=0.8, temperature=1.7, lam=0.3, chunk_size=2)
    def fn(s, fused):
        return delta_kd_loss(s, labels, t, t_raw, s_raw, **kw, fused=fused)
    assert torch.autograd.gradcheck(lambda s: fn(s, True), (s,))
    torch.testing.assert_close(fn(s, True), fn(s, False), rtol=1e-12, atol=0)
    s, labels, t, t_raw, s_raw = _loss_inputs(n=23, vocab=40, extra=(3, 8, 5, 0), dtype=torch.float32)
    for fused in (True, False):  # reverse KL at T = 1, where one log_softmax serves both terms; 17 counted, chunks of 8
        loss, parts = delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=0.6, divergence="rkl", lam=0.45, chunk_size=8,
                                    return_parts=True, fused=fused)
        (grad,) = torch.autograd.grad(loss, s)
        if fused:
            fused_results = loss, parts, grad
    torch.testing.assert_close(fused_results, (loss, parts, grad), rtol=1e-6, atol=1e-6 * grad.abs().max().item())
    assert counters["stats"]["unique_graphs"] >= graphs + 2


def _bucket_oracle(log_target, ids, s, T, divergence):
    """The loss on a cached target (deltakd.py (7)) in float64, as its formula reads: the k kept ids, then the tail as
    one outcome, of mass r under pi* and Q under the student: T^2 times the mean over positions, lam = 0."""
    p, q = log_target.double().exp(), torch.softmax(s.double() / T, -1)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
    r, Q = (p * ~kept).sum(-1), (q * ~kept).sum(-1)
    if divergence == "fkl":
        kl = torch.where(kept, p * (p.log() - q.log()), 0).sum(-1) + r * (r / Q).log()
    else:
        kl = torch.where(kept, q * (q.log() - p.log()), 0).sum(-1) + Q * (Q / r).log()
    return T * T * kl.mean()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_loss_on_a_cached_target_is_exact_at_k_all_and_the_bucket_formula_below(divergence, fused):
    """At k = V, the very loss and gradient of the online target; below, the formula. Compiled (fused), each setting
    compiles: one setting there."""
    s, labels, t, t_raw, s_raw = _loss_inputs(n=11, extra=(0, 0, 0, 0))
    counted = labels != -100
    for alpha, T, lam in PAPER_SETTINGS[:1] if fused else PAPER_SETTINGS:
        log_target = delta_kd_target(t[counted], t_raw[counted], s_raw[counted], alpha, T)
        kw = dict(temperature=T, lam=lam, divergence=divergence, chunk_size=3, fused=fused)
        online = delta_kd_loss(s, labels, t, t_raw, s_raw, alpha=alpha, **kw)
        cached = delta_kd_loss(s, labels, target=topk_target(log_target, 99), **kw)  # k >= V keeps every id
        torch.testing.assert_close(cached, online, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.autograd.grad(cached, s), torch.autograd.grad(online, s), rtol=1e-12, atol=0)
        for k in (4,) if fused else (1, 4, 12):
            target = topk_target(log_target, k)
            bucket = delta_kd_loss(s, labels, target=target, **{**kw, "lam": 0.0})
            oracle = _bucket_oracle(log_target, target.ids, s[counted], T, divergence)
            torch.testing.assert_close(bucket, oracle, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(torch.autograd.grad(bucket, s)[0][counted], torch.autograd.grad(oracle, s)[0][
                counted], rtol=1e-9, atol=1e-12)


def test_loss_tail_bucket_never_exceeds_the_exact_kl_and_misses_r_times_the_tails_kl():
    """deltakd.py (8): KL_k = KL - r KL(pi*_t || q_t) for "fkl"; the gradient's error is at most 2 T r per position
    (before the 1 / num_tokens), and T r |pi*_t - q_t|_1 exactly."""
    s, labels, t, t_raw, s_raw = _loss_inputs(n=16, extra=(0, 0, 0, 0))
    labels[:] = 0
    T = 1.5
    log_target = delta_kd_target(t, t_raw, s_raw, 1.0, T)

    def exact_each(log_p):  # KL(pi* || q) at each position
        return (log_p.exp() * (log_p - torch.log_softmax(s.detach() / T, -1))).sum(-1)
    for k in (1, 3, 8):
        target = topk_target(log_target, k)
        p, q = log_target.exp(), torch.softmax(s.detach() / T, -1)
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, target.ids, True)
        r, Q = (p * ~kept).sum(-1), (q * ~kept).sum(-1)
        torch.testing.assert_close(target.log_tail.exp(), r)
        tails = torch.where(kept, 0, (p / r[:, None]) * ((p / r[:, None]).log() - (q / Q[:, None]).log())).sum(-1)
        bucket = delta_kd_loss(s, labels, target=target, temperature=T, lam=0.0) / (T * T)
        torch.testing.assert_close(bucket, (exact_each(log_target) - r * tails).mean())
        assert bucket <= exact_each(log_target).mean()
        (g_bucket,) = torch.autograd.grad(bucket * T * T, s)
        (g_exact,) = torch.autograd.grad(delta_kd_loss(s, labels, t, t_raw, s_raw, temperature=T, lam=0.0), s)
        error = (g_bucket - g_exact).abs().sum(-1) * len(labels)  # per position, without the 1 / num_tokens
        torch.testing.assert_close(error, T * r * (p / r[:, None] - q / Q[:, None]).abs().where(~kept, 0).sum(-1))
        assert (error <= 2 * T * r + 1e-12).all()


def test_loss_topk_target_keeps_the_most_likely_ids_and_their_tail_mass():
    _, _, t, t_raw, s_raw = _loss_inputs(n=6, extra=(0, 0, 0, 0))
    log_target = delta_kd_target(t, t_raw, s_raw, 1.0, 1.0)
    log_target[0, 5] = -1e30  # an id with no mass (a masked row)
    log_target[0] = torch.log_softmax(log_target[0], -1)
    for k in (1, 5, 13, 50):
        target = topk_target(log_target, k)
        assert target.ids.shape == target.log_probs.shape == (6, min(k, 13)) and target.log_tail.shape == (6,)
        kept_mass = target.log_probs.exp().sum(-1)
        assert (target.log_probs == log_target.gather(1, target.ids)).all()
        assert (target.log_probs[:, :-1] >= target.log_probs[:, 1:]).all()  # the most likely first
        assert (target.log_probs[:, -1:] >= log_target.scatter(1, target.ids, -1e30)).all()  # none left is likelier
        torch.testing.assert_close(kept_mass + target.log_tail.exp(), torch.ones(6, dtype=torch.float64))
    assert (topk_target(log_target, 13).log_tail == -1e30).all()  # every id kept: no tail


def test_loss_cached_target_bad_arguments_are_named():
    s, labels, t, t_raw, s_raw = _loss_inputs(extra=(0, 0, 0, 0))
    target = topk_target(delta_kd_target(t, t_raw, s_raw, 1.0, 1.0)[labels != -100], 4)
    with pytest.raises(ValueError, match="pass it instead of the frozen models' logits"):
        delta_kd_loss(s, labels, t, target=target)
    with pytest.raises(ValueError, match="must be a TopK"):
        delta_kd_loss(s, labels, target=tuple(target))
    with pytest.raises(ValueError, match="target has 6 positions, labels count 9"):
        delta_kd_loss(s, labels.clamp(min=0), target=target)
    with pytest.raises(ValueError, match="target has 6 positions, `positions` 2"):
        delta_kd_loss(s, labels, target=target, positions=torch.tensor([1, 2]))


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
        at = mask.flatten().nonzero()[:, 0]  # flat positions into (B, T): only their logits
        torch.testing.assert_close(ours(ids, mask, logits_at=at), out.flatten(0, 1)[at])


def test_model_decoding_steps_give_the_full_forward_logits(tmp_path):
    """prefill (each prompt into its own slot, at its own length) + decode_step (a fixed-size cache, every position
    attended under a mask, each slot at its own position) give, at each new token, the logits that a full forward of
    that row alone gives; also in a slot refilled with a shorter prompt, over what the last one left in the cache.
    Compiled, the same within 1e-5."""
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    prompts = [[5, 9, 1, 33, 7], [4, 90, 2], [17]]
    new = torch.tensor([[3, 8, 11, 60], [12, 12, 5, 1], [40, 2, 9, 9]])  # (B, 4) tokens fed one at a time
    refill, refill_new = [8, 6], [21, 3]  # slot 1's next prompt, prefilled after the 5 steps
    def full(row):
        return ours(torch.tensor([row]))[0]
    compiled = Qwen2(ours.config).eval()
    compiled.load_state_dict(ours.state_dict())
    compiled.compile_blocks()
    for model in (ours, compiled):
        state = model.new_state(3, 10)
        for slot, p in enumerate(prompts):
            model.prefill(state, slot, p[:-1])  # the last prompt token is the first one fed
        feed = torch.cat([torch.tensor([p[-1] for p in prompts])[:, None], new], 1)  # (B, 5)
        steps = torch.stack([model.decode_step(state, feed[:, k]) for k in range(5)], 1)  # (B, 5, V)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(steps[i], full(p + new[i].tolist())[len(p) - 1:], atol=1e-5, rtol=0)
        assert state.pos.tolist() == [9, 7, 5]
        model.prefill(state, 1, refill[:-1])
        feed = torch.tensor([[0, t, 0] for t in refill[-1:] + refill_new])
        steps = torch.stack([model.decode_step(state, f)[1] for f in feed])  # the other slots run on, unread
        torch.testing.assert_close(steps, full(refill + refill_new)[len(refill) - 1:], atol=1e-5, rtol=0)
        assert state.pos.tolist() == [9, 4, 8]
        for _ in range(3):  # past the cache's end, a slot keeps rewriting its last position, within bounds
            model.decode_step(state, torch.zeros(3, dtype=torch.long))
        assert state.pos.tolist() == [9, 7, 9]
    # compiled greedy decoding picks, at every step, the eager model's best token (to 1e-4: a near-tie may go either
    # way)
    ids, mask = _model_left_pad(prompts)
    gen = generate(compiled, ids, mask, max_new_tokens=6)
    logits = ours(gen, torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1))[:, ids.size(1) - 1:-1]
    chosen = logits.gather(-1, gen[:, ids.size(1):, None])[..., 0]
    assert (chosen >= logits.max(-1).values - 1e-4).all()


def test_model_compiled_decode_step_writes_the_cache_in_place(tmp_path):
    """The compiled decode step writes each slot's position into the cache in place. When the layers' caches were
    slices of one (L, 2, ...) tensor, torch.compile copied all of it at every layer: L x the whole cache per token,
    some 200 GB for Qwen2.5-1.5B with 32 rows of 4096 positions. The step's generated code must allocate nothing as
    large as one layer's keys."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    ours.eval().compile_blocks()
    with torch.inference_mode(), inductor_config.patch(fx_graph_cache=False):  # a cached graph has no code to read
        state = ours.new_state(2, 500)
        ours.prefill(state, 0, [5, 9, 1, 33])
        ours.prefill(state, 1, [4, 90])
        _, code = run_and_get_code(ours.decode_step, state, torch.tensor([7, 2]))
    keys = state.cache[0][0]
    shapes = re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", "\n".join(code))
    sizes = [math.prod(int(n) for n in s.split(",") if n.strip()) for s in shapes]
    assert sizes, "found no allocation in the generated code: the pattern needs updating"
    assert max(sizes) < keys.numel(), (max(sizes), keys.shape)
    assert all(k._base is None and v._base is None for k, v in state.cache)
    assert keys[0, :, 4].abs().sum() > 0 and keys[1, :, 2].abs().sum() > 0  # each slot wrote at its own position
    assert keys[0, :, 5:].abs().sum() == 0 and keys[1, :, 3:].abs().sum() == 0


def test_model_masked_attention_repeats_kv_and_equals_enable_gqa():
    """A padding mask rules out flash attention, and on torch 2.9 CUDA's memory-efficient kernel refuses enable_gqa
    beside a mask, which left the math kernel and its fp32 (B, H, T, T) scores: so the masked branch repeats K/V to
    every query head instead. It gives what enable_gqa gives, and both what float64 softmax(QK^T / sqrt(D)) V gives;
    unmasked, the causal branch equals the masked one under a mask without padding."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 3, 6, 2, 7, 8
    q = torch.randn(B, H, T, D, generator=g)
    k, v = (torch.randn(B, Hkv, T, D, generator=g) for _ in range(2))
    _, pad = _model_left_pad([[1] * 7, [1] * 4, [1]])
    mask = attention_mask_4d(pad)  # (B, 1, T, T)
    ours = attend(q, k, v, mask, gqa=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                               rtol=0, atol=1e-6)
    k64, v64 = (t.double().repeat_interleave(H // Hkv, dim=1) for t in (k, v))  # transformers' repeat_kv
    scores = (q.double() @ k64.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, -math.inf)
    torch.testing.assert_close(ours.double(), scores.softmax(-1) @ v64, rtol=0, atol=1e-6)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    torch.testing.assert_close(attend(q, k, v, None, gqa=True), attend(q, k, v, causal, gqa=True), rtol=0, atol=1e-6)


def test_model_compiled_blocks_have_no_graph_break_and_one_graph_per_variant(tmp_path):
    """Blocks compiled as parallel.build compiles them (before fully_shard), on a world of one: a student's training
    with and without activation checkpointing, and a frozen teacher of other head counts in a forward, a left-padded
    forward, a prefill and a decode step, each trace into one graph with no break, shared by every layer of its model.
    (Under FSDP, dynamo makes the blocks' int attributes symbolic: enable_gqa computed in forward was a SymBool, and
    broke the graph at every attention call.) The graphs agree with eager. Handed to the eager backend: dynamo's
    graphs, guards and breaks are the same whatever backend compiles them, without inductor's minutes of compiling."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch.distributed.device_mesh import init_device_mesh
    shape = dict(vocab_size=97, num_hidden_layers=3, rope_theta=1e6)
    configs = {"student": Qwen2Config(hidden_size=32, intermediate_size=56, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True, **shape),
               "teacher": Qwen2Config(hidden_size=48, intermediate_size=64, num_attention_heads=6,
                                      num_key_value_heads=1, **shape)}
    ids, mask = _model_left_pad([[5, 9, 1, 33, 7, 60, 2, 8], [4, 90, 2], [17, 3, 3, 3, 3]])
    expected = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        eager = Qwen2(cfg)
        eager.init_weights()
        eager.save_pretrained(tmp_path / name)
        expected[name] = eager(ids), eager(ids, mask)[:, -1]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        f32 = torch.float32
        torch._dynamo.reset()
        counters.clear()
        student = parallel.build(tmp_path / "student", mesh, f32, f32, True, compile="eager")
        teacher = parallel.build(tmp_path / "teacher", mesh, f32, f32, False, compile="eager")
        for m in (student, teacher):
            load_weights(m, m.name_or_path)
        for checkpointing in (False, True):  # training
            for layer in student.model.layers:
                layer.gradient_checkpointing = checkpointing
            logits = student(ids)
            logits.sum().backward()
            torch.testing.assert_close(logits, expected["student"][0], rtol=0, atol=1e-5)
        assert all(p.grad is not None for p in student.parameters())
        with torch.no_grad():  # frozen: a forward, a left-padded forward, and a prefill that writes a KV cache
            torch.testing.assert_close(teacher(ids), expected["teacher"][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(teacher(ids, mask)[:, -1], expected["teacher"][1], rtol=0, atol=1e-5)
            state = teacher.new_state(1, ids.size(1))
            teacher.prefill(state, 0, ids[0, :-1].tolist())  # row 0 has no padding
            torch.testing.assert_close(teacher.decode_step(state, ids[0, -1:]), expected["teacher"][0][0, -1:],
                                       rtol=0, atol=1e-5)
        assert dict(counters["graph_break"]) == {}
        # one graph per variant and model, whatever the layer count: the student with and without checkpointing; the
        # teacher's forward, padded forward, prefill (a KV cache) and decode step (T = 1, per-row positions)
        assert counters["stats"]["unique_graphs"] == 6
    finally:
        dist.destroy_process_group()


def test_model_rope_frequencies_are_made_once(tmp_path):
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    rope_inv_freq.cache_clear()
    generate(ours, torch.tensor([[1, 2, 3]]), max_new_tokens=3)  # made first under inference mode,
    ours(torch.tensor([[1, 2, 3]])).sum().backward()  # then serves training
    assert rope_inv_freq.cache_info().misses == 1  # made once, then reused by every decode step and by training


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


_MODEL_FSDP_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard
from model import Qwen2, Qwen2Config, load_weights

mesh = init_device_mesh("cpu", (2,))
for name, dtype in (("tied", torch.float32), ("untied", torch.bfloat16)):  # bf16 from an fp32 file: a cast
    path = f"{sys.argv[1]}/{name}"
    full = Qwen2.from_pretrained(path, dtype=dtype).state_dict()
    for placement in (Shard(0), Shard(1)):
        with torch.device("meta"):
            m = Qwen2(Qwen2Config.from_json(path)).to(dtype)
        for module in [*m.model.layers, m]:  # as train.py shards, optionally by columns where they split evenly
            fully_shard(module, mesh=mesh,
                        shard_placement_fn=lambda p: placement if p.ndim == 2 and p.shape[1] % 2 == 0 else Shard(0))
        m.to_empty(device="cpu")
        m.tie_weights()
        assert (m.lm_head.weight is m.model.embed_tokens.weight) == (name == "tied")
        if placement == Shard(1):
            try:
                load_weights(m, path)
                raise AssertionError("column shards loaded")
            except ValueError as e:
                assert "Shard(dim=1)" in str(e) and "1-D mesh only" in str(e), e
            continue
        load_weights(m, path)
        shards = m.state_dict()
        assert shards.keys() == full.keys()
        for k, p in shards.items():  # the gathered shards are exactly the plain model's tensors
            assert p.to_local().dtype == dtype and torch.equal(p.full_tensor(), full[k]), k
        assert m.model.embed_tokens.weight.to_local().shape[0] == (49, 48)[mesh.get_local_rank()]
print(f"ok{mesh.get_local_rank()}")
"""


def test_model_load_weights_into_fsdp2_shards(tmp_path):
    """Each rank reads only its rows of each tensor; gathered, they are the plain model's weights bit for bit."""
    for name, tie in (("tied", True), ("untied", False)):  # vocab 97 and intermediate 45 do not split evenly
        cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=45, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=tie)
        m = Qwen2(cfg)
        m.init_weights(torch.Generator().manual_seed(0))
        m.save_pretrained(tmp_path / name)
    (tmp_path / "load.py").write_text(_MODEL_FSDP_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "load.py"), str(tmp_path), str(REPO)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    # both ranks got through every check (their lines may interleave)
    assert r.returncode == 0 and "ok0" in r.stdout and "ok1" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------------
# generate.py: decoding many prompts, against transformers and against static batching

@pytest.mark.parametrize("name", ["tied-gqa", "untied-mqa"])
def test_generate_greedy_follows_oracle_argmax(tmp_path, name):
    # in float64, where the two models agree to ~1e-14: a near-tie between two tokens cannot flip on another CPU
    ours, hf = (m.double() for m in _model_pair(tmp_path, name))
    rows = [[5, 9, 1, 33, 7, 60, 2, 8], [4, 4, 90], [11, 12, 13, 14, 15]]
    ids, mask = _model_left_pad(rows)
    N = 12
    out = generate(ours, ids, mask, max_new_tokens=N)
    assert out.shape == (3, ids.size(1) + N) and torch.equal(out[:, :ids.size(1)], ids)
    for i, r in enumerate(rows):
        seq = torch.cat([torch.tensor(r), out[i, ids.size(1):]])
        logits = hf(seq[None]).logits[0]
        # every generated token is the oracle's argmax given the tokens before it
        assert torch.equal(logits[len(r) - 1:-1].argmax(-1), seq[len(r):])
        # and a row generated alone is the same row
        assert torch.equal(generate(ours, torch.tensor([r]), max_new_tokens=N)[0, len(r):], out[i, ids.size(1):])


def test_generate_eos_fill_and_early_stop(tmp_path):
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    ids, mask = _model_left_pad([[5, 9, 1, 33], [4, 4, 90], [11, 12]])
    T, N = ids.size(1), 10
    free = generate(ours, ids, mask, max_new_tokens=N)
    eos = int(free[0, T + 2])  # row 0 emits this token third
    out = generate(ours, ids, mask, max_new_tokens=N, eos_token_id=eos)
    for row_free, row in zip(free[:, T:], out[:, T:]):
        hits = (row_free == eos).nonzero()
        k = int(hits[0]) if len(hits) else N  # first eos of the unconstrained run
        assert torch.equal(row[:k + 1], row_free[:k + 1])
        assert (row[k + 1:] == eos).all()
    # every row ends at once: early stop, full width, eos after; a list of eos ids works too
    firsts = [int(t) for t in free[:, T]]
    out = generate(ours, ids, mask, max_new_tokens=N, eos_token_id=[96] + firsts)
    assert out.shape == (3, T + N)
    assert torch.equal(out[:, T], free[:, T]) and (out[:, T + 1:] == 96).all()
    # the returned ids can be trained on (not inference tensors)
    assert not out.is_inference()
    ours(out).sum().backward()


def test_generate_sampling(tmp_path):
    ours, _ = _model_pair(tmp_path, "tied-gqa")
    ids = torch.tensor([[5, 9, 1, 33], [4, 4, 90, 2]])
    greedy = generate(ours, ids, max_new_tokens=8)
    tiny_p = generate(ours, ids, max_new_tokens=8, temperature=1.0, top_p=1e-6)
    assert torch.equal(tiny_p, greedy)  # the nucleus of a tiny top_p is the argmax alone

    def run(seed):
        return generate(ours, ids, max_new_tokens=8, temperature=1.5, seed=seed)
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    # Gumbel-max over counter-based noise draws from softmax(logits / T): n rows of the same logits, one seed each,
    # against the float64 softmax by a chi-square test (cells expecting 5 or more; 100 is p < 1e-6 at their ~35
    # degrees of freedom), far from the softmax at another temperature, so that the test can tell
    n, g = 20000, torch.Generator().manual_seed(3)
    logits = torch.randn(2, 50, generator=g, dtype=torch.float64) * 2
    seeds, step0 = torch.tensor([seed_of(5, i) for i in range(n)]), torch.zeros(n, dtype=torch.long)

    def chi2(drawn, p):
        counts, expected = torch.bincount(drawn, minlength=50).double(), n * p
        big = expected >= 5  # the others pooled into one cell
        counts, expected = (torch.cat([x[big], x[~big].sum()[None]][:1 + bool((~big).any())])
                            for x in (counts, expected))
        return ((counts - expected) ** 2 / expected).sum().item()
    for T in (1.0, 0.7):
        drawn = sample(logits[0].float().expand(n, -1), T, 1.0, seeds, step0)
        assert chi2(drawn, torch.softmax(logits[0] / T, -1)) < 100
        assert chi2(drawn, torch.softmax(logits[0] / (1.5 * T), -1)) > 300
    # the next step's noise is new: two steps agree as often as two independent draws do, sum of p^2
    p = torch.softmax(logits[0], -1)
    same = (sample(logits[0].expand(n, -1), 1.0, 1.0, seeds, step0) == sample(logits[0].expand(n, -1), 1.0, 1.0,
                                                                                 seeds, step0 + 1)).double().mean()
    assert abs(same - (p ** 2).sum()) < 5 * ((p ** 2).sum() / n) ** 0.5
    # top-p keeps the most likely tokens until their mass reaches p; check against a float64 formula
    p = torch.softmax(logits, -1)
    for i in range(2):
        sp, order = p[i].sort(descending=True)
        nucleus = set(order[:int((sp.cumsum(0) < 0.6).sum()) + 1].tolist())
        drawn = sample(logits[i:i + 1].float().expand(2000, -1), 1.0, 0.6, seeds[:2000], step0[:2000])
        assert set(drawn.tolist()) == nucleus


def _generate_greedy_oracle(hf, prompt, limit, stops):
    """Greedy decoding by full forwards of transformers' model, one per token, without any cache."""
    seq = list(prompt)
    while len(seq) - len(prompt) < limit and (len(seq) == len(prompt) or seq[-1] not in stops):
        seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_generate_continuous_batching_equals_static_batching_greedy(tmp_path):
    """Continuous batching (2 slots, each refilled as its row ends) gives, token for token, the replies of static
    batching (3 slots filled together), of generate(), and of transformers' model decoding each prompt alone by full
    forwards. In float64, where the two models agree to ~1e-14, so that no near-tie can flip; in fp32 and bf16 the
    batched step's rounding depends on the batch, and a reply may differ where two tokens' logits nearly tie."""
    ours, hf = (m.double() for m in _model_pair(tmp_path, "untied-mqa"))
    prompts = [[5, 9, 1, 33, 7, 60, 2, 8], [4, 4, 90], [11, 12, 13, 14, 15], [3], [70, 71], [8, 1, 2, 3, 4, 5]]
    limits = [12, 3, 9, 12, 7, 1]
    free = [_generate_greedy_oracle(hf, p, n, ()) for p, n in zip(prompts, limits)]
    stop = free[0][4]  # a token that ends the first reply early, and perhaps others
    oracle = {k: _generate_greedy_oracle(hf, p, n, (stop,)) for k, (p, n) in enumerate(zip(prompts, limits))}
    assert len(oracle[0]) == 5 and oracle[0] != free[0]  # the stop id ended a reply

    def replies(slots, refill, every=16):
        decoder = Decoder([ours], slots, 8 + 12, [stop], every=every)
        ended = [(k, tokens) for k, tokens, _ in decoder.run(((k, p, n, 0) for k, (p, n) in
                                                              enumerate(zip(prompts, limits))), refill)]
        assert decoder.live_steps == sum(map(len, oracle.values()))  # one live step per reply token
        return dict(ended), [k for k, _ in ended], decoder.utilization
    continuous, order, used = replies(2, True, every=4)  # the host looks every 4 steps: rows end out of order
    static, _, used_static = replies(3, False)
    assert continuous == static == oracle
    assert order[:2] == [1, 0] and used > used_static  # reply 1 ended first, and its slot took prompt 2
    ids, mask = _model_left_pad(prompts)
    out = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=stop)
    for k, reply in oracle.items():
        assert out[k, ids.size(1):ids.size(1) + len(reply)].tolist() == reply
    with pytest.raises(ValueError, match="a prompt of 3 tokens and 4 new ones do not fit the cache's 5 positions"):
        list(Decoder([ours], 1, 5).run([(0, [1, 2, 3], 4, 0)]))


def test_generate_sampled_replies_do_not_depend_on_slot_batch_or_other_prompts(tmp_path):
    """A prompt's sampled reply depends on its seed alone: not on its slot, the number of slots, the other prompts or
    their order (float64: no near-tie can flip). Another seed gives another reply, and none is the greedy one."""
    ours = _model_pair(tmp_path, "tied-gqa")[0].double()
    prompts = [[5, 9, 1, 33, 7, 60, 2, 8], [4, 4, 90], [11, 12, 13, 14, 15], [3], [70, 71], [8, 1, 2, 3, 4, 5],
               [60, 61, 62], [9]]

    def replies(keys, slots, seed=7, temperature=1.0):
        decoder = Decoder([ours], slots, 8 + 10, [96], temperature, top_p=0.9)
        return {k: tokens for k, tokens, _ in decoder.run((k, prompts[k], 10, seed_of(seed, k)) for k in keys)}
    alone = replies([0, 1, 2, 3, 4, 5], 2)
    assert {k: v for k, v in replies([5, 3, 0, 7, 1, 4, 2, 6], 4).items() if k in alone} == alone
    assert replies([2], 1) == {2: alone[2]}
    other, greedy = replies(range(6), 3, seed=8), replies(range(6), 3, temperature=0.0)
    assert all(other[k] != alone[k] and greedy[k] != alone[k] for k in alone)


def test_generate_decoder_counts_utilization_honestly():
    """Decoder.run's own count, over bench_model.py's stand-in that ends each row at its limit. Static batching: the
    sum of the lengths over slots x each batch's longest. Continuous batching, worked by hand (2 slots, a look every 16
    steps): rows of 5 and 40 run 16 steps, the first idle after its 5th until the host sees it end; its slot takes
    the row of 17, which runs 16 and then 1 step of the last 8, when the row of 40 ends: 62 live of 2 x 40."""
    from bench_model import _Scheduled
    lengths = [5, 40, 17, 3, 33, 16, 1, 70]
    static = _Scheduled(3)
    assert [k for k, _, _ in static.run(((k, [0], n, 0) for k, n in enumerate(lengths)), refill=False)] == \
        [0, 2, 1, 3, 5, 4, 6, 7]
    assert static.utilization == sum(lengths) / (3 * (40 + 33 + 70))
    continuous = _Scheduled(2)
    assert [k for k, _, _ in continuous.run((k, [0], n, 0) for k, n in enumerate(lengths[:3]))] == [0, 2, 1]
    assert (continuous.live_steps, continuous.slot_steps) == (62, 80)


def test_generate_decoding_syncs_once_per_16_steps(tmp_path):
    """The host waits for the device once per 16 decode steps, one .tolist() of the steps' records (plus a last,
    shorter look at the end), sampling with top-p included: the count a GPU would see."""
    from measure import HostSyncs
    ours = _model_pair(tmp_path, "tied-gqa")[0]
    prompts = [[5, 9, 1, 33], [4, 4, 90], [11, 12], [3], [70, 71, 72, 73, 74], [8, 1]]
    decoder = Decoder([ours], 3, 5 + 40, temperature=1.0, top_p=0.9)
    with torch.inference_mode(), HostSyncs() as syncs:
        replies = list(decoder.run((k, p, 20 + 4 * k, k) for k, p in enumerate(prompts)))
    steps = decoder.slot_steps // 3
    assert len(replies) == 6 and steps >= 40
    assert set(syncs.counts) == {".tolist()"} and syncs.total <= steps // 16 + 1, (syncs.counts, steps)


# ---------------------------------------------------------------------------------------------------------------------
# data.py: chat template, masks, sources, batches; toy.py: the toy's data


# Qwen2.5's chat template, verbatim (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct), as the rendering oracle.
_DATA_QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (Qwen's template, verbatim)


def _data_u(role, content):
    return {"role": role, "content": content}


_DATA_CONVERSATIONS = {
    "single": [_data_u("user", "What is 2 + 3?"), _data_u("assistant", "2 + 3 = 5.\nThe answer is 5.")],
    "multi": [_data_u("user", "Hi"), _data_u("assistant", "Hello! How can I help?"),
              _data_u("user", "Add 4 and 9."), _data_u("assistant", "4 + 9 = 13.")],
    "system": [_data_u("system", "You are a terse math tutor."), _data_u("user", "7 x 6?"),
               _data_u("assistant", "42")],
    "late_system": [_data_u("user", "a"), _data_u("assistant", "b"), _data_u("system", "be brief"),
                    _data_u("user", "c"), _data_u("assistant", "d")],
    "whitespace": [_data_u("system", "  sys with spaces \n"), _data_u("user", "\n\nleading newlines"),
                   _data_u("assistant", "\n\n  reply with edges  \n\n"), _data_u("user", " "),
                   _data_u("assistant", " \n")],
    "empty_reply": [_data_u("user", "say nothing"), _data_u("assistant", "")],
    "unicode": [_data_u("user", "caf\u00e9 \U0001F600 e\u0301"), _data_u("assistant", "\u00fcber \U0001F600\t\n")],
    "trailing_user": [_data_u("user", "q1"), _data_u("assistant", "a1"), _data_u("user", "q2")],
}


# ---------------------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def _data_toy(tmp_path_factory):
    """A small toy set and its tokenizer, written like `python toy.py` writes them."""
    out = tmp_path_factory.mktemp("toy")
    chats, corpus = toy.chats(300, seed=3), toy.corpus(300, seed=3)
    tok = toy.train_tokenizer([data.render_chat(r["messages"]) for r in chats] + [r["text"] for r in corpus])
    tok.save(str(out / "tokenizer.json"))
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return out, data.load_tokenizer(out)


def _data_byte_chars():
    """GPT-2's byte -> printable-char map, in the order that gives Qwen's first 256 ids ('!' = 0, '\\n' = 198)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return {b: chr(c) for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def _data_qwen_layout():
    """A tokenizer laid out like Qwen2.5's: its pre-tokenizer and normalizer, 151643 BPE ids, then the special tokens,
    with the ids FACTS.md gives: '\\n' 198, '\\n\\n' 271, 'assistant' 77091, specials 151643-151645. Other words
    exist only as bytes, so any id this test expects is one that Qwen2.5 also produces."""
    from tokenizers import Tokenizer
    chars = _data_byte_chars()
    vocab = {chars[b]: i for i, b in enumerate(chars)}
    assert vocab["\u010a"] == 198
    merges = [("\u010a", "\u010a")]
    fixed = {"\u010a\u010a": 271, "assistant": 77091}
    for word in ("assistant",):
        for k in range(2, len(word) + 1):
            merges.append((word[:k - 1], word[k - 1]))
    pieces = sorted({a + b for a, b in merges} - set(fixed))
    free = (i for i in range(256, 151643) if i not in fixed.values())
    vocab.update(fixed)
    vocab.update({p: next(free) for p in pieces})
    vocab.update({f"<unused_{i}>": i for i in free})
    assert len(vocab) == 151643
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 151643 + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for k, t in enumerate(data.SPECIAL_TOKENS)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": toy.QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }
    return Tokenizer.from_str(json.dumps(spec))


def _data_hf(tok):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=_DATA_QWEN_TEMPLATE)


def _data_expected_labels(messages, tok, ids):
    """Independent mask oracle: rebuild each token's byte span from its byte-level string and supervise the tokens
    that overlap an assistant reply's content or its <|im_end|> (found by searching the rendered text)."""
    inverse = {c: b for b, c in _data_byte_chars().items()}
    special = set(data.SPECIAL_TOKENS)
    pieces = [t.encode() if t in special else bytes(inverse[c] for c in t) for t in map(tok.id_to_token, ids)]
    text = unicodedata.normalize("NFC", data.render_chat(messages)).encode()
    assert b"".join(pieces) == text
    spans, pos = [], 0
    for m in messages:
        head = f"<|im_start|>{m['role']}\n".encode()
        pos = text.index(head, pos) + len(head)
        end = pos + len(unicodedata.normalize("NFC", m["content"]).encode()) + len(b"<|im_end|>")
        if m["role"] == "assistant":
            spans.append((pos, end))
        pos = end
    labels, start = [], 0
    for i, p in zip(ids, pieces):
        end = start + len(p)
        labels.append(i if any(start < b and end > a for a, b in spans) else -100)
        start = end
    return labels


# ---------------------------------------------------------------------------- rendering and masks

@pytest.fixture(scope="module")
def _data_oracles(_data_toy, _data_qwen_layout):
    return [(tok, _data_hf(tok)) for tok in (_data_toy[1], _data_qwen_layout)]


@pytest.mark.parametrize("name", sorted(_DATA_CONVERSATIONS))
def test_data_render_and_ids_match_transformers_template(name, _data_oracles):
    messages = _DATA_CONVERSATIONS[name]
    for tok, hf in _data_oracles:
        assert data.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False)
        assert data.render_chat(messages, add_generation_prompt=True) == \
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ex = data.encode_chat(messages, tok)
        assert ex["input_ids"] == hf.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert ex["labels"] == _data_expected_labels(messages, tok, ex["input_ids"])


def test_data_known_qwen_ids_and_mask_positions(_data_qwen_layout):
    tok = _data_qwen_layout
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [151643, 151644, 151645]
    assert tok.encode("<|im_start|>assistant\n", add_special_tokens=False).ids == [151644, 77091, 198]
    assert tok.encode("<|im_end|>\n", add_special_tokens=False).ids == [151645, 198]
    assert tok.encode("\n\n", add_special_tokens=False).ids == [271]
    def ids(s):
        return tok.encode(s, add_special_tokens=False).ids
    ex = data.encode_chat([_data_u("user", "hi"), _data_u("assistant", "Yo")], tok)
    tail = [151644, 77091, 198] + ids("Yo") + [151645, 198]
    assert ex["input_ids"][-len(tail):] == tail
    assert ex["labels"][-len(tail):] == [-100, -100, -100] + ids("Yo") + [151645, -100]
    assert all(label == -100 for label in ex["labels"][:-len(tail)])  # system, user, headers
    assert ex["input_ids"][:1] == [151644] and ex["input_ids"].count(151644) == 3  # the default system turn
    # A reply starting with "\n" merges with the header's "\n" into 271; it carries the reply, so it is supervised.
    ex = data.encode_chat([_data_u("user", "hi"), _data_u("assistant", "\nYo")], tok)
    tail = [151644, 77091, 271] + ids("Yo") + [151645, 198]
    assert ex["input_ids"][-len(tail):] == tail
    assert ex["labels"][-len(tail):] == [-100, -100, 271] + ids("Yo") + [151645, -100]
    # The prompt for generation ends in the generation header and stops before the last reply.
    prompt = data.encode_prompt(_DATA_CONVERSATIONS["multi"], tok)
    full = data.encode_chat(_DATA_CONVERSATIONS["multi"], tok)["input_ids"]
    assert prompt[-3:] == [151644, 77091, 198] and full[:len(prompt)] == prompt


def test_data_masks_by_decoding(_data_toy):
    tok = _data_toy[1]
    ex = data.encode_chat(_DATA_CONVERSATIONS["multi"], tok)
    runs, run = [], []
    for i, label in zip(ex["input_ids"], ex["labels"]):
        if label != -100:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == \
        ["Hello! How can I help?<|im_end|>", "4 + 9 = 13.<|im_end|>"]
    sys_ex = data.encode_chat(_DATA_CONVERSATIONS["system"], tok)
    assert "You are Qwen" not in tok.decode(sys_ex["input_ids"])
    assert data.render_chat(_DATA_CONVERSATIONS["system"]).startswith("<|im_start|>system\nYou are a terse")


def test_data_plain_text_and_truncation(_data_toy):
    tok = _data_toy[1]
    eot = tok.token_to_id("<|endoftext|>")
    ex, = data.build_examples([{"id": "t", "text": "3 + 4 = 7."}], tok)
    assert ex["input_ids"][-1] == eot and list(ex["labels"]) == list(ex["input_ids"])
    cut, = data.build_examples([{"id": "t", "text": "3 + 4 = 7."}], tok, max_len=3)
    assert list(cut["input_ids"]) == list(ex["input_ids"][:3])
    messages = _DATA_CONVERSATIONS["multi"]
    full = data.encode_chat(messages, tok)
    for k in (5, 40, len(full["input_ids"]) - 1, len(full["input_ids"]) + 10):
        cut = data.encode_chat(messages, tok, max_len=k)
        assert cut["input_ids"] == full["input_ids"][:k] and cut["labels"] == full["labels"][:k]
    first = next(i for i, label in enumerate(full["labels"]) if label != -100)
    rows = [{"id": "a", "messages": messages}, {"id": "b", "text": "1 + 1 = 2."}]
    examples = data.build_examples(rows, tok, max_len=first + 1)  # the chat keeps one supervised token
    assert len(examples) == 2 and list(examples[0]["labels"]) == full["labels"][:first + 1]
    assert examples[0]["input_ids"].dtype == np.int32


def test_data_prompt_filling_max_len_is_dropped(_data_toy, capsys):
    tok = _data_toy[1]
    messages = _DATA_CONVERSATIONS["single"]
    first = next(i for i, label in enumerate(data.encode_chat(messages, tok)["labels"]) if label != -100)
    rows = [{"id": "a", "messages": messages}, {"id": "b", "messages": messages}, {"id": "c", "text": "5."}]
    examples = data.build_examples(rows, tok, max_len=first)
    assert len(examples) == 1 and "dropped 2 of 3 rows" in capsys.readouterr().out


def test_data_load_tokenizer_errors(tmp_path, _data_toy):
    from tokenizers import Tokenizer, models
    assert data.load_tokenizer(_data_toy[0] / "tokenizer.json").get_vocab_size() == _data_toy[1].get_vocab_size()
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"<\|im_end\|>"):
        data.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        data.load_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------------------- loading

def _data_write_jsonl(path, rows):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


_DATA_GOOD = {"messages": [_data_u("user", "q"), _data_u("assistant", "a")]}


@pytest.mark.parametrize("bad, why", [
    (b'{"messages": [\n', "malformed JSON"),
    ({"messages": [_data_u("user", "q")]}, "no assistant turn"),
    ({"messages": [_data_u("user", "q"), _data_u("bot", "a")]}, "unknown role"),
    ({"messages": [_data_u("user", "q"), _data_u("assistant", 5)]}, "non-string content"),
    ({"prompt": "q", "response": None}, "non-string content"),
    (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
    ({"question": "q"}, "bad row"),
    ({"messages": [_data_u("user", "q"), {**_data_u("assistant", "a"), "weight": 0.5}]}, "bad weight"),
    ({"messages": [{**_data_u("user", "q"), "weight": 0}, _data_u("assistant", "a")]}, "bad weight"),
])
def test_data_bad_input_names_file_and_line(tmp_path, bad, why, capsys):
    path = _data_write_jsonl(tmp_path / "rows.jsonl", [_DATA_GOOD, {"text": "fine"}, bad, _DATA_GOOD])
    with pytest.raises(ValueError, match=why) as err:
        data.load_rows(path)
    assert f"{path}:3:" in str(err.value) and "--skip-bad-rows" in str(err.value)
    rows = data.load_rows(path, skip_bad=True)
    assert [r["id"] for r in rows] == ["rows.jsonl:1", "rows.jsonl:2", "rows.jsonl:4"]
    assert f"skipped 1 bad rows of {path}: 1 {why}" in capsys.readouterr().out


def test_data_bad_rows_in_json_and_parquet_and_skip_counts(tmp_path, capsys):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_DATA_GOOD, {"messages": [_data_u("user", "q")]}]))
    with pytest.raises(ValueError, match=rf"{path} row 1: no assistant turn"):
        data.load_rows(path)
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):  # a broken list fails even with skip_bad
        data.load_rows(path, skip_bad=True)
    path.write_bytes(b'[{"text": "a"},\n {"text": "\xff"}]')
    with pytest.raises(ValueError, match=rf"{path}:2: invalid UTF-8"):
        data.load_rows(path)
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "response": "a"}, {"prompt": "q", "response": None}]),
                   tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"rows.parquet row 1: non-string content"):
        data.load_rows(tmp_path / "rows.parquet")
    mixed = _data_write_jsonl(tmp_path / "mixed.jsonl", [b"{oops\n", {"messages": [_data_u("user", "q")]},
                                                         b"\xff\n", _DATA_GOOD, b"[1,\n"])
    assert len(data.load_rows(mixed, skip_bad=True)) == 1
    out = capsys.readouterr().out
    assert f"skipped 4 bad rows of {mixed}: 1 invalid UTF-8, 2 malformed JSON, 1 no assistant turn" in out


def _data_ultrachat_table(n, offset=0):
    return pa.Table.from_pylist([{"prompt": f"q{offset + i}", "prompt_id": f"p{offset + i}", "messages": [
        _data_u("user", f"q{offset + i}"), _data_u("assistant", f"a{offset + i}")]} for i in range(n)])


def _data_openmath_table(n, offset=0):
    return pa.Table.from_pylist([{"problem": f"P{offset + i}", "generated_solution": f"S{offset + i}",
                                  "expected_answer": "1", "problem_type": "x", "inference_mode": "cot"}
                                 for i in range(n)])


def test_data_parquet_json_and_folders(tmp_path):
    folder = tmp_path / "ultra" / "data"
    folder.mkdir(parents=True)
    pq.write_table(_data_ultrachat_table(3), folder / "train_sft-00000-of-00002-abc.parquet")
    pq.write_table(_data_ultrachat_table(2, 3), folder / "train_sft-00001-of-00002-abc.parquet")
    pq.write_table(_data_ultrachat_table(4, 100), folder / "test_sft-00000-of-00001-abc.parquet")
    rows = data.load_rows(tmp_path / "ultra", split="train_sft")
    assert [r["messages"][1]["content"] for r in rows] == ["a0", "a1", "a2", "a3", "a4"]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]  # UltraChat's prompt_id names its rows
    assert rows[0]["messages"] == [_data_u("user", "q0"), _data_u("assistant", "a0")]
    assert len(data.load_rows(tmp_path / "ultra", split="test_sft")) == 4
    assert len(data.load_rows(tmp_path / "ultra")) == 9
    assert len(data.load_rows(tmp_path / "ultra", split="train_sft", max_rows=4)) == 4
    # a row range, across shards, counted in good rows: a held-out slice of a dataset that has no test split
    def ranged(split, **kw):
        return [r["messages"][1]["content"] for r in data.load_rows(tmp_path / "ultra", split, **kw)]
    assert ranged("train_sft[1:4]") == ["a1", "a2", "a3"]
    assert ranged("train_sft[2:]", max_rows=2) == ["a2", "a3"]
    assert ranged("train_sft[:2]", max_rows=5) == ["a0", "a1"]
    with pytest.raises(FileNotFoundError, match="split 'train_gen'"):
        data.load_rows(tmp_path / "ultra", split="train_gen")
    pq.write_table(_data_openmath_table(2), tmp_path / "om.parquet")
    assert data.load_rows(tmp_path / "om.parquet")[1]["messages"] == [_data_u("user", "P1"), _data_u("assistant", "S1")]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _data_write_jsonl(mixed / "a.jsonl", [{"id": 7, "prompt": "p", "response": "r"}, {"text": "t"}])
    (mixed / "b.json").write_text(json.dumps([_DATA_GOOD]))
    (mixed / "c.json").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")  # JSON lines
    pq.write_table(pa.Table.from_pylist([{"text": "pq"}]), mixed / "d.parquet")
    rows = data.load_rows(mixed)
    assert rows[0] == {"id": "7", "messages": [_data_u("user", "p"), _data_u("assistant", "r")]}
    assert [r.get("text") for r in rows[1:]] == ["t", None, "x", "y", "pq"]
    with pytest.raises(FileNotFoundError, match="not a Hub dataset id"):
        data.load_rows(tmp_path / "missing.jsonl")


def _data_repeated_problems(n_problems=400, per_problem=5, seed=0):
    """OpenMathReasoning-like rows: several solutions per problem, shuffled, some solutions long."""
    rng = random.Random(seed)
    rows = [{"problem": f"Problem {p}: what is {p} + {p}?", "generated_solution": f"Solution {k} of {p}. "
             + "We think step by step. " * rng.choice([1, 2, 40]) + f"The answer is {2 * p}."}
            for p in range(n_problems) for k in range(per_problem)]
    rng.shuffle(rows)
    return pa.Table.from_pylist(rows)


def test_data_holdout_splits_by_problem_and_keeps_each_test_problem_once(tmp_path, capsys):
    pq.write_table(_data_repeated_problems(), tmp_path / "cot-00000-of-00001.parquet")
    def problem(r):
        return r["messages"][0]["content"]
    every = data.load_rows(tmp_path, split="cot")
    train = data.load_rows(tmp_path, split="cot", holdout="train")
    test = data.load_rows(tmp_path, split="cot", holdout="test")
    assert not {problem(r) for r in train} & {problem(r) for r in test}  # no test problem is ever trained on
    assert len({problem(r) for r in test}) == len(test)  # and each test problem appears once
    assert {problem(r) for r in train} | {problem(r) for r in test} == {problem(r) for r in every}
    assert len(train) + 5 * len(test) == len(every) and 0.02 < len(test) / 400 < 0.09  # about data.HOLDOUT of them
    assert [problem(r) for r in data.load_rows(tmp_path, split="cot", holdout="test", max_rows=3)] == \
        [problem(r) for r in test[:3]]
    with pytest.raises(ValueError, match="holdout must be"):
        data.load_rows(tmp_path, holdout="dev")


def test_data_fit_keeps_rows_whose_chat_fits_and_counts_kept_rows(tmp_path, _data_toy, capsys):
    """OpenMathReasoning's long solutions would lose their end and <|im_end|> when cut at max_len: with fit, only the
    rows whose chat fits are kept, --max-rows counts the kept rows, and the rule is the one train.py --drop-long and
    evaluate.py --max-len share."""
    tok = _data_toy[1]
    pq.write_table(_data_repeated_problems(40, 3), tmp_path / "cot.parquet")
    every = data.load_rows(tmp_path / "cot.parquet")
    lengths = [len(data.encode_chat(r["messages"], tok)["input_ids"]) for r in every]
    max_len = sorted(lengths)[len(lengths) // 2]
    kept = data.load_rows(tmp_path / "cot.parquet", fit=(tok, max_len))
    assert [r["id"] for r in kept] == [r["id"] for r, n in zip(every, lengths) if n <= max_len]
    assert f"{len(kept)} rows kept of {len(every)} read; the others' chats do not fit in {max_len}" in \
        capsys.readouterr().out
    assert len(data.load_rows(tmp_path / "cot.parquet", max_rows=7, fit=(tok, max_len))) == 7
    examples = data.build_examples(kept, tok, max_len)  # nothing to cut: every reply keeps its <|im_end|>
    im_end = tok.token_to_id("<|im_end|>")
    assert all(e["input_ids"][-2] == im_end and e["labels"][-2] == im_end for e in examples)
    text = _data_write_jsonl(tmp_path / "text.jsonl", [{"text": "a b c"}, {"text": "a " * 300}])
    assert [r["text"] for r in data.load_rows(text, fit=(tok, 50))] == ["a b c"]  # + <|endoftext|>


def test_data_weight_zero_replies_are_context(_data_toy):
    """A reply with "weight": 0 (OpenAI's fine-tuning format) is rendered like any other but not supervised."""
    tok = _data_toy[1]
    chat = [_data_u("user", "q1"), {**_data_u("assistant", "gold one"), "weight": 0}, _data_u("user", "q2"),
            {**_data_u("assistant", "trained two"), "weight": 1}]
    ex = data.encode_chat(chat, tok)
    assert data.render_chat(chat) == data.render_chat([{k: m[k] for k in ("role", "content")} for m in chat])
    assert tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100],
                      skip_special_tokens=False) == "trained two<|im_end|>"
    assert data.encode_chat(chat[:2], tok)["labels"] == [-100] * len(data.encode_chat(chat[:2], tok)["labels"])


def test_data_folder_without_split_reads_train(tmp_path, _data_toy):
    """A folder as `python toy.py` writes it: without a split, load_rows reads train.jsonl only, not the
    tokenizer's JSON nor the test and corpus rows."""
    shutil.copy(_data_toy[0] / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}, indent=2))
    _data_write_jsonl(tmp_path / "train.jsonl", [{"id": "tr", **_DATA_GOOD}])
    _data_write_jsonl(tmp_path / "test.jsonl", [{"id": "te", **_DATA_GOOD}])
    _data_write_jsonl(tmp_path / "corpus.jsonl", [{"id": "co", "text": "1 + 1 = 2."}])
    assert [r["id"] for r in data.load_rows(tmp_path)] == ["tr"]
    assert [r["id"] for r in data.load_rows(tmp_path, split="test")] == ["te"]


_DATA_HUB_SCRIPT = """
import sys, data
rows = data.load_rows("nvidia/OpenMathReasoning", max_rows=4)
print("OM", [r["messages"][0]["content"] for r in rows])
rows = data.load_rows("nvidia/OpenMathReasoning", split="cot[1:4]")
print("OM-RANGE", [r["messages"][0]["content"] for r in rows])
rows = data.load_rows("HuggingFaceH4/ultrachat_200k", split="test_sft")
print("UC", [r["messages"][1]["content"] for r in rows], [r["id"] for r in rows])
print("UC-LIMIT", len(data.load_rows("HuggingFaceH4/ultrachat_200k", split="test_sft", max_rows=10)))
try:
    data.load_rows("nvidia/OpenMathReasoning")
except Exception as e:
    print("ALL", type(e).__name__, e)
"""


def test_data_hub_ids_from_offline_cache(tmp_path):
    """The Hub path end to end, offline: a cache laid out as huggingface_hub lays it out, HF_HUB_OFFLINE=1.
    The second OpenMathReasoning shard is not a parquet file, so reading it fails: a row limit that the first shard
    meets must stop before it."""
    cache = tmp_path / "hub"
    for repo, shards in {
        "nvidia/OpenMathReasoning": {"data/cot-00000-of-00002.parquet": _data_openmath_table(4),
                                     "data/cot-00001-of-00002.parquet": b"not parquet",
                                     "data/tir-00000-of-00001.parquet": _data_openmath_table(2, 50)},
        "HuggingFaceH4/ultrachat_200k": {"data/train_sft-00000-of-00001-x.parquet": _data_ultrachat_table(2),
                                         "data/test_sft-00000-of-00001-x.parquet": _data_ultrachat_table(3, 10)},
    }.items():
        root = cache / ("datasets--" + repo.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(commit)
        for name, content in shards.items():
            path = root / "snapshots" / commit / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content) if isinstance(content, bytes) else pq.write_table(content, path)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _DATA_HUB_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OM ['P0', 'P1', 'P2', 'P3']" in out.stdout
    assert "OM-RANGE ['P1', 'P2', 'P3']" in out.stdout
    assert "UC ['a10', 'a11', 'a12'] ['p10', 'p11', 'p12']" in out.stdout  # ids: UltraChat's prompt_id
    assert "ALL ValueError" in out.stdout and "cot-00001-of-00002.parquet" in out.stdout
    # A cached copy may hold only the shards an earlier run with a row limit needed: say where the list came from,
    # and say so again when a limit then finds fewer rows than it asked for (and only then).
    lines = out.stdout.splitlines()
    short = [line for line in lines if "fewer than" in line]
    assert sum("local cache" in line for line in lines if line not in short) == 5  # one per load_rows call
    assert "UC-LIMIT 3" in out.stdout
    assert len(short) == 1 and "HuggingFaceH4/ultrachat_200k" in short[0] and "3 rows" in short[0]
    assert "local cache" in short[0]


# ---------------------------------------------------------------------------- batches

def _data_examples(n):
    """Example i is i + 1 repeated (i % 7) + 1 times: its first token names it, lengths vary."""
    return [{"input_ids": [i + 1] * (i % 7 + 1), "labels": [-100] + [i + 1] * (i % 7)} for i in range(n)]


def _data_step_ids(step):
    """The examples (by first token) in one rank's step, and how many filler rows it had."""
    ids, fillers = [], 0
    for mb in step:
        for row, mask, labels in zip(mb["input_ids"], mb["attention_mask"], mb["labels"]):
            if (labels == -100).all() and int(mask.sum()) == 1 and int(row[0]) == 0:
                fillers += 1
            else:
                ids.append(int(row[0]))
    return ids, fillers


def _data_epoch(n, batch_size, mbs, world_size, seed=0):
    """Per step: the union over ranks, and the per-rank micro-batch counts."""
    ranks = [data.Batches(_data_examples(n), batch_size, mbs, rank=r, world_size=world_size, seed=seed)
             for r in range(world_size)]
    steps = []
    for per_rank in zip(*ranks):
        assert len({len(s) for s in per_rank}) == 1  # same number of micro-batches on every rank
        ids = [i for s in per_rank for i in _data_step_ids(s)[0]]
        assert len(ids) == len(set(ids))  # no overlap across ranks
        steps.append(sorted(ids))
    assert len(steps) == len(ranks[0]) == -(-n // batch_size)
    assert all(b.epoch == 1 and b.step == 0 for b in ranks)
    return steps


def test_data_batches_sharding_is_independent_of_world_size_and_micro_batches():
    n, batch_size = 29, 8
    reference = _data_epoch(n, batch_size, batch_size, 1)
    assert sorted(i for s in reference for i in s) == list(range(1, n + 1))  # every example once per epoch
    for world_size, mbs in [(1, 1), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (8, 1)]:
        assert _data_epoch(n, batch_size, mbs, world_size) == reference
    assert _data_epoch(n, batch_size, 2, 2, seed=1) != reference


def test_data_batches_padding_fillers_and_shuffle():
    examples = _data_examples(10)
    b = data.Batches(examples, batch_size=4, micro_batch_size=2, rank=1, world_size=2, seed=5, pad_id=0)
    steps = list(b)
    # 10 examples in batches of 4 over 4 ranks: the last global batch has 2, one for each of two ranks, so the other
    # two run a filler to keep the collectives in step
    ranks = [list(data.Batches(examples, 4, 2, r, 4, seed=5)) for r in range(4)]
    fillers = 0
    for step in steps + [step for rank in ranks for step in rank]:
        for mb in step:
            T = mb["input_ids"].shape[1]
            assert mb["input_ids"].dtype == mb["labels"].dtype == mb["attention_mask"].dtype == torch.long
            lengths = mb["attention_mask"].sum(1)
            assert T == min(-(-int(lengths.max()) // 8) * 8, 7)  # a multiple of 8, but never past the longest
            for row, mask, labels, n, i in zip(mb["input_ids"], mb["attention_mask"], mb["labels"], lengths,
                                               mb["index"]):
                assert (mask[:n] == 1).all() and (mask[n:] == 0).all() and (labels[n:] == -100).all()
                if i >= 0:
                    ex = examples[int(i)]
                    assert row[:n].tolist() == ex["input_ids"] and labels[:n].tolist() == ex["labels"]
                else:  # a filler: one token, nothing supervised
                    assert n == 1 and (labels == -100).all() and int(row[0]) == 0
                    fillers += 1
            # the flat positions whose next token is supervised, found on the host, and those tokens (step_inputs)
            targets = F.pad(mb["labels"][:, 1:], (0, 1), value=-100)
            assert torch.equal(mb["positions"], (targets != -100).flatten().nonzero()[:, 0])
            _, at, target = data.step_inputs(mb, torch.device("cpu"))
            assert torch.equal(at, mb["positions"]) and torch.equal(target, targets.flatten()[at])
    last = [rank[-1] for rank in ranks]
    assert fillers == 2 and sorted(_data_step_ids(s)[1] for s in last) == [0, 0, 1, 1] and {len(s) for s in last} == {1}
    epoch0 = [_data_step_ids(s)[0] for s in steps]
    epoch1 = [_data_step_ids(s)[0] for s in b]
    assert epoch0 != epoch1 and b.epoch == 2  # a new shuffle each epoch
    again = data.Batches(examples, batch_size=4, micro_batch_size=2, rank=1, world_size=2, seed=5)
    assert [_data_step_ids(s)[0] for s in again] == epoch0  # deterministic from the seed


def _data_lognormal_examples(n, seed=0, median=900, sigma=0.6, cap=2048):
    """Lengths like UltraChat-200k's under the Qwen2.5 tokenizer (bench.py data uses the same)."""
    lengths = np.minimum(np.random.default_rng(seed).lognormal(math.log(median), sigma, n).astype(int) + 1, cap)
    return [{"input_ids": np.full(n, i + 1, np.int32), "labels": np.full(n, i + 1, np.int32)}
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("micro_batch_size", [2, 8])
def test_data_batches_layout_is_balanced_capped_and_world_size_free(micro_batch_size):
    """The paper command's shape: a global batch of 128 over 8 ranks. Laid out by length, at least 90% of the compute
    goes to real tokens (FSDP waits for the slowest rank at every micro-batch, so an index costs its costliest
    micro-batch on every rank); no micro-batch holds more than micro_batch_size x the longest example, padding
    included; every rank runs as many micro-batches; and the union of a step over ranks is the same examples for
    any world size. Integer arithmetic only: this holds on any CPU."""
    examples = _data_lognormal_examples(128 * 6)
    cap = micro_batch_size * max(len(e["input_ids"]) for e in examples)
    unions = {}
    for world in (1, 2, 8):
        ranks = [data.Batches(examples, 128, micro_batch_size, r, world, seed=4) for r in range(world)]
        real = compute = 0
        for k, steps in enumerate(zip(*ranks)):
            assert len({len(s) for s in steps}) == 1
            for i in range(len(steps[0])):
                sizes = [s[i]["input_ids"].numel() for s in steps]
                assert max(sizes) <= cap
                compute += max(sizes) * world
                real += sum(int(s[i]["attention_mask"].sum()) for s in steps)
            unions.setdefault(k, []).append(sorted(int(r[0]) for s in steps for mb in s for r in mb["input_ids"]
                                                   if r[0] != 0))
        if world == 8:
            assert real / compute >= 0.9, real / compute
    for k, per_world in unions.items():
        assert per_world[0] == per_world[1] == per_world[2] and len(per_world[0]) == 128


def test_data_batches_resume_exactly():
    examples = _data_examples(23)
    run = data.Batches(examples, batch_size=6, micro_batch_size=3, seed=2)
    it, seen, state = iter(run), [], None
    for k in range(3 * len(run)):  # three epochs, state saved after step 5 (the middle of epoch 1)
        if k == len(run):
            it = iter(run)
        if k == 2 * len(run):
            it = iter(run)
        step = next(it)
        seen.append([mb["input_ids"].tolist() for mb in step])
        if k == 5:
            state = json.loads(json.dumps(run.state_dict()))  # it must survive a checkpoint file
    resumed = data.Batches(examples, batch_size=6, micro_batch_size=2, seed=2)  # micro-batch size may change
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.step) == (1, 2)
    rest = []
    for _ in range(2):
        for step in resumed:
            rest.append(sorted(int(r[0]) for mb in step for r in mb["input_ids"]))
    assert rest == [sorted(r[0] for mb in step for r in mb) for step in seen[6:]]
    # After the last step of an epoch the state already names the next epoch, so an epoch loop resumes cleanly.
    end = data.Batches(examples, batch_size=6, micro_batch_size=3, seed=2)
    list(end)
    assert end.state_dict()["epoch"] == 1 and end.state_dict()["step"] == 0
    with pytest.raises(ValueError, match="num_examples"):
        data.Batches(examples[:-1], 6, 3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        data.Batches(examples, 6, 3, seed=3).load_state_dict(state)


def test_data_batches_bad_arguments():
    with pytest.raises(ValueError, match="need batch_size >= 1, micro_batch_size >= 1 and 0 <= rank < world_size"):
        data.Batches(_data_examples(4), 8, 0, world_size=4)
    with pytest.raises(ValueError, match=r"rank 2 of 2"):
        data.Batches(_data_examples(4), 8, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no examples"):
        data.Batches([], 8, 1)


# ---------------------------------------------------------------------------- toy data

def test_toy_cli_is_deterministic_and_loads(tmp_path):
    args = ["--n-train", "300", "--n-test", "30", "--n-corpus", "300"]
    procs = [subprocess.Popen([sys.executable, str(REPO / "toy.py"), "--out", str(tmp_path / d),
                               "--seed", "7", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for d in ("a", "b")]  # two processes: the Rust trainer's hash seeds differ between them
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    names = ["tokenizer.json", "tokenizer_config.json", "train.jsonl", "test.jsonl", "corpus.jsonl"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    tok = data.load_tokenizer(tmp_path / "a")
    V = tok.get_vocab_size(with_added_tokens=True)
    assert 300 <= V <= 1024
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [V - 3, V - 2, V - 1]  # after the BPE vocab
    train, test = data.load_rows(tmp_path / "a" / "train.jsonl"), data.load_rows(tmp_path / "a" / "test.jsonl")
    assert len(train) == 300 and len(test) == 30
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in test}
    corpus = data.load_rows(tmp_path / "a" / "corpus.jsonl")
    assert len(corpus) == 300 and all(isinstance(r["text"], str) for r in corpus)
    chats = [r["text"] for r in corpus if "<|im_start|>" in r["text"]]  # raw models know the markup, not the task
    assert 0 < len(chats) < len(corpus) and all("<|im_start|>user\nWhat is " in c for c in chats)
    raw = json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])
    assert raw["messages"][1]["content"].endswith(f"\\boxed{{{raw['answer']}}}.")
    # The chat template shipped in tokenizer_config.json renders like Qwen2.5's.
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    for messages in [r["messages"] for r in train[:3]] + list(_DATA_CONVERSATIONS.values()):
        assert hf.apply_chat_template(messages, tokenize=False) == data.render_chat(messages)
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            data.render_chat(messages, add_generation_prompt=True)
    examples = data.build_examples(train, tok)
    assert max(len(e["input_ids"]) for e in examples) < 200  # short enough for tiny models


def test_toy_problems_vary():
    rows = toy.chats(400, seed=0)
    assert rows == toy.chats(400, seed=0) and rows != toy.chats(400, seed=1)
    shapes = set()
    for r in rows:
        shape = re.sub(r"\d+", "N", r["messages"][0]["content"])
        for word in toy.NAMES + toy.ITEMS:
            shape = re.sub(rf"\b{word}\b", "W", shape)
        shapes.add(shape)
    assert len(shapes) == 7  # seven problem shapes, not one template
    for r in rows[:50]:
        answer = r["messages"][1]["content"].rsplit("\\boxed{", 1)[1].rstrip("}.")
        assert answer == r["answer"]


def test_toy_premise_regime_says_the_same_content_in_two_styles():
    """Style B (SFT's) is style A (pre-training's) line for line, in a frame; numbers stay small; the corpus holds
    style-A chats and, a quarter of it, style-B plain text, and never a test problem."""
    b, a = toy.chats(300, seed=2, regime="premise"), toy.chats(300, seed=2, regime="premise", style="A")
    assert [r["messages"][0] for r in b] == [r["messages"][0] for r in a]
    for rb, ra in zip(b, a):
        lines_b, lines_a = rb["messages"][1]["content"].split("\n"), ra["messages"][1]["content"].split("\n")
        assert lines_b[0] == "Let's solve this step by step." and lines_b[-1] == "I hope this helps!"
        steps = lines_b[1:-2]
        assert [s.split(": ", 1)[0] for s in steps] == [f"Step {k}" for k in range(1, len(steps) + 1)]
        assert [s.split(": ", 1)[1] for s in steps] == lines_a[:-1]
        answer = f"\\boxed{{{rb['answer']}}}."
        assert lines_b[-2] == f"Final answer: {answer}" and lines_a[-1] == f"The answer is {answer}"
        numbers = [int(n) for n in re.findall(r"\d+", rb["messages"][0]["content"])]
        assert max(numbers) <= 50 and 0 <= int(rb["answer"]) < 100  # one-digit operands, two-digit results
    test = {r["messages"][0]["content"] for r in b[200:]}
    corpus = toy.corpus(2000, seed=2, regime="premise", exclude=test)
    assert len(corpus) == 2000
    texts = 0
    for row in corpus:
        chat = re.fullmatch(r".*<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n(.*)<\|im_end\|>\n",
                            row["text"], re.S)
        question, reply = chat.groups() if chat else re.fullmatch(r"Problem: (.*?)\nSolution: (.*)", row["text"],
                                                                  re.S).groups()
        assert question not in test and (reply.startswith("Let's solve") != bool(chat)), row["text"]
        texts += not chat
    assert 0.2 < texts / len(corpus) < 0.3
    assert toy.corpus(2000, seed=2, regime="premise") != corpus  # without the exclusion, test problems come up


def test_toy_student_knows_keeps_the_facts_where_the_regime_says():
    """student-knows: no corpus, SFT or training chat holds a test problem; both corpora name every good, but only the
    raw student's states the student-only prices (every price, and only the right one); the teacher's SFT data never
    names a student-only good, and the training chats name the covered ones and never the uncovered; the test's
    kinds, facts and the gate's two styles agree."""
    files = toy.student_knows(n_train=400, n_test=40, n_corpus=3000, seed=3)
    market = toy.market(3)
    kinds = {kind: {g for g, (_, k) in market.items() if k == kind} for kind in ("shared", "covered", "uncovered")}
    plural = dict(toy.GOODS)

    def named(rows, goods):
        text = "\n".join(json.dumps(r) for r in rows)
        return {g for g in goods if re.search(rf"\b({g}|{plural[g]})\b", text)}
    questions = {r["messages"][0]["content"] for r in files["test"]}
    for name in ("corpus", "corpus-teacher"):
        assert not any(q in r["text"] for r in files[name] for q in questions), name
    for name in ("train", "sft"):
        assert not questions & {r["messages"][0]["content"] for r in files[name]}, name
    assert named(files["corpus-teacher"], set(market)) == set(market) == named(files["corpus"], set(market))
    prices = {name: {(m.group(1), int(m.group(2))) for r in files[name]
                     for m in re.finditer(r"an? (\w+) costs (\d+) dollars", r["text"])}
              for name in ("corpus", "corpus-teacher")}
    assert prices["corpus-teacher"] == {(g, p) for g, (p, kind) in market.items() if kind == "shared"}
    assert named(files["sft"], kinds["covered"] | kinds["uncovered"]) == set()
    assert named(files["train"], kinds["uncovered"]) == set() and named(files["train"], kinds["covered"])
    assert prices["corpus"] == {(g, p) for g, (p, _) in market.items()}  # every price, and only the right one
    assert [r["kind"] for r in files["test"]].count("covered") == 14 and {r["kind"] for r in files["test"]} == {
        "covered", "uncovered", "shared", "none"}
    for r in files["test"]:
        assert all(market[g] == (p, r["kind"]) for g, p in r["facts"].items()), r
        assert sorted(map(int, toy.FACT.findall(r["messages"][1]["content"]))) == sorted(r["facts"].values())
    assert [r["id"] for r in files["test-facts"]] == [r["id"] for r in files["test"]
                                                      if r["kind"] in ("covered", "uncovered")]
    for b, a in zip(files["test-facts"], files["test-facts-style-a"]):
        assert toy.FACT.findall(a["messages"][1]["content"]) == toy.FACT.findall(b["messages"][1]["content"])
        assert "Step 1:" in b["messages"][1]["content"] and "Step" not in a["messages"][1]["content"]


def test_data_reference_template_copy_is_current():
    shared = REPO.parent / "shared" / "reference" / "qwen2.5_chat_template.jinja"
    if not shared.exists():
        pytest.skip("no shared reference folder here")
    assert shared.read_text() == _DATA_QWEN_TEMPLATE


# ---------------------------------------------------------------------------------------------------------------------
# evaluate.py: ROUGE, against Google's rouge-score

_ROUGE_ROOTS = (
    "relat condit valen hesit digit conform radic differ vil analog vietnam predic oper feud decis hope call form "
    "sens triplic electr good reviv allow infer airlin gyroscop adjust defens irrit replac depend adopt homolog "
    "commun activ angular effect bowdler prob rate ceas control roll car pon ti cat feed agre plaster bled motor "
    "sing conflat troubl siz hop tan fall hiss fizz fail fil happ sky enjoy sp fl tr gener nation run try cry die "
    "lie tie bus gas big fit hat see tree play stud bio geo ecolog ski eye fly dy by toy say buy"
).split()
_ROUGE_SUFFIXES = (
    "s es ies ied ed ing ational tional ization ation ator alism iveness fulness ousness aliti iviti biliti fulli "
    "logi alli entli eli ousli enci anci izer bli abli icate ative alize iciti ical ful ness al ance ence er ic able "
    "ible ant ement ment ent ion sion tion ou ism ate iti ous ive ize e ll y ly eed sses ss ally ingly"
).split()
_ROUGE_IRREGULAR = {
    "dying": "die", "lying": "lie", "tying": "tie", "skies": "sky", "sky": "sky", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing", "cannings": "canning",
    "canning": "canning", "howe": "howe", "proceed": "proceed", "exceed": "exceed", "succeed": "succeed",
}
# Checked by hand against NLTK_EXTENSIONS; the ORIGINAL_ALGORITHM mode gives other stems for the first block.
_ROUGE_KNOWN_STEMS = {
    **_ROUGE_IRREGULAR, "ties": "tie", "tied": "tie", "enjoy": "enjoy", "cry": "cri", "biology": "biolog",
    "caresses": "caress", "ponies": "poni", "cats": "cat", "feed": "feed", "agreed": "agre", "plastered": "plaster",
    "bled": "bled", "motoring": "motor", "sing": "sing", "conflated": "conflat", "troubled": "troubl",
    "sized": "size", "hopping": "hop", "tanned": "tan", "falling": "fall", "hissing": "hiss", "fizzed": "fizz",
    "failing": "fail", "filing": "file", "happy": "happi", "flies": "fli", "cried": "cri", "relational": "relat",
    "conditional": "condit", "rational": "ration", "generalization": "gener", "formalize": "formal",
    "hopefulness": "hope", "electrical": "electr", "revival": "reviv", "allowance": "allow", "adoption": "adopt",
    "controlling": "control", "running": "run", "runs": "run", "ran": "ran", "generously": "gener",
    "sensibility": "sensibl", "analogously": "analog", "radically": "radic", "logic": "logic",
}
_ROUGE_OTHER_WORDS = (
    "a an the of is it by to in on at be we us i me my or and but not was are his her its one two run ran sun "
    "fox dog log lazy quick brown jumps over yes no ok hmm aaa yyy ayy yay eye bye you 0 7 42 100 2024 1990s 3d "
    "mp3 covid19 x86 abc123 running runs"
).split()
_ROUGE_SEPARATORS = [" "] * 12 + [
    ", ", ". ", "\n", "\n\n", "\t", " - ", "-", "/", "'s ", "... ", "! ", "? ", " (", ") ", ": ", "; ", ' "',
    "\u2014", "\u2019", " \u00e9 ", "_", "*", "  ", "\r\n", " 1,000.5 ", " 3.14 ", " 10% ", " $5 ",
]
_ROUGE_ODD_WORDS = ["caf\u00e9", "na\u00efve", "\u00fcber", "\u65e5\u672c\u8a9e", "\U0001F642", "stra\u00dfe",
                    "\u212aelvin", "\u0130stanbul", "\uff21\uff22", "\u00bd", "\u00b2", "\u0661\u0662"]


def _rouge_word_list():
    words = set(_ROUGE_ROOTS) | set(_ROUGE_OTHER_WORDS) | set(_ROUGE_IRREGULAR) | set(_ROUGE_KNOWN_STEMS)
    words |= {r + s for r in _ROUGE_ROOTS for s in _ROUGE_SUFFIXES}
    return sorted(words)


def _rouge_text(rng, words, n):
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.03:
            word = rng.choice(_ROUGE_ODD_WORDS)
        else:
            word = rng.choice(words)
            word = word.upper() if roll > 0.97 else word.capitalize() if roll > 0.9 else word
        out.append(word + rng.choice(_ROUGE_SEPARATORS))
    return "".join(out)


def _rouge_pairs(n, seed):
    """(prediction, reference) pairs ranging from unrelated to near copies, including inflected copies."""
    rng = random.Random(seed)
    words = _rouge_word_list()
    pairs = []
    for _ in range(n):
        ref_words = [rng.choice(words) for _ in range(rng.randint(0, 40))]
        mode = rng.random()
        if mode < 0.2:  # unrelated, but drawn from a small shared vocabulary so some words overlap
            vocab = rng.sample(words, 8)
            ref_words = [rng.choice(vocab) for _ in ref_words]
            pred_words = [rng.choice(vocab) for _ in range(rng.randint(0, 40))]
        elif mode < 0.5:  # the reference with tokens inflected differently, so stemming changes the score
            pred_words = [rng.choice(_ROUGE_ROOTS) + rng.choice(_ROUGE_SUFFIXES) if rng.random() < 0.3 else w
                          for w in ref_words]
        else:  # the reference edited: tokens dropped, replaced, repeated, and spans moved
            pred_words = []
            for w in ref_words:
                r = rng.random()
                if r < 0.15:
                    continue
                pred_words.append(rng.choice(words) if r < 0.3 else w)
                if r > 0.9:
                    pred_words.append(w)
            if len(pred_words) > 4 and rng.random() < 0.3:
                cut = rng.randrange(len(pred_words))
                pred_words = pred_words[cut:] + pred_words[:cut]
        pairs.append((_rouge_text(rng, pred_words, len(pred_words)) if pred_words else "",
                      _rouge_text(rng, ref_words, len(ref_words)) if ref_words else ""))
    return pairs


def _rouge_assert_same(pairs, use_stemmer):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    for prediction, reference in pairs:
        ours = rouge(prediction, reference, use_stemmer=use_stemmer)
        theirs = scorer.score(reference, prediction)
        assert set(ours) == {"rouge1", "rouge2", "rougeL"}
        for key in ours:
            assert ours[key] == tuple(theirs[key]), (key, prediction, reference, ours[key], theirs[key])


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_matches_rouge_score_on_generated_pairs(use_stemmer):
    _rouge_assert_same(_rouge_pairs(3000, seed=1234), use_stemmer)


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_matches_rouge_score_on_long_repetitive_pairs(use_stemmer):
    # Few distinct tokens and hundreds of positions: many LCS ties, and bit vectors far wider than a machine word.
    rng = random.Random(7)
    pairs = []
    for _ in range(20):
        vocab = rng.sample(["run", "running", "runs", "dog", "dogs", "the", "a", "news", "skies"], rng.randint(1, 5))
        pairs.append((" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 300))),
                      " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 300)))))
    _rouge_assert_same(pairs, use_stemmer)


_ROUGE_EDGE_CASES = [
    ("", ""), ("", "the cat sat"), ("the cat sat", ""), ("   \n\t ", "cat"), ("cat", "!!! ... ???"),
    ("!!!", "???"), ("...", ""), ("cat", "cat"), ("Cat!", "cat."), ("a", "a"), ("a b", "b a"),
    ("caf\u00e9 na\u00efve \u00fcber", "cafe naive uber"), ("caf\u00e9", "caf"),
    ("\u65e5\u672c\u8a9e", "\u65e5\u672c\u8a9e"), ("\U0001F642 happy \U0001F642", "happy"),
    ("\u212aelvin \u0130stanbul", "kelvin istanbul"), ("stra\u00dfe", "strasse"),
    ("1,000.5 apples", "1 000 5 apples"), ("1,000.5", "1000.5"), ("$3.14 / 10%", "3 14 10"),
    ("2024-01-31", "2024 01 31"),
    ("the the the the", "the"), ("the", "the the the the"), ("the cat the cat the cat", "the cat"),
    ("a a a b b b", "b b b a a a"), ("dying skies news", "die sky news"), ("running runs ran", "run running"),
    ("line one\nline two\n\nline three", "line one line two line three"), ("hello\r\nworld", "hello world"),
    ("it's don't can't", "it s don t can t"), ("e-mail co-operate", "email cooperate"),
    ("generalizations are generally general", "general generalization"), ("UPPER lower MiXeD", "upper LOWER mixed"),
]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_edge_cases(use_stemmer):
    _rouge_assert_same(_ROUGE_EDGE_CASES, use_stemmer)
    _rouge_assert_same([(b, a) for a, b in _ROUGE_EDGE_CASES], use_stemmer)
    for prediction, reference in [("", ""), ("", "cat"), ("cat", ""), ("!!!", "cat"), ("\u65e5\u672c", "cat")]:
        assert rouge(prediction, reference, use_stemmer) == {k: (0.0, 0.0, 0.0) for k in ("rouge1", "rouge2", "rougeL")}


def test_rouge_worked_examples():
    ref, pred = "The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."
    scores = rouge(pred, ref)
    assert scores["rouge1"] == pytest.approx((0.75, 0.666667, 0.705882), abs=1e-6)
    assert scores["rouge2"][2] == pytest.approx(0.266667, abs=1e-6)
    assert scores["rougeL"] == pytest.approx((0.625, 0.555556, 0.588235), abs=1e-6)
    assert rouge("run running", "running runs ran")["rouge1"][2] == pytest.approx(0.4)
    assert rouge("run running", "running runs ran", use_stemmer=True)["rouge1"][2] == pytest.approx(0.8)
    _rouge_assert_same([(pred, ref), ("run running", "running runs ran")], use_stemmer=False)
    _rouge_assert_same([(pred, ref), ("run running", "running runs ran")], use_stemmer=True)


def test_rouge_tokenize_matches_rouge_score():
    stemmer = PorterStemmer()
    texts = [a for pair in _ROUGE_EDGE_CASES for a in pair] + [_rouge_text(random.Random(i), _rouge_word_list(), 30)
                                                               for i in range(200)]
    for text in texts:
        assert tokenize(text) == rouge_score_tokenize.tokenize(text, None)
        assert tokenize(text, use_stemmer=True) == rouge_score_tokenize.tokenize(text, stemmer)
    assert tokenize("Caf\u00e9 1,000.5 it's") == ["caf", "1", "000", "5", "it", "s"]
    assert tokenize("Dying skies, the news!", use_stemmer=True) == ["die", "sky", "the", "news"]
    assert tokenize("was has cats", use_stemmer=True) == ["was", "has", "cat"]  # 3 letters or fewer: not stemmed
    assert PorterStemmer().stem("was") == "wa"


def test_porter_stem_known_stems():
    stemmer = PorterStemmer()
    for word, stem in _ROUGE_KNOWN_STEMS.items():
        assert porter_stem(word) == stem, word
        assert stemmer.stem(word) == stem, word  # the table itself is NLTK's answer


def test_porter_stem_matches_nltk_on_many_words():
    stemmer = PorterStemmer()
    words = set(_rouge_word_list())
    words |= {r + s1 + s2 for r in _ROUGE_ROOTS[::3] for s1 in _ROUGE_SUFFIXES for s2 in _ROUGE_SUFFIXES}
    # Every short string over letters that drive the y / vowel / double-consonant rules ...
    words |= {"".join(t) for n in range(1, 6) for t in itertools.product("aeysltdi", repeat=n)}
    # ... and random strings, digits included, up to 14 letters.
    rng = random.Random(0)
    words |= {"".join(rng.choice("aeiouybcdlmnrstgpzwxk0") for _ in range(rng.randint(1, 14))) for _ in range(20000)}
    # ... and every token of the generated test texts.
    words |= {t for pair in _rouge_pairs(300, seed=1234) for text in pair for t in tokenize(text)}
    assert len(words) > 100_000
    mismatches = [(w, porter_stem(w), stemmer.stem(w)) for w in sorted(words) if porter_stem(w) != stemmer.stem(w)]
    assert not mismatches, mismatches[:20]


def test_corpus_rouge_is_mean_f():
    pairs = _rouge_pairs(50, seed=5)
    scores = [rouge(p, r, use_stemmer=True) for p, r in pairs]
    corpus = corpus_rouge(scores)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert corpus[key] == pytest.approx(sum(s[key][2] for s in scores) / len(scores), abs=1e-15)
    assert corpus_rouge(scores[::-1]) == corpus  # order does not matter, so ranks can gather in any order
    assert corpus_rouge([rouge("a b", "a b")]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert not math.isnan(corpus_rouge([rouge("", "")])["rougeL"])
    with pytest.raises(ValueError, match="no scores"):
        corpus_rouge([])


# ---------------------------------------------------------------------------------------------------------------------
# train.py: the FSDP2 loop under torchrun (gloo)

def _train_tiny_model(path, tokenizer_dir, seed, **shape):
    torch.manual_seed(seed)
    model = Qwen2(Qwen2Config(rope_theta=1e6, num_attention_heads=4, num_hidden_layers=2, **shape))
    model.init_weights()
    model.save_pretrained(path, tokenizer_dir=tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def _train_world(tmp_path_factory):
    """Toy chats, and random tiny models whose lm_heads have more rows than the tokenizer, like Qwen's:
    the teachers 640 rows, the student 632 (tied), the tokenizer about 630 ids. The fine-tuned teacher is peakier than
    its raw self (initializer_range 0.06 against 0.02), as SFT makes a model, so that a wrong way of feeding the three
    frozen models to the loss gives a KD value far from the right one (test_train_every_loss_under_torchrun). chats8
    holds the first 8 chats: with --batch-size 8 every step is all of them, so an oracle knows a step's examples
    without the data order."""
    root = tmp_path_factory.mktemp("train")
    subprocess.run([sys.executable, str(REPO / "toy.py"), "--out",
                    str(root / "data"), "--n-train", "96", "--n-test", "8", "--n-corpus", "64"], check=True,
                   capture_output=True)
    (root / "chats8.jsonl").write_text("".join((root / "data" / "train.jsonl").read_text().splitlines(True)[:8]))
    teacher = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_key_value_heads=2)
    student = dict(vocab_size=632, hidden_size=32, intermediate_size=64, num_key_value_heads=1,
                   tie_word_embeddings=True)
    return {"root": root, "data": root / "data" / "train.jsonl", "chats8": root / "chats8.jsonl",
            "t_ft": _train_tiny_model(root / "teacher", root / "data", 1, initializer_range=0.06, **teacher),
            "t_raw": _train_tiny_model(root / "teacher-raw", root / "data", 2, **teacher),
            "s_raw": _train_tiny_model(root / "student", root / "data", 3, **student)}


def _train_run(world, out, *args, nproc=1, loss="deltakd", check=True, teachers=True, popen=False):
    kd = [] if loss == "sft" or not teachers else ["--teacher", str(world["t_ft"]), "--teacher-raw",
                                                   str(world["t_raw"])]
    script = [str(REPO / "train.py"), "--model", str(world["s_raw"]), *kd,
              "--loss", loss, "--data", str(world["data"]), "--out", str(out), "--max-len", "128", "--lr", "3e-3",
              "--log-every", "1", *args]
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(launcher + script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
    result = subprocess.run(launcher + script, capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _side_by_side(*calls):
    """Each call in its own thread, their results in order: two one-process runs that do not depend on each other
    keep both of a 2-core CI machine's cores busy."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def _train_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_weights(folder):
    return load_file(str(folder / "model.safetensors"))


_TRAIN_FROZEN = ("t_ft", "t_raw", "s_raw")  # the order of delta_kd_loss's frozen arguments
_TRAIN_RTOL = 1e-5  # train.py's fp32 step against float64: about 1e-7 apart where we ran it


def _train_oracle(world, alpha=1.0, T=1.0, lam=0.5, divergence="fkl", student=None, on_policy=False):
    """One step of train.py on chats8 (--batch-size 8: all of it), computed apart from train.py: transformers'
    Qwen2ForCausalLM in float64 for each checkpoint, and the loss written out. Returns loss, sft, kd and the student's
    gradient norm, as metrics.jsonl logs them, and "wirings": the KD value for every way of feeding the three frozen
    models to the loss, by slot (_TRAIN_FROZEN order), and for a raw teacher built from the student's folder.
    student: a state dict (a checkpoint's), else --model's weights. on_policy: an --on-policy step with one-token
    replies, which counts each chat's last prompt position alone, whatever token was sampled after it; its loss is
    (1 - lam) x KD, with no SFT term."""
    from transformers import Qwen2ForCausalLM

    def load(name, state=None):
        model = Qwen2ForCausalLM.from_pretrained(world[name], dtype=torch.float64)
        if state is not None:
            model.load_state_dict({k: v.double() for k, v in state.items()})
        return model

    tok = data.load_tokenizer(world["s_raw"])
    V = tok.get_vocab_size(with_added_tokens=True)
    rows = data.load_rows(world["chats8"])
    if on_policy:  # the prompt as evaluate.py writes it, and the one position that predicts the reply's token
        seqs = [(data.encode_prompt(r["messages"], tok), None) for r in rows]
    else:
        seqs = [(e["input_ids"].tolist(), torch.tensor(e["labels"][1:].tolist())) for e in
                data.build_examples(rows, tok, 128)]

    def counted(model):  # (N, V): the logits that predict each counted token, over the tokenizer's ids
        out = []
        for ids, labels in seqs:
            logits = model(torch.tensor([ids])).logits[0, :, :V]  # (T, V)
            out.append(logits[-1:] if labels is None else logits[:-1][labels != -100])
        return torch.cat(out)

    with torch.no_grad():
        frozen = {"t_ft": counted(load("t_ft")), "t_raw": counted(load("t_raw")), "s_raw": counted(load("s_raw"))}
    model = load("s_raw", student)
    s = counted(model)
    y = torch.zeros(len(s), dtype=torch.long) if on_policy else torch.cat([y[y != -100] for _, y in seqs])

    def kd(t, t_raw, s_raw):  # T^2 KL: the reference at lam = 0, in float64
        return delta_kd_loss_reference(s, y, t, t_raw, s_raw, alpha, T, lam=0.0, divergence=divergence)

    out = {"kd": kd(*(frozen[k] for k in _TRAIN_FROZEN))}
    if on_policy:
        out["loss"] = (1 - lam) * out["kd"]
    else:
        out["sft"] = delta_kd_loss_reference(s, y, lam=1.0)
        out["loss"] = lam * out["sft"] + (1 - lam) * out["kd"]
    out["loss"].backward()
    out = {k: v.item() for k, v in out.items()}
    out["grad_norm"] = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    with torch.no_grad():
        out["wirings"] = {order: kd(*(frozen[k] for k in order)).item() for order in
                          [*itertools.permutations(_TRAIN_FROZEN), ("t_ft", "s_raw", "s_raw")]}
    return out


def _train_checkpoint_weights(folder):
    """The student's weights in a DCP checkpoint, as a plain state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(folder, folder.parent / f"{folder.name}.pt")
    return torch.load(folder.parent / f"{folder.name}.pt")["model"]


def _train_check_step(record, oracle, keys=("loss", "sft", "kd", "grad_norm")):
    for k in keys:
        assert record[k] == pytest.approx(oracle[k], rel=_TRAIN_RTOL, abs=1e-9), (k, record, oracle)


@pytest.mark.parametrize("loss", ["sft", "fkl", "rkl", "deltakd"])
def test_train_every_loss_under_torchrun(_train_world, tmp_path, loss):
    """Two processes, two steps. Each step's loss, SFT and KD terms and gradient norm (before clipping) are the
    float64 oracle's, computed from the checkpoints alone: step 1 from --model, step 2 from the step-1 checkpoint. At
    alpha 0.5 every other wiring of the frozen models is at least 1% away (at alpha 1, t_ft and s_raw enter alike),
    and at step 2 the student has moved from its frozen raw copy, so a frozen model fed the live student fails too."""
    out = tmp_path / loss
    _train_run(_train_world, out, "--data", str(_train_world["chats8"]), "--batch-size", "8", "--micro-batch-size",
               "2", "--max-steps", "2", "--save-every", "1", "--alpha", "0.5", nproc=2, loss=loss)
    records = _train_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    how = {"sft": dict(lam=1.0), "fkl": dict(alpha=0.0), "rkl": dict(alpha=0.0, divergence="rkl"),
           "deltakd": dict(alpha=0.5)}[loss]
    keys = ("loss", "sft", "grad_norm") + (("kd",) if loss != "sft" else ())
    first = _train_oracle(_train_world, **how)
    _train_check_step(records[0], first, keys)
    assert (records[0]["kd"] == 0) == (loss == "sft")
    if loss != "sft":  # the test can tell: a wrong model in any slot that counts gives another value
        wrong = [v for order, v in first["wirings"].items()
                 if (order != _TRAIN_FROZEN if loss == "deltakd" else order[0] != "t_ft")]
        assert all(abs(v - first["kd"]) > 0.01 * first["kd"] for v in wrong), first["wirings"]
    second = _train_oracle(_train_world, **how, student=_train_checkpoint_weights(out / "checkpoints" / "step-1"))
    _train_check_step(records[1], second, keys)
    # the export loads in our model and is what the last checkpoint holds, in HF format
    final = Qwen2.from_pretrained(out / "final", dtype=torch.float32)
    before = _train_weights(_train_world["s_raw"])
    after = _train_weights(out / "final")
    assert after.keys() == before.keys() and "lm_head.weight" not in after  # tied: stored once
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-4
    assert (out / "final" / "tokenizer.json").exists() and final.config.vocab_size == 632
    # trained on chats, the export stops at <|im_end|> as well as <|endoftext|>, as Qwen2.5-Instruct's files say
    from transformers import GenerationConfig
    tok = data.load_tokenizer(out / "final")
    stops = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert GenerationConfig.from_pretrained(out / "final").eos_token_id == stops
    assert json.loads((out / "final" / "config.json").read_text())["eos_token_id"] == stops


def test_train_sft_loss_decreases_and_a_text_export_keeps_its_eos(_train_world, tmp_path):
    """One fixed batch of eight documents, seen at every step: fitting it is what Adam does whatever the CPU's
    rounding, so a wide margin holds. Trained on plain text, the export keeps the base model's eos."""
    docs = _data_write_jsonl(tmp_path / "docs.jsonl", [{"text": f"{i} + {i} = {2 * i}. " * 4} for i in range(8)])
    out = tmp_path / "sft"
    _train_run(_train_world, out, "--data", str(docs), "--batch-size", "8", "--micro-batch-size", "8",
               "--max-steps", "24", "--warmup-steps", "2", "--lr", "1e-2", loss="sft")
    losses = [r["loss"] for r in _train_metrics(out)]
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses  # about 0.4 where we ran it
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["eos_token_id"] == json.loads((_train_world["s_raw"] / "config.json").read_text())["eos_token_id"]
    assert not (out / "final" / "generation_config.json").exists()


def test_train_same_update_for_any_world_size_and_micro_batch(_train_world, tmp_path):
    """One process and two, with other micro-batches: the first step's gradient, before clipping and Adam (which
    would absorb a factor of the world size), is the float64 oracle's in both; after three steps the weights agree."""
    common = ["--data", str(_train_world["chats8"]), "--batch-size", "8", "--max-steps", "3", "--dtype", "fp32",
              "--temperature", "2", "--lam", "0.3"]
    _side_by_side(lambda: _train_run(_train_world, tmp_path / "one", *common, "--micro-batch-size", "2"),
                  lambda: _train_run(_train_world, tmp_path / "zero", *common, "--micro-batch-size", "2",
                                     "--on-policy", "0"))
    _train_run(_train_world, tmp_path / "two", *common, "--micro-batch-size", "4", "--grad-ckpt", nproc=2)
    oracle = _train_oracle(_train_world, T=2.0, lam=0.3)
    for run in ("one", "two"):
        _train_check_step(_train_metrics(tmp_path / run)[0], oracle)
    one, two = _train_weights(tmp_path / "one" / "final"), _train_weights(tmp_path / "two" / "final")
    start = _train_weights(_train_world["s_raw"])
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # the steps did move the weights
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    zero = _train_weights(tmp_path / "zero" / "final")
    assert all(torch.equal(zero[k], one[k]) for k in one)  # --on-policy 0 is today's run, bit for bit


_TRAIN_MINILLM = ["--batch-size", "8", "--num-rollouts", "8", "--max-new-tokens", "12",
                  "--dtype", "fp32"]


@pytest.mark.parametrize("method", ["minillm", "deltakd-on-policy"])
def test_train_on_policy_methods_under_torchrun(_train_world, tmp_path, method):
    """MiniLLM (a rollout phase of 2 PPO epochs over 8 rollouts: 2 steps) and on-policy Delta-KD on two processes,
    on chats8. MiniLLM's SFT term counts the data's replies, so at step 1 it is the oracle's whatever was sampled
    (its PPO and single-step terms are checked in process, in the minillm tests). On-policy Delta-KD samples one-token
    replies: its KD term then counts each prompt's last position alone, so the first step's loss, KD term and gradient
    norm are the oracle's whatever token was drawn."""
    args = [*_TRAIN_MINILLM, "--ppo-epochs", "2"] if method == "minillm" else \
        ["--batch-size", "8", "--on-policy", "1", "--max-new-tokens", "1"]
    out = tmp_path / method
    _train_run(_train_world, out, "--data", str(_train_world["chats8"]), *args, "--micro-batch-size", "2",
               "--max-steps", "3", nproc=2, loss="minillm" if method == "minillm" else "deltakd")
    records = _train_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    if method == "minillm":  # a new phase at step 3 samples again; within a phase the rollout values stay
        assert records[0]["gen_share"] > 0 and records[1]["gen_share"] == 0 and records[2]["gen_share"] > 0
        assert records[0]["rkl"] == records[1]["rkl"] and all(0 < r["reply_len"] <= 12 for r in records)
        _train_check_step(records[0], _train_oracle(_train_world, lam=1.0), ["sft"])
    else:  # every step is on-policy: the SFT term, which counts data replies only, is absent
        assert all("sft" not in r and r["reply_len"] == 1 for r in records)
        _train_check_step(records[0], _train_oracle(_train_world, on_policy=True), ("loss", "kd", "grad_norm"))
    assert Qwen2.from_pretrained(out / "final", dtype=torch.float32).config.vocab_size == 632


def test_train_deltakd_with_the_teacher_as_its_own_raw_teacher_has_no_kd_term_at_step_one(_train_world, tmp_path):
    """--teacher-raw equal to --teacher: pi* = pi_s_raw, which is the student at step 1, so the KD term is 0 up to
    fp32 rounding. Its log-ratio cancels to about 1e-6 per entry, and KL is second order in that (about 1e-9 here);
    a frozen model in the wrong slot gives 0.02 or more. The gradient is then the SFT term's alone."""
    out = tmp_path / "run"
    same = {**_train_world, "t_raw": _train_world["t_ft"]}
    _train_run(same, out, "--data", str(_train_world["chats8"]), "--batch-size", "8", "--micro-batch-size", "4",
               "--max-steps", "1")
    step = _train_metrics(out)[0]
    assert abs(step["kd"]) < 1e-6, step
    _train_check_step(step, _train_oracle(same), ("loss", "sft", "grad_norm"))


@pytest.mark.parametrize("method", ["sft", "fkl", "rkl", "deltakd", "deltakd-on-policy", "minillm"])
def test_train_step_makes_the_host_wait_once(_train_world, tmp_path, method):
    """Outside log steps, an optimizer step of every loss has one host sync, reading the finite check and the SIGTERM
    flag together: measure.py's HostSyncs
    counts them over train.py's own loop, run in this process, with several micro-batches per step. The rollouts'
    sampling is left out (decoding has its own count); MiniLLM's third step starts a new rollout phase."""
    from measure import train_step_syncs
    loss, extra = {"deltakd-on-policy": ("deltakd", ["--on-policy", "1", "--max-new-tokens", "8"]),
                   "minillm": ("minillm", [*_TRAIN_MINILLM, "--ppo-epochs", "2", "--max-new-tokens", "8"])}.get(
        method, (method, []))
    kd = [] if loss == "sft" else ["--teacher", str(_train_world["t_ft"]), "--teacher-raw",
                                   str(_train_world["t_raw"])]
    argv = ["--model", str(_train_world["s_raw"]), *kd, "--loss", loss, "--data", str(_train_world["data"]),
            "--out", str(tmp_path / "run"), "--max-len", "128", "--batch-size", "8", "--micro-batch-size", "2",
            *extra, "--max-steps", "4", "--log-every", "100", "--save-every", "100"]
    steps = train_step_syncs(argv)
    assert steps == [{".tolist()": 1}] * 3, steps


def test_train_minillm_same_update_for_any_world_size_and_exact_resume(_train_world, tmp_path):
    """With one PPO epoch, one process and two give the same first-step gradient norm and the same weights: the
    rollouts are seeded per prompt, gathered, and laid out like data. A run resumed from a checkpoint samples the
    same rollouts and ends with the same weights, bit for bit. The last step runs at --min-lr, so it moves the weights:
    a resume that lost the data position or the rollout phase would end elsewhere."""
    common = [*_TRAIN_MINILLM, "--ppo-epochs", "1", "--max-steps", "3", "--save-every", "2", "--min-lr", "1e-3"]
    _train_run(_train_world, tmp_path / "one", *common, "--micro-batch-size", "2", loss="minillm")
    _train_run(_train_world, tmp_path / "two", *common, "--micro-batch-size", "4", nproc=2, loss="minillm")
    (first_one, *_), (first_two, *_) = _train_metrics(tmp_path / "one"), _train_metrics(tmp_path / "two")
    assert first_two["grad_norm"] == pytest.approx(first_one["grad_norm"], rel=1e-5)
    one, two = _train_weights(tmp_path / "one" / "final"), _train_weights(tmp_path / "two" / "final")
    start = _train_weights(_train_world["s_raw"])
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4  # the steps did move the weights
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    shutil.rmtree(tmp_path / "one" / "final")
    shutil.rmtree(tmp_path / "one" / "checkpoints" / "step-3")
    result = _train_run(_train_world, tmp_path / "one", *common, "--micro-batch-size", "2", loss="minillm")
    last = _train_metrics(tmp_path / "one")[-1]
    assert "step-2 at step 2" in result.stdout and (last["step"], last["lr"]) == (3, 1e-3)
    resumed = _train_weights(tmp_path / "one" / "final")
    assert all(torch.equal(resumed[k], one[k]) for k in one)


def test_train_same_data_is_checked_on_every_rank(tmp_path):
    """Each rank loads the data itself; two that read different data stop at once, naming the difference."""
    script = tmp_path / "check.py"
    script.write_text(f"""
import os, sys, numpy as np, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
import train
dist.init_process_group("gloo")
rank = dist.get_rank()
examples = [{{"input_ids": np.arange(5, dtype=np.int32), "labels": np.arange(5, dtype=np.int32)}}] * (3 + rank)
train.check_same_data(examples, rank, 2)
print("same data")
""")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "same data" not in result.stdout
    assert re.search(r"error: the processes loaded different data .*: rank 0: 3, \w+, rank 1: 4, \w+", result.stderr)


def test_train_compile_equals_eager_with_no_graph_break(_train_world, tmp_path, monkeypatch):
    """--compile (after --grad-ckpt, before FSDP) on Delta-KD, whose step runs four models: 10 steps end within 1e-4
    of eager's weights, with no graph break and no recompile limit hit (each model has its own compile cache)."""
    monkeypatch.setenv("TORCH_LOGS", "graph_breaks,recompiles")  # what dynamo reports, on stderr
    common = ["--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "10", "--dtype", "fp32"]
    _, compiled = _side_by_side(lambda: _train_run(_train_world, tmp_path / "eager", *common),
                                lambda: _train_run(_train_world, tmp_path / "compiled", *common, "--compile",
                                                   "--grad-ckpt"))
    assert "Graph break" not in compiled.stderr and "recompile_limit" not in compiled.stderr, compiled.stderr[-5000:]
    eager, compiled = _train_weights(tmp_path / "eager" / "final"), _train_weights(tmp_path / "compiled" / "final")
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 1e-4


def test_train_resume_gives_identical_weights(_train_world, tmp_path):
    out = tmp_path / "run"
    args = ["--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "5", "--save-every", "2",
            "--warmup-steps", "2", "--min-lr", "1e-3"]  # the last step moves the weights
    _train_run(_train_world, out, *args, nproc=2)
    reference = _train_weights(out / "final")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-4", "step-5"]  # the newest two are kept
    shutil.rmtree(out / "final")
    shutil.rmtree(ckpts / "step-5")
    shutil.copytree(ckpts / "step-4", ckpts / "step-6.tmp")  # an interrupted save: never taken for a checkpoint
    (ckpts / "step-6.tmp" / "trainer_state.json").unlink()
    result = _train_run(_train_world, out, *args, nproc=2)
    assert "resuming from" in result.stdout and "step-4 at step 4" in result.stdout
    resumed = _train_weights(out / "final")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert [r["step"] for r in _train_metrics(out)] == [1, 2, 3, 4, 5, 5]
    # the schedule by hand: warmup to 3e-3 over two steps, then a cosine from 3e-3 at step 3 to 1e-3 at step 5
    assert [r["lr"] for r in _train_metrics(out)] == pytest.approx([1.5e-3, 3e-3, 3e-3, 2e-3, 1e-3, 1e-3], rel=1e-12)
    # a checkpoint written by two processes resumes on one: DCP reshards it
    shutil.rmtree(out / "final")
    shutil.rmtree(ckpts / "step-5")
    _train_run(_train_world, out, *args)
    one = _train_weights(out / "final")
    assert max((one[k] - reference[k]).abs().max().item() for k in reference) < 1e-5


def test_train_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(_train_world, tmp_path):
    out = tmp_path / "nan"
    # a learning rate of 1e30 sends every weight to +-1e30 after the first step; the second forward overflows
    result = _train_run(_train_world, out, "--batch-size", "8", "--micro-batch-size", "8", "--max-steps", "4",
                        "--save-every", "1", "--lr", "1e30", "--grad-clip", "0", check=False)
    assert result.returncode != 0
    assert "error: step 2:" in result.stderr and "Last good checkpoint" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert not (out / "final").exists()


def _train_expect_exit(argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert message in str(e.value.code)


def test_train_bad_arguments_are_refused_before_loading(_train_world, tmp_path):
    w = {k: str(v) for k, v in _train_world.items()}
    base = ["--model", w["s_raw"], "--data", w["data"], "--out", str(tmp_path / "x")]
    _train_expect_exit(base + ["--loss", "fkl"], "--loss fkl needs --teacher")
    _train_expect_exit(base + ["--loss", "deltakd", "--teacher", w["t_ft"]], "needs --teacher-raw")
    _train_expect_exit(base + ["--loss", "sft", "--on-policy", "0.5"], "--on-policy 0.5: a fraction in [0, 1], for")
    _train_expect_exit(base + ["--loss", "minillm", "--teacher", w["t_ft"], "--num-rollouts", "12",
                               "--batch-size", "8"], "--num-rollouts (12) a multiple of --batch-size (8)")
    _train_expect_exit(base + ["--loss", "minillm", "--teacher", w["t_ft"], "--mix", "1"], "--mix 1.0 must lie in")
    _train_expect_exit(base + ["--loss", "sft", "--micro-batch-size", "0"], "must be at least 1")
    truncated = tmp_path / "truncated"  # a download cut short: named in one line, before any data is read
    shutil.copytree(w["t_ft"], truncated)
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    _train_expect_exit(base + ["--loss", "fkl", "--teacher", str(truncated)],
                       f"error: --teacher: {truncated / 'model.safetensors'} is truncated or corrupt")
    _train_expect_exit(["--model", w["s_raw"], "--data", str(tmp_path / "nope.jsonl"), "--out", "x", "--loss", "sft"],
                       f"error: --data: {tmp_path / 'nope.jsonl'}: no such file or folder")
    _train_expect_exit(["--model", str(tmp_path / "missing"), "--data", w["data"], "--out", "x", "--loss", "sft"],
                       f"error: --model: {tmp_path / 'missing'} is neither a model folder nor a Hub id")
    _train_expect_exit(base + ["--loss", "fkl", "--random-init", "--teacher", w["t_ft"]], "--random-init")
    # a teacher whose tokenizer differs: KD would compare different ids
    other = tmp_path / "other-teacher"
    shutil.copytree(w["t_ft"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    _train_expect_exit(base + ["--loss", "fkl", "--teacher", str(other)], "has a different tokenizer")
    assert not (tmp_path / "x").exists()  # nothing was written


# ---------------------------------------------------------------------------------------------------------------------
# targets.py: decoupled inference. The cache at k = all against the online loss, the tail bucket, resume, SIGTERM

def _targets_make(world, out, *args, nproc=1, alpha="0.5", check=True, timeout=300, popen=False):
    """targets.py on _train_world's models and data, as train.py's runs there read them (--max-len 128)."""
    models = ["--teacher", str(world["t_ft"])] + (["--model", str(world["s_raw"]), "--teacher-raw",
                                                      str(world["t_raw"])] if alpha != "0" else [])
    script = [str(REPO / "targets.py"), *models, "--alpha", alpha, "--data", str(world["data"]), "--max-len", "128",
              "--out", str(out), "--micro-batch-size", "3", *args]
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(launcher + script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
    result = subprocess.run(launcher + script, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"targets.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def _targets_caches(_train_world):
    """Exact caches (k >= the vocabulary) of pi* for Delta-KD at alpha 0.5, made on two processes in shards of 7
    examples (so that the processes' rounds are uneven), and for FKL (alpha 0), on one process."""
    root = _train_world["root"]
    _side_by_side(lambda: _targets_make(_train_world, root / "cache-deltakd", "--top-k", "100000", "--shard-size", "7",
                                        nproc=2),
                  lambda: _targets_make(_train_world, root / "cache-fkl", "--top-k", "100000", alpha="0"))
    return {"deltakd": root / "cache-deltakd", "fkl": root / "cache-fkl"}


def _targets_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("loss", ["deltakd", "fkl"])
def test_targets_training_from_an_exact_cache_is_online_training(_train_world, _targets_caches, tmp_path, loss):
    """At k = all, a student trained from the cache, on one process and on two (another micro-batch size, so the
    cache is read in another layout), has the online student's loss, parts and gradient norm at every one of 10
    steps, and its weights after them. The online run builds the frozen models; the cached runs have none."""
    steps = ["--max-steps", "10", "--batch-size", "8", "--micro-batch-size", "2", "--alpha",
             "0.5" if loss == "deltakd" else "0"]
    cached = ["--targets", str(_targets_caches[loss]), "--max-steps", "10", "--batch-size", "8"]

    def from_cache(name, nproc, micro):
        return _train_run(_train_world, tmp_path / name, *cached, "--micro-batch-size", micro, nproc=nproc, loss=loss,
                          teachers=False)
    _, one = _side_by_side(lambda: _train_run(_train_world, tmp_path / "online", *steps, loss=loss),
                           lambda: from_cache("one", 1, "2"))
    runs = {"one": one, "two": from_cache("two", 2, "4")}
    for name, run in runs.items():
        assert re.search(r'"parameters": \{\s*"student": \d+\s*\}', run.stdout)  # the student alone is built
        for online, mine in zip(_train_metrics(tmp_path / "online"), _train_metrics(tmp_path / name), strict=True):
            for k in ("loss", "sft", "kd", "grad_norm"):
                assert mine[k] == pytest.approx(online[k], rel=1e-5, abs=1e-9), (name, k, mine, online)
        want, got = _train_weights(tmp_path / "online" / "final"), _train_weights(tmp_path / name / "final")
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_targets_cache_holds_pi_star_and_its_top_k(_train_world, _targets_caches, tmp_path):
    """The shards hold, for each example found by its content, pi* at its supervised positions as deltakd computes
    it from the models' logits in float64 (fp32 rounding apart); a top-k cache keeps those entries' k largest and
    the log of the rest's mass."""
    from targets import TargetCache
    cache = TargetCache(_targets_caches["deltakd"])
    tok = data.load_tokenizer(_train_world["s_raw"])
    args = train.get_args(["--model", str(_train_world["s_raw"]), "--data", str(_train_world["data"]), "--out", "x",
                           "--max-len", "128", "--targets", str(_targets_caches["deltakd"])])
    examples, _ = data.examples_from_arguments(args, tok)
    assert cache.check(examples, tok, args) is None
    V = tok.get_vocab_size(with_added_tokens=True)
    models = {k: Qwen2.from_pretrained(_train_world[k], torch.float64) for k in ("t_ft", "t_raw", "s_raw")}
    top4 = tmp_path / "top4"
    _targets_make(_train_world, top4, "--top-k", "4", "--max-rows", "12")
    small = TargetCache(top4)
    assert small.check(examples[:12], tok, args) is None  # a cache of a row limit's examples serves those
    batch = next(iter(data.Batches(examples[:12], 12, 12)))[0]
    with torch.no_grad():
        at = batch["positions"]
        logits = {k: m(batch["input_ids"], logits_at=at)[:, :V] for k, m in models.items()}
    log_target = delta_kd_target(logits["t_ft"], logits["t_raw"], logits["s_raw"], 0.5, 1.0)
    exact = cache.rows(batch)
    assert exact.ids.shape == (len(at), V)
    torch.testing.assert_close(exact.log_probs.double().gather(1, exact.ids.argsort(1)).exp(), log_target.exp(),
                               rtol=1e-5, atol=1e-7)
    kept = small.rows(batch)
    want = topk_target(log_target, 4)
    assert kept.ids.shape == (len(at), 4) and kept.ids.dtype == torch.long
    torch.testing.assert_close(kept.log_probs.double().exp(), want.log_probs.exp(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kept.log_tail.double().exp(), want.log_tail.exp(), rtol=1e-5, atol=1e-7)
    ties = (want.log_probs[:, :-1] - want.log_probs[:, 1:]).abs().min(1).values > 1e-5  # ids may swap in a near-tie
    assert (kept.ids[ties] == want.ids[ties]).all()
    with safe_open(top4 / "shard-00000.safetensors", framework="pt") as f:
        assert {k: f.get_slice(k).get_dtype() for k in f.keys()} == {"ids": "I32", "log_probs": "F32",
                                                                    "log_tail": "F32", "keys": "U8", "offsets": "I64"}


def test_targets_refusals_name_the_setting_before_any_work(_train_world, _targets_caches, tmp_path, capsys):
    w, cache = _train_world, str(_targets_caches["deltakd"])
    base = ["--model", str(w["s_raw"]), "--data", str(w["data"]), "--out", str(tmp_path / "x"), "--max-len", "128",
            "--loss", "deltakd", "--targets", cache]

    def refused(argv, pattern, cli=train):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert re.search(pattern, f"{e.value} {capsys.readouterr().err}"), pattern
        assert not (tmp_path / "x").exists()
    refused([*base, "--max-len", "100"], r"made with --max-len 128, this run has 100")
    other = tmp_path / "other.jsonl"
    other.write_text((w["data"]).read_text())
    refused([*base, "--data", str(other)], r"made with --data .*train.jsonl, this run has .*other.jsonl")
    refused([*base, "--alpha", "1"], r"--alpha 1.0, but --targets .* holds pi\* at alpha 0.5")
    refused([*base, "--temperature", "2"], r"--temperature 2.0, but .* at temperature 1.0")
    refused([*base, "--loss", "fkl"], r"--alpha 0.0, but .* alpha 0.5 \(--loss fkl is alpha 0\)")
    refused([*base, "--loss", "minillm"], r"--targets is pi\* read from a cache, for off-policy .*--loss minillm")
    refused([*base, "--on-policy", "0.5"], r"not with --loss deltakd, --on-policy")
    refused([*base, "--teacher", str(w["t_ft"])], r"nor beside --teacher")
    foreign = tmp_path / "foreign-tokenizer"
    shutil.copytree(w["s_raw"], foreign)
    tok = data.load_tokenizer(foreign)
    tok.add_tokens(["<|extra|>"])
    tok.save(str(foreign / "tokenizer.json"))
    refused([*base[:1], str(foreign), *base[2:]], r"made with another tokenizer")
    partial = tmp_path / "partial"
    _targets_make(w, partial, "--max-rows", "20")
    refused([*base[:-1], str(partial)], r"lacks 76 of this run's 96 examples")
    refused([*base[:-1], str(tmp_path)], r"--targets: .* is not a targets.py folder")
    refused([*base[:1], str(w["t_ft"]), *base[2:]], r"made from another raw student than --model")  # its pi*'s
    # targets.py: another setting into a folder that holds targets is refused before any weight is read
    import targets
    made = ["--model", str(w["s_raw"]), "--teacher", str(w["t_ft"]), "--teacher-raw", str(w["t_raw"]), "--alpha",
            "0.5", "--data", str(w["data"]), "--max-len", "128", "--out", cache, "--top-k", "100000", "--shard-size",
            "7"]
    before = _targets_bytes(_targets_caches["deltakd"])
    for flag, value, why in (("--top-k", "5", r"top-k \d+, not 5"), ("--max-len", "64", "max-len 128, not 64"),
                             ("--alpha", "1", "alpha 0.5, not 1.0"), ("--temperature", "2", "temperature 1.0, not 2.0"),
                             ("--max-rows", "9", "max-rows None, not 9")):
        with pytest.raises(SystemExit, match=f"holds targets made with {why}: give another --out"):
            targets.main([*made, flag, value])
    assert _targets_bytes(_targets_caches["deltakd"]) == before
    stray = tmp_path / "stray"
    stray.mkdir()
    shutil.copy(_targets_caches["deltakd"] / "shard-00000.safetensors", stray)
    with pytest.raises(SystemExit, match="holds shards but no targets.json"):
        targets.main([*made[:-5], str(stray)])


def test_targets_stopped_by_sigterm_resume_to_the_same_bytes(_train_world, tmp_path):
    """targets.py under torchrun, sent SIGTERM (as SLURM or Kubernetes would) once its first shard is out: the
    processes finish the shards in hand and stop, saying how to resume; the same command then ends with the same
    bytes as an uninterrupted run on one process (and a stray .tmp from a kill is overwritten). train.py likewise:
    stopped after a step, saved, and resumed, it ends with the very weights of an uninterrupted run."""
    args = ["--top-k", "8", "--shard-size", "1", "--max-rows", "48"]  # 48 shards: many rounds to stop between
    _targets_make(_train_world, tmp_path / "whole", *args)
    run = _targets_make(_train_world, tmp_path / "cut", *args, nproc=2, popen=True)
    while not list((tmp_path / "cut").glob("shard-*.safetensors")) and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert re.search(r"stopped by SIGTERM after \d+ of 48 shards; the same command resumes", output), output[-3000:]
    assert len(list((tmp_path / "cut").glob("shard-*.safetensors"))) < 48
    (tmp_path / "cut" / "shard-00047.safetensors.tmp").write_bytes(b"half a shard")
    _targets_make(_train_world, tmp_path / "cut", *args, nproc=2)
    assert _targets_bytes(tmp_path / "cut") == _targets_bytes(tmp_path / "whole")

    steps = ["--targets", str(tmp_path / "whole"), "--max-rows", "48", "--max-steps", "30", "--batch-size", "8",
             "--micro-batch-size", "4", "--save-every", "1000"]
    _train_run(_train_world, tmp_path / "train-whole", *steps, nproc=2, teachers=False)
    run = _train_run(_train_world, tmp_path / "train-cut", *steps, nproc=2, teachers=False, popen=True)
    metrics = tmp_path / "train-cut" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()) and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    stopped = re.search(r"stopped by SIGTERM after step (\d+) of 30, saved in (\S+); the same command resumes", output)
    assert stopped and int(stopped.group(1)) < 30 and Path(stopped.group(2)).name == f"step-{stopped.group(1)}", \
        output[-3000:]
    assert not (tmp_path / "train-cut" / "final").exists()
    resumed = _train_run(_train_world, tmp_path / "train-cut", *steps, nproc=2, teachers=False)
    assert f"resuming from {stopped.group(2)} at step {stopped.group(1)}" in resumed.stdout
    want, got = _train_weights(tmp_path / "train-whole" / "final"), _train_weights(tmp_path / "train-cut" / "final")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------------------------------
# measure.py: the fake-tensor estimate of a step's peak (bench.py memory), against real tensors

def test_bench_memory_estimate_matches_real_tensors(tmp_path):
    """bench.py memory's estimate (fake tensors, a fake process group of 2 ranks) of a Delta-KD step with
    --grad-ckpt against the same step on real tensors, 2 processes under gloo, counted the same way (the live
    storages' bytes): within 3%, and the parameters and optimizer state exactly. The count itself is checked against
    the CPU allocator's own report of every allocation and free (torch.profiler's memory events) on one process
    (with two, gloo's threads allocate buffers of their own at times that vary): within 3%. That count is what the
    CUDA caching allocator reports as allocated."""
    import torch.distributed as dist
    import measure
    shapes = {"student": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, vocab_size=2048,
                              tie_word_embeddings=True),
              "teacher": dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, vocab_size=2080)}
    for name, shape in shapes.items():
        (tmp_path / name).mkdir()
        config = Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, rope_theta=1e6, **shape)
        (tmp_path / name / "config.json").write_text(json.dumps(config.to_dict()))  # all that an estimate reads
    argv = ["--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--teacher-raw",
            str(tmp_path / "teacher"), "--loss", "deltakd", "--micro-batch-size", "2", "--max-len", "128",
            "--grad-ckpt", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*launcher, flag):
        r = subprocess.run([*launcher, str(REPO / "bench.py"), "memory", *argv, flag], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads(r.stdout.splitlines()[-1])
    estimate = run(sys.executable, flag="--world-size=2")
    real = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", flag="--real")
    assert abs(estimate["peak_gib"] / real["peak_gib"] - 1) < 0.03, (estimate, real)
    assert [estimate[k] for k in ("parameters_gib", "optimizer_gib", "where")] == \
        [real[k] for k in ("parameters_gib", "optimizer_gib", "where")]
    _, args = measure.memory_args(argv)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cpu = torch.device("cpu")
        counted, allocated = measure.allocator_peak(lambda: measure.memory_of_step(args, 1, cpu, fake=False), cpu)
    finally:
        dist.destroy_process_group()
    assert abs(allocated / counted["peak_gib"] - 1) < 0.03, (counted, allocated)


# ---------------------------------------------------------------------------------------------------------------------
# minillm.py: the policy-gradient estimator against exact enumeration, and teacher-mixed sampling

_MINI_VOCAB, _MINI_STOP, _MINI_REPLY, _MINI_PROMPT = 5, 4, 3, [1, 2]  # replies of at most 3 tokens from 5: 85 of them


def _mini_model(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    model = Qwen2(Qwen2Config(vocab_size=_MINI_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, rope_theta=1e6, initializer_range=0.5))
    model.init_weights()
    return model.to(dtype)


def _mini_replies():
    """Every reply: it ends at the stop token, or is cut after _MINI_REPLY tokens."""
    return [list(y) for n in range(1, _MINI_REPLY + 1) for y in itertools.product(range(_MINI_VOCAB), repeat=n)
            if _MINI_STOP not in y[:-1] and (n == _MINI_REPLY or y[-1] == _MINI_STOP)]


def _mini_token_log_probs(model, reply):
    logits = model(torch.tensor([_MINI_PROMPT + reply]))[0, len(_MINI_PROMPT) - 1:-1]  # the logits choosing the reply
    return torch.log_softmax(logits, -1)[range(len(reply)), reply]  # (n,)


def _mini_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _mini_exact_gradient(student, teacher):
    """The gradient of the sequence-level KL(q || p) = sum over replies y of q(y) (log q(y) - log p(y))."""
    student.zero_grad()
    kl = 0.0
    for y in _mini_replies():
        log_q = _mini_token_log_probs(student, y).sum()
        with torch.no_grad():
            log_p = _mini_token_log_probs(teacher, y).sum()
        kl = kl + log_q.exp() * (log_q - log_p)
    kl.backward()
    return _mini_grad(student)


def _mini_estimate(student, teacher, reply, mix):
    """MiniLLM's estimate from one reply, in its unbiased settings (reward scale 1, no clipping, no length
    normalisation or whitening), at theta = theta_old: the gradient of L_pg + L_single, both summed over the reply."""
    with torch.no_grad():
        log_q, log_p = (_mini_token_log_probs(m, reply).numpy() for m in (student, teacher))
    log_mix = np.logaddexp(np.log1p(-mix) + log_q, np.log(mix) + log_p) if mix else log_q
    adv = minillm.advantages([log_p - log_q], length_norm=False, whiten=False)[0]
    ids, targets = torch.tensor([_MINI_PROMPT + reply]), torch.tensor(reply)
    at = torch.arange(len(reply)) + len(_MINI_PROMPT) - 1  # the positions whose logits choose the reply's tokens
    student.zero_grad()
    logits = student(ids, logits_at=at)
    with torch.no_grad():
        teacher_logits = teacher(ids, logits_at=at)
    pg = minillm.policy_loss(logits, targets, *map(torch.tensor, (log_q, adv, np.exp(log_q - log_mix))), _MINI_VOCAB,
                             1.0, clip=math.inf)
    single = delta_kd_loss(logits, targets, teacher_logits, alpha=0.0, lam=0.0, divergence="rkl", num_tokens=1)
    (pg + single).backward()
    return _mini_grad(student)


def _mini_reply_prob(student, teacher, reply, mix):
    with torch.no_grad():
        log_q, log_p = (_mini_token_log_probs(m, reply) for m in (student, teacher))
    return float(torch.logaddexp(math.log1p(-mix) + log_q, math.log(mix) + log_p).sum().exp() if mix else
                 log_q.sum().exp())


@pytest.mark.parametrize("mix", [0.0, 0.2])
def test_minillm_policy_gradient_against_the_exact_sequence_level_gradient(mix):
    """Every reply can be enumerated, so the exact gradient of KL(q || p), the exact mean of MiniLLM's estimate under
    the sampling distribution p~, and the mean over replies drawn by minillm.sample_replies can all be compared.

    m = 0: the estimate's mean is the exact gradient (up to rounding), and 4000 sampled replies average to it
    within 5 standard errors, in the gradient's own direction and in a random one.
    m = 0.2: the sampled replies average to the estimate's exact mean under p~, which checks the teacher-mixed sampling
    and the importance weights. That mean is not the exact gradient: MiniLLM weights each token by its own ratio
    q / p~ where an unbiased estimate would multiply the ratios of the prefix and the future (their Sec. 2.3). Here
    that approximation is off by over 5% of the gradient's norm; the test pins it, so the docstring stays true."""
    student, teacher = _mini_model(1), _mini_model(2)
    replies = _mini_replies()
    exact = _mini_exact_gradient(student, teacher)
    estimates = torch.stack([_mini_estimate(student, teacher, y, mix) for y in replies])  # (replies, params)
    probs = torch.tensor([_mini_reply_prob(student, teacher, y, mix) for y in replies], dtype=torch.float64)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)
    mean = probs @ estimates  # the estimate's exact mean under p~
    samples = 4000
    drawn = minillm.sample_replies(student.float(), [_MINI_PROMPT] * samples, list(range(samples)),
                                   [_MINI_REPLY] * samples, [_MINI_STOP], _MINI_VOCAB, teacher.float(), mix)
    where = {tuple(y): i for i, y in enumerate(replies)}
    freq = torch.zeros(len(replies), dtype=torch.float64)
    for r in drawn:
        freq[where[tuple(r["tokens"])]] += 1 / samples
    sampled = freq @ estimates
    for u in (mean / mean.norm(),
              torch.randn(len(mean), dtype=torch.float64, generator=torch.Generator().manual_seed(0))):
        u = u / u.norm()
        along = estimates @ u
        std_error = ((probs @ (along - probs @ along) ** 2) / samples).sqrt()
        assert abs((sampled - mean) @ u) < 5 * std_error  # the sampler draws from p~
    bias = ((mean - exact).norm() / exact.norm()).item()
    if mix == 0:
        assert bias < 1e-5  # float64, up to the CPU attention kernel's own rounding (~1e-7 here)
    else:
        assert bias > 0.05  # MiniLLM's single-token importance weight: an approximation (see the docstring)


def test_minillm_teacher_mixed_sampling_draws_from_the_mixture():
    """The first token's distribution is fixed by the prompt: 20000 draws at m = 0.2 match p~ = 0.8 q + 0.2 p by a
    chi-square test (4 degrees of freedom; 30 is p < 1e-5), and are far from q alone, so the test can tell. The
    log-probabilities recorded with each token are the models' own."""
    student, teacher = _mini_model(1, torch.float32), _mini_model(2, torch.float32)
    with torch.no_grad():
        q, p = (torch.softmax(m(torch.tensor([_MINI_PROMPT]))[0, -1].double(), -1) for m in (student, teacher))
    n = 20000
    drawn = minillm.sample_replies(student, [_MINI_PROMPT] * n, list(range(n)), [1] * n, [_MINI_STOP], _MINI_VOCAB,
                                   teacher, 0.2)
    counts = torch.bincount(torch.tensor([r["tokens"][0] for r in drawn]), minlength=_MINI_VOCAB).double()
    def chi2(dist):
        return ((counts - n * dist) ** 2 / (n * dist)).sum().item()
    assert chi2(0.8 * q + 0.2 * p) < 30 and chi2(q) > 300
    for r in drawn[:50]:
        t = r["tokens"][0]
        assert r["log_q"][0] == pytest.approx(math.log(q[t]), abs=1e-5)
        assert r["log_p"][0] == pytest.approx(math.log(p[t]), abs=1e-5)
        assert r["log_mix"][0] == pytest.approx(math.log(0.8 * q[t] + 0.2 * p[t]), abs=1e-5)


def test_minillm_sample_replies_against_a_sampler_without_cache():
    """sample_replies (a generate.Decoder: KV caches, a slot per prompt, a repeated prompt's cache rows copied, the
    records read back once per 16 steps) draws the same tokens, with the same log-probabilities, as a sampler written
    out token by token: full forwards of both models over the prompt and the reply so far, the mixture in float64, and
    the same counter-based noise (generate.gumbel) for the same seeds. The host waits on the device once per 16
    steps."""
    from measure import HostSyncs
    vocab, stop, mix = 40, 39, 0.3

    def model(seed):
        torch.manual_seed(seed)
        m = Qwen2(Qwen2Config(vocab_size=vocab + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, rope_theta=1e6, initializer_range=0.5))
        m.init_weights()
        return m  # three lm_head rows past the tokenizer's ids, which are never drawn
    student, teacher = model(1), model(2)
    prompts, seeds, limits = [[1, 2], [3], [1, 2], [2, 0, 1, 3], [1, 2]], [11, 12, 13, 14, 11], [30, 30, 5, 30, 30]
    with HostSyncs() as syncs:
        drawn = minillm.sample_replies(student, prompts, seeds, limits, [stop], vocab, teacher, mix)

    def by_hand(prompt, seed, limit):
        out = {"tokens": [], "log_q": [], "log_p": [], "log_mix": []}
        while len(out["tokens"]) < limit and stop not in out["tokens"]:
            with torch.no_grad():
                q, p = (torch.log_softmax(m(torch.tensor([prompt + out["tokens"]]))[0, -1, :vocab].double(), -1)
                        for m in (student, teacher))
            m = torch.logaddexp(q + math.log1p(-mix), p + math.log(mix))
            token = int((m + gumbel(torch.tensor([seed]), torch.tensor([len(out["tokens"])]), vocab)[0]).argmax())
            for k, x in (("tokens", token), ("log_q", q[token]), ("log_p", p[token]), ("log_mix", m[token])):
                out[k].append(x if k == "tokens" else x.item())
        return out
    lengths = []
    for reply, prompt, seed, limit in zip(drawn, prompts, seeds, limits):
        want = by_hand(prompt, seed, limit)
        assert reply["tokens"] == want["tokens"]
        for k in ("log_q", "log_p", "log_mix"):
            assert reply[k] == pytest.approx(want[k], abs=1e-5)
        lengths.append(len(reply["tokens"]))
    assert drawn[0] == drawn[4] and drawn[0] != drawn[2]  # the same prompt and seed, the same reply; another seed
    assert max(lengths) > 16 and min(lengths) < 30 and lengths[2] == 5  # stopped, cut, and over 16 steps
    assert set(syncs.counts) == {".tolist()"} and syncs.total <= max(lengths) // 16 + 1, syncs.counts


def test_minillm_single_step_term_is_the_token_level_reverse_kl():
    """MiniLLM's single-step term is delta_kd_loss(rkl, alpha=0, lam=0): sum over positions of KL(q || p) over the
    first vocab_size ids, divided by num_tokens, against a float64 formula; the teacher's lm_head may be longer."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 7, 11, generator=g, dtype=torch.float64)
    t = torch.randn(2, 7, 13, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 7), generator=g)
    targets[0, :3] = -100
    got = delta_kd_loss(s, targets, t, alpha=0.0, lam=0.0, divergence="rkl", vocab_size=11, num_tokens=5.0)
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t[..., :11], -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    assert got.item() == pytest.approx((kl * (targets != -100)).sum().item() / 5.0, rel=1e-12)


def test_minillm_policy_loss_is_chunked_and_exact(monkeypatch):
    """policy_loss takes log q(y) a chunk of positions at a time, never an fp32 (N, V) log_softmax: with chunks of 3
    positions, its value and gradient equal the whole-tensor formula's in float64, clipped and unclipped ratios both."""
    import deltakd
    g = torch.Generator().manual_seed(4)
    N, V = 10, 7
    logits = torch.randn(N, V + 2, generator=g, dtype=torch.float64, requires_grad=True)  # an lm_head's extra rows
    targets = torch.randint(0, V, (N,), generator=g)
    log_q = torch.log_softmax(logits[:, :V], -1).gather(1, targets[:, None])[:, 0]
    log_q_old = log_q.detach() + 0.4 * torch.randn(N, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    weight = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    rho = (log_q - log_q_old).exp() * weight
    assert 0 < ((rho - 1).abs() > 0.2).sum() < N  # some ratios clipped, some not
    expected = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.2)).sum() / 4.0
    (g_expected,) = torch.autograd.grad(expected, logits)
    monkeypatch.setitem(deltakd._CHUNK_BYTES, "cpu", 4 * V * 3)
    got = minillm.policy_loss(logits, targets, log_q_old, adv, weight, V, 4.0)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-10, atol=1e-14)
    assert g_got[:, V:].abs().max() == 0


def test_minillm_advantages_follow_the_future_reward():
    r = np.array([1.0, 2.0, 4.0])
    assert minillm.advantages([r], length_norm=False, whiten=False)[0].tolist() == [6.0, 4.0, 0.0]
    assert minillm.advantages([r], whiten=False)[0].tolist() == [3.0, 4.0, 0.0]  # the mean of the 2, 1, 0 after it
    whitened = np.concatenate(minillm.advantages([r, np.array([5.0])]))
    assert abs(whitened.mean()) < 1e-9 and whitened.std() == pytest.approx(1.0, rel=1e-6)


def test_minillm_policy_loss_clips_as_ppo_does():
    """(6) with the default clip, 0.2, by hand: rho = w q / q_old is clipped to [0.8, 1.2] only where that raises the
    loss. Rows (rho, A): (1.5, 1) and (0.5, -1) are clipped, with no gradient; (0.5, 1), (1.5, -1), (1.1, 2) and
    (0.9, -2) are not, and their gradient is -A rho (onehot(y) - softmax) / num_tokens."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    rho = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, 0.9], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
    weight = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 4.0], dtype=torch.float64)  # the importance weight is in rho
    log_q = torch.log_softmax(logits.detach(), -1)[range(6), targets]
    loss = minillm.policy_loss(logits, targets, log_q - (rho / weight).log(), adv, weight, 5, 4.0)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 2.2 + 1.8) / 4, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = -(adv * rho)[:, None] * (F.one_hot(targets, 5) - torch.softmax(logits.detach(), -1)) / 4
    expected[[0, 3]] = 0.0
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.fixture
def _mini_trainer():
    """MiniLLM as train.py makes it, in this process: a world of one (gloo), train.py's defaults (mix 0.2, reward
    scale 0.5, lam 0.5), the float32 models above and 16 examples, prompts of 1 to 4 tokens, replies of 1 to 4."""
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(16):
        prompt, reply = list(rng.integers(0, _MINI_STOP, rng.integers(1, 5))), list(rng.integers(0, _MINI_STOP, 3))
        reply = reply[:rng.integers(0, 4)] + [_MINI_STOP]
        examples.append({"input_ids": np.array(prompt + reply), "labels": np.array([-100] * len(prompt) + reply)})
    args = train.get_args(["--model", "-", "--data", "-", "--out", "-", "--batch-size", "16", "--num-rollouts", "16",
                           "--micro-batch-size", "8", "--ppo-epochs", "1", "--max-new-tokens", "4"])
    student, teacher = _mini_model(1, torch.float32), _mini_model(2, torch.float32)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield (minillm.MiniLLM(args, examples, student, teacher, _MINI_VOCAB, [_MINI_STOP], 0, 1, torch.device("cpu"),
                               _MINI_STOP), args, examples)
    finally:
        dist.destroy_process_group()


def _mini_rollout_rows(micro_batches):
    """Each stored rollout: its tokens, the positions of its reply, and the per-token fields there."""
    rows = []
    for mb in micro_batches:
        for i, n in enumerate(mb["attention_mask"].sum(1).tolist()):
            reply = (mb["labels"][i, :n] != -100).nonzero()[:, 0]
            rows.append({"ids": mb["input_ids"][i, :n], "reply": reply,
                         **{k: mb[k][i, reply].double() for k in ("log_q_old", "adv", "weight")}})
    return rows


def _mini_reply_log_probs(model, row):
    """log pi(y_k) of each reply token, from one full forward without a cache: (n,), and the (n, V) rows."""
    log_probs = torch.log_softmax(model(row["ids"][None])[0, row["reply"] - 1], -1)
    return log_probs.gather(1, row["ids"][row["reply"], None])[:, 0], log_probs


def test_minillm_rollout_stores_scaled_rewards_whitened_advantages_and_weights(_mini_trainer):
    """What MiniLLM.rollout stores for the PPO passes, against float64 forwards of each sampled reply, whatever was
    sampled: each token's reward is reward_scale x (log p - log q) (logged as its mean, "reward", and the mean of
    log q - log p, "rkl"); its advantage is the mean reward of the tokens after it, whitened over the batch's tokens
    (so mean 0 and std 1); its importance weight is q / ((1 - mix) q + mix p); its old log-probability is log q."""
    ppo, args, _ = _mini_trainer
    ppo.rollout(0)
    rows = _mini_rollout_rows(next(ppo.minibatches))
    student, teacher = (copy.deepcopy(m).double() for m in (ppo.student, ppo.teacher))
    with torch.no_grad():
        log_q, log_p = ([_mini_reply_log_probs(m, r)[0] for r in rows] for m in (student, teacher))
    rewards = [args.reward_scale * (p - q) for p, q in zip(log_p, log_q)]
    future = torch.cat([torch.stack([r[k + 1:].sum() / max(len(r) - 1 - k, 1) for k in range(len(r))])
                        for r in rewards])
    stored = {k: torch.cat([r[k] for r in rows]) for k in ("log_q_old", "adv", "weight")}
    torch.testing.assert_close(stored["adv"], (future - future.mean()) / future.std(unbiased=False), atol=1e-5,
                               rtol=0)
    assert abs(stored["adv"].mean()) < 1e-6 and stored["adv"].std(unbiased=False).item() == pytest.approx(1, rel=1e-6)
    log_q, log_p = torch.cat(log_q), torch.cat(log_p)
    torch.testing.assert_close(stored["log_q_old"], log_q, atol=1e-5, rtol=0)
    q, p = log_q.exp(), log_p.exp()
    torch.testing.assert_close(stored["weight"], q / ((1 - args.mix) * q + args.mix * p), atol=1e-5, rtol=1e-5)
    assert ppo.rollout_stats["reward"] == pytest.approx(args.reward_scale * (log_p - log_q).mean().item(), abs=1e-6)
    assert ppo.rollout_stats["rkl"] == pytest.approx((log_q - log_p).mean().item(), abs=1e-6)
    assert ppo.rollout_stats["rkl"] > 0.05  # the test can tell a reward of the wrong sign


def test_minillm_step_gradient_is_the_clipped_policy_loss_the_reverse_kl_and_sft(_mini_trainer):
    """MiniLLM.step at the first step of a phase (theta = theta_old, so rho = w) against a float64 oracle on the
    rollouts it stores: per reply token max(-A rho, -A clip(rho, 0.8, 1.2)) + KL(q || p) over the vocabulary, summed
    and divided by the rollout tokens, plus lam x the cross-entropy of the data's replies: the logged terms and the
    gradient. With mix 0.2 the weights spread past [0.8, 1.2], so the clip takes part."""
    ppo, args, examples = _mini_trainer
    ppo.rollout(0)
    rows = _mini_rollout_rows(next(ppo.minibatches))  # what step 0 uses: phase 0 sampled again draws the same
    data_step = next(iter(data.Batches(examples, 16, 8, pad_id=_MINI_STOP)))
    parts = ppo.step(0, data_step)
    got = torch.cat([p.grad.flatten() for p in ppo.student.parameters()])
    student, teacher = (copy.deepcopy(m).double() for m in (ppo.student, ppo.teacher))
    pg = kl = 0.0
    for r in rows:
        log_q, log_q_all = _mini_reply_log_probs(student, r)
        with torch.no_grad():
            log_p_all = _mini_reply_log_probs(teacher, r)[1]
        rho = r["weight"] * (log_q - r["log_q_old"]).exp()
        pg = pg + torch.maximum(-r["adv"] * rho, -r["adv"] * rho.clamp(1 - 0.2, 1 + 0.2)).sum()
        kl = kl + (log_q_all.exp() * (log_q_all - log_p_all)).sum()
    n = sum(len(r["reply"]) for r in rows)
    replies = [{"ids": torch.as_tensor(e["input_ids"]), "reply": torch.as_tensor(np.flatnonzero(e["labels"] != -100))}
               for e in examples]
    sft = -torch.cat([_mini_reply_log_probs(student, r)[0] for r in replies]).mean()
    (pg / n + kl / n + args.lam * sft).backward()
    want = torch.cat([p.grad.flatten() for p in student.parameters()])
    for key, value in (("pg", pg / n), ("kd", kl / n), ("sft", sft), ("loss", pg / n + kl / n + args.lam * sft)):
        assert float(parts[key]) == pytest.approx(value.item(), rel=1e-5), key
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    weights, adv = torch.cat([r["weight"] for r in rows]), torch.cat([r["adv"] for r in rows])
    assert (((adv > 0) & (weights > 1.2)) | ((adv < 0) & (weights < 0.8))).sum() >= 3  # clipped tokens


# ---------------------------------------------------------------------------------------------------------------------
# evaluate.py: the generation CLI


def _eval_short(chat):
    return {**chat, "messages": [chat["messages"][0], {"role": "assistant",
                                                       "content": f"The answer is \\boxed{{{chat['answer']}}}."}]}


def _eval_fit(model, tokenizer, chats, new_tokens=24, margin=2.0, max_steps=800):
    """Train until greedy decoding reproduces the first `new_tokens` tokens of every chat's last reply (up to its
    <|im_end|>), each by a logit margin of at least `margin`; fail if max_steps is reached first. A checked condition,
    not a step count: the tests need a model whose every greedy choice is clear, so that batched and unbatched,
    one-process and two-process decoding agree on any CPU, with replies that share words with the references and
    stop by themselves where the reply is short."""
    stop = tokenizer.token_to_id("<|im_end|>")
    pad = tokenizer.token_to_id("<|endoftext|>")
    examples = [data.encode_chat(c["messages"][:data.last_reply(c["messages"]) + 1], tokenizer) for c in chats]
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [pad] * (T - len(e["input_ids"])) for e in examples])  # (B, T)
    labels = torch.tensor([e["labels"] + [-100] * (T - len(e["labels"])) for e in examples])  # (B, T)
    checks = []  # (position of the first reply token, the tokens that greedy decoding must produce)
    for c, e in zip(chats, examples):
        start = len(data.encode_prompt(c["messages"], tokenizer))
        want = e["input_ids"][start:start + new_tokens]
        checks.append((start, want[:want.index(stop) + 1] if stop in want else want))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(1, max_steps + 1):
        logits = model(ids)  # right padding: no mask needed for the real tokens
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            with torch.no_grad():
                logits = model(ids)
            worst = math.inf
            for row, (start, want) in zip(logits, checks):
                got = row[start - 1:start - 1 + len(want)]  # (n, V): the logits that choose each wanted token
                right = got.gather(1, torch.tensor(want)[:, None])[:, 0]
                others = got.scatter(1, torch.tensor(want)[:, None], -math.inf).max(-1).values
                worst = min(worst, (right - others).min().item())
            if worst >= margin:
                return step
    raise AssertionError(f"_eval_fit: after {max_steps} steps the smallest margin is {worst:.3f} < {margin}")


def _eval_test_chats():
    """Toy test chats, half with short replies, plus two shapes the prompt cutting must handle: a system turn with two
    exchanges (the prompt keeps the first reply), and a conversation that goes on after its last reply."""
    chats = toy.chats(60, seed=1)[50:]
    chats[:5] = map(_eval_short, chats[:5])
    chats.append({"id": "two-turns", "messages": [
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "Ava has 3 apples. Ben gives Ava 4 more. How many apples does Ava have?"},
        {"role": "assistant", "content": "Ava has 3 + 4 = 7.\nThe answer is \\boxed{7}."},
        {"role": "user", "content": "And if she then loses 2?"},
        {"role": "assistant", "content": "After losing 2, Ava has 7 - 2 = 5.\nThe answer is \\boxed{5}."}]})
    chats.append({"id": "trailing-user", "messages": [
        {"role": "user", "content": "Sam's garden is 4 m wide and 6 m long. What is its area in square meters?"},
        {"role": "assistant", "content": "The area is the width times the length.\n4 x 6 = 24.\nThe answer is "
                                         "\\boxed{24}."},
        {"role": "user", "content": "Thanks!"}]})
    return chats


@pytest.fixture(scope="module", autouse=True)
def _eval_one_thread():
    """Tiny tensors gain nothing from a second thread, and two threads on a busy 2-core machine can be many times
    slower than one; the subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def _eval_env(tmp_path_factory):
    """A model fitted to the test chats (_eval_fit), a random one, the test data, and the reference run: one
    process, --batch-size 4."""
    root = tmp_path_factory.mktemp("eval")
    train = toy.chats(50, seed=1)
    tokenizer = toy.train_tokenizer([data.render_chat(c["messages"]) for c in train]
                                    + [r["text"] for r in toy.corpus(100)], vocab_size=400)
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    config = Qwen2Config(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    model = Qwen2(config)
    model.init_weights()
    model.save_pretrained(root / "random", tokenizer_dir=root / "tok")  # near-uniform: sampling differs from greedy
    chats = _eval_test_chats()
    _eval_fit(model, tokenizer, chats)
    model.save_pretrained(root / "model", tokenizer_dir=root / "tok")
    (root / "test.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    run = _eval_run(root, "ref", "--batch-size", "4", "--write-data", str(root / "seqkd.jsonl"))
    return {"root": root, "chats": chats, "ref": root / "ref", "stdout": run.stdout}


def _eval_run(root, out, *args, torchrun=False, max_new_tokens=24):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    cmd = [*launcher, str(REPO / "evaluate.py"), "--model", str(root / "model"), "--data",
           str(root / "test.jsonl"), "--max-new-tokens", str(max_new_tokens), "--out", str(root / out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the one-process runs must not believe they were launched by torchrun
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def _eval_read(out):
    """predictions.jsonl's rows and summary.json, less decode_slot_utilization: a measurement of the run's schedule,
    which differs between runs (processes, a crash) whose replies and scores must not."""
    text = (out / "predictions.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line]  # not splitlines(): U+2028 may be in a reply
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("decode_slot_utilization", None)
    return rows, summary


def _eval_scorer(use_stemmer):
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)


def _eval_fitted_reply(tokenizer, reference, new_tokens=24):
    """What the fitted model replies, known before it generates (_eval_fit): the reference's first tokens, and
    whether its <|im_end|> came within them."""
    ids = tokenizer.encode(reference + "<|im_end|>", add_special_tokens=False).ids[:new_tokens]
    finished = ids[-1] == tokenizer.token_to_id("<|im_end|>")
    return tokenizer.decode(ids[:-1] if finished else ids), finished


def test_eval_cli_writes_consistent_predictions_and_summary(_eval_env):
    """Each reply is the reference cut at 24 tokens, which the fitted model reproduces; its scores are rouge-score's,
    and the summary holds their means."""
    rows, summary = _eval_read(_eval_env["ref"])
    chats, tokenizer = _eval_env["chats"], data.load_tokenizer(_eval_env["root"] / "model")
    assert [r["id"] for r in rows] == [c["id"] for c in chats]  # the data's order, not the length-sorted one
    for r, c in zip(rows, chats):
        last = max(i for i, m in enumerate(c["messages"]) if m["role"] == "assistant")
        assert r["messages"] == c["messages"][:last] and r["reference"] == c["messages"][last]["content"]
        assert (r["prediction"], r["finished"]) == _eval_fitted_reply(tokenizer, r["reference"])
        for key, stem in (("", False), ("_stemmed", True)):
            theirs = _eval_scorer(stem).score(r["reference"], r["prediction"])
            assert {k: r["scores"][k + key] for k in theirs} == {k: v.fmeasure for k, v in theirs.items()}
    assert 0 < summary["unfinished"] == sum(not r["finished"] for r in rows) < len(rows)
    for key, suffix in (("rouge", ""), ("rouge_stemmed", "_stemmed")):
        assert summary[key] == pytest.approx({k: sum(r["scores"][k + suffix] for r in rows) / len(rows)
                                              for k in ("rouge1", "rouge2", "rougeL")}, rel=1e-12)
    for field in ("prediction", "reference"):
        assert summary[f"mean_{field}_tokens"] == pytest.approx(
            sum(len(rouge_score_tokenize.tokenize(r[field], None)) for r in rows) / len(rows), rel=1e-12)
    assert summary["examples"] == len(chats) and summary["model"].endswith("model") and summary["dtype"] == "fp32"
    used = json.loads((_eval_env["ref"] / "summary.json").read_text())["decode_slot_utilization"]
    assert 0 < used <= 1 and f"decode slot utilization {used:.1%}" in _eval_env["stdout"]
    table = _eval_env["stdout"]
    assert "R-1" in table and "R-L" in table and "stemmed" in table
    assert f"{100 * summary['rouge']['rougeL']:.2f}" in table


def test_eval_cli_replies_match_model_generate(_eval_env):
    """Each reply is what model.generate gives for data.encode_prompt alone, up to the first stop token."""
    root = _eval_env["root"]
    rows, _ = _eval_read(_eval_env["ref"])
    tokenizer = data.load_tokenizer(root / "model")
    model = Qwen2.from_pretrained(root / "model", dtype=torch.float32)
    stops = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    for r, c in zip(rows, _eval_env["chats"]):
        prompt = data.encode_prompt(c["messages"], tokenizer)
        new = generate(model, torch.tensor([prompt]), max_new_tokens=24)[0, len(prompt):].tolist()
        end = next((k for k, t in enumerate(new) if t in stops), None)
        assert r["prediction"] == tokenizer.decode(new[:end], skip_special_tokens=True)
        assert r["finished"] == (end is not None)


def test_eval_cli_batched_equals_unbatched(_eval_env):
    _eval_run(_eval_env["root"], "bs1", "--batch-size", "1")
    assert _eval_read(_eval_env["root"] / "bs1") == _eval_read(_eval_env["ref"])


def test_eval_cli_two_processes_equal_one(_eval_env):
    run = _eval_run(_eval_env["root"], "two", "--batch-size", "4", torchrun=True)
    assert "rank 0 of 2" in run.stderr and "examples/s" in run.stderr and "ETA" in run.stderr  # the progress line
    assert _eval_read(_eval_env["root"] / "two") == _eval_read(_eval_env["ref"])


def test_eval_cli_sampling_is_seeded_per_prompt(_eval_env, tmp_path):
    """A sampled reply comes from its prompt's own seed (--seed and its index): the same from one process with 4 slots
    as from two processes with 3, whose slots take other prompts side by side; and not the greedy one."""
    root, args = _eval_env["root"], ["--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]
    model = ["--model", str(root / "random")]  # near-uniform over ~400 ids: sampled replies are not the greedy ones
    main([*model, "--data", str(root / "test.jsonl"), "--max-new-tokens", "24", "--out", str(tmp_path / "one"),
          "--batch-size", "4", *args])
    _eval_run(root, tmp_path / "two", "--batch-size", "3", *args, *model, torchrun=True)
    _eval_run(root, tmp_path / "greedy", "--batch-size", "4", *model)
    assert _eval_read(tmp_path / "one") == _eval_read(tmp_path / "two")
    assert [r["prediction"] for r in _eval_read(tmp_path / "one")[0]] != \
        [r["prediction"] for r in _eval_read(tmp_path / "greedy")[0]]


def test_eval_cli_resumes_after_a_crash(_eval_env, tmp_path, capsys):
    """A run killed (SIGKILL) just after its 5th reply reached the disk, in the middle of writing its 6th, and run again
    with the same command, reuses the 5, makes the cut one again, and ends with predictions.jsonl and SeqKD data
    byte for byte those of an uninterrupted run, and the same summary.json but for the measured utilization."""
    root, out = _eval_env["root"], tmp_path / "out"
    args = ["--model", str(root / "model"), "--data", str(root / "test.jsonl"), "--max-new-tokens", "24",
            "--batch-size", "4", "--out", str(out), "--write-data", str(tmp_path / "seqkd.jsonl")]
    crash = ("import json, os, signal, sys, evaluate\n"
             "append, written = evaluate.append_reply, []\n"
             "def crashing(f, record):\n"
             "    if len(written) == 5:  # the 6th reply: half a line reaches the disk, then the process dies\n"
             "        f.write(json.dumps(record)[:30]); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
             "    append(f, record); written.append(record)\n"
             "evaluate.append_reply = crashing\n"
             "evaluate.main(sys.argv[1:])\n")
    run = subprocess.run([sys.executable, "-c", crash, *args], cwd=REPO, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == -signal.SIGKILL, run.stderr
    lines = (out / "replies" / "rank-0.jsonl").read_bytes().split(b"\n")
    assert len(lines) == 6 and lines[-1] and not (out / "predictions.jsonl").exists()  # 5 whole lines, a cut one
    rerun = _eval_run(root, out, *args[4:])
    assert f"reusing 5 of {len(_eval_env['chats'])} replies" in rerun.stdout
    for name in ("predictions.jsonl", "summary.json"):
        assert (out / name).exists()
    assert (out / "predictions.jsonl").read_bytes() == (_eval_env["ref"] / "predictions.jsonl").read_bytes()
    assert (tmp_path / "seqkd.jsonl").read_bytes() == (root / "seqkd.jsonl").read_bytes()
    assert _eval_read(out)[1] == _eval_read(_eval_env["ref"])[1]
    written = [json.loads(line) for line in (out / "replies" / "rank-0.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in written) == list(range(len(_eval_env["chats"])))  # each once, the cut one redone
    # run once more: every reply is reused, nothing decoded, and summary.json (utilization too) stays the same
    before = (out / "summary.json").read_bytes()
    main(args)
    again = capsys.readouterr()
    assert f"reusing {len(written)} of {len(written)} replies" in again.out and "examples/s" not in again.err
    assert (out / "summary.json").read_bytes() == before


def test_eval_cli_refuses_another_command_in_the_same_out(_eval_env, capsys):
    """The reference run's --out holds its replies: a command that would make other replies is refused, in one line
    naming what differs, before any work; one that only decodes differently (--batch-size) reuses them."""
    root, ref = _eval_env["root"], _eval_env["ref"]
    args = ["--model", str(root / "model"), "--data", str(root / "test.jsonl"), "--max-new-tokens", "24",
            "--out", str(ref)]
    before = {p: p.read_bytes() for p in ref.rglob("*") if p.is_file()}
    for extra, why in ((["--temperature", "0.5"], "--temperature 0.0, not 0.5"),
                       (["--max-new-tokens", "12"], "--max-new-tokens 24, not 12"),
                       (["--seed", "1"], "--seed 0, not 1"), (["--max-examples", "3"], "--max-examples None, not 3"),
                       (["--dtype", "bf16"], "--dtype fp32, not bf16")):
        with pytest.raises(SystemExit) as e:
            main(args + extra)
        assert re.fullmatch(f"error: {re.escape(str(ref / 'replies'))} holds replies made with {why}: give another "
                            f"--out, or delete .* to start again", str(e.value)), str(e.value)
    with pytest.raises(SystemExit, match=r"^error: .* holds replies made with --model .*/model, not .*/random: give"):
        main([*args, "--model", str(root / "random")])
    assert {p: p.read_bytes() for p in ref.rglob("*") if p.is_file()} == before
    main([*args, "--batch-size", "7", "--out", str(ref)])  # the same replies: all reused, the same files
    assert "reusing" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in ref.rglob("*") if p.is_file()} == before


def test_eval_cli_scores_saved_predictions(_eval_env, tmp_path):
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--predictions", str(_eval_env["ref"] /
                    "predictions.jsonl"), "--out", str(tmp_path / "rescored")], check=True, capture_output=True)
    (rows, summary), (ref_rows, ref_summary) = _eval_read(tmp_path / "rescored"), _eval_read(_eval_env["ref"])
    assert rows == ref_rows
    assert {k: summary[k] for k in ("rouge", "rouge_stemmed", "examples", "mean_prediction_tokens")} == \
        {k: ref_summary[k] for k in ("rouge", "rouge_stemmed", "examples", "mean_prediction_tokens")}
    # another system's outputs, without ids: FACTS.md's worked example
    (tmp_path / "other.jsonl").write_text(
        json.dumps({"prediction": "The quick brown dog jumps on the log.",
                    "reference": "The quick brown fox jumps over the lazy dog"}) + "\n\n"
        + json.dumps({"id": 7, "prediction": "run running", "reference": "running runs ran"}) + "\n")
    main(["--predictions", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "other")])
    rows, summary = _eval_read(tmp_path / "other")
    assert [r["id"] for r in rows] == ["other.jsonl:1", "7"]
    assert [round(r["scores"]["rouge1"], 6) for r in rows] == [0.705882, 0.4]
    assert [round(r["scores"]["rouge1_stemmed"], 6) for r in rows] == [0.705882, 0.8]
    assert summary["rouge_stemmed"]["rouge1"] == pytest.approx((12 / 17 + 0.8) / 2, rel=1e-15)


def test_eval_cli_write_data_loads_for_training(_eval_env):
    rows, _ = _eval_read(_eval_env["ref"])
    finished = [(r, c) for r, c in zip(rows, _eval_env["chats"]) if r["finished"]]
    assert finished and f"left out {len(rows) - len(finished)} of {len(rows)}" in _eval_env["stdout"]
    written = data.load_rows(_eval_env["root"] / "seqkd.jsonl")
    assert [w["id"] for w in written] == [c["id"] for _, c in finished]
    for w, (r, c) in zip(written, finished):
        last = max(i for i, m in enumerate(c["messages"]) if m["role"] == "assistant")
        assert w["messages"] == [*c["messages"][:last], {"role": "assistant", "content": r["prediction"]},
                                 *c["messages"][last + 1:]]
    # and it can be scored and trained on like any data: its prompts are the original prompts
    tokenizer = data.load_tokenizer(_eval_env["root"] / "model")
    assert data.build_examples(written, tokenizer)
    assert [data.encode_prompt(w["messages"], tokenizer) for w in written] == \
        [data.encode_prompt(c["messages"], tokenizer) for _, c in finished]


def test_eval_write_data_leaves_out_replies_cut_at_max_new_tokens(tmp_path, capsys):
    """A reply cut at --max-new-tokens would teach the student to close its reply (the supervised <|im_end|>) in the
    middle of a solution, so SeqKD data keeps finished replies only. Only the last reply is the model's."""
    chats = [[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
              {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
             [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}],
             [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"},
              {"role": "user", "content": "thanks"}]]
    examples = [{"id": f"c{k}", "messages": m, "last": max(i for i, t in enumerate(m) if t["role"] == "assistant")}
                for k, m in enumerate(chats)]
    records = [{"messages": ex["messages"][:ex["last"]], "prediction": f"model {k}", "finished": k != 1}
               for k, ex in enumerate(examples)]
    write_seqkd_data(tmp_path / "seqkd.jsonl", examples, records)
    assert "left out 1 of 3 replies cut at --max-new-tokens" in capsys.readouterr().out
    assert data.load_rows(tmp_path / "seqkd.jsonl") == [
        {"id": "c0", "messages": [chats[0][0], {**chats[0][1], "weight": 0}, chats[0][2],
                                  {"role": "assistant", "content": "model 0"}]},
        {"id": "c2", "messages": [chats[2][0], {"role": "assistant", "content": "model 2"}, chats[2][2]]}]
    with pytest.raises(SystemExit, match="all 3 replies were cut at --max-new-tokens"):  # not an empty training set
        write_seqkd_data(tmp_path / "none.jsonl", examples, [{**r, "finished": False} for r in records])
    assert not (tmp_path / "none.jsonl").exists()


def test_eval_cli_reports_the_rouge_ceiling(_eval_env):
    """summary.json carries what a perfect reply could score under --max-new-tokens: each reference cut there, against
    itself (stemmed). The fitted model's replies are those cut references, so the ceiling is its own score, and
    rouge-score gives it; a reference that fits whole scores 1."""
    rows, summary = _eval_read(_eval_env["ref"])
    tok = data.load_tokenizer(_eval_env["root"] / "model")
    assert summary["ceiling_stemmed"] == summary["rouge_stemmed"]
    cut = [_eval_scorer(True).score(r["reference"], _eval_fitted_reply(tok, r["reference"])[0]) for r in rows]
    assert all(c["rougeL"].fmeasure == 1.0 for c, r in zip(cut, rows) if r["finished"])
    assert summary["ceiling_stemmed"] == pytest.approx({k: sum(c[k].fmeasure for c in cut) / len(cut)
                                                        for k in ("rouge1", "rouge2", "rougeL")}, rel=1e-12)
    assert summary["ceiling_stemmed"]["rouge1"] < 0.95  # the long references do not fit in 24 tokens
    assert evaluate.rouge_ceiling([r["reference"] for r in rows], tok, 1000)["rougeL"] == 1.0
    assert "ceiling" in _eval_env["stdout"]
    # a cut inside a word, where stemming decides: a reference whose last token is a plural's "s", cut before it,
    # still matches in full
    refs = [f"Ava counts the {word}" for word in ("books", "meters", "parts", "starts", "stamps")]
    ref = next((r for r in refs if tok.decode(tok.encode(r, add_special_tokens=False).ids[-1:]) == "s"), None)
    assert ref, "none of these words ends in a lone 's' token under the toy tokenizer: pick others"
    n = len(tok.encode(ref, add_special_tokens=False).ids) - 1
    assert evaluate.rouge_ceiling([ref], tok, n) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_eval_prompts_keep_the_system_prompt_and_the_last_user_turn(_data_toy, tmp_path, capsys):
    tok = _data_toy[1]
    chat = [_data_u("system", "Be brief."), _data_u("user", "first question " * 20), _data_u("assistant", "a1 " * 20),
            _data_u("user", "second question"), _data_u("assistant", "a2"), _data_u("user", "last question"),
            _data_u("assistant", "the reply")]
    whole = data.encode_prompt(chat, tok)
    assert evaluate.prompt_within(chat, tok, len(whole)) == (chat[:6], whole)
    kept, ids = evaluate.prompt_within(chat, tok, len(whole) - 1)  # the oldest exchange goes, whole
    assert kept == [chat[0], *chat[3:6]] and ids == data.encode_prompt(kept + [chat[6]], tok)
    smallest = data.encode_prompt([chat[0], chat[5], chat[6]], tok)
    assert evaluate.prompt_within(chat, tok, len(smallest))[0] == [chat[0], chat[5]]
    assert evaluate.prompt_within(chat, tok, len(smallest) - 1) == (None, None)
    # through the CLI: the count is reported, and the rows that cannot fit are left out
    short = [_data_u("system", "Hi."), _data_u("user", "q"), _data_u("assistant", "a")]
    rows = [{"id": "long", "messages": chat}, {"id": "short", "messages": short}]
    path = _data_write_jsonl(tmp_path / "chats.jsonl", rows)
    args = evaluate.get_args(["--model", "m", "--data", str(path), "--max-prompt-len", str(len(smallest) - 1)])
    assert [e["id"] for e in evaluate.load_examples(args, tok)] == ["short"]
    assert "cut 1 of 2 prompts to their latest turns, and left out the 1 whose" in capsys.readouterr().out
    args = evaluate.get_args(["--model", "m", "--data", str(path), "--max-prompt-len", str(len(whole) - 1)])
    examples = evaluate.load_examples(args, tok)
    assert [e["context"] for e in examples] == [kept, short[:2]]


def test_eval_seqkd_data_supervises_only_the_teachers_words(_data_toy, tmp_path, capsys):
    """On multi-turn chats the earlier replies are gold text: SeqKD data keeps them as context ("weight": 0), so every
    supervised token of it comes from the model's replies (and their <|im_end|>), none from a gold one."""
    tok = _data_toy[1]
    gold = ["Gold reply one, 7 + 5 = 12.", "Gold reply two: carry the 1.", "Gold three."]
    chats = [[_data_u("user", "q1"), _data_u("assistant", gold[0]), _data_u("user", "q2"),
              _data_u("assistant", gold[1]), _data_u("user", "q3"), _data_u("assistant", gold[2])],
             [_data_u("system", "Be brief."), _data_u("user", "q"), _data_u("assistant", gold[0]),
              _data_u("user", "and?"), _data_u("assistant", gold[1])]]
    examples = [{"id": f"c{k}", "messages": m, "last": data.last_reply(m)} for k, m in enumerate(chats)]
    teacher = ["Teacher says 9 x 9 = 81.", "Teacher: the sum is 40."]
    records = [{"messages": ex["messages"][:ex["last"]], "prediction": t, "finished": True}
               for ex, t in zip(examples, teacher)]
    write_seqkd_data(tmp_path / "seqkd.jsonl", examples, records)
    built = data.build_examples(data.load_rows(tmp_path / "seqkd.jsonl"), tok)
    for ex, reply in zip(built, teacher):
        supervised = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
        assert tok.decode(supervised, skip_special_tokens=False) == reply + "<|im_end|>"
    # the same chats as data (SFT) supervise every reply: the weight is what makes the difference
    sft = data.build_examples([{"id": "x", "messages": chats[0]}], tok)[0]
    assert tok.decode([t for t, label in zip(sft["input_ids"], sft["labels"]) if label != -100]) == "".join(gold)


def test_eval_predictions_read_back_with_unicode_line_breaks(tmp_path):
    """predictions.jsonl keeps U+2028, U+2029 and U+0085 raw (ensure_ascii=False); they are not line ends, so
    --predictions reads our own output back. Bytes that are not UTF-8 are an error, not silently replaced."""
    odd = "line\u2028sep para\u2029sep next\x85line"
    (tmp_path / "odd.jsonl").write_text(json.dumps({"id": "u", "prediction": odd, "reference": "line sep"},
                                                   ensure_ascii=False) + "\r\n", encoding="utf-8")
    main(["--predictions", str(tmp_path / "odd.jsonl"), "--out", str(tmp_path / "a")])
    assert "\u2028" in (tmp_path / "a" / "predictions.jsonl").read_text(encoding="utf-8")  # still raw
    main(["--predictions", str(tmp_path / "a" / "predictions.jsonl"), "--out", str(tmp_path / "b")])
    rows, _ = _eval_read(tmp_path / "b")
    assert rows == _eval_read(tmp_path / "a")[0] and rows[0]["prediction"] == odd
    (tmp_path / "bad.jsonl").write_bytes(json.dumps({"prediction": "x", "reference": "y"}).encode() + b"\n"
                                         + b'{"prediction": "caf\xe9", "reference": "y"}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: invalid UTF-8"):
        main(["--predictions", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_eval_cli_bad_input_fails_before_any_work(_eval_env, tmp_path):
    root, out = _eval_env["root"], tmp_path / "out"
    model_args = ["--model", str(root / "model"), "--out", str(out)]

    def fails(argv, pattern):
        with pytest.raises(SystemExit, match=pattern):
            main(argv)
        assert not out.exists()  # nothing was written: the error came first

    truncated = tmp_path / "truncated"  # a download cut short: one line naming the file, before any data is read
    shutil.copytree(root / "model", truncated)
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[:len(raw) - 100])
    fails(["--model", str(truncated), "--data", str(root / "test.jsonl"), "--out", str(out)],
          r"error: --model .*truncated: .*truncated/model\.safetensors is truncated or corrupt")
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        Qwen2.from_pretrained(truncated)
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(root / "model", no_tok)
    (no_tok / "tokenizer.json").unlink()
    fails(["--model", str(no_tok), "--data", str(root / "test.jsonl"), "--out", str(out)],
          r"error: --model .*no-tokenizer: no tokenizer\.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    fails([*model_args, "--data", str(tmp_path / "empty.jsonl")], r"error: .*empty\.jsonl: no usable rows")
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "Problem: 2 + 2 = 4."}) + "\n")
    fails([*model_args, "--data", str(tmp_path / "text.jsonl")], "none of its 1 rows is a conversation with an "
                                                                  "assistant turn")
    (tmp_path / "no-answer.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    fails([*model_args, "--data", str(tmp_path / "no-answer.jsonl")], r"no-answer\.jsonl:1: no assistant turn")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": "a", "prediction": "x", "reference": "y"}) + "\n"
                     + json.dumps({"id": "b", "prediction": "x"}) + "\n")
    fails(["--predictions", str(preds), "--out", str(out)], r"error: .*preds\.jsonl:2: missing field 'reference'")
    preds.write_text(json.dumps({"prediction": "x", "reference": "y"}) + "\n{not json\n")
    fails(["--predictions", str(preds), "--out", str(out)], r"preds\.jsonl:2: malformed JSON")
    fails(["--predictions", str(preds), *model_args], "--predictions scores saved replies")
    fails(["--predictions", str(preds), "--out", str(out), "--split", "test", "--max-new-tokens", "9"],
          "--predictions scores saved replies: it takes no --split, --max-new-tokens")
    folder = tmp_path / "folder"  # a folder without the default split, test_sft: the error shows how to name one
    folder.mkdir()
    shutil.copy(root / "test.jsonl", folder / "train.jsonl")
    fails([*model_args, "--data", str(folder)], r"split 'test_sft'.*pass --split, e\.g\. .*\[100000:101000\]")
    fails(["--model", str(root / "model")], "need --model and --data")
    fails([*model_args, "--data", str(root / "test.jsonl"), "--batch-size", "0"], "--batch-size must be at least 1")


# ---------------------------------------------------------------------------------------------------------------------
# diagnose.py: Delta-KD's target before any student trains; evaluate.py's scores beside ROUGE

@pytest.fixture(scope="module")
def _diag_env(_eval_env):
    """Three models on _eval_env's tokenizer and chats: its fitted model as the fine-tuned teacher, a copy with a
    little noise in every weight as the raw teacher (SFT moved it little), and one with more noise as the raw student,
    which has 5 lm_head rows past the tokenizer's ids, with weights large enough to take much of any softmax that
    counted them. Each model is right at some positions and wrong at others, and some positions are unmoved."""
    root = _eval_env["root"]
    generator = torch.Generator().manual_seed(0)

    def noisy(model, scale, name):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * scale * p.abs().mean())
        model.save_pretrained(root / name, tokenizer_dir=root / "tok")
        return root / name

    teacher = Qwen2.from_pretrained(root / "model", torch.float32)
    V = teacher.config.vocab_size
    student = Qwen2(Qwen2Config(**{**vars(teacher.config), "vocab_size": V + 5}))
    with torch.no_grad():
        for p, q in zip(student.parameters(), teacher.parameters()):
            p[:len(q)] = q
        student.model.embed_tokens.weight[V:] = 10 * torch.randn(5, teacher.config.hidden_size, generator=generator)
    return {"root": root, "chats": _eval_env["chats"], "t_ft": root / "model",
            "s_raw": noisy(student, 0.3, "s-raw"), "t_raw": noisy(teacher, 0.1, "t-raw")}


def _diag_run(env, out, teacher_raw=None, torchrun=False, alphas="0,0.5,1"):
    argv = ["--model", str(env["s_raw"]), "--teacher", str(env["t_ft"]), "--teacher-raw",
            str(teacher_raw or env["t_raw"]), "--data", str(env["root"] / "test.jsonl"), "--alphas", alphas,
            "--micro-batch-size", "3", "--out", str(out)]
    if torchrun:
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(REPO / "diagnose.py"), *argv], cwd=REPO, capture_output=True, text=True,
                             timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    else:
        diagnose.main(argv)
    return json.loads((out / "diagnose.json").read_text())


def _diag_oracle(env, alphas):
    """diagnose.json's numbers in float64, one chat at a time, from the paper's formulas in probability space: each
    pi a softmax over the tokenizer's ids, pi* = pi_t_ft * (pi_s_raw / pi_t_raw) ** alpha / Z."""
    tokenizer = data.load_tokenizer(env["t_ft"])
    V = tokenizer.get_vocab_size(with_added_tokens=True)
    models = {k: Qwen2.from_pretrained(env[k], torch.float64) for k in ("t_ft", "t_raw", "s_raw")}
    p, gold, classes, logits = {k: [] for k in models}, [], [], {k: [] for k in models}
    for chat in env["chats"]:
        ex = data.encode_chat(chat["messages"], tokenizer)
        keep = torch.tensor(ex["labels"][1:]) != -100  # logits at i predict the token at i + 1
        gold.append(torch.tensor(ex["labels"][1:])[keep])
        classes.append(torch.from_numpy(diagnose.token_classes(chat["messages"], tokenizer)[1:]).long()[keep])
        with torch.no_grad():
            for k, m in models.items():
                logits[k].append(m(torch.tensor([ex["input_ids"]]))[0, :-1][keep])
                p[k].append(torch.softmax(logits[k][-1][:, :V], -1))
    p, logits = {k: torch.cat(v) for k, v in p.items()}, {k: torch.cat(v) for k, v in logits.items()}
    gold, classes = torch.cat(gold), torch.cat(classes)
    def kl(a, b):
        return (a * (a / b).log()).sum(-1)
    right = {k: v.argmax(-1) == gold for k, v in p.items()}
    unmoved = kl(p["t_ft"], p["t_raw"]) < 0.01
    student_only = right["t_ft"] & right["t_raw"] & ~right["s_raw"]
    stars = [p["t_ft"] * (p["s_raw"] / p["t_raw"]) ** a for a in alphas]
    stars = [s / s.sum(-1, keepdim=True) for s in stars]

    def summary(mask):
        n, only = mask.sum().item(), (mask & student_only).sum().item()
        def mean(x):
            return x[mask].sum().item() / n if n else None
        return {"positions": n, "accuracy": {k: mean(v.double()) for k, v in right.items()},
                "unmoved_share": mean(unmoved.double()), "raw_student_only_errors": mean(student_only.double()),
                "alphas": [{"alpha": a, "accuracy": mean((s.argmax(-1) == gold).double()),
                            "kl_to_teacher": mean(kl(s, p["t_ft"])), "kl_to_raw_student": mean(kl(s, p["s_raw"])),
                            "accuracy_on_raw_student_only_errors":
                                ((s.argmax(-1) == gold) & mask & student_only).sum().item() / only if only else None,
                            "fixes": mean((~right["t_ft"] & (s.argmax(-1) == gold)).double()),
                            "breaks": mean((right["t_ft"] & (s.argmax(-1) != gold)).double())}
                           for a, s in zip(alphas, stars)]}
    everything = torch.ones_like(unmoved)
    tails = [{k: s.sort(-1, descending=True).values[:, k:].sum(-1) for k in diagnose.TAIL_K} for s in stars]
    return (summary(everything), summary(unmoved), {k: summary(classes == i) for i, k in enumerate(diagnose.CLASSES)},
            logits, gold, tails)


def _diag_flat(record, path=""):
    """{"alphas/1/kl_to_teacher": value, ...}: a nested record as one flat dict, for pytest.approx."""
    items = record.items() if isinstance(record, dict) else enumerate(record) if isinstance(record, list) else None
    if items is None:
        return {path: record}
    return {k: v for key, value in items for k, v in _diag_flat(value, f"{path}/{key}").items()}


def _diag_same(got, want, rel=2e-5):
    """Counts and shares exactly (fp32 and float64 agree on every argmax here), the KL values to rel."""
    got, want = _diag_flat({k: got[k] for k in want}), _diag_flat(want)
    def split(flat, kl):
        return {k: v for k, v in flat.items() if ("kl" in k) == kl}
    assert split(got, False) == split(want, False)
    assert split(got, True) == pytest.approx(split(want, True), rel=rel, abs=rel / 10)


def test_diagnose_matches_float64_formulas_and_the_loss(_diag_env, tmp_path, capsys):
    alphas = [0.0, 0.5, 1.0]
    got = _diag_run(_diag_env, tmp_path / "d")
    everything, unmoved, classes, logits, gold, tails = _diag_oracle(_diag_env, alphas)
    _diag_same(got, everything)
    # pi*'s mass outside its top k: each median and 99th percentile is the upper edge of the 1.05-wide bin that the
    # float64 order statistic falls in
    for record, oracle in zip(got["tail_mass"], tails):
        for k, masses in oracle.items():
            for q, p in (("median", 0.5), ("p99", 0.99)):
                truth, edge = masses.sort().values[math.ceil(p * len(masses)) - 1].item(), record[str(k)][q]
                assert (truth < 1e-12) if edge == 0 else (edge / 1.06 < truth <= edge * 1.01), (k, q, truth, edge)
    _diag_same(got["unmoved"], unmoved)
    for name, want in classes.items():
        _diag_same(got["classes"][name], want)
    assert sum(c["share"] for c in got["classes"].values()) == pytest.approx(1)
    # a case that tells the identity apart from its absence: most positions unmoved, raw-student-only errors, and
    # pi* at alpha = 1 far from the teacher there and close to the raw student
    assert 0.5 < got["unmoved_share"] < 1 and got["raw_student_only_errors"] > 0.05
    assert got["unmoved"]["alphas"][-1]["kl_to_raw_student"] < 0.2 * got["unmoved"]["alphas"][-1]["kl_to_teacher"]
    # pi* is the loss's own target: the KD term of delta_kd_loss, with the teacher or the raw student as the
    # "student", is the KL the diagnostic reports
    V = data.load_tokenizer(_diag_env["t_ft"]).get_vocab_size(with_added_tokens=True)
    for a, record in zip(alphas, got["alphas"]):
        for key, student in (("kl_to_teacher", "t_ft"), ("kl_to_raw_student", "s_raw")):
            _, parts = delta_kd_loss(logits[student], gold, logits["t_ft"], logits["t_raw"], logits["s_raw"],
                                     alpha=a, lam=0.0, vocab_size=V, return_parts=True)
            assert record[key] == pytest.approx(parts["kd"].item(), rel=2e-5, abs=2e-6), (a, key)
    # the printout names its advice in plain words, and diagnose.md holds the same text
    text = capsys.readouterr().out
    assert "expect Delta-KD to inherit the raw student's mistakes there" in text
    assert (tmp_path / "d" / "diagnose.md").read_text() in text
    assert all(a["breaks"] > 0.01 for a in got["alphas"][1:])  # it can tell
    # fixes where the fine-tuned teacher errs (here it never does): the noisiest model as both teachers, so that pi*
    # at alpha = 1 is the fitted model in the raw student's place, right wherever that one is (whatever the rounding)
    swapped = {**_diag_env, "t_ft": _diag_env["s_raw"], "t_raw": _diag_env["s_raw"], "s_raw": _diag_env["t_ft"]}
    got = _diag_run(swapped, tmp_path / "swapped", alphas="0,0.5,1")
    _diag_same(got, _diag_oracle(swapped, alphas)[0])
    assert all(a["fixes"] > 0.01 for a in got["alphas"][1:])  # it can tell


def test_diagnose_identities_and_two_processes(_diag_env, tmp_path):
    """alpha = 0 gives the fine-tuned teacher; the teacher as its own raw model gives the raw student at alpha = 1;
    two processes, each with its share of the chats, give the same numbers as one."""
    one = _diag_run(_diag_env, tmp_path / "one")
    zero = one["alphas"][0]
    assert zero["alpha"] == 0 and zero["accuracy"] == one["accuracy"]["t_ft"]
    assert abs(zero["kl_to_teacher"]) < 1e-6 and zero["kl_to_raw_student"] > 0.1
    same = _diag_run(_diag_env, tmp_path / "same", teacher_raw=_diag_env["t_ft"])
    last = same["alphas"][-1]
    assert last["alpha"] == 1 and last["accuracy"] == same["accuracy"]["s_raw"] != same["accuracy"]["t_ft"]
    assert abs(last["kl_to_raw_student"]) < 1e-6 and last["kl_to_teacher"] > 0.1
    assert same["unmoved_share"] == 1 and same["raw_student_only_errors"] > 0  # s_raw wrong there, so pi* too
    hits = [a["accuracy_on_raw_student_only_errors"] for a in same["alphas"]]
    assert hits[0] == 1 and hits[-1] == 0  # pi* is t_ft, then s_raw
    two = _diag_run(_diag_env, tmp_path / "two", torchrun=True)
    _diag_same(two, one, rel=1e-9)


def test_diagnose_bad_arguments_fail_before_any_work(_diag_env, _data_toy, tmp_path, capsys):
    out = tmp_path / "out"
    models = ["--model", str(_diag_env["s_raw"]), "--teacher", str(_diag_env["t_ft"]),
              "--data", str(_diag_env["root"] / "test.jsonl"), "--out", str(out)]

    def fails(argv, pattern, cli=diagnose):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert re.search(pattern, f"{e.value} {capsys.readouterr().err}"), pattern
        assert not out.exists()

    fails(models, "the following arguments are required: --teacher-raw")
    raw = ["--teacher-raw", str(_diag_env["t_raw"])]
    fails([*models, *raw, "--max-new-tokens", "9"], "unrecognized arguments: --max-new-tokens 9")  # generates nothing
    fails([*models[:2], *models[4:], "--alphas", "0,1"], "unrecognized arguments: --alphas 0,1", cli=evaluate)
    fails([*models, *raw, "--micro-batch-size", "0"], "--micro-batch-size must be at least 1")
    fails([*models, *raw, "--alphas", "0,one"], "expected numbers separated by commas")
    other = tmp_path / "other-tokenizer"
    shutil.copytree(_diag_env["t_raw"], other)
    shutil.copy(_data_toy[0] / "tokenizer.json", other / "tokenizer.json")
    fails([*models, "--teacher-raw", str(other)], "--teacher-raw has a different tokenizer from --model's")


def test_diagnose_token_classes(_eval_env):
    """A digit makes a number; a word of the question, in however many pieces, is copied; another word is a word;
    the rest is format, special tokens included."""
    tokenizer = data.load_tokenizer(_eval_env["root"] / "tok")
    messages = [{"role": "user", "content": "Ava has 3 Zorblaxes. How many?"},
                {"role": "assistant", "content": "Ava has 13 zorblaxes, Quuxwerp!\nThe answer is \\boxed{13}."}]
    ex = data.encode_chat(messages, tokenizer)
    classes = diagnose.token_classes(messages, tokenizer)
    reply = [(tokenizer.decode([t], skip_special_tokens=False), list(diagnose.CLASSES)[c])
             for t, label, c in zip(ex["input_ids"], ex["labels"], classes) if label != -100]
    assert "".join(text for text, _ in reply) == messages[1]["content"] + "<|im_end|>"
    pieces = {"copied": "Ava has zorblaxes", "word": "Quuxwerp The answer is boxed", "number": "13"}
    for text, name in reply:
        if name == "format":
            assert text == "<|im_end|>" or set(text) <= set(" ,!\n.\\{}"), text
        else:
            assert text.strip() in pieces[name], (text, name)
    assert sum(name == "copied" for _, name in reply) > 3  # "zorblaxes" comes in pieces, each copied
    # --mark: the tokens of its first group are "marked", whatever else they are; the rest keep their class
    marked = diagnose.token_classes(messages, tokenizer, re.compile(r"has (\d+) zorblaxes"))
    spans = [(s, e) for s, e in tokenizer.encode(data.render_chat(messages), add_special_tokens=False).offsets]
    text = data.render_chat(messages)
    start = text.index("Ava has 13") + len("Ava has ")
    assert [text[s:e] for (s, e), c in zip(spans, marked) if c == len(diagnose.CLASSES)] == ["1", "3"]
    assert all(a == b for a, b, (s, e) in zip(classes, marked, spans) if not (s < start + 2 and start < e))


def test_eval_scores_beside_rouge():
    """The final \\boxed{} answer (nested braces, the last box, none or unclosed), R-L with numbers masked, and R-L of
    the numbers alone, each checked on a case where it differs from plain R-L."""
    assert evaluate.boxed_answer("so \\boxed{2} or rather \\boxed{ \\frac{1}{2} }.") == "\\frac{1}{2}"
    assert evaluate.boxed_answer("\\boxed{7") is None and evaluate.boxed_answer("7") is None
    ref = "Ava has 3 + 4 = 7 apples.\nThe answer is \\boxed{7}."
    wrong_number = evaluate.what_went_wrong("Ava has 3 + 4 = 8 apples.\nThe answer is \\boxed{8}.", ref)
    assert wrong_number["rougeL_numbers_masked"] == 1.0 and not wrong_number["boxed_correct"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert wrong_number["rougeL_numbers_only"] == scorer.score("3 4 7 7", "3 4 8 8")["rougeL"].fmeasure
    wrong_words = evaluate.what_went_wrong("Ben got 3 and 4, so 7 pears. Answer: \\boxed{ 7 }", ref)
    assert wrong_words["rougeL_numbers_only"] == 1.0 and wrong_words["boxed_correct"]
    stemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert wrong_words["rougeL_numbers_masked"] == stemmed.score("Ava has 0 + 0 = 0 apples.\nThe answer is \\boxed{0}.",
                                                                 "Ben got 0 and 0, so 0 pears. Answer: \\boxed{ 0 }"
                                                                 )["rougeL"].fmeasure < 1
    assert evaluate.what_went_wrong("no numbers", "none here") == {
        "rougeL_numbers_masked": 0.0, "rougeL_numbers_only": None, "boxed_correct": None}


# ---------------------------------------------------------------------------------------------------------------------
# reproduce.sh and README: the pipeline

def _repro(*args, env=None, timeout=60):
    result = subprocess.run(["bash", str(REPO / "reproduce.sh"), *args],
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHON": sys.executable, **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _repro_commands(stdout, script):
    """argv after `script` for every printed command that runs it (the launcher before it may be python or torchrun)."""
    commands = [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]
    return [argv[argv.index(script) + 1:] for argv in commands if script in argv]


def _repro_students(trains):
    """{(run name, seed): parsed train.py arguments} of the students: every run but the raw models and the teacher."""
    return {(Path(a.out).name, a.seed): a for a in trains
            if Path(a.out).name not in ("teacher-raw", "student-raw", "teacher-ft")}


TOY_STUDENTS = {"sft": ("sft", None, 0.0), "fkl": ("fkl", None, 0.0), "rkl": ("rkl", None, 0.0),  # (loss, alpha,
                "seqkd": ("sft", None, 0.0), "minillm": ("minillm", None, 0.0),  # on-policy): alpha for deltakd
                "deltakd": ("deltakd", 1.0, 0.0), "deltakd-alpha0": ("deltakd", 0.0, 0.0),
                "deltakd-onpolicy": ("deltakd", 1.0, 0.5)}
def _study_students(quick):
    """The study's students: the toy's, the alphas between 0 and 1 (one of them at --quick), the online check."""
    sweep = (0.5,) if quick else (0.25, 0.5, 0.75)
    return {**{k: v for k, v in TOY_STUDENTS.items() if k != "deltakd-alpha0"},
            **{f"deltakd-alpha{a}": ("deltakd", a, 0.0) for a in sweep}, "deltakd-online": ("deltakd", 1.0, 0.0)}


@pytest.mark.parametrize("args,env", [
    (["--dry-run"], {}),
    (["toy", "--quick", "--regime", "premise", "--dry-run"], {}),
    (["toy", "--regime", "student-knows", "--dry-run"], {}),
    (["study", "--dry-run"], {"SEEDS": "3"}),
    (["study", "--quick", "--regime=knowledge", "--dry-run"], {}),
    (["paper", "--dry-run"], {}),
    (["paper", "--dry-run"], {"DATASET": "openmath", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}),
])
def test_reproduce_dry_run_commands_parse(args, env):
    stdout = _repro(*args, env=env)
    runs = re.split(r"^# reproduce\.sh .*: writing to .*$", stdout, flags=re.M)[1:]  # a study runs every regime
    regimes = re.findall(r"^# reproduce\.sh toy, ([\w-]+) regime", stdout, flags=re.M)
    assert regimes == (["knowledge", "premise", "student-knows"] if args == ["study", "--dry-run"] else
                       [args[args.index("--regime") + 1]] if "--regime" in args else [] if "paper" in args else
                       ["knowledge"])
    for run, regime in itertools.zip_longest(runs, regimes):
        _repro_check_dry_run(run, args, env, regime)


def _repro_check_dry_run(stdout, args, env, regime):
    trains = [train.get_args(argv) for argv in _repro_commands(stdout, "train.py")]  # argparse exits on any error
    evals = [evaluate.get_args(argv) for argv in _repro_commands(stdout, "evaluate.py")]
    diagnoses = [diagnose.get_args(argv) for argv in _repro_commands(stdout, "diagnose.py")]
    caches = {a.out: a for a in map(targets.get_args, _repro_commands(stdout, "targets.py"))}
    students = _repro_students(trains)
    seeds = int(env.get("SEEDS", 2 if "--quick" in args else 5)) if "study" in args else 1
    expected = {(name, 0): how for name, how in TOY_STUDENTS.items()}
    if "study" in args:
        expected |= {(name, seed): how for name, how in _study_students("--quick" in args).items()
                     for seed in range(seeds)}

    def alpha(a):  # Delta-KD's, given or its cache's
        return None if a.loss != "deltakd" else caches[a.targets].alpha if a.targets else a.alpha
    assert {key: (a.loss, alpha(a), a.on_policy) for key, a in students.items()} == expected
    assert len(trains) == len(students) + (1 if "paper" in args else 3)  # each step printed once
    # the study and the paper: the off-policy FKL and Delta-KD students read one cache of pi* per alpha, made after
    # the teacher's SFT and before the first student, on the students' data; the online check and the rest do not
    cached = {key: a for key, a in students.items() if a.targets}
    assert {name for name, _ in cached} == ({"fkl", "deltakd", "deltakd-alpha0"} | (
        {name for name in _study_students("--quick" in args) if name.startswith("deltakd-alpha")}
        if "study" in args else set()) if "study" in args or "paper" in args else set())
    assert {a.targets for a in cached.values()} == set(caches)
    for (name, _), a in cached.items():
        made = caches[a.targets]
        assert (a.teacher, a.teacher_raw, made.top_k, made.temperature) == (None, None, 64, 1.0)
        assert [getattr(made, k) for k in targets.DATA_FLAGS] == [getattr(a, k) for k in targets.DATA_FLAGS]
        assert (made.model, made.teacher_raw) == ((None, None) if made.alpha == 0 else (a.model, students[
            "deltakd-onpolicy", 0].teacher_raw)) and Path(made.teacher).parent.name == "teacher-ft"
        assert stdout.index(f"--out {Path(made.teacher).parent}\n") < stdout.index(f"--out {made.out}\n") < \
            stdout.index(f"--out {a.out}\n")
    # one optimizer and one step budget for every student; MiniLLM's rollouts as its public script
    budget = {(a.max_steps, a.batch_size, a.lr, a.min_lr, a.warmup_steps, a.max_len) for a in students.values()}
    assert len(budget) == 1
    minillm = students["minillm", 0]
    assert (minillm.mix, minillm.reward_scale, minillm.ppo_epochs) == (0.2, 0.5, 4)
    assert minillm.num_rollouts == (256 if "paper" in args else 2 * minillm.batch_size)
    # the premise diagnostic after the teacher's SFT and before the first student, on the scored test data; in the
    # premise regime, first the gate: the raw teacher as both teachers, on the test problems in style A
    scored = [e for e in evals if not e.write_data]
    # and in a study, seed 0's FKL and Delta-KD students in the raw student's place, once they trained
    by_class = [e for e in diagnoses if Path(e.out).parent.name == "students-by-class"]
    diagnoses = [e for e in diagnoses if e not in by_class]
    assert [(e.model, e.teacher, e.teacher_raw, e.data, Path(e.out).name) for e in by_class] == \
        [(students[name, 0].out + "/final", diagnoses[-1].teacher, diagnoses[-1].teacher_raw, diagnoses[-1].data, name)
         for name in ("fkl", "deltakd") if "study" in args]
    assert all(stdout.index(f"--out {e.out}\n") > stdout.index(f"--out {students[name, 0].out}\n")
               for e, name in zip(by_class, ("fkl", "deltakd")))
    facts = [d for d in diagnoses if Path(d.out).name.startswith("gate-facts")]
    diagnoses = [d for d in diagnoses if d not in facts]
    assert len(diagnoses) == 1 + (regime == "premise")
    assert {d.mark.pattern if d.mark else None for d in (*diagnoses, *facts, *by_class)} == \
        {r"costs (\d+) dollars" if regime == "student-knows" else None}
    diag = diagnoses[-1]
    # the SFT students need no teacher: in the knowledge regime and the paper's run, they train before it is made
    first_student = min(stdout.index(f"--out {a.out}\n") for (name, _), a in students.items()
                        if name != "sft" or regime in ("premise", "student-knows"))
    raw = ("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B") if "paper" in args else \
        tuple(str(Path(students["sft", 0].out).parent / f"{who}-raw/final") for who in ("student", "teacher"))
    assert (diag.model, Path(diag.teacher).parent.name, diag.teacher_raw) == (raw[0], "teacher-ft", raw[1])
    assert (diag.data, diag.split, diag.holdout, diag.max_len, diag.max_examples) == \
        (scored[0].data, scored[0].split, scored[0].holdout, scored[0].max_len, scored[0].max_examples)
    assert stdout.index(f"--out {Path(diag.teacher).parent}\n") < stdout.index(f"--out {diag.out}\n") < \
        first_student
    if regime == "premise":
        gate = diagnoses[0]
        assert gate.teacher == gate.teacher_raw == diag.teacher_raw and gate.model == diag.model
        assert gate.data.endswith("test-style-a.jsonl") and gate.max_examples == diag.max_examples
        assert stdout.index(f"--out {gate.out}\n") < stdout.index("report.py") < stdout.index("teacher-ft") < \
            first_student and re.search(r"report\.py \S+ --gate 0\.02$" if "--quick" not in args else "--gate 1$",
                                        stdout, re.M)
        assert re.search(r"toy\.py .*--regime premise", stdout)
    if regime == "student-knows":  # the gate after the teacher's SFT: the three models, at the student-only prices
        assert [(Path(d.data).name, d.model, d.teacher, d.teacher_raw) for d in facts] == [
            (name, diag.model, diag.teacher, diag.teacher_raw) for name in ("test-facts.jsonl",
                                                                            "test-facts-style-a.jsonl")]
        assert stdout.index(f"--out {Path(diag.teacher).parent}\n") < stdout.index(f"--out {facts[-1].out}\n") < \
            stdout.index("report.py") < first_student
        assert re.search(r"report\.py \S+ --gate-facts " + (r"0\\,1$" if "--quick" in args else r"0\.8\\,0\.3$"),
                         stdout, re.M)
        runs = {Path(a.out).name: a for a in trains}
        assert (runs["teacher-raw"].data.endswith("corpus-teacher.jsonl"), runs["student-raw"].data.endswith(
            "corpus.jsonl"), runs["teacher-ft"].data.endswith("sft.jsonl")) == (True, True, True)
        assert all(a.data.endswith("train.jsonl") for (name, _), a in students.items() if name != "seqkd")
    else:
        assert not facts
    # the SeqKD answers, the teacher, the raw student, and every student once
    assert len(evals) == 1 + 2 + len(students)
    assert len({(e.data, e.split, e.holdout, e.max_len, e.max_new_tokens, e.max_examples) for e in scored}) == 1
    assert re.search(r"^\+ \S*python\S* report\.py \S+( --study|$)", stdout, re.M)
    if "paper" not in args:
        return
    assert all(line.startswith("+ torchrun") for line in stdout.splitlines()
               if "train.py" in line or "evaluate.py" in line or "diagnose.py" in line)
    seqkd_data = next(e for e in evals if e.write_data)
    seqkd = students["seqkd", 0]
    if env.get("DATASET") == "openmath":  # the hash-held-out problems are the test; no training run sees them
        assert {(a.split, a.holdout, a.drop_long, a.max_len, a.micro_batch_size)
                for a in trains if a is not seqkd} == {("cot", "train", True, 4096, 1)}
        assert {(e.split, e.holdout, e.max_len, e.max_new_tokens) for e in scored} == {("cot", "test", 4096, 4096)}
        assert (seqkd_data.split, seqkd_data.holdout, seqkd_data.max_len) == ("cot", "train", 4096)
    else:  # whole chats that fit in 2048 tokens, and every kept reference fits in the replies: a ceiling of 1
        assert {(a.drop_long, a.max_len) for a in trains} == {(True, 2048)}
        assert {(e.split, e.max_len, e.max_new_tokens) for e in scored} == {("test_sft", 2048, 2048)}
        assert (seqkd_data.split, seqkd_data.max_len) == ("train_sft", 2048)
    assert seqkd.data == seqkd_data.write_data and seqkd.drop_long


def test_reproduce_bad_arguments():
    for args in (["paper", "study"], ["--regime", "facts"], ["paper", "--regime", "premise"], ["--regime"]):
        result = subprocess.run(["bash", str(REPO / "reproduce.sh"), *args, "--dry-run"], capture_output=True,
                                text=True, env={**os.environ, "PYTHON": sys.executable})
        assert result.returncode == 2 and ("study" in result.stderr if "study" in args else
                                           "--regime is knowledge, premise or student-knows" in result.stderr), args


def _repro_table(path):  # the file's first table, which opens it
    return _rows(Path(path).read_text().split("\n\n")[0])


def _repro_table_after(path, words):  # the first table after `words`
    text = Path(path).read_text()
    return _rows(text[text.index(words):].split("\n\n")[1])


def _rows(table):  # a Markdown table's rows by their first cell
    rows = [line for line in table.splitlines() if "---" not in line]
    return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows[1:]}


def test_report_gates_pass_and_fail(tmp_path):
    """report.py's two gates on diagnose.json files as diagnose.py writes them: the premise regime's (the raw student
    within POINTS of the raw teacher) and the student-knows regime's (at the marked prices, the raw student right at
    least LEAST of the time, both teachers at most MOST); each exits 1, saying why, when its premise fails."""
    def gate(s_raw, t_raw, t_ft=None, folder="gate"):
        c = {"positions": 40, "examples": 8, "accuracy": {"s_raw": s_raw, "t_raw": t_raw, "t_ft": t_ft}}
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "diagnose.json").write_text(json.dumps({**c, "classes": {"marked": c}}))

    def report(*args):
        return subprocess.run([sys.executable, str(REPO / "report.py"), str(tmp_path), *args], capture_output=True,
                              text=True)
    gate(0.985, 1.0)
    assert report("--gate", "0.02").returncode == 0 and report("--gate", "0.01").returncode == 1
    assert "FAILED" in report("--gate", "0.01").stderr
    gate(0.9, 0.1, 0.2, "gate-facts")
    gate(0.95, 0.1, 0.1, "gate-facts-style-a")
    passed = report("--gate-facts", "0.8,0.3")
    assert passed.returncode == 0 and "| the SFT style (B) | 90.0% | 10.0% | 20.0% |" in passed.stdout
    assert "| the pre-training style (A) | 95.0% | 10.0% | 10.0% |" in passed.stdout
    for least, most in (("0.95", "0.3"), ("0.8", "0.15")):
        failed = report("--gate-facts", f"{least},{most}")
        assert failed.returncode == 1 and "The gate FAILED" in failed.stderr, (least, most)


def test_report_when_ranks_the_alphas_as_diagnostic_and_students_did(tmp_path):
    """report.py --when on two regimes' folders as the study leaves them: the diagnostic's numbers per alpha, the
    students' paired differences, both rankings of the alphas (FKL is alpha 0) and Kendall's tau between them."""
    def regime(name, pi, rl):  # pi*'s accuracy and the students' R-L by alpha
        (tmp_path / name / "diagnose").mkdir(parents=True)
        alphas = [{"alpha": a, "accuracy": pi[a], "fixes": max(pi[a] - pi[0], 0), "breaks": max(pi[0] - pi[a], 0)}
                  for a in (0, 0.25, 0.5, 0.75, 1)]
        (tmp_path / name / "diagnose" / "diagnose.json").write_text(json.dumps({
            "unmoved_share": 0.7, "raw_student_only_errors": 0.05, "accuracy": {"t_ft": pi[0]}, "alphas": alphas}))
        names = {0: "fkl", 0.25: "deltakd-alpha0.25", 0.5: "deltakd-alpha0.5", 0.75: "deltakd-alpha0.75", 1: "deltakd"}
        summary = {names[a]: {"rougeL": [rl[a], 0.01], **({} if a == 0 else {"rougeL_minus_fkl": [rl[a] - rl[0], 0.002],
                                                                                  "wins_vs_fkl": 3})} for a in rl}
        (tmp_path / name / "results.json").write_text(json.dumps({"summary": summary}))
        return tmp_path / name
    same = regime("toy-study-a", {0: 0.9, 0.25: 0.95, 0.5: 0.92, 0.75: 0.8, 1: 0.7},
                  {0: 0.5, 0.25: 0.6, 0.5: 0.55, 0.75: 0.4, 1: 0.3})
    reversed_ = regime("toy-study-b", {0: 0.9, 0.25: 0.8, 0.5: 0.7, 0.75: 0.6, 1: 0.5},
                       {0: 0.1, 0.25: 0.2, 0.5: 0.3, 0.75: 0.4, 1: 0.5})
    r = subprocess.run([sys.executable, str(REPO / "report.py"), str(same), str(reversed_), "--when",
                        str(tmp_path / "when.md")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "when.md").read_text()
    assert "| a | 70.0% | 5.0% | 90.0% | 5.0% / 0.0% (+5.0); 2.0% / 0.0% (+2.0); 0.0% / 10.0% (-10.0); " \
           "0.0% / 20.0% (-20.0) | 0.25 |" in text
    assert "| a | +0.1000 ± 0.0020 (3); +0.0500 ± 0.0020 (3); -0.1000 ± 0.0020 (3); -0.2000 ± 0.0020 (3) | " \
           "0.25 > 0.5 > 0 > 0.75 > 1 | 0.25 > 0.5 > 0 > 0.75 > 1 | +1.0 |" in text
    assert text.rstrip().endswith("| 1 > 0.75 > 0.5 > 0.25 > 0 | 0 > 0.25 > 0.5 > 0.75 > 1 | -1.0 |")
    assert subprocess.run([sys.executable, str(REPO / "report.py"), str(same), str(reversed_)],
                          capture_output=True, text=True).returncode == 2  # several folders only with --when


def test_reproduce_study_quick_end_to_end_reuses_and_repeats(tmp_path):
    """The student-knows regime's study at the size that checks the pipeline: data, pre-training, the teacher's SFT,
    the gate, the diagnostic, the caches of pi*, every student over two seeds, the tables; then a rerun. (The other
    regimes run the same steps but for their gates and data: test_report_gates_pass_and_fail and the dry runs.)"""
    out = tmp_path / "toy-study"
    env = {"OUT": str(out), "SEEDS": "2"}
    first = _repro("study", "--quick", "--regime", "student-knows", env=env, timeout=1200)
    # the gate passed before any student trained, and the diagnostic ran on the style-B test replies
    students = [line for line in first.splitlines() if line.startswith("+") and "train.py" in line
                and not re.search(r"--out \S+/(teacher-raw|student-raw|teacher-ft)$", line)]
    assert first.index("The gate passed") < first.index(students[0])
    gate, diagnosis = (json.loads((out / d / "diagnose.json").read_text()) for d in ("gate-facts", "diagnose"))
    assert gate["data"].endswith("test-facts.jsonl") and gate["models"]["t_ft"] != gate["models"]["t_raw"]
    assert gate["classes"]["marked"]["positions"] >= 6  # the prices that the eight test problems state
    assert set(diagnosis) >= {"positions", "accuracy", "unmoved_share", "raw_student_only_errors", "alphas",
                              "tail_mass"}
    assert [a["alpha"] for a in diagnosis["alphas"]] == [0, 0.25, 0.5, 0.75, 1]
    assert set(diagnosis["alphas"][0]) == {"alpha", "accuracy", "kl_to_teacher", "kl_to_raw_student",
                                           "accuracy_on_raw_student_only_errors", "fixes", "breaks"}
    # one cache of pi* per alpha, made once, every shard out
    for alpha in ("0", "0.5", "1"):
        made = json.loads((out / "targets" / f"alpha{alpha}" / "targets.json").read_text())
        assert made["alpha"] == float(alpha) and (out / "targets" / f"alpha{alpha}" / "complete.json").exists()
    # seed 0 as the toy's table: one run of each method, the same step budget for every student
    table = _repro_table(out / "results-seed0.md")
    assert list(table) == ["Teacher (SFT)", "Student (raw)", "SFT", "FKL", "RKL", "SeqKD", "MiniLLM", "Delta-KD",
                           "Delta-KD, alpha=0", "Delta-KD, on-policy (extension)", "Delta-KD, frozen models online"]
    for (method, (r1, r2, rl, *values, _)), name in zip(table.items(), ["teacher-ft", "student-raw", *TOY_STUDENTS,
                                                                        "deltakd-online"], strict=True):
        rows = [json.loads(line) for line in (out / "eval" / name / "predictions.jsonl").read_text().split("\n")
                if line]
        scores = [_eval_scorer(True).score(r["reference"], r["prediction"]) for r in rows]
        mean = [sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")]
        # rouge-score's, to 4 places (a tie like 0.04375 may round either way)
        assert [float(x) for x in (r1, r2, rl)] == pytest.approx(mean, abs=5e-5 + 1e-12), method
        assert len(values) == 3 and all(0.0 <= float(x) <= 1.0 for x in values), method
    steps = {row[-1] for name, row in table.items() if name not in ("Teacher (SFT)", "Student (raw)")}
    assert len(steps) == 1 and table["Student (raw)"][-1] == "0"
    notes = (out / "results-seed0.md").read_text()
    assert "pre-training (corpus) loss" in notes and "sampled replies in all" in notes
    assert "The gate, before any student trained" in notes and (out / "diagnose/diagnose.md").read_text() in notes
    # alpha = 0 is forward KL, bit for bit, read from the same cache: the same weights, so the same replies
    assert (out / "fkl/final/model.safetensors").read_bytes() == \
        (out / "deltakd-alpha0/final/model.safetensors").read_bytes()
    assert table["FKL"] == table["Delta-KD, alpha=0"]
    # the study: every method over both seeds, mean ± sd, paired against FKL
    results = json.loads((out / "results.json").read_text())
    assert {name: sorted(runs) for name, runs in results["runs"].items()} == {
        name: ["0", "1"] for name in _study_students(quick=True)}
    saved = json.loads((out / "eval/fkl/summary.json").read_text())
    assert results["runs"]["fkl"]["0"] == {**saved["rouge_stemmed"], "rougeL_numbers_masked":
                                           saved["rougeL_numbers_masked"], "rougeL_numbers_only":
                                           saved["rougeL_numbers_only"], "boxed_accuracy": saved["boxed_accuracy"]}
    rows = _repro_table(out / "results.md")
    assert "pre-training (corpus) loss" in (out / "results.md").read_text()
    by_class = _repro_table_after(out / "results.md", "Where the students err")
    assert list(by_class) == ["all", "number", "copied", "word", "format", "marked"]
    kinds = _repro_table_after(out / "results.md", "By the kind of test problem")
    assert list(kinds) == list(rows)[2:]
    assert all(len(row) == 12 for row in kinds.values()) and kinds["FKL"][1] == ""  # FKL's own difference: none
    assert re.search(r"Delta-KD from its cache minus Delta-KD with the frozen models online, paired by seed: R-L "
                     r"[-+]\d\.\d{4} ± \d\.\d{4}", (out / "results.md").read_text())
    diagnosis = json.loads((out / "diagnose/diagnose.json").read_text())
    for name, column in (("fkl", 4), ("deltakd", 5)):  # each student's accuracy, as its own diagnostic measured it
        measured = json.loads((out / "students-by-class" / name / "diagnose.json").read_text())
        assert by_class["all"][column] == f"{100 * measured['accuracy']['s_raw']:.1f}%"
        assert measured["positions"] == diagnosis["positions"]
    assert list(rows)[:2] == ["Teacher (SFT)", "Student (raw)"] and len(rows) == 2 + len(_study_students(quick=True))
    for name, (r1, r2, rl, diff, wins, masked, numbers, answer, steps) in list(rows.items())[2:]:
        assert all("±" in x for x in (r1, r2, rl, masked, numbers, answer)), name
        assert (diff, wins) == ("", "") if name == "FKL" else ("±" in diff and re.fullmatch(r"[0-2]/2", wins)), name
    try:
        import matplotlib  # noqa: F401
        assert all((out / png).stat().st_size > 0 for png in ("alpha.png", "curves.png", "diagnose.png"))
    except ImportError:
        assert "pip install matplotlib" in first
    times = json.loads((out / "times.json").read_text())
    assert set(times["stages"]) == {"data", "pre-training", "gate", "teacher SFT", "diagnostic", "targets",
                                    "students", "study"} and times["total"] > 0
    # A rerun reuses every finished step and writes the same tables; one run deleted is made again, bit for bit (FKL
    # of seed 1: it enters every paired difference).
    tables = {p: p.read_text() for p in (out / "results.md", out / "results-seed0.md", out / "results.json")}
    weights = (out / "seed1/fkl/final/model.safetensors").read_bytes()
    shutil.rmtree(out / "seed1/fkl")
    shutil.rmtree(out / "seed1/eval/fkl")
    again = _repro("study", "--quick", "--regime", "student-knows", env=env, timeout=300)
    assert [argv[-1] for argv in _repro_commands(again, "train.py")] == [str(out / "seed1/fkl")]
    assert [argv[-1] for argv in _repro_commands(again, "evaluate.py")] == [str(out / "seed1/eval/fkl")]
    assert (out / "seed1/fkl/final/model.safetensors").read_bytes() == weights
    assert {p: p.read_text() for p in tables} == tables
    assert not _repro_commands(again, "toy.py")
    assert (out / "results.md").read_text().split("\n\n")[0] in again  # printed again, as the first time
    # the default toy (no study) has no Delta-KD with its frozen models online: its table is the rest
    shutil.rmtree(out / "eval" / "deltakd-online")
    shutil.rmtree(out / "deltakd-online")
    toy = subprocess.run([sys.executable, str(REPO / "report.py"), str(out)], capture_output=True, text=True)
    assert toy.returncode == 0, toy.stderr
    assert list(_repro_table(out / "results.md")) == list(table)[:-1]
