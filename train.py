"""Train a Qwen2 student with SFT, forward KL, reverse KL, Delta-KD or MiniLLM: one plain FSDP2 loop for 1 to N GPUs.

    python train.py --model Qwen/Qwen2.5-7B --loss sft --data HuggingFaceH4/ultrachat_200k --out runs/teacher
    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-1.5B --teacher runs/teacher/final \
        --teacher-raw Qwen/Qwen2.5-7B --loss deltakd --data HuggingFaceH4/ultrachat_200k --out runs/deltakd

Every model, the frozen ones included, is built on the meta device, sharded with fully_shard (each block, then the
root), materialised with to_empty and filled from its safetensors one tensor at a time, so no process ever holds a
full copy. The loss is normalised by the global count of supervised tokens, so the same global batch gives the same
update whatever the number of processes and the micro-batch size. The on-policy branches (--loss minillm, and
--on-policy for the token-level losses) live in minillm.py. References: torchtitan (FSDP2, DCP), nanoGPT and nanochat
(the loop), Delta-KD (arXiv:2509.14526), MiniLLM (arXiv:2306.08543), GKD (arXiv:2306.13649).
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, \
    set_state_dict
from torch.distributed.device_mesh import init_device_mesh

import parallel
from data import Batches, add_data_arguments, examples_from_arguments, load_tokenizer, step_inputs, to_device
from deltakd import TopK, delta_kd_loss
from minillm import MiniLLM, global_count, on_policy_batches
from model import Qwen2, Qwen2Config, checked_model_dir, load_weights
from parallel import build
from targets import MODEL_FLAGS, TargetCache, model_hashes

LOSSES = {  # how the paper's token-level methods fall out of delta_kd_loss
    "sft": dict(lam=1.0),  # cross-entropy on the data, no teacher
    "fkl": dict(alpha=0.0, divergence="fkl"),  # KL(teacher || student)
    "rkl": dict(alpha=0.0, divergence="rkl"),  # KL(student || teacher)
    "deltakd": dict(divergence="fkl"),  # KL(pi* || student), pi* from the teacher's SFT shift
    "minillm": {},  # sequence-level KL(student || teacher) by policy gradient: minillm.py
}


def loss_settings(args):
    """delta_kd_loss's keyword arguments for --loss and its flags."""
    return {"alpha": args.alpha, "temperature": args.temperature, "lam": args.lam, **LOSSES[args.loss]}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--model", required=True, help="the model to train: a folder or a Hub id")
    g.add_argument("--teacher", help="the fine-tuned teacher (fkl, rkl, deltakd, minillm)")
    g.add_argument("--teacher-raw", help="the same teacher before its SFT (deltakd)")
    g.add_argument("--targets", metavar="DIR",
                   help="fkl, rkl, deltakd: pi* from targets.py's cache instead of the frozen models, which are then "
                        "neither built nor read (the paper's decoupled inference); alpha and T are the cache's")
    g.add_argument("--random-init", action="store_true",
                   help="start from random weights (--model then needs only config.json and the tokenizer): for "
                        "pre-training small raw models with --loss sft")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=list(LOSSES), default="deltakd", help="what to train with")
    g.add_argument("--alpha", type=float, help="deltakd: how much of the teacher's SFT shift to apply (default 1; "
                                               "with --targets, the cache's)")
    g.add_argument("--temperature", type=float, help="temperature of the KD term, not of sampling (default 1; with "
                                                     "--targets, the cache's)")
    g.add_argument("--lam", type=float, default=0.5, help="weight of the SFT term; the KD term gets 1 - lam (minillm: "
                   "the SFT term is added to the policy loss with this weight)")
    g = p.add_argument_group("on-policy: the student's own samples (minillm.py)")
    g.add_argument("--on-policy", type=float, default=0.0, metavar="FRACTION",
                   help="fkl, rkl, deltakd: on this seeded fraction of steps the replies are the student's own samples "
                        "for the same prompts (GKD); the KD term is computed on them, the SFT term only on data")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled reply (also capped by --max-len)")
    g.add_argument("--mix", type=float, default=0.2, help="minillm: sample from (1 - mix) student + mix teacher")
    g.add_argument("--reward-scale", type=float, default=0.5, help="minillm: multiplies the per-token reward")
    g.add_argument("--ppo-epochs", type=int, default=4, help="minillm: passes over each batch of rollouts")
    g.add_argument("--num-rollouts", type=int, default=256,
                   help="minillm: replies sampled per rollout phase (a multiple of --batch-size); a phase is "
                        "ppo-epochs x num-rollouts / batch-size optimizer steps")
    g = add_data_arguments(p)
    g.add_argument("--batch-size", type=int, default=64, help="sequences per optimizer step, over all processes")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass, per process")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (ignored with --max-steps)")
    g.add_argument("--max-steps", type=int, help="optimizer steps to run")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm; 0 disables")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order and --random-init")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/step-N/, final/; with "
                                                "several nodes, on a filesystem that every node sees")
    g.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps (and at the end); minillm: at the first rollout-phase boundary "
                        "after each N, so that a resumed run samples the same rollouts")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    g.add_argument("--log-every", type=int, default=10, help="log every N steps")
    g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on every block")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each block whole (after --grad-ckpt, before FSDP, as torchtitan does), one "
                        "compile cache per model. Measured on a 2-core CPU, fp32, small model (bench.py model): a "
                        "training step 0.94x transformers' time against eager's 1.01x, after 15-120 s of compiling, "
                        "so off by default; not yet measured on a GPU (bench.py gpu)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU bf16 peak for MFU (H100 SXM: 989)")
    args = p.parse_args(argv)
    if not args.targets:  # with --targets, the cache's (target_cache)
        args.alpha = 1.0 if args.alpha is None else args.alpha
        args.temperature = 1.0 if args.temperature is None else args.temperature
    return args


