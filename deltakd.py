"""The Delta-KD loss in plain PyTorch: copy this file alone, it imports nothing but torch.

Delta Knowledge Distillation, Cao et al. 2025, https://arxiv.org/abs/2509.14526. Four models take part: the
fine-tuned teacher t_ft, the same teacher before SFT t_raw, the student before training s_raw (a frozen copy of its
starting weights) and the student s being trained. Each pi below is softmax(logits / T) at temperature T.

In reading order: the derivation; delta_kd_loss_reference, the paper as plain autograd code and the specification;
delta_kd_target, the one definition of the target; topk_target, the target kept as its top k and a tail, for a trainer
that reads it from a cache instead of running the frozen models (the paper's decoupled inference); delta_kd_loss, the
same loss made for a 152k vocabulary (in chunks of positions, its gradient written by hand, no host sync), on the
models' logits or on a cached target, which the test suite pins to the reference and to float64 formulas.

Derivation (the numbers tag the lines of code that compute each step)
--------------------------------------------------------------------
(1) The paper's target distribution at one position:

        pi*(y) = pi_t_ft(y) * (pi_s_raw(y) / pi_t_raw(y)) ** alpha / Z,      Z = sum over y' of the numerator.

    The ratio pi_t_ft / pi_t_raw is the shift that the teacher's SFT produced; the student is asked to apply that
    shift to its own pretrained distribution instead of copying the teacher's absolute distribution.

(2) Take logs. Every log pi is a log_softmax of logits / T, computed in fp32:

        log pi*(y) = z(y) - log Z,    z(y) = log pi_t_ft(y) + alpha * (log pi_s_raw(y) - log pi_t_raw(y)).

(3) Z = sum_y exp(z(y)), so log Z = logsumexp(z), and log pi* = z - logsumexp(z) = log_softmax(z). Normalising is
    one more log_softmax. No ratio of probabilities is ever formed: two tiny probabilities underflow to 0 / 0 = NaN in
    bf16 or at a low temperature, while their log-difference stays exact.

    Where the temperature goes: each log pi differs from its logits / T by a per-position constant, which the final
    log_softmax removes, so pi* = softmax((t_ft + alpha * (s_raw - t_raw)) / T). Tempering each model, or tempering
    these "effective teacher logits" once, is the same thing.

(4) alpha = 0 gives pi* = pi_t_ft: standard KD from the fine-tuned teacher. alpha = 1 gives
    pi* ∝ pi_s_raw * (pi_t_ft / pi_t_raw): the raw student moved by the teacher's whole SFT shift. Values in between
    interpolate geometrically.

(5) The loss, averaged over the counted positions (labels != ignore_index), with q = softmax(s / T):

        L = lam * CE(softmax(s), y) + (1 - lam) * T^2 * KL(pi* || q)          divergence="fkl" (the paper's)
                                     (1 - lam) * T^2 * KL(q || pi*)           divergence="rkl"

    The SFT term is plain cross-entropy at temperature 1. lam = 1 is SFT, and alpha = 0 with "rkl" is reverse-KL KD:
    the paper's token-level baselines are this one function.

(6) The gradient with respect to the student's logits s, per position. From d log q(y) / d s_k = (δ_yk - q_k) / T:

        d KL(pi* || q) / d s = (q - pi*) / T,          d KL(q || pi*) / d s = q * (log q - log pi* - KL(q || pi*)) / T,
        d CE / d s = softmax(s) - onehot(y).

    For T well above the spread of the logits, q - pi* itself shrinks like 1 / T (Hinton et al. 2015), so the KD
    gradient shrinks like 1 / T^2; the factor T^2 keeps it on the scale of the CE gradient. With it, the forward-KL
    gradient is T * (q - pi*). (Below T = 1 the same factor weighs the KD term down.)

(7) Decoupled inference: the frozen models compute pi* once, and the trainer reads it. Kept per position: the k most
    likely ids K, their log pi*, and log r, r = pi*'s mass outside K (topk_target). The loss then compares k + 1
    outcomes, the k ids and the tail as one, whose mass is r under pi* and Q = sum over y not in K of q(y) under q:

        KL_k(pi* || q) = sum over y in K of pi*(y) log(pi*(y) / q(y))  +  r log(r / Q).

    That is KL(pi~ || q) for the dense pi~ that is pi* on K and gives the tail the student's own shape,
    pi~(y) = r q(y) / Q off K (its tail terms add up to r log(r / Q)). So the loss builds pi~ and runs (5) and (6)
    unchanged. Its gradient is still T (q - pi~): pi~ moves with s off K, but those terms sum to zero, as the
    log-probabilities' own do in (6).

(8) What the tail bucket costs, for "fkl". Normalise each tail to 1, pi*_t = pi* / r and q_t = q / Q off K. The chain
    rule of KL splits the exact loss's tail: sum off K of pi* log(pi* / q) = r log(r / Q) + r KL(pi*_t || q_t). So

        KL_k(pi* || q) = KL(pi* || q) - r KL(pi*_t || q_t)  <=  KL(pi* || q):

    the bucket never exceeds the exact KL, and the gap is r times the KL between the two tails. The gradient's error,
    T (pi* - pi~), is 0 on K and T (pi*(y) - r q(y) / Q) off it: in L1 at most T r |pi*_t - q_t|_1 <= 2 T r, and
    <= T r sqrt(2 KL(pi*_t || q_t)) (Pinsker), before the (1 - lam) / num_tokens that scale every position. At k = V,
    r = 0 and the loss is exact. With "rkl" the same buckets give KL_k(q || pi*) = KL(q || pi*) - Q KL(q_t || pi*_t):
    the gap is the student's tail mass Q times the reverse KL of the tails, and r does not bound it: a student that
    puts mass where pi*'s tail is tiny goes unpunished there. r is what a cache can report before training; Q is not,
    so "fkl", the paper's divergence, is the one whose cost the cache's tail mass bounds.

Masked logits. A -inf logit (a masked vocabulary row) means probability 0, and where pi_t_ft is 0, pi* is 0. In the
raw log-ratio, -inf becomes _LOG_ZERO, a finite value far below any real log-probability, so that 0 / 0 counts as
"no shift" instead of NaN; a raw model's 0 where pi_t_ft is not 0 makes the shift, and pi* there, overwhelming. So
pass the raw models' full logits: fill a top-k service's missing entries with a finite floor, not -inf. With "rkl",
student mass where pi* is 0 costs about 1e30: finite, and a sign that the target is wrong. A NaN anywhere stays NaN,
for the trainer to see.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_LOG_ZERO = -1e30  # stands in for log 0: finite, so -inf - -inf is not NaN and 0 * log 0 is 0, while NaN stays NaN


# ---------------------------------------------------------------------------------------------------------------------
# The paper as code

def delta_kd_loss_reference(student_logits, labels, teacher_logits=None, teacher_raw_logits=None,
                            student_raw_logits=None, alpha=1.0, temperature=1.0, lam=0.5, divergence="fkl",
                            ignore_index=-100):
    """(5) in plain autograd over full logits (..., V), every model's over the same V ids; logits[..., i] predicts
    labels[..., i]. The mean over the positions where labels != ignore_index. The teacher may be None at lam = 1, the
    raw models at alpha = 0. The specification: the test suite pins delta_kd_loss to it, values and gradients."""
    counted = labels != ignore_index
    s = student_logits[counted].to(torch.promote_types(student_logits.dtype, torch.float32))  # (N, V), fp32 at least
    sft = F.cross_entropy(s, labels[counted])  # (5) CE at T = 1, the mean over the N positions
    if lam == 1.0:
        return sft
    frozen = [None if x is None else x[counted].detach() for x in (teacher_logits, teacher_raw_logits,
                                                                   student_raw_logits)]
    log_p = delta_kd_target(*frozen, alpha, temperature)  # (3) log pi*, a constant
    log_q = F.log_softmax(s / temperature, dim=-1)  # (5) log q
    if divergence == "fkl":
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (5) KL(pi* || q) at each position
    else:
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # (5) KL(q || pi*) at each position
    return lam * sft + (1 - lam) * temperature ** 2 * kl.mean()  # (5)


def delta_kd_target(teacher_logits, teacher_raw_logits, student_raw_logits, alpha, temperature):
    """log pi* over the last dimension, in fp32 at least, from each frozen model's logits (..., V) over the same V
    ids: (2) and (3). At alpha = 0 the raw models take no part and may be None (pi* = pi_t_ft, renormalised). The one
    definition of the target: the losses, the diagnostic and the target cache all compute it here."""
    z = _log_probs(teacher_logits, temperature)  # (2) log pi_t_ft
    if alpha != 0:
        shift = _log_probs(student_raw_logits, temperature) - _log_probs(teacher_raw_logits, temperature)
        z = z + alpha * shift  # (2) z = log pi_t_ft + alpha * (log pi_s_raw - log pi_t_raw)
        del shift
    return F.log_softmax(z, dim=-1).clamp_(min=_LOG_ZERO)  # (3) log pi* = z - logsumexp(z)


def _log_probs(logits, temperature):
    """log softmax(logits / T) over the last dimension, in fp32 at least (float64 stays float64), -inf made finite."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1).clamp_(min=_LOG_ZERO)


