"""Speed and memory of deltakd, as ratios against baselines measured in the same run. No GPU needed; where one is
present, the GPU cases run too.

    python bench.py data     data.Batches vs the old layout: compute lost to padding and to ranks waiting
    python bench.py model    model.py, eager and compiled, vs transformers' Qwen2ForCausalLM: train step, generate
    python bench.py loss     delta_kd_loss fused and eager vs a naive full upcast: peak memory added, time, passes
    python bench.py rouge    our ROUGE vs rouge-score on 6,000 pairs with stemming: time, identical values
    python bench.py train    train.py tokens/s, on-policy runs' generation speed, host syncs per step (CPU: tiny
                             models; GPU: Qwen2.5-0.5B-shaped student, 1.5B-shaped teachers)
    python bench.py memory   the per-GPU peak of a train.py step, from fake tensors: the paper's runs, or train.py's
                             arguments with --world-size (--json: {"peak_gib": ...}; --real: measured, under torchrun)
    python bench.py gpu      on one GPU: a Delta-KD step's tokens/s, MFU, host syncs and peak memory, eager and
                             compiled, beside the memory estimate (--dry-run: the estimate alone); not among "all"
    python bench.py generate static vs continuous batching: decode-slot utilization, time per reply token, idle ranks,
                             host syncs per token (--json: a last line of JSON)
"""
import argparse
import contextlib
import copy
import gc
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path
from unittest import mock

import huggingface_hub
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import data
import evaluate
import train
from deltakd import _CHUNK_BYTES, delta_kd_loss
from model import Decoder, Qwen2, Qwen2Config, rope_inv_freq


# ---------------------------------------------------------------------------------------------------------------------
# host syncs: the ops that make a GPU's host wait for the device

# aten ops whose result (or output shape) depends on tensor data, so that on a GPU the host must wait for every queued
# kernel before it can go on. Under a TorchDispatchMode they are seen on any device, so they are counted on the CPU.
_SYNC_OPS = {"aten._local_scalar_dense": ".item() / bool() / int() / float()", "aten.is_nonzero": "bool()",
             "aten.nonzero": "nonzero", "aten.masked_select": "masked_select", "aten._unique2": "unique",
             "aten.unique_consecutive": "unique_consecutive", "aten.equal": "torch.equal"}