def check_args(args):
    """Everything that can be wrong with the command line alone."""
    if args.targets and (args.loss not in ("fkl", "rkl", "deltakd") or args.on_policy or args.teacher or
                         args.teacher_raw):
        sys.exit(f"error: --targets is pi* read from a cache, for off-policy fkl, rkl and deltakd: not with --loss "
                 f"{args.loss}{', --on-policy' * bool(args.on_policy)}, nor beside --teacher or --teacher-raw "
                 "(on-policy methods and MiniLLM need the models online)")
    if args.loss in ("fkl", "rkl", "deltakd", "minillm") and not args.teacher and not args.targets:
        sys.exit(f"error: --loss {args.loss} needs --teacher (the fine-tuned teacher), or --targets")
    if args.loss == "deltakd" and args.alpha != 0 and not (args.teacher_raw or args.targets):
        sys.exit("error: --loss deltakd needs --teacher-raw (the teacher before SFT), or --alpha 0, or --targets")
    if args.random_init and args.loss != "sft":
        sys.exit("error: --random-init is for pre-training with --loss sft; a distilled student starts pretrained")
    if min(args.batch_size, args.micro_batch_size, args.max_len, args.max_new_tokens, args.ppo_epochs,
           args.num_rollouts) < 1:
        sys.exit("error: --batch-size, --micro-batch-size, --max-len, --max-new-tokens, --ppo-epochs and "
                 "--num-rollouts must be at least 1")
    if not 0 <= args.on_policy <= 1 or (args.on_policy and args.loss not in ("fkl", "rkl", "deltakd")):
        sys.exit(f"error: --on-policy {args.on_policy}: a fraction in [0, 1], for --loss fkl, rkl or deltakd")
    if not 0 <= args.mix < 1:
        sys.exit(f"error: --mix {args.mix} must lie in [0, 1): the student's share keeps the importance weights finite")
    if args.loss == "minillm" and args.num_rollouts % args.batch_size:
        sys.exit(f"error: --loss minillm needs --num-rollouts ({args.num_rollouts}) a multiple of --batch-size "
                 f"({args.batch_size})")
    if not (args.max_steps or args.epochs > 0) or args.save_every < 1 or args.keep_checkpoints < 1:
        sys.exit("error: need --max-steps > 0 or --epochs > 0, --save-every >= 1 and --keep-checkpoints >= 1")


def preflight(args):
    """Everything that can be wrong with the command, the model folders and the data, found before any process group
    or weight: ({s_raw, t_ft, t_raw: folder} as given, the tokenizer, the examples, whether the data are chats, and
    the target cache of --targets or None)."""
    check_args(args)
    dirs = {}
    for name, flag in MODEL_FLAGS.items():
        if getattr(args, flag):
            try:  # a local folder or a cached Hub download; --random-init needs only its config and tokenizer
                dirs[name] = checked_model_dir(getattr(args, flag), weights=not (name == "s_raw" and args.random_init))
            except (OSError, ValueError) as e:
                sys.exit(f"error: --{flag.replace('_', '-')}: {e}")
    tokenizer = load_tokenizer(dirs["s_raw"])
    for name in ("t_ft", "t_raw"):
        if name in dirs and load_tokenizer(dirs[name]).get_vocab(True) != tokenizer.get_vocab(True):
            flag = MODEL_FLAGS[name]
            sys.exit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)} has a different tokenizer from "
                     f"--model {args.model}: token-level KD compares distributions over the same ids")
    examples, chats = examples_from_arguments(args, tokenizer)
    return dirs, tokenizer, examples, chats, target_cache(args, dirs, examples, tokenizer) if args.targets else None


