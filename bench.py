"""Speed and memory of deltakd, as ratios against baselines measured in the same run. No GPU needed; where one is
present, the GPU cases run too.

    python bench.py data     data.Batches vs the old layout: compute lost to padding and to ranks waiting
    python bench.py loss     delta_kd_loss fused and eager vs the plain reference: peak memory added, time, passes
    python bench.py train    train.py tokens/s, on-policy runs' generation speed, host syncs per step (CPU: tiny
                             models; GPU: Qwen2.5-0.5B-shaped student, 1.5B-shaped teachers)
    python bench.py memory   the per-GPU peak of a train.py step, from fake tensors: the paper's runs, or train.py's
                             arguments with --world-size (--json: {"peak_gib": ...}; --real: measured, under torchrun)
    python bench.py gpu      on one GPU: a Delta-KD step's tokens/s, MFU, host syncs and peak memory, eager and
                             compiled, beside the memory estimate (--dry-run: the estimate alone); not among "all"
    python bench.py model    model.py, eager and compiled, vs transformers' Qwen2ForCausalLM: train step, generate
    python bench.py generate static vs continuous batching: decode-slot utilization, time per reply token, idle ranks,
                             host syncs per token (--json: a last line of JSON)
    python bench.py rouge    our ROUGE vs rouge-score on 6,000 pairs with stemming: time, identical values
    python bench.py targets  a training step from targets.py's cache vs the online step, same micro-batches (--json:
                             {"time_ratio", "memory_ratio"}; --run DIR: the cost of the top k with DIR's models)

The last three live in bench_model.py; the instruments (host syncs, memory traffic, the memory estimate) in
measure.py.
"""
import argparse
import contextlib
import gc
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import bench_model
import data
import measure
import parallel
import train
from deltakd import _CHUNK_BYTES, delta_kd_loss, delta_kd_loss_reference, delta_kd_target, topk_target
from measure import (allocator_peak, loss_passes, memory_args, memory_of_step, measured_step, private_torch, timed,
                     train_step_syncs)
from model import Qwen2, Qwen2Config, load_weights

REPO = Path(__file__).resolve().parent


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
# loss: fused and eager (chunked) vs naive

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
        return s, lambda: delta_kd_loss_reference(s, labels, t, t_raw, s_raw, 1.0, 1.0, 0.5).backward()
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
            times[variant].append(timed(run, torch.cuda.synchronize))
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
    _, args = memory_args(["--world-size", "1", *GPU_RUN])
    _, FakeStore, _, _ = private_torch()
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
    with measured_step(args, 1, device, fake=False) as (step, models, _):
        start = time.perf_counter()
        step(2)  # compiles, with --compile
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        step(2)
        seconds = timed(lambda: [step(2) for _ in range(opts.steps)], torch.cuda.synchronize)
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
# targets: a training step from targets.py's cache against the online step

TARGET_KS = (8, 16, 32, 64, 128)
PAPER_POSITIONS = 2e8  # UltraChat-200k's supervised reply positions, about (docs/scale.md)
PAPER_PARAMS = {"student": 1.5e9, "t_ft": 7.6e9, "t_raw": 7.6e9, "s_raw": 1.5e9}  # Qwen2.5-1.5B and -7B


def _targets_setup(work, k):
    """reproduce.sh's toy shapes with random weights (a step's time and memory do not depend on them), 240 chats, and
    a cache of pi* at alpha 1, top k: (online args, cached args)."""
    subprocess.run([sys.executable, str(REPO / "toy.py"), "--out", str(work / "data"), "--n-train", "240",
                    "--n-test", "2", "--n-corpus", "10"], check=True, capture_output=True)
    shapes = dict(rope_theta=1e6, num_attention_heads=4, max_position_embeddings=512)
    _train_model_dir(work / "teacher", Qwen2Config(vocab_size=784, hidden_size=128, intermediate_size=384,
                                                   num_hidden_layers=4, num_key_value_heads=2, **shapes),
                     work / "data", torch.float32)
    _train_model_dir(work / "student", Qwen2Config(vocab_size=776, hidden_size=64, intermediate_size=192,
                                                   num_hidden_layers=2, num_key_value_heads=1,
                                                   tie_word_embeddings=True, **shapes), work / "data", torch.float32)
    flags = ["--data", str(work / "data" / "train.jsonl"), "--max-len", "256"]
    subprocess.run([sys.executable, str(REPO / "targets.py"), "--model", str(work / "student"), "--teacher",
                    str(work / "teacher"), "--teacher-raw", str(work / "teacher"), *flags, "--top-k", str(k),
                    "--micro-batch-size", "64", "--out", str(work / "cache")], check=True, capture_output=True)
    common = ["--model", str(work / "student"), *flags, "--out", str(work / "run"), "--batch-size", "12",
              "--micro-batch-size", "12"]
    return (train.get_args(common + ["--teacher", str(work / "teacher"), "--teacher-raw", str(work / "teacher")]),
            train.get_args(common + ["--targets", str(work / "cache")]))