# ---------------------------------------------------------------------------------------------------------------------
# The target written once (decoupled inference): pi*'s top k and one tail bucket, (7) and (8)

class TopK(NamedTuple):
    """pi* kept at N positions (7): the k most likely ids (N, k), their log pi* (N, k), and log_tail (N,), log r, the
    log of pi*'s mass outside them (_LOG_ZERO where every id is kept)."""
    ids: torch.Tensor
    log_probs: torch.Tensor
    log_tail: torch.Tensor


def topk_target(log_target, k):
    """(7) pi* kept as its k most likely ids, from log pi* (N, V) over the whole vocabulary: a TopK. k >= V keeps
    every id, and the loss on it is the loss on the full target."""
    log_probs, ids = log_target.topk(min(k, log_target.size(-1)), dim=-1)  # (N, k) each, the most likely first
    rest = log_target.scatter(-1, ids, float("-inf"))  # (N, V): the tail alone
    log_tail = torch.logsumexp(rest, dim=-1).clamp(min=_LOG_ZERO)  # its mass summed: 1 - kept would cancel near 1
    return TopK(ids, log_probs, log_tail)


def _bucket_target(log_q, ids, log_probs, log_tail):
    """(7) log pi~ (C, V) at a chunk of positions: log pi* at the kept ids, and off them the student's own shape with
    pi*'s tail mass, log r + log q - log Q."""
    kept = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, ids, True)
    log_Q = torch.logsumexp(log_q.masked_fill(kept, float("-inf")), dim=1, keepdim=True)  # (C, 1): the student's tail
    tail = log_q + (log_tail[:, None] - log_Q)  # r q / Q (where every id is kept, nothing of it is left below)
    return tail.scatter(1, ids, log_probs).clamp_(min=_LOG_ZERO)