# These never reach the dispatcher on a CPU tensor (they read its memory directly), so they are counted at the method.
_SYNC_METHODS = ("tolist", "cpu", "numpy")


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, by kind, the data-dependent ops run inside `with HostSyncs() as syncs:`: each one would stop a GPU's
    queue (the host waits for the device), whatever the device they run on here. Boolean-mask indexing (x[mask],
    x[mask] = v) and repeat_interleave without output_size count too; their output shape depends on the data.
    .tolist(), .cpu() and .numpy() count on any tensor, a host one too: the hot path should not need them.
    Uses torch.utils._python_dispatch.TorchDispatchMode, a private but long-stable torch API."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def _count(self, kind):
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _SYNC_OPS:
            self._count(_SYNC_OPS[name])
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self._count("boolean-mask indexing")
        elif name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None and len(args) < 3:
            self._count("repeat_interleave")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {m: getattr(torch.Tensor, m) for m in _SYNC_METHODS}
        for m, original in self._saved.items():
            def counted(tensor, *a, _m=m, _original=original, **k):
                self._count(f".{_m}()")
                return _original(tensor, *a, **k)
            setattr(torch.Tensor, m, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for m, original in self._saved.items():
            setattr(torch.Tensor, m, original)
        return super().__exit__(*exc)

    @property
    def total(self):
        return sum(self.counts.values())


def train_step_syncs(argv):
    """train.py's main(argv), run in this process under HostSyncs: the host syncs of each optimizer step after the
    first (which holds the setup), as {kind: count}, from the end of one optimizer step to the end of the next. Left
    out: the optimizer's own step (on the CPU, AdamW reads its step counter, a host tensor that no GPU waits for;
    on CUDA it is fused) and the rollouts (minillm.py's sampling, counted by its own bench). Give --log-every and
    --save-every beyond --max-steps: then only the last step logs and saves, after its optimizer step."""
    import minillm
    import train
    steps, excluded = [], Counter()

    def left_out(fn):
        def run(*args, **kwargs):
            before = Counter(syncs.counts)
            try:
                return fn(*args, **kwargs)
            finally:
                excluded.update(Counter(syncs.counts) - before)
        return run

    def step_begins(optimizer, args, kwargs):
        step_begins.before = Counter(syncs.counts)

    def step_ends(optimizer, args, kwargs):
        excluded.update(Counter(syncs.counts) - step_begins.before)
        steps.append(Counter(syncs.counts) - excluded)  # cumulative, the left-out syncs taken away

    with HostSyncs() as syncs, mock.patch.object(train, "on_policy_batches", left_out(train.on_policy_batches)), \
            mock.patch.object(minillm.MiniLLM, "rollout", left_out(minillm.MiniLLM.rollout)), \
            contextlib.redirect_stdout(io.StringIO()):  # train.py's log
        hooks = [register_optimizer_step_pre_hook(step_begins),
                 register_optimizer_step_post_hook(step_ends)]
        try:
            train.main(argv)
        finally:
            for hook in hooks:
                hook.remove()
    return [dict(after - before) for before, after in zip(steps, steps[1:])]


# ---------------------------------------------------------------------------------------------------------------------
# data: padding and idle ranks, data.Batches vs the old layout

def _data_old_layout(lengths, indices, mbs, rank, world):
    """The layout before data.Batches balanced ranks: every world-th example of the step, consecutive micro-batches
    of mbs rows, each padded to its longest row rounded up to a multiple of 8. Per micro-batch: (rows x T, real)."""
    mine = indices[rank::world]
    runs = [mine[k:k + mbs] for k in range(0, len(mine), mbs)]
    return [(len(run) * -(-lengths[run].max() // 8) * 8, lengths[run].sum()) for run in runs]


def _data_account(steps, world):
    """steps: per step, per rank, [(rows x T, real tokens)] per micro-batch. FSDP synchronises every micro-batch, so
    at each micro-batch index every rank pays for the costliest rank's micro-batch."""
    tokens = real = compute = largest = 0
    counts = []
    for ranks in steps:
        assert len({len(r) for r in ranks}) == 1, "ranks disagree on the number of micro-batches: FSDP would hang"
        compute += world * sum(max(r[k][0] for r in ranks) for k in range(len(ranks[0])))
        tokens += sum(c for r in ranks for c, _ in r)
        real += sum(n for r in ranks for _, n in r)
        largest = max([largest] + [c for r in ranks for c, _ in r])
        counts.append(len(ranks[0]))
    return {"padding": 1 - real / tokens, "real": real / compute, "counts": counts, "largest": largest}


def bench_data(batch_size=128, world=8, n_steps=32, median=900, sigma=0.6, cap=2048, goal=0.9):
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(np.log(median), sigma, batch_size * n_steps).round().astype(int).clip(1, cap)
    examples = [{"input_ids": np.zeros(n, np.int32), "labels": np.zeros(n, np.int32)} for n in lengths]
    print(f"data: {n_steps} steps of global batch {batch_size} over {world} ranks; lengths like UltraChat-200k under "
          f"the Qwen2.5 tokenizer: lognormal, median {median} tokens, sigma {sigma}, capped at {cap} (mean "
          f"{lengths.mean():.0f}, {(lengths == cap).mean():.1%} at the cap)")
    print("  padding: share of micro-batch tokens (rows x T) that are padding. real share: real tokens / compute, "
          f"where compute is, at every micro-batch index, the costliest rank's rows x T times {world} ranks")
    for mbs in (2, 8):
        perm = np.random.default_rng([0, 0]).permutation(len(examples))  # Batches' order for seed 0, epoch 0
        old = _data_account([[_data_old_layout(lengths, perm[s * batch_size:(s + 1) * batch_size], mbs, r, world)
                              for r in range(world)] for s in range(n_steps)], world)
        ranks = [iter(data.Batches(examples, batch_size, mbs, r, world)) for r in range(world)]
        new = _data_account([[[(mb["input_ids"].numel(), lengths[mb["index"][mb["index"] >= 0]].sum())
                               for mb in next(rank)] for rank in ranks] for _ in range(n_steps)], world)
        print(f"  --micro-batch-size {mbs}: cap {mbs} x {cap} = {mbs * cap} tokens per micro-batch")
        for name, r in (("old layout", old), ("data.Batches", new)):
            lo, hi, mean = min(r["counts"]), max(r["counts"]), np.mean(r["counts"])
            counts = f"{lo}" if lo == hi else f"{lo}-{hi} (mean {mean:.1f})"
            verdict = f"   (goal real share >= {goal:.0%}: {'met' if r['real'] >= goal else 'NOT met'})" \
                if r is new else ""
            print(f"    {name:<12}  padding {r['padding']:5.1%}   real share {r['real']:5.1%}   micro-batches per rank "
                  f"{counts:>14}   largest {r['largest']:5d} tokens{verdict}")


# ---------------------------------------------------------------------------------------------------------------------
# model: ours vs transformers

def _model_pair(cfg, dtype, device):
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM  # a test-only dependency
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(HFConfig(**vars(cfg), attn_implementation="sdpa"))
    hf = hf.to(device=device, dtype=dtype)
    ours = Qwen2(cfg).to(device=device, dtype=dtype)
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def _model_timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _model_compare(name, fns, reps, sync, goals):
    """Median times of fns {label: fn}, interleaved in a rotating order so that drifts in machine speed hit all alike,
    as ratios to the last one (transformers). goals {label: most ratio}."""
    labels = list(fns)
    times = {k: [] for k in labels}
    for i in range(reps):
        for k in labels[i % len(labels):] + labels[:i % len(labels)]:
            times[k].append(_model_timed(fns[k], sync))
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: median[k] / median[labels[-1]] for k in labels}
    print(f"  {name}")
    for k in labels:
        goal = f"   (goal <= {goals[k]}: {'met' if ratios[k] <= goals[k] else 'NOT met'})" if k in goals else ""
        print(f"    {k:<14} {median[k] * 1e3:9.1f} ms   {ratios[k]:.3f}x{goal}")
    return ratios


def _matmul_share(fn):
    """The share of fn's time spent inside matmul kernels (torch.profiler, CPU): the part that compiling leaves as it
    is, since inductor calls the same matmul kernels and fuses only what lies between them."""
    with torch.profiler.profile() as prof:
        fn()
    events = prof.key_averages()
    matmuls = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return matmuls / sum(e.self_cpu_time_total for e in events)


def _print_matmul_shares(fns):
    shares = ", ".join(f"{k} {_matmul_share(fn):.0%}" for k, fn in fns.items())
    print(f"    time in matmul kernels (torch.profiler): {shares}")


def _model_run(cfg, dtype, device, train_shape, reps):
    ours, hf = _model_pair(cfg, dtype, device)
    compiled = copy.deepcopy(ours).compile_blocks()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(1)

    # forward + backward on a right-padded training batch, loss over real tokens
    B, T = train_shape
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
    lengths = torch.linspace(T // 2, T, B).long()
    mask = (torch.arange(T)[None] < lengths[:, None]).long().to(device)
    labels = ids.masked_fill(mask == 0, -100)

    def train_step(model, logits_of):
        def step():
            loss = F.cross_entropy(logits_of(model).flatten(0, 1)[:-1].float(), labels.flatten()[1:])
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step
    for m in (ours, compiled, hf):
        m.train()
    steps = {"ours eager": train_step(ours, lambda m: m(ids, mask)),
             "ours compiled": train_step(compiled, lambda m: m(ids, mask)),
             "transformers": train_step(hf, lambda m: m(input_ids=ids, attention_mask=mask).logits)}
    compile_train = _model_timed(steps["ours compiled"], sync)  # the first call compiles forward and backward
    for fn in steps.values():
        fn()  # warm-up
    diff = (compiled(ids, mask) - ours(ids, mask)).abs().max().item()  # with grad, as trained: no new graph
    r_train = _model_compare(f"forward+backward ({B}x{T}, cross-entropy on real tokens)", steps, reps, sync,
                             {"ours eager": 1.0, "ours compiled": 0.8})
    if device == "cpu":
        _print_matmul_shares(steps)

    # greedy generation: batch 4, left-padded 32-token prompts, 48 new tokens, no early stop
    for m in (ours, compiled, hf):
        m.eval()
    B, T, N = 4, 32, 48
    prompt = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
    pmask = (torch.arange(T)[None] >= torch.tensor([0, 3, 7, 12])[:, None]).long().to(device)
    gens = {"ours eager": lambda: ours.generate(prompt, pmask, max_new_tokens=N),
            "ours compiled": lambda: compiled.generate(prompt, pmask, max_new_tokens=N),
            "transformers": lambda: hf.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=N,
                                                min_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=None)}
    compile_gen = _model_timed(gens["ours compiled"], sync)  # the prefill's graph and the decode step's
    out = {k: fn()[:, T:] for k, fn in gens.items()}  # and the warm-up
    r_gen = _model_compare(f"generate ({B}x{T} -> +{N} tokens, greedy)", gens, reps, sync,
                           {"ours eager": 0.8, "ours compiled": 0.5})
    if device == "cpu":
        _print_matmul_shares(gens)

    agree = (out["ours eager"] == out["transformers"]).float().mean().item()
    same = torch.equal(out["ours compiled"], out["ours eager"])
    print(f"  generated tokens equal to transformers': {agree:.1%}; compiled greedy tokens equal eager's: {same}")
    check = f" (goal <= 1e-5 in fp32: {'met' if diff <= 1e-5 else 'NOT met'})" if dtype == torch.float32 else ""
    print(f"  compiled logits vs eager: max |difference| {diff:.2e}{check}")
    print(f"  compiling (the first calls, from an empty cache; not in the times above): forward+backward "
          f"{compile_train:.1f} s, generate {compile_gen:.1f} s")
    return r_train, r_gen


def bench_model():
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_grad_enabled(True)
    print(f"model.py, eager and with compile_blocks(), vs transformers {transformers.__version__} (torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads); ratio = time / transformers' time, lower is "
          "better")
    # an empty compile cache, for this benchmark only: the compile time that a first run pays
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache):
        small = Qwen2Config(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)
        print("CPU fp32, random model: vocab 8192, hidden 256, 4 layers, 8 heads / 2 kv")
        _model_run(small, torch.float32, "cpu", (4, 256), reps=12)

        if torch.cuda.is_available():
            qwen05 = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                                 tie_word_embeddings=True)
            print(f"{torch.cuda.get_device_name()} bf16, random model shaped like Qwen2.5-0.5B")
            _model_run(qwen05, torch.bfloat16, "cuda", (8, 1024), reps=9)


# ---------------------------------------------------------------------------------------------------------------------
# loss: fused and eager (chunked) vs naive

def naive_delta_kd_loss(s, labels, t, t_raw, s_raw, alpha, T, lam, vocab):
    """The obvious version: upcast all four tensors whole and let autograd keep what it needs."""
    s, t, t_raw, s_raw = (x[..., :vocab].float() for x in (s, t, t_raw, s_raw))
    counted = labels != -100
    log_p = F.log_softmax(F.log_softmax(t / T, -1) + alpha * (F.log_softmax(s_raw / T, -1)
                                                               - F.log_softmax(t_raw / T, -1)), -1)
    log_q = F.log_softmax(s / T, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = F.cross_entropy(s.flatten(0, -2), labels.flatten(), reduction="none").view_as(kl)
    return ((lam * ce + (1 - lam) * T * T * kl) * counted).sum() / counted.sum().clamp(min=1)


def _rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


def _loss_case(variant, n, vocab, device):
    """Random bf16 logits of one variant, and its forward+backward as a function. Returns (student logits, fn)."""
    torch.manual_seed(0)
    s = torch.randn(n, vocab, dtype=torch.bfloat16, device=device).mul_(3).requires_grad_()
    t, t_raw, s_raw = (torch.randn(n, vocab, dtype=torch.bfloat16, device=device).mul_(3) for _ in range(3))
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[: n // 4] = -100  # a prompt's worth of ignored positions
    if variant == "naive":
        return s, lambda: naive_delta_kd_loss(s, labels, t, t_raw, s_raw, 1.0, 1.0, 0.5, vocab).backward()
    return s, lambda: delta_kd_loss(s, labels, t, t_raw, s_raw, fused=variant == "fused").backward()


def loss_worker(variant, n, vocab, repeats):
    """One variant in a fresh process: after a first call (which compiles the fused loss and is timed apart), the
    peak resident memory added by one forward+backward, then the median time."""
    import ctypes
    s, run = _loss_case(variant, n, vocab, "cpu")
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times, added = [], None
    for i in range(repeats + 1):
        s.grad = None
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the first call's freed heap back to the system: counted anew
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        if i == 0:
            added = (_rss_kib("VmHWM") - before) * 1024
    print(json.dumps({"added_bytes": added, "time_s": statistics.median(times[1:]), "first_s": first,
                      "input_bytes": s.nbytes}))


class _Traffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes that eager aten ops read and write in tensors of at least `size` elements (views move nothing), split
    into those inside deltakd._chunk and those around it. Uses the private TorchDispatchMode, as HostSyncs does."""

    def __init__(self, size):
        super().__init__()
        self.size, self.inside, self.bytes = size, False, {"chunk": 0, "around": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(x, torch.Tensor)]
            self.bytes["chunk" if self.inside else "around"] += sum(x.nbytes for x in tensors if x.numel() >= self.size)
        return out


def _kernel_traffic(code, vocab):
    """From inductor's C++ for a chunk: the loops over (chunk, vocab) and the bytes per row they read and write. Each
    loop nest over the rows (x0) that has a loop over the vocabulary (x1) is one pass; within it, every distinct
    pointer indexed by x1 moves vocab elements of its type per row."""
    size = {"float": 4, "double": 8, "at::BFloat16": 2, "at::Half": 2, "bool": 1, "int64_t": 8, "int32_t": 4}
    signature = re.search(r'extern "C"\s+void\s+kernel\((.*?)\)', code, re.S).group(1)
    types = {name: size[t] for t, name in re.findall(r"(?:const )?([\w:]+)\* (\w+)", signature)}
    types.update({alias: types[name] for alias, name in re.findall(r"auto (\w+ptr\d+) = (\w+ptr\d+);", code)})
    nests = re.split(r"for\(int64_t x0=", code)[1:]  # from each loop over the rows to the next
    loops, per_row = 0, 0
    for nest in nests:
        if f"x1<static_cast<int64_t>({vocab}L)" not in nest:
            continue
        loops += 1
        pointers = {name for name, index in re.findall(r"(\w+ptr\d+)(?: \+ |\[)static_cast<int64_t>\(([^;]{0,80})",
                                                          nest) if "x1" in index}
        per_row += sum(types.get(p, 4) * vocab for p in pointers)
    return loops, per_row


def loss_passes(vocab, chunk):
    """Full passes over a (chunk, vocab) fp32 tensor per chunk, eager and fused, from one chunk's forward+backward:
    eager from the aten ops (bytes read and written, in units of the tensor's 4 x chunk x vocab bytes); fused from
    the ops around the compiled kernel plus the kernel's own loops, read from inductor's generated code."""
    import deltakd
    from torch._inductor.utils import run_and_get_code
    s, t, t_raw, s_raw = (torch.randn(chunk, vocab, dtype=torch.bfloat16) for _ in range(4))
    labels = torch.randint(0, vocab, (chunk,))  # every position counted: one chunk

    def run():
        delta_kd_loss(s.requires_grad_(), labels, t, t_raw, s_raw, fused=False).backward()
    unit = 4 * chunk * vocab
    traffic = _Traffic(chunk * vocab // 2)
    chunk_fn = deltakd._chunk

    def inside(*args):
        traffic.inside = True
        try:
            return chunk_fn(*args)
        finally:
            traffic.inside = False
    with mock.patch.object(deltakd, "_chunk", inside), traffic:
        run()
    args = (s.detach(), t, t_raw, s_raw, labels, torch.ones(chunk), 1.0, 1.0, 0.5, "fkl", vocab, torch.tensor(1.0),
            torch.bfloat16)  # the arguments the fused loss passes for one chunk
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph brings no code to read
        _, code = run_and_get_code(torch.compile(chunk_fn, dynamic=False, fullgraph=True), *args)
    loops, per_row = _kernel_traffic("\n".join(code), vocab)
    around = traffic.bytes["around"] / unit
    return {"eager": traffic.bytes["chunk"] / unit + around, "around": around, "kernel_loops": loops,
            "kernel": per_row * chunk / unit}


def _loss_summary(summary):
    """summary {variant: (peak added in input tensors, seconds)}."""
    for variant, (added, seconds) in summary.items():
        print(f"  {variant:8s} peak added {added:5.2f}x   time {seconds * 1e3:8.1f} ms")
    (a_n, t_n), (a_e, t_e), (a_f, t_f) = summary["naive"], summary["eager"], summary["fused"]
    print(f"  memory: eager adds {a_e:.2f}x (goal <= 2.0x; naive {a_n:.1f}x)   time ratio eager/naive {t_e / t_n:.2f} "
          "(goal <= 1.0)")
    print(f"  fused vs eager: time {t_f / t_e:.2f}x (goal <= 0.5), peak added {a_f / a_e:.2f}x (goal <= 1.0)")


def _loss_cuda(n, vocab, repeats):
    """Every variant in this process: the CUDA allocator counts exactly what is allocated, and its peak resets."""
    cases = {variant: _loss_case(variant, n, vocab, "cuda") for variant in ("naive", "eager", "fused")}
    added = {}
    for variant, (s, run) in cases.items():
        run()  # the fused loss compiles here
        s.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        added[variant] = (torch.cuda.max_memory_allocated() - before) / s.nbytes
    times = {variant: [] for variant in cases}
    for _ in range(repeats):  # interleaved
        for variant, (s, run) in cases.items():
            s.grad = None
            times[variant].append(_model_timed(run, torch.cuda.synchronize))
    return {variant: (added[variant], statistics.median(times[variant])) for variant in cases}


def bench_loss(n=2048, vocab=151936, repeats=3, rounds=2):
    def chunks(device):  # what delta_kd_loss chooses by default
        return f"chunks of {_CHUNK_BYTES[device] // 2**20} MiB ({_CHUNK_BYTES[device] // (4 * vocab)} positions)"
    print(f"delta_kd_loss forward+backward, N={n} positions, V={vocab}, bf16 inputs, CPU ({torch.get_num_threads()} "
          f"threads), {chunks('cpu')}; naive: a full fp32 upcast with autograd; eager: the chunked loss, each chunk "
          f"eagerly (fused=False); fused: each chunk one compiled kernel. Peak RSS added, in units of one input "
          f"logits tensor ({n * vocab * 2 / 2**20:.0f} MiB)")
    results = {"naive": [], "eager": [], "fused": []}
    for _ in range(rounds):  # interleaved, each in a fresh process so that one's peak does not hide the other's
        for variant in results:
            out = subprocess.run([sys.executable, __file__, "loss-worker", variant, str(n), str(vocab), str(repeats)],
                                 check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.splitlines()[-1]))
    _loss_summary({variant: (max(r["added_bytes"] for r in runs) / runs[0]["input_bytes"],
                             statistics.median(r["time_s"] for r in runs)) for variant, runs in results.items()})
    firsts = ", ".join(f"{r['first_s']:.1f} s" for r in results["fused"])
    print(f"  the fused loss's first call, compiling (the later runs read inductor's cache): {firsts}")
    chunk = _CHUNK_BYTES["cpu"] // (4 * vocab)
    passes = loss_passes(vocab, chunk)
    if not passes["kernel_loops"]:
        print("  (no loop over the chunk found in inductor's C++: its form changed; update _kernel_traffic)")
    print(f"  memory traffic per chunk, in full passes over a ({chunk}, {vocab}) fp32 tensor (bytes read and written"
          f" / its size): eager {passes['eager']:.0f} (aten ops); fused {passes['kernel'] + passes['around']:.0f}: "
          f"the kernel's {passes['kernel_loops']} loops over the chunk move {passes['kernel']:.0f}, the ops around "
          f"it {passes['around']:.0f} (gathering the rows, writing the gradient buffer, backward's scaling)")

    if torch.cuda.is_available():
        n = 2 * 2048  # one micro-batch of --micro-batch-size 2 at --max-len 2048
        print(f"delta_kd_loss on {torch.cuda.get_device_name()}, N={n}, V={vocab}, bf16 inputs, {chunks('other')}; "
              f"peak allocated added (torch.cuda.max_memory_allocated), in units of one input logits tensor "
              f"({n * vocab * 2 / 2**20:.0f} MiB)")
        _loss_summary(_loss_cuda(n, vocab, repeats=10))


# ---------------------------------------------------------------------------------------------------------------------
# rouge: ours vs rouge-score

def _rouge_bench_pairs(n, seed=0):
    """Chat-reply-like pairs: 30-200 words from a Zipfian vocabulary of inflected words, partly shared."""
    rng = random.Random(seed)
    roots = ("relat condit hesit digit conform radic differ analog predic oper decis hope call form sens electr "
             "good reviv allow infer adjust defens depend adopt commun activ effect control roll play stud gener "
             "nation run walk talk learn teach model train data answer question help explain write read build "
             "test score measur distil compar improv").split()
    suffixes = ["", "", "", "s", "ed", "ing", "ation", "ational", "er", "ers", "ness", "ful", "ly", "ment", "ive",
                "ity", "ize", "izing", "able", "al", "ally", "ies", "ence"]
    function_words = "the a an of to in and is that for it as with on be this by are or can you your we".split()
    vocab = function_words + [r + s for r in roots for s in suffixes]
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    seps = [" "] * 20 + [", ", ". ", "\n", "\n\n", " - ", ": "]

    def text(words):
        return "".join(w + rng.choice(seps) for w in words)

    pairs = []
    for _ in range(n):
        ref = rng.choices(vocab, weights, k=rng.randint(30, 200))
        pred = [w if rng.random() < 0.5 else rng.choices(vocab, weights)[0] for w in ref[: rng.randint(10, len(ref))]]
        pred += rng.choices(vocab, weights, k=rng.randint(0, 60))
        pairs.append((text(pred), text(ref)))
    return pairs


def bench_rouge(n=6000, repeats=3):
    from rouge_score import rouge_scorer

    pairs = _rouge_bench_pairs(n)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

    def run_ours():
        evaluate.porter_stem.cache_clear()  # every repetition starts cold, as a fresh process would
        return [evaluate.rouge(p, r, use_stemmer=True) for p, r in pairs]

    def run_theirs():
        return [scorer.score(r, p) for p, r in pairs]

    times = {"ours": [], "rouge-score": []}
    for _ in range(repeats):  # interleaved, so drifts in machine speed hit both alike
        for name, fn in (("ours", run_ours), ("rouge-score", run_theirs)):
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            if name == "ours":
                ours = result
            else:
                theirs = result

    mismatches = sum(o[k] != tuple(t[k]) for o, t in zip(ours, theirs) for k in ("rouge1", "rouge2", "rougeL"))
    tokens = sum(len(evaluate.tokenize(p)) + len(evaluate.tokenize(r)) for p, r in pairs) / n
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["rouge-score"])
    print(f"rouge: {n} pairs with stemming, {tokens:.0f} tokens per pair, median of {repeats} interleaved runs")
    print(f"  ours         {ours_s:8.2f} s  ({n / ours_s:9.0f} pairs/s)")
    print(f"  rouge-score  {theirs_s:8.2f} s  ({n / theirs_s:9.0f} pairs/s)")
    print(f"  speed-up     {theirs_s / ours_s:8.1f}x   values identical: {mismatches == 0} "
          f"({mismatches} of {3 * n} score triples differ)")
    assert mismatches == 0, f"{mismatches} score triples differ from rouge-score"
    return {"ours_s": ours_s, "rouge_score_s": theirs_s, "speedup": theirs_s / ours_s}


# ---------------------------------------------------------------------------------------------------------------------
# train: tokens/s of train.py

def _train_model_dir(path, cfg, tokenizer_dir, dtype):
    torch.manual_seed(0)
    model = Qwen2(cfg).to(dtype)
    model.init_weights()
    model.save_pretrained(path, tokenizer_dir=tokenizer_dir)


def _train_argv(work, out, loss, args):
    teachers = [] if loss == "sft" else ["--teacher", str(work / "teacher")]
    teachers += ["--teacher-raw", str(work / "teacher")] if loss == "deltakd" else []
    return ["--model", str(work / "student"), *teachers, "--loss", loss, "--data", str(work / "data" / "train.jsonl"),
            "--out", str(out), "--lr", "1e-4", "--save-every", "1000", *args]


def _train_run(work, name, loss, args):
    out = work / f"run-{name.replace(' ', '')}"
    cmd = [sys.executable, str(Path(__file__).parent / "train.py"), *_train_argv(work, out, loss, args)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def bench_train():
    """On the CPU: tiny student and teacher. On a GPU: a random student shaped like Qwen2.5-0.5B, teachers shaped
    like Qwen2.5-1.5B, over a toy tokenizer padded to Qwen's 151665 ids so that the loss sees a real vocabulary."""
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, str(Path(__file__).parent / "toy.py"), "--out", str(work / "data"),
                        "--n-train", "2000", "--n-test", "10", "--n-corpus", "100"], check=True, capture_output=True)
        if cuda:
            tok = data.load_tokenizer(work / "data")
            tok.add_tokens([f"<|bench_pad_{i}|>" for i in range(151665 - tok.get_vocab_size(True))])
            tok.save(str(work / "data" / "tokenizer.json"))
            shape = dict(vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True)
            student = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                  num_key_value_heads=2, **shape)
            teacher = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                  num_attention_heads=12, num_key_value_heads=2, **shape)
            extra, new_tokens = ["--micro-batch-size", "4", "--max-len", "1024"], 64
            dtype = torch.bfloat16
        else:
            shape = dict(vocab_size=640, rope_theta=1e6)
            student = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True, **shape)
            teacher = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, **shape)
            extra, new_tokens = ["--micro-batch-size", "8", "--max-len", "256"], 32
            dtype = torch.float32
        # five log intervals: the first warms up, the last may be short; the median of the three between resists the
        # other processes of a shared machine. An interval holds whole MiniLLM phases of 2 steps (--ppo-epochs 2 x
        # --num-rollouts 16 / --batch-size 16), so its mean reply length is the replies' mean
        batch, log_every, phase = 16, 6, 2
        total = 5 * log_every
        extra = ["--batch-size", str(batch), *extra, "--max-steps", str(total), "--log-every", str(log_every)]
        _train_model_dir(work / "student", student, work / "data", dtype)
        _train_model_dir(work / "teacher", teacher, work / "data", dtype)
        where = f"{torch.cuda.get_device_name()} bf16" if cuda else f"CPU fp32, {torch.get_num_threads()} threads"
        print(f"train.py, one process, {where}; student {student.hidden_size}x{student.num_hidden_layers}, "
              f"teachers {teacher.hidden_size}x{teacher.num_hidden_layers}; {' '.join(extra)}; median of the "
              f"intervals ending at steps {2 * log_every}, {3 * log_every}, {4 * log_every}")
        print("  tokens/s: real tokens through the student's forward+backward per second of wall time, generation "
              "included")
        print("  rollout: sampled reply tokens per second spent generating (MiniLLM: student and teacher decode "
              "together); gen share: generation's share of step time")
        if cuda:
            print("  MFU: (6 x student + 2 x frozen parameters) FLOPs per token x tokens/s / --peak-tflops; peak "
                  "memory: torch.cuda.max_memory_allocated (max_memory_reserved)")
        runs = [("sft", "sft", []), ("fkl", "fkl", []), ("rkl", "rkl", []), ("deltakd", "deltakd", [])]
        runs += [("deltakd --compile", "deltakd", ["--compile"])] if cuda else []
        runs += [("deltakd --on-policy 0.5", "deltakd", ["--on-policy", "0.5", "--max-new-tokens", str(new_tokens)]),
                 ("minillm", "minillm", ["--num-rollouts", str(batch), "--ppo-epochs", str(phase), "--max-new-tokens",
                                         str(new_tokens)])]
        print("  host syncs: per optimizer step outside log steps, in steps 2-4 of a run of its own, by kind (the "
              "rollouts' sampling left out; goal: 1, the finite check)")
        for name, loss, args in runs:
            records = _train_run(work, name, loss, extra + args)[1:-1]
            argv = _train_argv(work, work / f"syncs-{name.replace(' ', '')}", loss, extra + args)
            syncs = train_step_syncs(argv + ["--max-steps", "4", "--log-every", "1000"])

            def median(f):
                return statistics.median(f(r) for r in records)
            line = f"  {name:<24} {median(lambda r: r['tokens_per_s']):8.0f} tokens/s"
            if "gen_share" in records[0]:
                speed = statistics.median(r["gen_tokens_per_s"] for r in records if "gen_tokens_per_s" in r)
                line += f"   rollout {speed:6.0f} tokens/s (replies " \
                        f"{median(lambda r: r['reply_len']):.0f} tokens)" \
                        f"   gen share {median(lambda r: r['gen_share']):4.0%}"
            if cuda:
                line += f"   MFU {median(lambda r: r['mfu']):5.1%}   peak memory " \
                        f"{max(r['peak_mem_gib'] for r in records):5.1f} GiB (reserved " \
                        f"{max(r['peak_reserved_gib'] for r in records):5.1f})"
            most = max(syncs, key=lambda c: sum(c.values()))
            print(line + f"   host syncs {max(sum(c.values()) for c in syncs)} per step {most}")


