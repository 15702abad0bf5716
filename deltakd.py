"""The Delta-KD loss: one pure function, copyable alone (it imports nothing but torch).

Delta Knowledge Distillation, Cao et al. 2025, https://arxiv.org/abs/2509.14526. Four models take part: the
fine-tuned teacher t_ft, the same teacher before SFT t_raw, the student before training s_raw (a frozen copy of its
starting weights) and the student s being trained. Each pi below is softmax(logits / T) at temperature T.

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

Vocabulary. All distributions are compared over the first `vocab_size` ids. Qwen2.5-7B has 152064 rows in its
lm_head and Qwen2.5-1.5B 151936, but the tokenizer has 151665 ids: the rows past it are padding that no text ever
produces. Pass the tokenizer length; the default is the smallest last dimension. The SFT term uses the same ids.

Normalisation. The sum over positions is divided by `num_tokens`. Pass the global count of counted positions over
every micro-batch of the optimizer step and every process: each call then returns its share, and the gradients summed
over calls and processes equal those of the whole global batch in one piece. A mean of micro-batch means does not.
DDP and FSDP average gradients over processes instead of summing them: pass num_tokens = global count / world size.

Masked logits. A -inf logit (a masked vocabulary row) means probability 0, and where pi_t_ft is 0, pi* is 0. In the
raw log-ratio, -inf becomes _LOG_ZERO, a finite value far below any real log-probability, so that 0 / 0 counts as
"no shift" instead of NaN; a raw model's 0 where pi_t_ft is not 0 makes the shift, and pi* there, overwhelming. So
pass the raw models' full logits: fill a top-k service's missing entries with a finite floor, not -inf. With "rkl",
student mass where pi* is 0 costs about 1e30: finite, and a sign that the target is wrong. A NaN anywhere stays NaN,
for the trainer to see.

Memory. The logits of a 152k vocabulary are the largest tensors of a KD step: 2048 positions in bf16 take 622 MB
each, and upcasting four of them to fp32 with autograd keeps about 16 such sizes alive. Here positions are processed
in chunks: each chunk is upcast, its loss and its gradient (6) are computed at once, and the gradient is written into
one buffer shaped like the student logits that backward returns (fp32 for fp16 inputs, whose range is too small for
it). The peak added is that buffer plus a few fp32 chunks. Backward multiplies the buffer in place by the gradient it
receives and hands it over uncopied: a scaled loss (lam * loss) costs no second buffer, and a plain loss.backward(),
which passes exactly 1, changes nothing. To go further, fuse the lm_head matmul into the loop (as Liger's fused
linear cross-entropy does): take the student's hidden states and lm_head weight, compute each chunk's logits h @ W.T
inside the loop, and accumulate dh = g @ W and dW += g.T @ h, so the student's full logits never exist.

Memory traffic. Eagerly, every step of a chunk reads and writes whole fp32 (chunk, vocab) tensors: about 80 passes
over one such tensor per chunk (bench.py loss counts them from the aten ops), so the loss is bound by memory
bandwidth, not by arithmetic. fused=True runs the same chunk function (_chunk) compiled whole, for one fixed shape
(the last chunk is padded with rows that count 0): its loops read each model's logits a few times and do every
step's arithmetic there, about 10 passes, plus 8 around it for gathering the rows and writing the gradient. It is
used by default from vocab_size 32,768 up, where compiling (7-25 s on a CPU, once per process and setting) is repaid
in a few calls; a toy vocabulary's call takes milliseconds and stays eager. Compiled code cannot run under a dispatch
mode (FakeTensorMode, bench.py's counters), so there the default is eager too.

Host syncs. Searching for the counted positions (labels != ignore_index) makes the host wait for the device: their
number decides the shapes that follow, so on a GPU every queued kernel must finish first, and the next model's work
starts on an idle device. A trainer that knows them passes `positions` (train.py takes them from the labels on the
host, where they cost nothing); then nothing here waits: the labels are checked on the device (torch._assert_async),
and backward scales the gradient on the device.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_LOG_ZERO = -1e30  # stands in for log 0: finite, so -inf - -inf is not NaN and 0 * log 0 is 0, while NaN stays NaN
# The size of one fp32 (chunk, vocab) temporary, of which a handful are alive at once. On the CPU, below glibc's
# 32 MiB mmap threshold, so that each chunk reuses heap memory instead of faulting in fresh pages (4x faster here).
# On a GPU, larger: at V = 151,665 a 16 MiB chunk is 27 positions, about 4.5k kernel launches per 2 x 2048 tokens;
# 64 MiB is 110 positions, and the chunks stay well under the one logits tensor that the gradient buffer adds.
_CHUNK_BYTES = {"cpu": 16 * 2**20, "other": 64 * 2**20}
_FUSED_MIN_VOCAB = 32768  # fused=None compiles the chunks of real LLM vocabularies only (see "Memory traffic")


def chunk_positions(vocab, device):
    """Positions per chunk: as many fp32 rows of `vocab` entries as fit in _CHUNK_BYTES for the device, at least one."""
    return max(1, _CHUNK_BYTES["cpu" if device.type == "cpu" else "other"] // (4 * vocab))


@torch.compiler.disable  # a Python loop over chunks (and a data-dependent count without `positions`): no graph
def delta_kd_loss(student_logits, labels, teacher_logits, teacher_raw_logits=None, student_raw_logits=None,
                  alpha=1.0, temperature=1.0, lam=0.5, divergence="fkl", ignore_index=-100, vocab_size=None,
                  num_tokens=None, *, chunk_size=None, return_parts=False, positions=None, fused=None):
    """lam * CE + (1 - lam) * T^2 * KL(pi* || softmax(s / T)), summed over counted positions and divided by num_tokens.

    Logits are [..., V] and `labels` has the same leading shape; logits[..., i, :] predicts labels[..., i] (the caller
    has shifted), and positions where labels == ignore_index count for neither term. Only the student gets a gradient;
    the other logits are detached constants. teacher_logits may be None when lam = 1 (SFT), and the raw logits may be
    None when alpha = 0 (standard KD). divergence="rkl" puts KL(q || pi*) in place of KL(pi* || q). vocab_size, by
    default the smallest last dimension, cuts every input to its first ids; num_tokens, by default this call's count of
    counted positions, divides the sum (see "Normalisation" above).

    Keywords: positions, the flat indices into labels' shape of the counted positions, saves the loss searching for
    them (see "Host syncs"): compute them where it costs nothing, from the labels on the host; with logits already
    cut to the counted positions, torch.arange(len(labels)). Out-of-range labels are then caught on the device.
    fused compiles each chunk's body (see "Memory traffic"); by default at vocab_size >= _FUSED_MIN_VOCAB.
    chunk_size sets the positions per chunk (by default as many as fit _CHUNK_BYTES for the device). With
    return_parts=True the result is (loss, {"sft": ..., "kd": ...}), the two terms normalised like the loss, detached,
    for logging.
    """
    # --- check the arguments, naming the one that is wrong
    if divergence not in ("fkl", "rkl"):
        raise ValueError(f"divergence must be 'fkl' or 'rkl', got {divergence!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if teacher_logits is None and lam != 1.0:
        raise ValueError("teacher_logits is None: only lam=1 (pure SFT) needs no teacher")
    if lam != 1.0 and alpha != 0.0 and (teacher_raw_logits is None or student_raw_logits is None):
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

    # --- the models that take part: none but the student at lam = 1, no raw models at alpha = 0
    t, t_raw, s_raw = (None if x is None else x.detach() for x in (teacher_logits, teacher_raw_logits,
                                                                     student_raw_logits))
    if lam == 1.0:
        t = None
    if t is None or alpha == 0.0:
        t_raw = s_raw = None
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad  # no gradient buffer in evaluation
    if fused is None:  # compiled code cannot run under a dispatch mode (FakeTensorMode, counters): those run eagerly
        fused = vocab >= _FUSED_MIN_VOCAB and not torch._C._len_torch_dispatch_stack()
    loss, sft, kd = _DeltaKD.apply(student_logits, labels, t, t_raw, s_raw, float(alpha), float(temperature),
                                   float(lam), divergence, ignore_index, vocab, num_tokens, chunk_size, need_grad,
                                   positions, fused)
    return (loss, {"sft": sft, "kd": kd}) if return_parts else loss


def _log_probs(x, vocab, dtype, temperature):
    """log softmax(x / T) over the first `vocab` ids, upcast, -inf clamped: (C, vocab)."""
    return F.log_softmax(x[:, :vocab].to(dtype) / temperature, dim=-1).clamp_(min=_LOG_ZERO)


def _chunk(s, t, t_raw, s_raw, y, real, alpha, T, lam, divergence, vocab, denom, grad_dtype):
    """The loss (5) and its gradient (6) at one chunk of positions: the rows (C, V) of each model's logits, their
    labels y (C,), and `real`, 1 or (C,) with 0 at rows that only pad a compiled chunk. Returns the chunk's sums of
    CE and KL, and the gradient rows (C, vocab) divided by `denom`, in grad_dtype. Run eagerly, or compiled whole."""
    dtype = torch.promote_types(s.dtype, torch.float32)  # fp32 at least; float64 stays float64 for gradcheck
    if t is not None:
        z = _log_probs(t, vocab, dtype, T)  # (2) log pi_t_ft
        if t_raw is not None:
            shift = _log_probs(s_raw, vocab, dtype, T) - _log_probs(t_raw, vocab, dtype, T)
            z += alpha * shift  # (2) z = log pi_t_ft + alpha * (log pi_s_raw - log pi_t_raw)
            del shift
        log_p = F.log_softmax(z, dim=-1).clamp_(min=_LOG_ZERO)  # (3) log pi* = z - logsumexp(z)
        del z

    log_q = _log_probs(s, vocab, dtype, T)  # (5) log q = log softmax(s / T)
    log_q1 = log_q if T == 1.0 else _log_probs(s, vocab, dtype, 1.0)  # (5) SFT is at T = 1
    sft = -(log_q1.gather(1, y[:, None])[:, 0] * real).sum()  # (5) CE = -log softmax(s)[y]
    g = log_q1.exp()  # (6) d CE / d s = softmax(s) ...
    # (6) ... - onehot(y), as a select: compiled, it joins the loop that writes g (an indexed write made the compiler
    # keep g whole, 3x slower, and torch 2.13 on the CPU dropped it when the KL's sum came after)
    g = torch.where(torch.arange(vocab, device=g.device) == y[:, None], g - 1.0, g)
    g *= lam  # (5) lam * CE
    del log_q1

    kd = torch.zeros((), dtype=dtype, device=s.device)
    if t is not None:
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


_compiled_chunk = None


def _fused_chunk(*args):
    """_chunk compiled whole, for one fixed shape: each loop over a (chunk, vocab) tensor reads every model's logits
    once and does every step's arithmetic there, where eagerly each step reads and writes fp32 tensors of that size.
    Made at the first call, since importing torch.compile alone takes seconds."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk, dynamic=False, fullgraph=True)
    return _compiled_chunk(*args)