def _targets_steps(online, cached, steps):
    """Each step's seconds and one step's peak memory (GiB: the weights and AdamW's state held, and the step's own
    allocations) of each variant, on the same micro-batches, interleaved, in turn first."""
    dirs, tokenizer, examples, _, cache = train.preflight(cached)
    device = torch.device("cpu")
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (1,))
    student, frozen = train.build_models({**dirs, "t_ft": online.teacher, "t_raw": online.teacher_raw}, online, mesh,
                                         torch.float32)
    for m in (student, *frozen.values()):
        load_weights(m, m.name_or_path)
    optimizer = train.make_optimizer(student, online, fused=False)
    batches = iter(data.Batches(examples, 12, 12, pad_id=tokenizer.token_to_id("<|endoftext|>")))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    variants = {"online": (frozen, train.loss_settings(online), None),
                "cached": ({}, train.loss_settings(cached), cache)}
    held = {"online": [*student.parameters(), *(p for m in frozen.values() for p in m.parameters())],
            "cached": list(student.parameters())}
    times, peaks = {name: [] for name in variants}, {}
    for i in range(steps):
        micro_batches = next(batches)
        for name in (list(variants) if i % 2 else list(reversed(variants))):
            models, settings, source = variants[name]

            def step():
                train.kd_backward(student, models, micro_batches, settings, vocab, device, 1, cache=source)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if i == 1:  # a first step of each has made AdamW's state and warmed the allocator
                state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
                peaks[name] = allocator_peak(step, device)[1] + (sum(p.nbytes for p in held[name]) + state) / 2**30
            times[name].append(timed(step, lambda: None))
    return times, peaks