# ---------------------------------------------------------------------------------------------------------------------
# memory: the per-GPU peak of a train.py step, from fake tensors

# Qwen2.5's config.json files as the Hub has them, for Hub ids that are not in the local cache: estimates run offline
QWEN25 = {f"Qwen/Qwen2.5-{size}": Qwen2Config(
    vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
    num_key_value_heads=kv, tie_word_embeddings=tied, rope_theta=1e6, bos_token_id=151643, eos_token_id=151643)
    for size, (hidden, inter, layers, heads, kv, vocab, tied) in {
        "0.5B": (896, 4864, 24, 14, 2, 151936, True), "1.5B": (1536, 8960, 28, 12, 2, 151936, True),
        "7B": (3584, 18944, 28, 28, 4, 152064, False)}.items()}
# The paper's runs (reproduce.sh paper, UltraChat): the teacher's SFT, each student method, and two variations
_PAPER = ["--max-len", "2048", "--micro-batch-size", "2", "--grad-ckpt"]
_TEACHERS = ["--teacher", "Qwen/Qwen2.5-7B", "--teacher-raw", "Qwen/Qwen2.5-7B"]
MEMORY_RUNS = {
    "teacher SFT (7B)": ["--model", "Qwen/Qwen2.5-7B", "--loss", "sft", *_PAPER],
    "teacher SFT, no --grad-ckpt": ["--model", "Qwen/Qwen2.5-7B", "--loss", "sft", *_PAPER[:4]],
    **{f"student {loss} (1.5B)": ["--model", "Qwen/Qwen2.5-1.5B", "--loss", loss, *_TEACHERS, *_PAPER]
       for loss in ("sft", "fkl", "rkl", "deltakd")},
    "deltakd, --micro-batch-size 8": ["--model", "Qwen/Qwen2.5-1.5B", "--loss", "deltakd", *_TEACHERS, *_PAPER[:2],
                                      "--micro-batch-size", "8", "--grad-ckpt"],
    "deltakd, no --grad-ckpt": ["--model", "Qwen/Qwen2.5-1.5B", "--loss", "deltakd", *_TEACHERS, *_PAPER[:4]],
}