def _unflatten(flat, shape):
    """Flat indices into `shape` as one index tensor per dimension, by arithmetic: no search, no host sync."""
    out, stride = [], 1
    for size in reversed(shape):
        out.append(flat // stride % size)
        stride *= size
    return tuple(reversed(out))


class _DeltaKD(torch.autograd.Function):
    """Forward computes the loss and its gradient (6) chunk by chunk; backward hands the stored gradient over.
    The forward of an autograd.Function runs without gradient tracking, so the target carries none."""

    @staticmethod
    def forward(ctx, s, labels, t, t_raw, s_raw, alpha, T, lam, divergence, ignore_index, vocab, num_tokens, chunk,
                need_grad, positions, fused):
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
            if fused:  # one compiled shape for every chunk: the last is padded with copies of its first row, worth 0
                padded = tuple(torch.cat([i, i[:1].expand(chunk - m)]) for i in rows)
                real = (torch.arange(chunk, device=s.device) < m).to(dtype)
            sft, kd, g = (_fused_chunk if fused else _chunk)(
                *(None if x is None else x[padded] for x in (s, t, t_raw, s_raw)), labels[padded].long(), real,
                alpha, T, lam, divergence, vocab, denom, dtype if grad is None else grad.dtype)
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
        grad, = ctx.saved_tensors
        if grad is None:  # the student needs no gradient
            return (None,) * 16
        if ctx.first_grad_loss is None:  # scaled in place and handed over: no second buffer, no reading grad_loss
            ctx.first_grad_loss = grad_loss  # back to the host (x * 1 is exact, so a plain backward() changes nothing)
            grad.data.mul_(grad_loss)  # .data: the saved tensor's version stays, for a retained graph's next backward
        else:  # a retained graph's next backward: the buffer holds the first one's gradient, so scale a copy of it
            grad = grad * (grad_loss / ctx.first_grad_loss)
        return (grad.to(ctx.input_dtype),) + (None,) * 15