def target_cache(args, dirs, examples, tokenizer):
    """--targets: the cache, checked against this run's tokenizer, data, examples and raw student; alpha and T, when
    not given, taken from it. Each refusal names what differs, before any process group or weight."""
    try:
        cache = TargetCache(args.targets)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --targets: {e}")
    if why := cache.check(examples, tokenizer, args):
        sys.exit(f"error: {why}")
    if cache.settings["alpha"] != 0 and cache.settings["models"]["s_raw"] != model_hashes(dirs)["s_raw"]:
        sys.exit(f"error: --targets {args.targets} holds pi* made from another raw student than --model {args.model}: "
                 "pi* is the raw student moved by the teacher's SFT shift, so it serves that student alone")
    alpha = 0.0 if args.loss in ("fkl", "rkl") else args.alpha  # fkl and rkl are alpha 0 whatever the flag
    for flag, mine in (("alpha", alpha), ("temperature", args.temperature)):
        if mine is not None and mine != cache.settings[flag]:
            sys.exit(f"error: --{flag} {mine}, but --targets {args.targets} holds pi* at {flag} "
                     f"{cache.settings[flag]}" + (f" (--loss {args.loss} is alpha 0)" if flag == "alpha" else ""))
        setattr(args, flag, cache.settings[flag])
    return cache


# ----------------------------------------------------------------------------------------------------------------------
# models, and one step of a token-level loss

def build_models(dirs, args, mesh, compute_dtype):
    """The student, in fp32 master weights, and the frozen models that its loss reads, stored in the compute dtype:
    (student, {"t_ft", "t_raw", "s_raw"} as needed), their weights not yet loaded."""
    backend = "inductor" if args.compile else None
    student = build(dirs["s_raw"], mesh, compute_dtype, torch.float32, True, args.grad_ckpt, backend)
    frozen = {}
    if args.loss != "sft" and not args.targets:
        frozen["t_ft"] = build(dirs["t_ft"], mesh, compute_dtype, compute_dtype, False, compile=backend)
    if args.loss == "deltakd" and args.alpha != 0 and not args.targets:
        frozen["t_raw"] = build(dirs["t_raw"], mesh, compute_dtype, compute_dtype, False, compile=backend)
        frozen["s_raw"] = build(dirs["s_raw"], mesh, compute_dtype, compute_dtype, False, compile=backend)
    return student, frozen


def random_init(out, dirs, args, rank):
    """--random-init: rank 0 writes the initial weights once, so every rank and every rerun loads the same ones."""
    if rank == 0 and not (out / "init").exists():
        torch.manual_seed(args.seed)
        init = Qwen2(Qwen2Config.from_json(dirs["s_raw"]))
        init.init_weights()
        init.save_pretrained(out / "init", tokenizer_dir=dirs["s_raw"])
    dist.barrier()
    return {**dirs, "s_raw": out / "init"}


def make_optimizer(student, args, fused):
    decay = [p for p in student.parameters() if p.ndim >= 2]  # no weight decay on biases and norms
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), fused=fused)


def model_flops_per_token(n_params):
    """For MFU, from {"student": parameters, frozen model: parameters, ...}: 6N for the trained student (forward and
    backward), 2N for each frozen model's forward; attention's own FLOPs are left out."""
    return 6 * n_params["student"] + 2 * sum(v for k, v in n_params.items() if k != "student")