def _private_torch():
    """The private torch APIs that the estimate needs, or one line saying which one this torch lacks."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.testing._internal.distributed.fake_pg import FakeStore
        collectives = (torch.ops.c10d._allgather_base_.default, torch.ops.c10d._reduce_scatter_base_.default)
        return FakeTensorMode, FakeStore, collectives, torch._C._current_graph_task_id
    except (ImportError, AttributeError) as e:
        sys.exit(f"error: bench.py memory needs private torch APIs (FakeTensorMode, the fake process group, c10d's "
                 f"_allgather_base_ and _reduce_scatter_base_, _current_graph_task_id) that torch {torch.__version__} "
                 f"lacks: {e}")


def _local(t):
    return t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t


class _WorstCase(torch.utils._python_dispatch.TorchDispatchMode):
    """Answers, under fake tensors, the data-dependent ops of a step, whose values fake tensors do not have, as for the
    worst case: every mask all True (every position supervised), every check passing, and a loss backpropagated by a
    plain .backward() (an incoming gradient of 1). A value it has no answer for fails naming the op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, torch.distributed.tensor.DTensor) for t in types):
            return NotImplemented  # DTensor runs first and comes back with its local tensors
        aten = torch.ops.aten
        if func is aten.nonzero.default:
            return args[0].new_empty((args[0].numel(), args[0].dim()), dtype=torch.long)
        if func is aten._pin_memory.default:  # fake tensors cannot pin; a pinned host copy takes no GPU memory
            return args[0]
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            indices = []
            for i in args[1]:  # an all-True mask of k dims selects every position: k flat integer indices
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    for d, n in enumerate(i.shape):
                        shape = [1] * i.dim()
                        shape[d] = n
                        indices.append(torch.arange(n, device=i.device).view(shape).expand(i.shape).reshape(-1))
                else:
                    indices.append(i)
            return func(args[0], indices, *args[2:], **kwargs)
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default):
            if args[0].dtype == torch.bool:
                return True
            if args[0].is_floating_point():
                return 1.0
            raise RuntimeError(f"bench.py memory: the step reads {func} of a {args[0].dtype} tensor, whose value fake "
                               "tensors do not have; give _WorstCase its worst-case answer")
        return func(*args, **kwargs)


class PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of the live tensor storages on this rank, by kind, and their peak: what a GPU's caching allocator
    counts as allocated (up to its 512-byte rounding). Parameters: every model's shards, and the blocks FSDP gathers
    (the storages it resizes, and its all-gather buffers); gradients: FSDP's reduce-scatter buffers, of which the
    sharded gradients are views; optimizer state; activations: all else (activations, logits, the loss's chunks, a
    block's unsharded gradients until FSDP reduces them). `where` says where in the step the peak fell."""
    KINDS = ("parameters", "gradients", "optimizer state", "activations")

    def __init__(self, models, optimizer):
        super().__init__()
        _, _, (self._all_gather, self._reduce_scatter), self._graph_task = _private_torch()
        self.live = {}  # id(storage) -> [bytes, kind]
        self.now = dict.fromkeys(self.KINDS, 0)
        self.peak, self.where = dict(self.now), ""
        for p in (p for m in models.values() for p in m.parameters()):
            self._add(_local(p).untyped_storage(), "parameters")
        for t in (t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)):
            self._add(_local(t).untyped_storage(), "optimizer state")
        # where: the innermost model part running forward (a block recomputes its forward in backward under
        # --grad-ckpt), the micro-batch (each runs every model once), and the optimizer step
        self.names = {id(m): name for name, m in models.items()}
        self.names.update({id(b): f"{name} block {i}" for name, m in models.items()
                           for i, b in enumerate(m.model.layers)})
        self.names.update({id(m.lm_head): f"{name} lm_head" for name, m in models.items()})
        self.roots, self.model_calls, self.running, self.optimizing = {id(m) for m in models.values()}, 0, [], False
        self.optimizer = optimizer

    def _add(self, storage, kind):
        if id(storage) not in self.live:
            self.live[id(storage)] = [storage.nbytes(), kind]
            self.now[kind] += storage.nbytes()
            weakref.finalize(storage, self._free, id(storage))

    def _free(self, key):
        size, kind = self.live.pop(key)
        self.now[kind] -= size

    def _retag(self, tensor, kind):
        self._add(tensor.untyped_storage(), kind)
        entry = self.live[id(tensor.untyped_storage())]
        self.now[entry[1]] -= entry[0]
        self.now[kind] += entry[0]
        entry[1] = kind

    def _update(self):
        if sum(self.now.values()) > sum(self.peak.values()):
            self.peak = dict(self.now)
            inner = next((self.names[i] for i in reversed(self.running) if i in self.names), None)
            if self.optimizing:
                self.where = "the optimizer step"
            elif self._graph_task() != -1:
                self.where = "the backward" + (f", {inner} recomputing its forward" if inner else "")
            else:
                self.where = f"{inner} forward" if inner else "the loss"
            self.where += f" (micro-batch {-(-self.model_calls // len(self.roots))})"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, torch.distributed.tensor.DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func is self._all_gather:
            self._retag(args[0], "parameters")
        elif func is self._reduce_scatter:
            self._retag(args[0], "gradients")
            self._retag(args[1], "gradients")
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), "activations")
        self._update()
        return out

    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_

        def resize_(storage, size):  # FSDP gathers a block into storages it resizes, bypassing the dispatcher
            resize(storage, size)
            self._add(storage, "parameters")
            entry = self.live[id(storage)]
            self.now[entry[1]] += storage.nbytes() - entry[0]
            entry[0] = storage.nbytes()
            self._update()
        torch.UntypedStorage.resize_ = resize_

        def enter(module, *_):
            self.running.append(id(module))
            self.model_calls += id(module) in self.roots and self._graph_task() == -1

        def leave(*_):
            self.running.pop()

        def optimizing(*_):
            self.optimizing = True
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
                       torch.nn.modules.module.register_module_forward_hook(leave),
                       self.optimizer.register_step_pre_hook(optimizing)]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def report(self):
        gib = {kind.split()[0] + "_gib": size / 2**30 for kind, size in self.peak.items()}
        return {"peak_gib": sum(self.peak.values()) / 2**30, **gib, "where": self.where}


