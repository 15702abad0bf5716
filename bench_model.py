"""model.py, generate.py and rouge.py against what they reimplement: transformers' Qwen2 (a training step and
generation, eager and compiled), static batching (continuous batching's utilization, speed and idle ranks), and
Google's rouge-score (speed, identical values). Run through bench.py: python bench.py model|generate|rouge.
"""
import copy
import json
import os
import random
import statistics
import tempfile
import time
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import rouge
from generate import Decoder, generate
from measure import HostSyncs, timed
from model import Qwen2, Qwen2Config


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


def _model_compare(name, fns, reps, sync, goals):
    """Median times of fns {label: fn}, interleaved in a rotating order so that drifts in machine speed hit all alike,
    as ratios to the last one (transformers). goals {label: most ratio}."""
    labels = list(fns)
    times = {k: [] for k in labels}
    for i in range(reps):
        for k in labels[i % len(labels):] + labels[:i % len(labels)]:
            times[k].append(timed(fns[k], sync))
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
    compile_train = timed(steps["ours compiled"], sync)  # the first call compiles forward and backward
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
    gens = {"ours eager": lambda: generate(ours, prompt, pmask, max_new_tokens=N),
            "ours compiled": lambda: generate(compiled, prompt, pmask, max_new_tokens=N),
            "transformers": lambda: hf.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=N,
                                                min_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=None)}
    compile_gen = timed(gens["ours compiled"], sync)  # the prefill's graph and the decode step's
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
        rouge.porter_stem.cache_clear()  # every repetition starts cold, as a fresh process would
        return [rouge.rouge(p, r, use_stemmer=True) for p, r in pairs]

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
    tokens = sum(len(rouge.tokenize(p)) + len(rouge.tokenize(r)) for p, r in pairs) / n
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["rouge-score"])
    print(f"rouge: {n} pairs with stemming, {tokens:.0f} tokens per pair, median of {repeats} interleaved runs")
    print(f"  ours         {ours_s:8.2f} s  ({n / ours_s:9.0f} pairs/s)")
    print(f"  rouge-score  {theirs_s:8.2f} s  ({n / theirs_s:9.0f} pairs/s)")
    print(f"  speed-up     {theirs_s / ours_s:8.1f}x   values identical: {mismatches == 0} "
          f"({mismatches} of {3 * n} score triples differ)")
    assert mismatches == 0, f"{mismatches} score triples differ from rouge-score"
    return {"ours_s": ours_s, "rouge_score_s": theirs_s, "speedup": theirs_s / ours_s}


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
    print("generate: static vs continuous batching (generate.Decoder) on UltraChat-like reply lengths: lognormal, "
          "median 280 tokens, sigma 0.9, capped at 2048; prompts taken in length order, unrelated to reply length")
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