def check_same_data(examples, rank, world):
    """Every rank loads the data itself; a rank whose Hub listing failed may read a smaller local cache. Different
    example lists would silently duplicate and drop examples, or hang at the end of an epoch: stop instead."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(e["input_ids"].tobytes())
        digest.update(e["labels"].tobytes())
    everyone = [None] * world
    dist.all_gather_object(everyone, (len(examples), digest.hexdigest()[:12]))
    if len(set(everyone)) > 1:
        if rank == 0:
            print("error: the processes loaded different data (examples, hash of the tokens): "
                  + ", ".join(f"rank {r}: {n}, {h}" for r, (n, h) in enumerate(everyone)), file=sys.stderr)
        dist.destroy_process_group()
        sys.exit(1)


def kd_backward(student, frozen, micro_batches, loss_kwargs, vocab_size, device, world, scale=1.0, cache=None):
    """Forward and backward of one optimizer step of a token-level loss; returns this rank's share of the logged
    values. scale multiplies the loss: 1 - lam on an on-policy step, whose KD term alone is trained. cache: pi* read
    from targets.py's cache, in place of the frozen models (then none)."""
    # The global count of supervised tokens, all-reduced before the step, so the same global batch gives the same
    # update however it is split. FSDP averages gradients over ranks, so each rank divides by count / world: the
    # average of the ranks' gradients is then the global batch's.
    num_tokens = global_count(micro_batches, device) / world
    batch = [step_inputs(mb, device) for mb in micro_batches]  # every copy queued at once, none waited for
    cached = [None if cache is None else TopK(*(to_device(x, device) for x in cache.rows(mb))) for mb in micro_batches]
    stats = {"loss": 0.0, "sft": 0.0, "kd": 0.0, "tokens": sum(mb["attention_mask"].sum() for mb in micro_batches)}
    for (input_ids, at, target), pi in zip(batch, cached):
        # Batches pads on the right, so plain causal attention is already exact on every real token: no mask. Only
        # the supervised positions get logits, the largest tensors of the step: prompts and padding need none.
        with torch.no_grad():
            logits = {k: m(input_ids, logits_at=at) for k, m in frozen.items()}  # (N, V) each
        loss, parts = delta_kd_loss(student(input_ids, logits_at=at), target, logits.pop("t_ft", None),
                                    logits.pop("t_raw", None), logits.pop("s_raw", None), **loss_kwargs,
                                    target=pi, vocab_size=vocab_size, num_tokens=num_tokens, return_parts=True,
                                    positions=torch.arange(len(target), device=device))  # frozen logits freed here
        (loss * scale if scale != 1 else loss).backward()  # the loss scales its gradient in place: no second buffer
        for k, v in (("loss", loss.detach() * scale), ("sft", parts["sft"]), ("kd", parts["kd"])):
            stats[k] += v / world
    return stats


def train_step(step, micro_batches, student, frozen, ppo, examples, args, ctx):
    """Forward and backward of one optimizer step, by --loss: this rank's share of the logged values."""
    if ppo:  # MiniLLM: a rollout phase when one begins, then one PPO minibatch and the SFT term
        return ppo.step(step, micro_batches)
    kd = dict(vocab_size=ctx["vocab_size"], device=ctx["device"], world=ctx["world"])
    if ctx["cache"]:  # decoupled inference: pi* from targets.py's cache
        return kd_backward(student, {}, micro_batches, loss_settings(args), **kd, cache=ctx["cache"])
    if args.on_policy and random.Random(f"{args.seed}-{step}").random() < args.on_policy:
        micro_batches, sampled = on_policy_batches(student, examples, micro_batches, step, args, ctx["stop_ids"],
                                                   ctx["vocab_size"], ctx["rank"], ctx["world"], ctx["pad_id"])
        parts = kd_backward(student, frozen, micro_batches, {**loss_settings(args), "lam": 0.0}, **kd,
                            scale=1 - args.lam)
        del parts["sft"]  # the SFT term counts data replies only: on this step, none
        return {**parts, **{k: v / ctx["world"] for k, v in sampled.items()}}
    return kd_backward(student, frozen, micro_batches, loss_settings(args), **kd)


def all_reduced(parts, device):
    """The logged values summed over ranks, in one all-reduce, as (names, values). The losses are on the device; the
    host's numbers (tokens, seconds) join them by a copy that does not wait for the device."""
    on_device = sorted(k for k, v in parts.items() if torch.is_tensor(v) and v.device == device)
    on_host = sorted(set(parts) - set(on_device))
    values = [parts[k].float().reshape(1) for k in on_device]
    if on_host:
        values.append(to_device(torch.stack([torch.as_tensor(parts[k], dtype=torch.float32) for k in on_host]), device))
    values = torch.cat(values)
    dist.all_reduce(values)
    return on_device + on_host, values


