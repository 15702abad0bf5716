"""Speed and memory of deltakd, as ratios against baselines measured in the same run. No GPU needed; where one is
present, the GPU cases run too.

    python bench.py model    model.py vs transformers' Qwen2ForCausalLM: forward+backward and generate time
    python bench.py loss     delta_kd_loss chunked vs the naive full-upcast version: peak memory added, time
    python bench.py rouge    our ROUGE vs rouge-score on 6,000 pairs with stemming: time, identical values
    python bench.py train    train.py tokens/s (CPU: tiny models; GPU: Qwen2.5-0.5B-shaped student, 1.5B teachers)
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import evaluate
from deltakd import delta_kd_loss
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


def _model_timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _model_compare(name, ours_fn, hf_fn, reps, sync, goal):
    ours_fn(), hf_fn()  # warm-up
    t_ours, t_hf = [], []
    for i in range(reps):  # interleaved, alternating who goes first
        pair = [(t_ours, ours_fn), (t_hf, hf_fn)]
        for times, fn in (pair if i % 2 == 0 else pair[::-1]):
            times.append(_model_timed(fn, sync))
    ours, hf = statistics.median(t_ours), statistics.median(t_hf)
    ratio = ours / hf
    print(f"  {name:<22} ours {ours * 1e3:8.1f} ms   transformers {hf * 1e3:8.1f} ms   ratio {ratio:.3f}"
          f"   (goal <= {goal}: {'met' if ratio <= goal else 'NOT met'})")
    return ratio


def _model_run(cfg, dtype, device, train_shape, reps):
    ours, hf = _model_pair(cfg, dtype, device)
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
    ours.train(), hf.train()
    r_train = _model_compare("forward+backward", train_step(ours, lambda m: m(ids, mask)),
                             train_step(hf, lambda m: m(input_ids=ids, attention_mask=mask).logits), reps, sync, 1.0)

    # greedy generation: batch 4, left-padded 32-token prompts, 48 new tokens, no early stop
    ours.eval(), hf.eval()
    B, T, N = 4, 32, 48
    prompt = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(device)
    pmask = (torch.arange(T)[None] >= torch.tensor([0, 3, 7, 12])[:, None]).long().to(device)
    out_ours = ours.generate(prompt, pmask, max_new_tokens=N)
    out_hf = hf.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=N, min_new_tokens=N,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    agree = (out_ours[:, T:] == out_hf[:, T:]).float().mean().item()
    r_gen = _model_compare("generate (4x32 -> +48)", lambda: ours.generate(prompt, pmask, max_new_tokens=N),
                           lambda: hf.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=N,
                                               min_new_tokens=N, do_sample=False, pad_token_id=0,
                                               eos_token_id=None), reps, sync, 0.8)
    print(f"  generated tokens equal to transformers': {agree:.1%}")
    return r_train, r_gen


def bench_model():
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_grad_enabled(True)
    print(f"model.py vs transformers {transformers.__version__} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); ratio = ours / transformers, lower is better")

    small = Qwen2Config(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)
    print("CPU fp32, random model: vocab 8192, hidden 256, 4 layers, 8 heads / 2 kv; train batch 4x256")
    _model_run(small, torch.float32, "cpu", (4, 256), reps=15)

    if torch.cuda.is_available():
        qwen05 = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                             tie_word_embeddings=True)
        print(f"{torch.cuda.get_device_name()} bf16, random model shaped like Qwen2.5-0.5B; train batch 8x1024")
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


def loss_worker(variant, n, vocab, repeats):
    """One variant in a fresh process: peak resident memory added by forward+backward, then the median time."""
    torch.manual_seed(0)
    shape = (n, vocab)
    s = torch.randn(shape, dtype=torch.bfloat16).mul_(3).requires_grad_()
    t, t_raw, s_raw = (torch.randn(shape, dtype=torch.bfloat16).mul_(3) for _ in range(3))
    labels = torch.randint(0, vocab, (n,))
    labels[: n // 4] = -100  # a prompt's worth of ignored positions
    fn = delta_kd_loss if variant == "chunked" else naive_delta_kd_loss
    args = (s, labels, t, t_raw, s_raw) if variant == "chunked" else (s, labels, t, t_raw, s_raw, 1.0, 1.0, 0.5, vocab)
    times, added = [], None
    for i in range(repeats + 1):
        s.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        fn(*args).backward()
        times.append(time.perf_counter() - start)
        if i == 0:
            added = (_rss_kib("VmHWM") - before) * 1024
    print(json.dumps({"added_bytes": added, "time_s": statistics.median(times[1:]), "input_bytes": s.nbytes}))


def bench_loss(n=2048, vocab=151936, repeats=3, rounds=2):
    print(f"delta_kd_loss forward+backward, N={n} positions, V={vocab}, bf16 inputs, CPU ({torch.get_num_threads()} "
          f"threads); peak RSS added, in units of one input logits tensor ({n * vocab * 2 / 2**20:.0f} MiB)")
    results = {"naive": [], "chunked": []}
    for _ in range(rounds):  # interleaved, each in a fresh process so that one's peak does not hide the other's
        for variant in results:
            out = subprocess.run([sys.executable, __file__, "loss-worker", variant, str(n), str(vocab), str(repeats)],
                                 check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.splitlines()[-1]))
    summary = {}
    for variant, runs in results.items():
        added = max(r["added_bytes"] for r in runs) / runs[0]["input_bytes"]
        seconds = statistics.median(r["time_s"] for r in runs)
        summary[variant] = (added, seconds)
        print(f"  {variant:8s} peak added {added:5.2f}x   time {seconds:6.2f} s")
    (a_n, t_n), (a_c, t_c) = summary["naive"], summary["chunked"]
    print(f"  memory: chunked adds {a_c:.2f}x (goal <= 2.0x; naive {a_n:.1f}x)   "
          f"time ratio chunked/naive {t_c / t_n:.2f} (goal <= 1.0)")


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


def _train_run(work, loss, student, teacher, extra):
    out = work / f"run-{loss}"
    kd = ["--teacher", str(teacher), "--teacher-raw", str(teacher)] if loss != "sft" else []
    cmd = [sys.executable, str(Path(__file__).parent / "train.py"), "--model", str(student), *kd, "--loss", loss,
           "--data", str(work / "data" / "train.jsonl"), "--out", str(out), "--lr", "1e-4", "--save-every", "1000",
           *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])  # the last interval: warmed up


def bench_train():
    """On the CPU: tiny student and teacher. On a GPU: a random student shaped like Qwen2.5-0.5B, teachers shaped
    like Qwen2.5-1.5B, over a toy tokenizer padded to Qwen's 151665 ids so that the loss sees a real vocabulary."""
    import data  # noqa: F401 (the toy tokenizer and data)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, str(Path(__file__).parent / "data.py"), "toy", "--out", str(work / "data"),
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
            extra = ["--batch-size", "16", "--micro-batch-size", "4", "--max-len", "1024", "--max-steps", "12",
                     "--log-every", "6"]
            dtype = torch.bfloat16
        else:
            shape = dict(vocab_size=640, rope_theta=1e6)
            student = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True, **shape)
            teacher = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, **shape)
            extra = ["--batch-size", "16", "--micro-batch-size", "8", "--max-len", "256", "--max-steps", "20",
                     "--log-every", "10"]
            dtype = torch.float32
        _train_model_dir(work / "student", student, work / "data", dtype)
        _train_model_dir(work / "teacher", teacher, work / "data", dtype)
        where = f"{torch.cuda.get_device_name()} bf16" if cuda else f"CPU fp32, {torch.get_num_threads()} threads"
        print(f"train.py, one process, {where}; student {student.hidden_size}x{student.num_hidden_layers}, "
              f"teachers {teacher.hidden_size}x{teacher.num_hidden_layers}; {' '.join(extra)}")
        for loss in ("sft", "deltakd"):
            r = _train_run(work, loss, work / "student", work / "teacher", extra)
            gpu = f"   MFU {r['mfu']:.1%}   peak memory {r['peak_mem_gib']:.1f} GiB" if cuda else ""
            print(f"  {loss:8s} {r['tokens_per_s']:10.0f} tokens/s{gpu}")


def main():
    benches = {"model": bench_model, "loss": bench_loss, "rouge": bench_rouge, "train": bench_train}
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
