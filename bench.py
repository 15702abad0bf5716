"""Speed and memory of deltakd, as ratios against baselines measured in the same run. No GPU needed; where one is
present, the GPU cases run too.

    python bench.py data     data.Batches vs the old layout: compute lost to padding and to ranks waiting
    python bench.py model    model.py, eager and compiled, vs transformers' Qwen2ForCausalLM: train step, generate
    python bench.py loss     delta_kd_loss chunked vs the naive full-upcast version: peak memory added, time
    python bench.py rouge    our ROUGE vs rouge-score on 6,000 pairs with stemming: time, identical values
    python bench.py train    train.py tokens/s, on-policy runs' generation speed (CPU: tiny models; GPU: Qwen2.5-0.5B-
                             shaped student, 1.5B-shaped teachers)
"""
import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import data
import evaluate
from deltakd import _CHUNK_BYTES, delta_kd_loss
from model import Qwen2, Qwen2Config


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
# loss: chunked vs naive

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
    if variant == "chunked":
        return s, lambda: delta_kd_loss(s, labels, t, t_raw, s_raw).backward()
    return s, lambda: naive_delta_kd_loss(s, labels, t, t_raw, s_raw, 1.0, 1.0, 0.5, vocab).backward()


def loss_worker(variant, n, vocab, repeats):
    """One variant in a fresh process: peak resident memory added by forward+backward, then the median time."""
    s, run = _loss_case(variant, n, vocab, "cpu")
    times, added = [], None
    for i in range(repeats + 1):
        s.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        if i == 0:
            added = (_rss_kib("VmHWM") - before) * 1024
    print(json.dumps({"added_bytes": added, "time_s": statistics.median(times[1:]), "input_bytes": s.nbytes}))


def _loss_summary(summary):
    """summary {variant: (peak added in input tensors, seconds)}."""
    for variant, (added, seconds) in summary.items():
        print(f"  {variant:8s} peak added {added:5.2f}x   time {seconds * 1e3:8.1f} ms")
    (a_n, t_n), (a_c, t_c) = summary["naive"], summary["chunked"]
    print(f"  memory: chunked adds {a_c:.2f}x (goal <= 2.0x; naive {a_n:.1f}x)   "
          f"time ratio chunked/naive {t_c / t_n:.2f} (goal <= 1.0)")


def _loss_cuda(n, vocab, repeats):
    """Both variants in this process: the CUDA allocator counts exactly what is allocated, and its peak resets."""
    cases = {variant: _loss_case(variant, n, vocab, "cuda") for variant in ("naive", "chunked")}
    added = {}
    for variant, (s, run) in cases.items():
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
          f"threads), {chunks('cpu')}; peak RSS added, in units of one input logits tensor "
          f"({n * vocab * 2 / 2**20:.0f} MiB)")
    results = {"naive": [], "chunked": []}
    for _ in range(rounds):  # interleaved, each in a fresh process so that one's peak does not hide the other's
        for variant in results:
            out = subprocess.run([sys.executable, __file__, "loss-worker", variant, str(n), str(vocab), str(repeats)],
                                 check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.splitlines()[-1]))
    _loss_summary({variant: (max(r["added_bytes"] for r in runs) / runs[0]["input_bytes"],
                             statistics.median(r["time_s"] for r in runs)) for variant, runs in results.items()})

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


def _train_run(work, name, loss, args):
    out = work / f"run-{name.replace(' ', '')}"
    teachers = [] if loss == "sft" else ["--teacher", str(work / "teacher")]
    teachers += ["--teacher-raw", str(work / "teacher")] if loss == "deltakd" else []
    cmd = [sys.executable, str(Path(__file__).parent / "train.py"), "--model", str(work / "student"), *teachers,
           "--loss", loss, "--data", str(work / "data" / "train.jsonl"), "--out", str(out), "--lr", "1e-4",
           "--save-every", "1000", *args]
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
                  "memory: torch.cuda.max_memory_allocated")
        runs = [("sft", "sft", []), ("deltakd", "deltakd", [])]
        runs += [("deltakd --compile", "deltakd", ["--compile"])] if cuda else []
        runs += [("deltakd --on-policy 0.5", "deltakd", ["--on-policy", "0.5", "--max-new-tokens", str(new_tokens)]),
                 ("minillm", "minillm", ["--num-rollouts", str(batch), "--ppo-epochs", str(phase), "--max-new-tokens",
                                         str(new_tokens)])]
        for name, loss, args in runs:
            records = _train_run(work, name, loss, extra + args)[1:-1]

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
                        f"{max(r['peak_mem_gib'] for r in records):5.1f} GiB"
            print(line)


def main():
    benches = {"data": bench_data, "model": bench_model, "loss": bench_loss, "rouge": bench_rouge, "train": bench_train}
    if sys.argv[1:2] == ["loss-worker"]:  # bench_loss runs each variant in a fresh process
        return loss_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="*", choices=[[], *benches], default=list(benches),
                        help="benchmarks to run (default: all)")
    for name in parser.parse_args().which:
        benches[name]()
        print()


if __name__ == "__main__":
    main()