def _memory_model_dir(name, tmp):
    """A folder with name's config.json: the folder itself, the local Hub cache's copy, or a built-in config."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json") if name.count("/") == 1 else None
    if isinstance(cached, str):
        return Path(cached).parent
    if name not in QWEN25:
        sys.exit(f"error: {name} is not a model folder, nor in the local Hub cache, nor one of the built-in configs "
                 f"({', '.join(QWEN25)})")
    folder = tmp / name.replace("/", "--")
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(QWEN25[name].to_dict()))
    return folder


@contextlib.contextmanager
def _train_step(args, world, device, fake):
    """One step of train.py's token-level loss, as step(micro_batches), with its models {"student", ...} and optimizer,
    built by train.build_models and train.make_optimizer over the process group already made and run by
    train.kd_backward, unchanged: each micro-batch --micro-batch-size x --max-len tokens, every position supervised
    (the worst case). With fake=True, on fake tensors (every shape as on rank 0 of `world`, nothing computed); on
    real ones, the weights are left uninitialised: no value changes what is allocated or what a kernel does. On the
    CPU the loss's chunks are sized as on a GPU."""
    FakeTensorMode = _private_torch()[0]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        dirs = {k: _memory_model_dir(getattr(args, k), Path(tmp)) for k in ("model", "teacher", "teacher_raw")
                if getattr(args, k)}
        vocab_size = min(Qwen2Config.from_json(d).vocab_size for d in dirs.values())  # as delta_kd_loss's default
        mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (world,))
        if fake:  # model.py caches the RoPE frequencies per device: no fake tensor may outlive its mode there
            rope_inv_freq.cache_clear()
            stack.callback(rope_inv_freq.cache_clear)
            stack.enter_context(FakeTensorMode())
            stack.enter_context(_WorstCase())
        if device.type == "cpu":
            stack.enter_context(mock.patch.dict(_CHUNK_BYTES, cpu=_CHUNK_BYTES["other"]))
        compute_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
        student, frozen = train.build_models(dirs, args, mesh, compute_dtype)
        models = {"student": student, **frozen}
        optimizer = train.make_optimizer(student, args, fused=True)
        B, T = args.micro_batch_size, args.max_len
        batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "labels": torch.zeros(B, T, dtype=torch.long),
                 "attention_mask": torch.ones(B, T, dtype=torch.long),
                 "positions": torch.arange(B * T).view(B, T)[:, :-1].flatten()}  # each row's last predicts nothing

        def step(micro_batches):
            train.kd_backward(student, frozen, [batch] * micro_batches, train.loss_settings(args), vocab_size, device,
                              world)
            torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        yield step, models, optimizer


def memory_of_step(args, world, device, fake=True):
    """The peak of one steady train.py step on rank 0 (_train_step): AdamW's state already made, two micro-batches,
    then the clip and the optimizer step. PeakMemory's report."""
    with _train_step(args, world, device, fake) as (step, models, optimizer):
        step(1)  # untracked: AdamW's state appears, and fused AdamW's first step allocates once more
        with PeakMemory(models, optimizer) as tracker:
            step(2)  # the second micro-batch runs with the first one's gradients held, as every later one does
    return tracker.report()