def log_record(step, total_steps, lr, grad_norm, stats, counts, seconds, steps, flops_per_token, world, args):
    """metrics.jsonl's line for the steps since the last log: the losses and the other values (means per step), the
    learning rate, the gradient norm, speed, ETA and, on a GPU, MFU and peak memory."""
    summed = ("tokens", "gen_s", "gen_tokens")  # totals over the interval; the others are means per step
    means = {k: (v / (1 if k in summed else counts[k])).item() for k, v in stats.items()}
    record = {"step": step, **{k: means.pop(k) for k in ("loss", "sft", "kd") if k in means}, "lr": lr,
              "grad_norm": grad_norm.item(), "tokens_per_s": means.pop("tokens") / seconds,
              "eta_s": seconds / steps * (total_steps - step)}
    if "gen_s" in means:  # time spent sampling rollouts or on-policy replies; reply tokens per second of it
        gen_s, gen_tokens = means.pop("gen_s"), means.pop("gen_tokens")
        record["gen_share"] = gen_s / seconds
        if gen_s:  # a MiniLLM interval shorter than a phase may not sample
            record["gen_tokens_per_s"] = gen_tokens / gen_s
    record.update(means)
    if torch.cuda.is_available():
        record["mfu"] = flops_per_token * record["tokens_per_s"] / world / (args.peak_tflops * 1e12)
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30  # what tensors held
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30  # with the cached blocks
    return record


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints: sharded (DCP) and resumable, each published whole by a rename; the final export in HF format

def checkpoints(out):
    """Complete checkpoints, oldest first: a folder counts once it has been renamed from its .tmp name."""
    found = [(int(m.group(1)), d) for d in (out / "checkpoints").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", d.name)) and (d / "trainer_state.json").exists()]
    return [d for _, d in sorted(found)]


def save_checkpoint(out, step, model, optimizer, batches, args, rank):
    final = out / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted save left behind
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)  # sharded: each rank writes its own part
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        state = {"step": step, "data": batches.state_dict(), "args": vars(args)}
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # the checkpoint exists from here on, whole
        for old in checkpoints(out)[:-args.keep_checkpoints]:
            shutil.rmtree(old)
    dist.barrier()


def resume(out, model, optimizer, batches, args, rank, log):
    """The step to start from: the newest complete checkpoint's, loaded, or 0. Rank 0 decides, and every rank takes
    the same branch, or the collectives below would hang."""
    found = checkpoints(out) if rank == 0 else []
    path = [found[-1] if found else None]
    dist.broadcast_object_list(path, src=0)
    if path[0] is None:
        return 0
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path[0]))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = json.loads((path[0] / "trainer_state.json").read_text())
    batches.load_state_dict(state["data"])
    log(f"resuming from {path[0]} at step {state['step']}")
    changed = {k: (v, vars(args)[k]) for k, v in state["args"].items() if vars(args).get(k, v) != v}
    if changed:
        log(f"warning: these arguments differ from the checkpoint's (saved, now): {changed}")
    return state["step"]


def export(out, student, dirs, compute_dtype, stop_ids, chats, rank):
    """The final weights in Hugging Face format, gathered on rank 0 and written atomically."""
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        for name in full:  # one tensor at a time: never an fp32 and a bf16 copy of the whole model at once
            full[name] = full[name].to(compute_dtype)
        # trained on chats, the model ends its replies with <|im_end|>; exported so, as Qwen2.5-Instruct is
        student.save_pretrained(out / "final", state_dict=full, tokenizer_dir=dirs["s_raw"],
                                eos_token_id=stop_ids if chats else None)
        print(f"wrote {out / 'final'}")
    dist.barrier()


def stop_on_nan(out, step, loss, grad_norm, log):
    """A loss or gradient that is not finite: stop before it reaches the weights or a checkpoint."""
    good = checkpoints(out)
    log(f"error: step {step + 1}: loss {loss.item()}, gradient norm {grad_norm.item()}; stopping. Last good "
        f"checkpoint: {good[-1] if good else 'none'}", file=sys.stderr)
    dist.destroy_process_group()
    sys.exit(1)