# ---------------------------------------------------------------------------------------------------------------------
# The same loss, made for a 152k vocabulary
#
# The reference upcasts four (N, V) logits tensors and lets autograd keep what it needs: at 2048 positions and
# V = 152k, 18 times one bf16 logits tensor (bench.py loss). delta_kd_loss gives the same values and gradients
# (tested) with three changes, each explained where it is made:
# - positions go through in chunks, whose loss and gradient (6) are computed at once, into one gradient buffer;
# - each chunk's arithmetic is compiled into a few loops over the vocabulary (fused);
# - a trainer that knows the counted positions passes them, and nothing here makes the host wait for the device.
# It also takes vocab_size (Qwen's lm_heads have padding rows) and num_tokens (gradient accumulation, several
# processes): see its docstring.

@torch.compiler.disable  # a Python loop over chunks (and a data-dependent count without `positions`): no graph
def delta_kd_loss(student_logits, labels, teacher_logits=None, teacher_raw_logits=None, student_raw_logits=None,
                  alpha=1.0, temperature=1.0, lam=0.5, divergence="fkl", ignore_index=-100, vocab_size=None,
                  num_tokens=None, *, target=None, chunk_size=None, return_parts=False, positions=None, fused=None):
    """lam * CE + (1 - lam) * T^2 * KL(pi* || softmax(s / T)), summed over counted positions and divided by num_tokens.

    Logits are [..., V] and `labels` has the same leading shape; logits[..., i, :] predicts labels[..., i] (the caller
    has shifted), and positions where labels == ignore_index count for neither term. Only the student gets a gradient;
    the other logits are detached constants. teacher_logits may be None when lam = 1 (SFT), and the raw logits may be
    None when alpha = 0 (standard KD). divergence="rkl" puts KL(q || pi*) in place of KL(pi* || q).

    target: pi* read from a cache instead of computed from the frozen models' logits (pass none of those): a TopK at
    the counted positions, in the order of `positions` (or of labels' flat order), made by topk_target with this
    temperature. Its tail is one bucket, (7) and (8).

    vocab_size: every distribution is compared over the first vocab_size ids, by default the smallest last dimension.
    Qwen2.5-7B has 152064 rows in its lm_head and Qwen2.5-1.5B 151936, but the tokenizer has 151665 ids: the rows past
    it are padding that no text produces. Pass the tokenizer length. The SFT term uses the same ids.

    num_tokens divides the sum over positions, by default this call's count. Pass the global count of counted
    positions over every micro-batch of the optimizer step and every process: each call then returns its share, and
    the gradients summed over calls and processes equal those of the whole global batch in one piece (a mean of
    micro-batch means does not). DDP and FSDP average gradients over processes instead of summing them: there pass
    the global count / world size.

    Keywords: positions, the flat indices into labels' shape of the counted positions, spares the loss searching for
    them (see _DeltaKD): compute them where it costs nothing, from the labels on the host; with logits already cut to
    the counted positions, torch.arange(len(labels)). Out-of-range labels are then caught on the device. fused
    compiles each chunk (see _fused_chunk); by default at vocab_size >= _FUSED_MIN_VOCAB. chunk_size sets the
    positions per chunk (by default chunk_positions()). With return_parts=True the result is (loss, {"sft": ...,
    "kd": ...}), the two terms normalised like the loss, detached, for logging.
    """
    vocab = _checked_vocab(student_logits, labels, teacher_logits, teacher_raw_logits, student_raw_logits, alpha,
                           temperature, lam, divergence, vocab_size, positions, target)
    # the models that take part: none but the student at lam = 1, no raw models at alpha = 0
    t, t_raw, s_raw = (None if x is None else x.detach() for x in (teacher_logits, teacher_raw_logits,
                                                                     student_raw_logits))
    if lam == 1.0:
        t = target = None
    if t is None or alpha == 0.0:
        t_raw = s_raw = None
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad  # no gradient buffer in evaluation
    if fused is None:  # compiled code cannot run under a dispatch mode (FakeTensorMode, counters): those run eagerly
        fused = vocab >= _FUSED_MIN_VOCAB and not torch._C._len_torch_dispatch_stack()
    loss, sft, kd = _DeltaKD.apply(student_logits, labels, t, t_raw, s_raw, target, float(alpha), float(temperature),
                                   float(lam), divergence, ignore_index, vocab, num_tokens, chunk_size, need_grad,
                                   positions, fused)
    return (loss, {"sft": sft, "kd": kd}) if return_parts else loss