def _allocator_peak(run, device):
    """(run(), the peak of the bytes that the allocator handed out during it, in GiB). On CUDA, the caching
    allocator's max_memory_allocated. On the CPU, torch.profiler's memory events (each allocation and free that the
    allocator reports, kineto_results: a private API), summed in order."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return run(), torch.cuda.max_memory_allocated(device) / 2**30
    with torch.profiler.profile(profile_memory=True) as prof:
        result = run()
    now = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        now += event.nbytes()
        peak = max(peak, now)
    return result, peak / 2**30


def _memory_args(argv):
    p = argparse.ArgumentParser(prog="bench.py memory", description="The per-GPU peak of a train.py step, estimated "
                                "on the CPU with fake tensors. Takes train.py's arguments (--model, --teacher, "
                                "--teacher-raw, --loss, --micro-batch-size, --max-len, --grad-ckpt, --dtype, ...; "
                                "Hub ids of Qwen2.5 0.5B, 1.5B, 7B not in the local cache use built-in configs); "
                                "without them, the paper's runs.")
    p.add_argument("--world-size", type=int, default=8, help="processes (GPUs) that FSDP shards over")
    p.add_argument("--json", action="store_true", help="print one JSON object with peak_gib")
    p.add_argument("--real", action="store_true", help="measure real tensors instead, on this torchrun world")
    mine, rest = p.parse_known_args(argv)
    if not rest:
        return mine, None
    args = train.get_args(rest + ["--data", "(unused)", "--out", "(unused)"])
    train.check_args(args, mine.world_size)
    if args.loss == "minillm" or args.on_policy:
        sys.exit("error: bench.py memory estimates the token-level steps (sft, fkl, rkl, deltakd); MiniLLM's and "
                 "--on-policy's rollouts hold the gathered models and their KV caches (README, Memory)")
    args.dtype = args.dtype or "bf16"  # the GPU's default
    return mine, args


def bench_memory(argv=()):
    mine, args = _memory_args(list(argv))
    FakeTensorMode, FakeStore, _, _ = _private_torch()
    if mine.real:  # under torchrun: this world's real tensors, counted alike, and the allocator's own peak
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        report, report["allocator_peak_gib"] = _allocator_peak(
            lambda: memory_of_step(args, torch.distributed.get_world_size(), device, fake=False), device)
        if torch.distributed.get_rank() == 0:
            print(json.dumps(report) if mine.json else report)
        torch.distributed.destroy_process_group()
        return report
    runs = {"": args} if args else {name: _memory_args(["--world-size", str(mine.world_size), *run])[1]
                                    for name, run in MEMORY_RUNS.items()}
    if not mine.json:
        print(f"per-GPU peak of one train.py step, rank 0 of {mine.world_size}, estimated with fake tensors (torch "
              f"{torch.__version__}): the live tensors' bytes, what torch.cuda.max_memory_allocated would report; "
              "not counted: the CUDA context (about 0.5-1 GiB), NCCL's buffers, and the caching allocator's cached "
              "blocks and fragmentation (max_memory_reserved minus max_memory_allocated)")
    reports = {}
    for name, run in runs.items():
        torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=mine.world_size)
        try:
            reports[name] = r = memory_of_step(run, mine.world_size, torch.device("cpu"))
        finally:
            torch.distributed.destroy_process_group()
        if mine.json:
            continue
        print(f"  {name or ' '.join(argv)}")
        print(f"    peak {r['peak_gib']:6.2f} GiB = parameters {r['parameters_gib']:.2f} + gradients "
              f"{r['gradients_gib']:.2f} + optimizer state {r['optimizer_gib']:.2f} + activations "
              f"{r['activations_gib']:.2f}; at {r['where']}")
    if mine.json:
        print(json.dumps(reports[""] if args else reports))
    return reports


# ---------------------------------------------------------------------------------------------------------------------
# gpu: what to measure when a GPU is lent

# a Qwen2.5-0.5B-shaped student distilled from 1.5B-shaped teachers, weights left uninitialised: nothing to download
GPU_RUN = ["--model", "Qwen/Qwen2.5-0.5B", "--teacher", "Qwen/Qwen2.5-1.5B", "--teacher-raw", "Qwen/Qwen2.5-1.5B",
           "--loss", "deltakd", "--micro-batch-size", "4", "--max-len", "1024", "--dtype", "bf16"]


def bench_gpu(argv=()):
    p = argparse.ArgumentParser(prog="bench.py gpu", description="On one GPU, in under 10 minutes: train.py's Delta-KD "
                                "step (" + " ".join(GPU_RUN) + ", two micro-batches a step), eager and --compile: "
                                "tokens/s, MFU, the host syncs that torch.cuda.set_sync_debug_mode reports, and the "
                                "peak memory beside bench.py memory's estimate.")
    p.add_argument("--dry-run", action="store_true", help="the estimate only, on the CPU (what runs without a GPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each variant")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100, H200 SXM: 989)")
    opts = p.parse_args(argv)
    _, args = _memory_args(["--world-size", "1", *GPU_RUN])
    _, FakeStore, _, _ = _private_torch()
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        estimate = memory_of_step(args, 1, torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()
    print(f"{' '.join(GPU_RUN)}, one process, two micro-batches a step\n  bench.py memory's estimate: peak "
          f"{estimate['peak_gib']:.2f} GiB, at {estimate['where']}")
    if opts.dry_run or not torch.cuda.is_available():
        return print("  (no GPU: nothing measured)")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(), rank=0, world_size=1,
                                         device_id=device)
    print(f"  {torch.cuda.get_device_name()}, torch {torch.__version__}; MFU: (6 x student + 2 x frozen parameters) "
          f"FLOPs per token x tokens/s / {opts.peak_tflops:g} TFLOPs")
    try:
        for compiled in (False, True):
            args.compile = compiled
            _gpu_variant(args, device, opts, estimate)
            gc.collect()  # the variant's models are gone: give their memory back before the next one's
            torch.cuda.empty_cache()
    finally:
        torch.distributed.destroy_process_group()


def _gpu_variant(args, device, opts, estimate):
    with _train_step(args, 1, device, fake=False) as (step, models, _):
        start = time.perf_counter()
        step(2)  # compiles, with --compile
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        step(2)
        seconds = _model_timed(lambda: [step(2) for _ in range(opts.steps)], torch.cuda.synchronize)
        tokens_per_s = 2 * args.micro_batch_size * args.max_len * opts.steps / seconds
        flops = train.model_flops_per_token({k: sum(p.numel() for p in m.parameters()) for k, m in models.items()})
        torch.cuda.set_sync_debug_mode("warn")  # a warning at each call that makes the host wait for the GPU
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(2)
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.reset_peak_memory_stats()
        step(2)
        torch.cuda.synchronize()
    syncs = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print(f"  {'--compile' if args.compile else 'eager':9s}  {tokens_per_s:8.0f} tokens/s   MFU "
          f"{flops * tokens_per_s / (opts.peak_tflops * 1e12):5.1%}   first step {first:5.1f} s   peak "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated "
          f"({torch.cuda.max_memory_reserved() / 2**30:.2f} reserved) vs {estimate['peak_gib']:.2f} estimated\n"
          f"    host syncs in a step: {sum(syncs.values())} "
          f"({', '.join(f'{k} x{n}' for k, n in syncs.most_common()) or 'none'})")


# ---------------------------------------------------------------------------------------------------------------------
# generate: static vs continuous batching, on UltraChat-like reply lengths

class _Scheduled(Decoder):
    """Decoder.run, the real scheduler, over a stand-in for the models: each row runs until the length drawn for it
    (its limit), at the cost of counting. The simulation's utilization is run()'s own count."""

    def __init__(self, slots):
        self.slots, self.every, self.stop_ids, self.live_steps, self.slot_steps = slots, 16, set(), 0, 0
        self.left = [0] * slots  # the steps each slot's row has still to run

    def add(self, slot, prompt, limit, seed, twin=None):
        self.left[slot] = limit

    def step(self):
        record = torch.tensor([[0.0 if n > 0 else -1.0] for n in self.left])  # (B, 1): a token, or -1 once ended
        self.left = [n - 1 for n in self.left]
        return record


def _generate_lengths(n, seed=0, median=280, sigma=0.9, cap=2048):
    return np.random.default_rng(seed).lognormal(np.log(median), sigma, n).round().clip(1, cap).astype(int).tolist()


def _generate_ranks(lengths, slots, world, continuous):
    """Each rank's decode steps for one pass over `lengths` (prompts in length order): today's deal (static batches,
    batches[rank::world]) or a shared counter (continuous: the ranks take the next prompt as they free a slot,
    simulated by always advancing the rank that is furthest behind, exact to one reply's interval)."""
    work = [(k, [0], n, 0) for k, n in enumerate(lengths)]
    decoders = [_Scheduled(slots) for _ in range(world)]
    if not continuous:
        batches = [work[k:k + slots] for k in range(0, len(work), slots)]
        for rank, d in enumerate(decoders):
            for _ in d.run([item for batch in batches[rank::world] for item in batch], refill=False):
                pass
        return [d.slot_steps / slots for d in decoders]
    shared = iter(work)
    runs = {rank: d.run(shared) for rank, d in enumerate(decoders)}
    while runs:
        rank = min(runs, key=lambda r: decoders[r].slot_steps)
        if next(runs[rank], None) is None:
            del runs[rank]
    return [d.slot_steps / slots for d in decoders]


def _generate_timed(model, prompts, lengths, slots, refill):
    decoder = Decoder([model], slots, max(map(len, prompts)) + max(lengths))
    start = time.perf_counter()
    with torch.inference_mode():
        replies = {k: tokens for k, tokens, _ in decoder.run(zip(range(len(prompts)), prompts, lengths,
                                                                  range(len(prompts))), refill)}
    return time.perf_counter() - start, replies, decoder.utilization


def bench_generate(as_json=False, n=4000, timed=256, world=8):
    print("generate: static vs continuous batching (model.Decoder) on UltraChat-like reply lengths: lognormal, median "
          "280 tokens, sigma 0.9, capped at 2048; prompts taken in length order, which is unrelated to reply length")
    lengths = _generate_lengths(n)
    print(f"  utilization (live-row decode steps / (slots x steps)): Decoder.run, the real scheduler, over a stand-in "
          f"that stops each row at its drawn length; {n} prompts (mean reply {np.mean(lengths):.0f} tokens)")
    used = {}
    for slots in (16, 32, 64):
        used[slots] = {}
        for name, refill in (("static", False), ("continuous", True)):
            d = _Scheduled(slots)
            for _ in d.run(((k, [0], n, 0) for k, n in enumerate(lengths)), refill):
                pass
            used[slots][name] = d.utilization
        goal = f"   (goal >= 90%: {'met' if used[32]['continuous'] >= 0.9 else 'NOT met'})" if slots == 32 else ""
        print(f"    batch {slots:2d}: static {used[slots]['static']:5.1%}   continuous {used[slots]['continuous']:5.1%}"
              f"{goal}")

    # the real Decoder and a tiny model, forced to stop at the drawn lengths: the same prompts both ways, in one run
    torch.manual_seed(0)
    model = Qwen2(Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6)).eval()
    g = np.random.default_rng(1)
    prompts = sorted(([int(t) for t in g.integers(0, 256, int(g.integers(16, 64)))] for _ in range(timed)), key=len,
                     reverse=True)
    cut = _generate_lengths(timed, seed=2)
    times = {name: _generate_timed(model, prompts, cut, 32, refill) for name, refill in (("static", False),
                                                                                        ("continuous", True))}
    assert times["static"][1] == times["continuous"][1], "static and continuous batching gave different replies"
    per_token = {name: t / sum(cut) for name, (t, _, _) in times.items()}
    ratio = per_token["continuous"] / per_token["static"]
    print(f"  wall time per reply token, a tiny model on the CPU ({torch.get_num_threads()} threads, fp32), {timed} "
          f"prompts of 16-64 tokens, batch 32, greedy replies identical both ways:")
    print(f"    static {per_token['static'] * 1e3:.3f} ms (utilization {times['static'][2]:.1%})   continuous "
          f"{per_token['continuous'] * 1e3:.3f} ms ({times['continuous'][2]:.1%})   continuous / static {ratio:.2f}x"
          f"   (goal <= 0.4x: {'met' if ratio <= 0.4 else 'NOT met'})")

    # ranks: the slowest rank sets the run's time; the others idle while they wait for it
    evaluation = _generate_lengths(2000, seed=3)
    print(f"  {world} ranks at batch 32, each rank's decode steps (a step costs the same on every rank); idle share = "
          f"1 - mean / slowest")
    idle = {}
    for what, lens in (("an evaluation, 2000 prompts", evaluation), (f"SeqKD-like, {n // 2 * world} prompts",
                                                                     _generate_lengths(n // 2 * world, seed=4))):
        today, ours = _generate_ranks(lens, 32, world, False), _generate_ranks(lens, 32, world, True)
        idle[what] = {"today": 1 - np.mean(today) / max(today), "continuous": 1 - np.mean(ours) / max(ours)}
        print(f"    {what}: today's deal (static, batches[rank::world]) slowest {max(today):.0f} steps, idle "
              f"{idle[what]['today']:.1%}; shared counter (continuous) slowest {max(ours):.0f} steps, idle "
              f"{idle[what]['continuous']:.1%}; {max(ours) / max(today):.2f}x the time")

    # host syncs: what a GPU's host would wait on, per decode step and per reply token (sampling with top-p)
    decoder = Decoder([model], 8, 64 + 64, temperature=1.0, top_p=0.9)
    with torch.inference_mode(), HostSyncs() as syncs:
        tokens = sum(len(t) for _, t, _ in decoder.run(zip(range(32), prompts[:32], _generate_lengths(32, 5, 40, 0.5,
                                                                                                       64), range(32))))
    steps = decoder.slot_steps / 8
    print(f"  host syncs (HostSyncs), 32 sampled replies at batch 8: {syncs.total} in {steps:.0f} decode steps "
          f"({steps / syncs.total:.1f} steps per sync), {syncs.total / tokens:.4f} per reply token {syncs.counts}")
    if as_json:
        print(json.dumps({"utilization": used[32], "utilization_by_batch": used, "continuous_over_static": ratio,
                          "idle_share_8_ranks": idle, "syncs_per_token": syncs.total / tokens}))


def main():
    benches = {"data": bench_data, "model": bench_model, "loss": bench_loss, "rouge": bench_rouge, "train": bench_train,
               "memory": bench_memory, "generate": bench_generate}
    if sys.argv[1:2] == ["loss-worker"]:  # bench_loss runs each variant in a fresh process
        return loss_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    if sys.argv[1:2] == ["memory"]:  # takes train.py's arguments
        return bench_memory(sys.argv[2:])
    if sys.argv[1:2] == ["gpu"]:  # its own arguments, and not among "all"
        return bench_gpu(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="*", choices=[[], *benches], default=list(benches),
                        help="benchmarks to run (default: all)")
    parser.add_argument("--json", action="store_true",
                        help="generate: end with one line of JSON, {\"utilization\": {\"static\", \"continuous\"}} at "
                             "batch 32 and the other numbers")
    args = parser.parse_args()
    for name in args.which:
        benches[name](**({"as_json": args.json} if name == "generate" else {}))
        print()


if __name__ == "__main__":
    main()