def lr_at(step, args, total_steps):
    """Linear warmup to --lr, then cosine decay to --min-lr at the last step. A function of the step: resuming needs
    no scheduler state."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - 1 - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)

    # --- set-up: the command, models' folders and data checked before any process group or weight; then processes
    dirs, tokenizer, examples, chats, cache = preflight(args)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    stop_ids = [tokenizer.token_to_id("<|im_end|>"), pad_id]
    rank, world, device = parallel.start()  # torchrun's processes, or a world of one: the same path
    check_same_data(examples, rank, world)
    batches = Batches(examples, args.batch_size, args.micro_batch_size, rank, world, args.seed, pad_id)
    total_steps = args.max_steps or math.ceil(args.epochs * len(batches))
    mesh = init_device_mesh(device.type, (world,))
    compute_dtype = parallel.DTYPES[parallel.dtype_name(args.dtype)]
    log = print if rank == 0 else lambda *a, **k: None
    out = Path(args.out)
    if args.random_init:
        dirs = random_init(out, dirs, args, rank)

    # --- build: every model on the meta device, sharded, then filled from its safetensors; resume or start
    student, frozen = build_models(dirs, args, mesh, compute_dtype)
    for name in frozen:
        load_weights(frozen[name], frozen[name].name_or_path)
    optimizer = make_optimizer(student, args, fused=device.type == "cuda")
    ppo = MiniLLM(args, examples, student, frozen["t_ft"], vocab_size, stop_ids, rank, world, device,
                  pad_id) if args.loss == "minillm" else None
    step = resume(out, student, optimizer, batches, args, rank, log)
    if step == 0:
        load_weights(student, dirs["s_raw"])
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in {"student": student, **frozen}.items()}
    log(json.dumps({"config": vars(args), "world_size": world, "device": str(device), "dtype": str(compute_dtype),
                    "vocab_size": vocab_size, "examples": len(examples), "steps_per_epoch": len(batches),
                    "total_steps": total_steps, "parameters": n_params}, indent=1))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    ctx = dict(vocab_size=vocab_size, device=device, rank=rank, world=world, stop_ids=stop_ids, pad_id=pad_id,
               cache=cache)

    # --- the loop: step, clip, stop on a NaN, optimizer, log, checkpoint; SIGTERM (what SLURM and Kubernetes send
    # before a kill; torchrun passes it on and waits 30 s) finishes the step in hand, saves and stops every rank
    next_save, sigterm, stopped = (step // args.save_every + 1) * args.save_every, [], False
    signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))
    stats, counts = {}, {}  # sums since the last log of this rank's shares; how many steps reported each value
    t_log, steps_since_log = time.perf_counter(), 0
    while step < total_steps and not stopped:
        for micro_batches in batches:  # one epoch; each item is one optimizer step
            lr = lr_at(step, args, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = train_step(step, micro_batches, student, frozen, ppo, examples, args, ctx)
            names, reduced = all_reduced({**parts, "sigterm": float(bool(sigterm))}, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip or float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # the step's one host sync: a bad step must stop before it reaches the weights or a checkpoint, and a
            # SIGTERM on any rank stops them all after the same step
            finite, stopped = torch.stack([torch.isfinite(torch.cat([reduced, grad_norm.reshape(1)])).all(),
                                           reduced[names.index("sigterm")] > 0]).tolist()
            if not finite:
                stop_on_nan(out, step, reduced[names.index("loss")], grad_norm, log)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stopped = stopped and (not ppo or step % ppo.steps_per_phase == 0)  # MiniLLM: at its phase's end
            for k, v in zip(names, reduced):
                if k != "sigterm":
                    stats[k], counts[k] = stats.get(k, 0.0) + v, counts.get(k, 0) + 1
            steps_since_log += 1

            if step % args.log_every == 0 or step == total_steps:  # the only place that reads values back to the host
                record = log_record(step, total_steps, lr, grad_norm, stats, counts, time.perf_counter() - t_log,
                                    steps_since_log, model_flops_per_token(n_params), world, args)
                log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
                if rank == 0:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                stats, counts = {}, {}
                t_log, steps_since_log = time.perf_counter(), 0
            if step == total_steps or stopped or (step >= next_save and (not ppo or step % ppo.steps_per_phase == 0)):
                save_checkpoint(out, step, student, optimizer, batches, args, rank)
                next_save = (step // args.save_every + 1) * args.save_every
            if stopped:
                log(f"stopped by SIGTERM after step {step} of {total_steps}, saved in {checkpoints(out)[-1]}; the same "
                    "command resumes from there", flush=True)
            if step == total_steps or stopped:
                break

    # --- export
    if not stopped:
        export(out, student, dirs, compute_dtype, stop_ids, chats, rank)
    del student, frozen, optimizer, ppo  # before the group goes: FSDP's hooks hold the models in reference cycles
    parallel.end()


if __name__ == "__main__":
    main()