def _checked_vocab(student_logits, labels, teacher_logits, teacher_raw_logits, student_raw_logits, alpha,
                   temperature, lam, divergence, vocab_size, positions, target):
    """The ids compared, after checking every argument: a ValueError names the one that is wrong."""
    if divergence not in ("fkl", "rkl"):
        raise ValueError(f"divergence must be 'fkl' or 'rkl', got {divergence!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if target is not None and (teacher_logits is not None or teacher_raw_logits is not None or
                               student_raw_logits is not None):
        raise ValueError("target is pi* from a cache: pass it instead of the frozen models' logits, not beside them")
    if target is not None:
        if not isinstance(target, TopK) or target.ids.shape != target.log_probs.shape or target.ids.dim() != 2 or \
                target.log_tail.shape != target.ids.shape[:1]:
            raise ValueError("target must be a TopK of ids (N, k), log_probs (N, k) and log_tail (N,)")
        if positions is not None and len(positions) != len(target.ids):
            raise ValueError(f"target has {len(target.ids)} positions, `positions` {len(positions)}: one row each")
    elif teacher_logits is None and lam != 1.0:
        raise ValueError("teacher_logits is None: only lam=1 (pure SFT) needs no teacher")
    elif lam != 1.0 and alpha != 0.0 and (teacher_raw_logits is None or student_raw_logits is None):
        raise ValueError(f"alpha={alpha} needs teacher_raw_logits and student_raw_logits; pass alpha=0 for plain KD")
    logits = {"student_logits": student_logits, "teacher_logits": teacher_logits,
              "teacher_raw_logits": teacher_raw_logits, "student_raw_logits": student_raw_logits}
    logits = {name: x for name, x in logits.items() if x is not None}
    for name, x in logits.items():
        if x.shape[:-1] != labels.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; labels {tuple(labels.shape)} must match all but its "
                             "last dimension")
    vocab = min(x.shape[-1] for x in logits.values()) if vocab_size is None else vocab_size
    for name, x in logits.items():
        if x.shape[-1] < vocab:
            raise ValueError(f"vocab_size={vocab} but {name} has only {x.shape[-1]} entries in its last dimension")
    if positions is not None and (positions.dtype != torch.long or positions.dim() != 1):
        raise ValueError(f"positions must be a 1-D LongTensor of flat indices, got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    return vocab


# Memory. Upcasting the four logits of 2048 positions to fp32 with autograd keeps about 16 sizes of one bf16 logits
# tensor alive. Here each chunk of positions is upcast, its loss and its gradient (6) are computed at once, and the
# gradient is written into one buffer shaped like the student logits, which backward returns (fp32 for fp16 inputs,
# whose range is too small for it). The peak added is that buffer plus a few fp32 chunks. To go further, fuse the
# lm_head matmul into the loop (as Liger's fused linear cross-entropy does): take the student's hidden states and
# lm_head weight, compute each chunk's logits h @ W.T inside the loop, and accumulate dh = g @ W and dW += g.T @ h, so
# that the student's full logits never exist.
#
# The size of one fp32 (chunk, vocab) temporary, of which a handful are alive at once. On the CPU, below glibc's
# 32 MiB mmap threshold, so that each chunk reuses heap memory instead of faulting in fresh pages (4x faster here).
# On a GPU, larger: at V = 151,665 a 16 MiB chunk is 27 positions, about 4.5k kernel launches per 2 x 2048 tokens;
# 64 MiB is 110 positions, and the chunks stay well under the one logits tensor that the gradient buffer adds.
_CHUNK_BYTES = {"cpu": 16 * 2**20, "other": 64 * 2**20}
_FUSED_MIN_VOCAB = 32768  # fused=None compiles the chunks of real LLM vocabularies only (see _fused_chunk)


def chunk_positions(vocab, device):
    """Positions per chunk: as many fp32 rows of `vocab` entries as fit in _CHUNK_BYTES for the device, at least one."""
    return max(1, _CHUNK_BYTES["cpu" if device.type == "cpu" else "other"] // (4 * vocab))


def _chunk(s, t, t_raw, s_raw, target, y, real, alpha, T, lam, divergence, denom, grad_dtype):
    """The loss (5) and its gradient (6) at one chunk of positions: the rows (C, V) of each model's logits (None for
    a model that takes no part) or of a cached target (a TopK, or None), their labels y (C,), and `real`, 1 or (C,)
    with 0 at rows that only pad a compiled chunk. Returns the chunk's sums of CE and KL, and the gradient rows
    (C, V) divided by `denom`, in grad_dtype. Run eagerly, or compiled whole."""
    log_p = None if t is None else delta_kd_target(t, t_raw, s_raw, alpha, T)  # (3) log pi*
    log_q = _log_probs(s, T)  # (5) log q = log softmax(s / T)
    if target is not None:
        log_p = _bucket_target(log_q, *target)  # (7) log pi~: pi* on the kept ids, the tail in the student's shape
    log_q1 = log_q if T == 1.0 else _log_probs(s, 1.0)  # (5) SFT is at T = 1
    sft = -(log_q1.gather(1, y[:, None])[:, 0] * real).sum()  # (5) CE = -log softmax(s)[y]
    g = log_q1.exp()  # (6) d CE / d s = softmax(s) ...
    # (6) ... - onehot(y), as a select: compiled, it joins the loop that writes g (an indexed write made the compiler
    # keep g whole, 3x slower, and torch 2.13 on the CPU dropped it when the KL's sum came after)
    g = torch.where(torch.arange(g.size(1), device=g.device) == y[:, None], g - 1.0, g)
    g *= lam  # (5) lam * CE
    del log_q1

    kd = torch.zeros((), dtype=g.dtype, device=g.device)
    if log_p is not None:
        q = log_q.exp()  # (5) q = softmax(s / T)
        if divergence == "fkl":
            p = log_p.exp()  # (3) pi*
            kd = ((p * (log_p - log_q)).sum(-1) * real).sum()  # (5) KL(pi* || q) = sum pi* (log pi* - log q)
            g += (1 - lam) * T * (q - p)  # (6) T^2 * (q - pi*) / T
        else:
            log_ratio = log_q - log_p  # (5) log q - log pi*
            kl = (q * log_ratio).sum(-1, keepdim=True)  # (5) KL(q || pi*) at each position
            kd = (kl[:, 0] * real).sum()  # (5) summed over positions
            g += (1 - lam) * T * q * (log_ratio - kl)  # (6) T^2 * q * (log q - log pi* - KL) / T
    return sft, kd, (g / denom).to(grad_dtype)  # (5) the share of num_tokens


# Memory traffic. Eagerly, every step of _chunk reads and writes whole fp32 (chunk, vocab) tensors: about 80 passes
# over one such tensor per chunk (bench.py loss counts them from the aten ops), so the loss is bound by memory
# bandwidth, not by arithmetic. Compiled whole for one fixed shape (the last chunk padded with rows that count 0), its
# loops read each model's logits a few times and do every step's arithmetic there: about 10 passes, plus 8 around it
# for gathering the rows and writing the gradient. fused=None compiles from vocab_size 32,768 up, where compiling
# (7-25 s on a CPU, once per process and setting) is repaid in a few calls; a toy vocabulary's call takes
# milliseconds and stays eager. Compiled code cannot run under a dispatch mode (FakeTensorMode, bench.py's counters),
# so there the default is eager too.
_compiled_chunk = None


def _fused_chunk(*args):
    """_chunk compiled whole, made at the first call, since importing torch.compile alone takes seconds."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk, dynamic=False, fullgraph=True)
    return _compiled_chunk(*args)


def _filled(x, size):
    """x (m, ...) made `size` rows long with copies of its first row."""
    return torch.cat([x, x[:1].expand(size - len(x), *x.shape[1:])])


def _unflatten(flat, shape):
    """Flat indices into `shape` as one index tensor per dimension, by arithmetic: no search, no host sync."""
    out, stride = [], 1
    for size in reversed(shape):
        out.append(flat // stride % size)
        stride *= size
    return tuple(reversed(out))


class _DeltaKD(torch.autograd.Function):
    """Forward computes the loss and its gradient (6) chunk by chunk; backward hands the stored gradient over.
    The forward of an autograd.Function runs without gradient tracking, so the target carries none.

    Host syncs. Searching for the counted positions (labels != ignore_index) makes the host wait for the device: their
    number decides the shapes that follow, so on a GPU every queued kernel must finish first, and the next model's
    work starts on an idle device. A trainer that knows them passes `positions` (train.py takes them from the labels on
    the host, where they cost nothing); then nothing here waits: the labels are checked on the device
    (torch._assert_async), and backward scales the gradient on the device."""

    @staticmethod
    def forward(ctx, s, labels, t, t_raw, s_raw, target, alpha, T, lam, divergence, ignore_index, vocab, num_tokens,
                chunk, need_grad, positions, fused):
        if positions is None:  # searched for: the host waits for their count (on a GPU, for every queued kernel)
            counted = labels != ignore_index
            where = counted.nonzero(as_tuple=True)  # indices of the counted positions, one tensor per leading dim
            if where[0].numel() and not ((labels[counted] >= 0) & (labels[counted] < vocab)).all():
                raise ValueError(f"labels hold ids outside [0, vocab_size={vocab}) at counted positions")
        else:  # given: the count is their length, and the labels are checked on the device, without waiting
            where = _unflatten(positions, labels.shape)
            y = labels[where]
            torch._assert_async(((y >= 0) & (y < vocab)).all(),
                                f"labels hold ids outside [0, vocab_size={vocab}) at `positions`")
        n = where[0].numel()
        if target is not None and len(target.ids) != n:
            raise ValueError(f"target has {len(target.ids)} positions, labels count {n}: one row each")
        dtype = torch.promote_types(s.dtype, torch.float32)
        denom = num_tokens.to(s.device, dtype) if torch.is_tensor(num_tokens) else \
            torch.full((), float(n if num_tokens is None else num_tokens), dtype=dtype, device=s.device)
        denom = denom.where(denom > 0, 1.0)  # nothing counted anywhere: the sums are 0, and so is the loss
        # the gradient's dtype, except fp16, whose smallest values are too big for g / num_tokens
        grad = torch.zeros_like(s, dtype=dtype if s.dtype == torch.float16 else s.dtype) if need_grad else None
        sft_sum = torch.zeros((), dtype=dtype, device=s.device)
        kd_sum = torch.zeros((), dtype=dtype, device=s.device)
        chunk = chunk or chunk_positions(vocab, s.device)

        for start in range(0, n, chunk):
            rows = tuple(i[start:start + chunk] for i in where)
            m, padded, real = len(rows[0]), rows, 1.0
            part = None if target is None else TopK(*(x[start:start + chunk].to(s.device) for x in target))
            if fused:  # one compiled shape for every chunk: the last is padded with copies of its first row, worth 0
                padded = tuple(_filled(i, chunk) for i in rows)
                part = None if part is None else TopK(*(_filled(x, chunk) for x in part))
                real = (torch.arange(chunk, device=s.device) < m).to(dtype)
            sft, kd, g = (_fused_chunk if fused else _chunk)(
                *(None if x is None else x[padded][:, :vocab] for x in (s, t, t_raw, s_raw)), part,
                labels[padded].long(), real, alpha, T, lam, divergence, denom, dtype if grad is None else grad.dtype)
            sft_sum += sft
            kd_sum += kd
            if grad is not None:
                grad[rows + (slice(0, vocab),)] = g[:m]

        ctx.save_for_backward(grad)  # freed by autograd right after backward, unless the graph is retained
        ctx.input_dtype, ctx.first_grad_loss = s.dtype, None
        sft = sft_sum / denom
        kd = T * T * kd_sum / denom  # (5) T^2 * KL
        loss = lam * sft + (1 - lam) * kd  # (5) L = lam * SFT + (1 - lam) * T^2 * KL
        ctx.mark_non_differentiable(sft, kd)
        return loss, sft, kd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_sft, _grad_kd):
        # Backward multiplies the buffer in place by the gradient it receives and hands it over uncopied: a scaled
        # loss (lam * loss) costs no second buffer, and a plain loss.backward(), which passes exactly 1, changes nothing
        grad, = ctx.saved_tensors
        if grad is None:  # the student needs no gradient
            return (None,) * 17
        if ctx.first_grad_loss is None:  # scaled in place and handed over: no second buffer, no reading grad_loss
            ctx.first_grad_loss = grad_loss  # back to the host (x * 1 is exact, so a plain backward() changes nothing)
            grad.data.mul_(grad_loss)  # .data: the saved tensor's version stays, for a retained graph's next backward
        else:  # a retained graph's next backward: the buffer holds the first one's gradient, so scale a copy of it
            grad = grad * (grad_loss / ctx.first_grad_loss)
        return (grad.to(ctx.input_dtype),) + (None,) * 16