def bench_targets(as_json=False, k=64, steps=8, run=None):
    """train.py's Delta-KD step at the study's sizes, online (the frozen models built and run) and from targets.py's
    cache (the student alone): the same micro-batches, interleaved, in one process. Then, at paper size, the frozen
    forwards' share of a step (FLOP model) and the cache's storage; with run (a reproduce.sh toy folder), the cost of
    keeping only the top k, from its trained models."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # train.py's preflight talks
        online, cached = _targets_setup(Path(tmp), k)
        parallel.start()
        times, peaks = _targets_steps(online, cached, steps)
        parallel.end()
    median = {name: statistics.median(t[2:]) for name, t in times.items()}
    ratio = {"time_ratio": median["cached"] / median["online"], "memory_ratio": peaks["cached"] / peaks["online"]}
    print(f"targets: train.py's Delta-KD step at the study's sizes (reproduce.sh's toy models, 12 chats of up to 256 "
          f"tokens in one micro-batch, fp32, CPU, {torch.get_num_threads()} threads), the same micro-batches "
          f"interleaved, median of {steps - 2}:")
    print(f"  online (three frozen models built and run)  {median['online'] * 1e3:7.1f} ms   peak "
          f"{peaks['online'] * 1024:6.1f} MiB (weights, AdamW's state and the step's own)")
    print(f"  from the cache (top {k}, the student alone)    {median['cached'] * 1e3:7.1f} ms   peak "
          f"{peaks['cached'] * 1024:6.1f} MiB")
    print(f"  time ratio {ratio['time_ratio']:.2f} (goal <= 0.5: {'met' if ratio['time_ratio'] <= 0.5 else 'NOT met'})"
          f"   memory ratio {ratio['memory_ratio']:.2f}")
    step_flops = 6 * PAPER_PARAMS["student"]
    frozen_flops = 2 * sum(v for name, v in PAPER_PARAMS.items() if name != "student")
    print(f"  at paper size (FLOP model, 6N for the trained student, 2N per frozen forward): the frozen forwards are "
          f"{frozen_flops / 1e9:.1f} of {(frozen_flops + step_flops) / 1e9:.1f} GFLOP per token, "
          f"{frozen_flops / (frozen_flops + step_flops):.0%} of a Delta-KD step; from the cache a step does "
          f"{step_flops / (frozen_flops + step_flops):.2f}x the FLOPs")
    print("  the cache: 8k + 4 bytes per position (ids int32, log-probs float32, the tail's log-mass); at paper size, "
          f"{PAPER_POSITIONS:.0e} positions: " + ", ".join(f"k = {kk}: {(8 * kk + 4) * PAPER_POSITIONS / 1e9:.0f} GB"
                                                            for kk in TARGET_KS)
          + f", every id (151,665): {(8 * 151665 + 4) * PAPER_POSITIONS / 1e12:.0f} TB")
    if run:
        targets_exactness(Path(run))
    if as_json:
        print(json.dumps(ratio))
    return ratio


def targets_exactness(run, n=96, alpha=1.0):
    """What keeping only the top k of pi* costs, from a reproduce.sh toy run's trained models (the student at its
    start, s_raw): on the supervised positions of n training chats, pi*'s mass outside the top k (median and 99th
    percentile) and the loss's and the gradient's relative error against the exact target (the first step's)."""
    models = {name: Qwen2.from_pretrained(run / folder / "final", torch.float64) for name, folder in
              (("t_ft", "teacher-ft"), ("t_raw", "teacher-raw"), ("s_raw", "student-raw"))}
    tok = data.load_tokenizer(run / "student-raw" / "final")
    rows = data.load_rows(run / "data" / "train.jsonl", max_rows=n)
    batch = next(iter(data.Batches(data.build_examples(rows, tok, 256), n, n)))[0]
    V, at = tok.get_vocab_size(with_added_tokens=True), batch["positions"]
    labels = batch["labels"].flatten()[at + 1]
    with torch.no_grad():
        logits = {name: m(batch["input_ids"], logits_at=at)[:, :V] for name, m in models.items()}
    log_target = delta_kd_target(logits["t_ft"], logits["t_raw"], logits["s_raw"], alpha, 1.0)
    s = logits["s_raw"].clone().requires_grad_()
    exact = delta_kd_loss(s, labels, logits["t_ft"], logits["t_raw"], logits["s_raw"], alpha=alpha)
    (g_exact,) = torch.autograd.grad(exact, s)
    print(f"  exactness against k, {run.name}'s models, alpha {alpha:g}, {len(at)} positions of {n} training chats, "
          f"float64: | k | pi*'s mass outside, median / p99 | loss's relative error | first step's gradient's |")
    for k in (*TARGET_KS, V):
        kept = topk_target(log_target, k)
        loss = delta_kd_loss(s, labels, target=kept)
        (g,) = torch.autograd.grad(loss, s)
        tail = kept.log_tail.exp()
        print(f"    | {'all' if k == V else k} | {tail.median():.1e} / {tail.quantile(0.99):.1e} | "
              f"{abs(loss / exact - 1):.1e} | {(g - g_exact).norm() / g_exact.norm():.1e} |")


def main():
    benches = {"data": bench_data, "model": bench_model.bench_model, "loss": bench_loss,
               "rouge": bench_model.bench_rouge, "train": bench_train, "memory": measure.report_memory,
               "generate": bench_model.bench_generate, "targets": bench_targets}
    if sys.argv[1:2] == ["loss-worker"]:  # bench_loss runs each variant in a fresh process
        return loss_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    if sys.argv[1:2] == ["memory"]:  # takes train.py's arguments
        return measure.report_memory(sys.argv[2:])
    if sys.argv[1:2] == ["gpu"]:  # its own arguments, and not among "all"
        return bench_gpu(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="*", choices=[[], *benches], default=list(benches),
                        help="benchmarks to run (default: all)")
    parser.add_argument("--json", action="store_true",
                        help="generate: end with one line of JSON, {\"utilization\": {\"static\", \"continuous\"}} at "
                             "batch 32 and the other numbers; targets: {\"time_ratio\", \"memory_ratio\"}")
    parser.add_argument("--run", metavar="DIR",
                        help="targets: also the cost of keeping pi*'s top k, from this reproduce.sh toy run's models")
    args = parser.parse_args()
    for name in args.which:
        benches[name](**({"as_json": args.json} if name in ("generate", "targets") else {}),
                      **({"run": args.run} if name == "targets" else {}))
        print()


if __name__ == "__main__":
    main()
