"""Decoupled inference, as the paper runs it: the frozen models write Delta-KD's target once, and the student trains
alone from it.

    torchrun --nproc_per_node 8 targets.py --model S_RAW --teacher T_FT --teacher-raw T_RAW --data ... --out DIR \\
        --alpha 1 --temperature 1 --top-k 64
    torchrun --nproc_per_node 8 train.py --model S_RAW --loss deltakd --targets DIR --data ... --out RUN

One teacher-forced pass of the frozen models over the data's replies, data-parallel over the processes, each model
built and sharded as train.py builds its frozen models (FSDP2, the compute dtype). At every supervised position, pi*
over the whole vocabulary from the fp32 logits, by deltakd.delta_kd_target as the online loss computes it, kept as
its top k ids and the log of the mass outside them (deltakd.topk_target). Why: at paper size the three frozen
forwards are 79% of a Delta-KD step's FLOPs, and off-policy they compute the same target at every epoch, seed and lam.
alpha 0 needs no raw models: plain FKL targets, pi_t_ft itself.

The folder DIR:
- targets.json: what made it. alpha, T, k, the vocabulary, the data flags, the shards' plan, and hashes of the
  tokenizer and of each model's config and weights. A rerun into the same folder with any other setting is refused,
  naming it.
- shard-NNNNN.safetensors, up to --shard-size examples each: keys (E, 16) uint8, each example's content_key, by which
  a trainer finds it whatever its order, batch size, seed or process count; offsets (E + 1,) int64, each example's
  first row; and per supervised position, in the order of the example's tokens: ids (N, k) int32, which holds every
  Qwen id (151,665 of them); log_probs (N, k) float32, log pi* as the online loss computes it (fp32 rounding, a
  relative error of 6e-8 in pi*); log_tail (N,) float32. 8k + 4 bytes per position.
A shard is written under a temporary name and renamed whole: a killed run, rerun, reuses every finished shard and ends
with the same bytes as one that was never stopped. On SIGTERM every process finishes the shard in hand, and the run
exits 0 with the command that resumes it.
"""
import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

import parallel
from data import IGNORE, Batches, add_data_arguments, examples_from_arguments, load_tokenizer, step_inputs
from deltakd import TopK, _LOG_ZERO, chunk_positions, delta_kd_target, topk_target
from model import checked_model_dir, load_weights

FORMAT = "deltakd-targets-1"
DATA_FLAGS = ("data", "split", "max_rows", "skip_bad_rows", "max_len", "drop_long", "holdout")
MODEL_FLAGS = {"s_raw": "model", "t_ft": "teacher", "t_raw": "teacher_raw"}  # each model's flag, here and train.py


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--model", help="the raw student s_raw (train.py's --model); alpha 0 needs none")
    g.add_argument("--teacher", required=True, help="the fine-tuned teacher t_ft")
    g.add_argument("--teacher-raw", help="the same teacher before its SFT, t_raw; alpha 0 needs none")
    g = p.add_argument_group("the target")
    g.add_argument("--alpha", type=float, default=1.0, help="how much of the teacher's SFT shift pi* applies")
    g.add_argument("--temperature", type=float, default=1.0, help="the KD term's temperature, as train.py's")
    g.add_argument("--top-k", type=int, default=64,
                   help="ids kept per position; at or above the vocabulary size, every id: exact (diagnose.py reports "
                        "pi*'s mass outside the top k, to choose k before producing)")
    add_data_arguments(p)
    g = p.add_argument_group("output and runtime")
    g.add_argument("--out", required=True, help="the cache's folder: targets.json and its shards")
    g.add_argument("--shard-size", type=int, default=512, help="examples per shard: the work a rerun may redo")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass, per process")
    g.add_argument("--dtype", choices=list(parallel.DTYPES), help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    return p.parse_args(argv)


def content_key(example):
    """16 bytes that name an example by its content: a hash of its input ids and labels."""
    return hashlib.sha256(example["input_ids"].astype(np.int32).tobytes() + b"|" +
                          example["labels"].astype(np.int32).tobytes()).digest()[:16]


def supervised(example):
    """The positions of an example whose next token is supervised: the rows its cache entry holds, in order."""
    return np.flatnonzero(np.asarray(example["labels"][1:]) != IGNORE)


def file_hash(*paths):
    """A hash of the files' bytes, every one of them."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def tokenizer_hash(tokenizer):
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:32]


def data_settings(args):
    """The data flags as the cache records them; a local --data as its absolute path, so that any spelling matches."""
    return {k: str(Path(args.data).resolve()) if k == "data" and Path(args.data).exists() else getattr(args, k)
            for k in DATA_FLAGS}


# ----------------------------------------------------------------------------------------------------------------------
# the cache, as a trainer reads it

class TargetCache:
    """A targets.py folder, read lazily: each shard is memory-mapped, and a micro-batch's rows are read as they are
    needed. rows(micro_batch) gives its cached pi* (a TopK on the host) at the positions data.Batches lists."""

    def __init__(self, folder):
        self.folder = Path(folder)
        try:
            self.settings = json.loads((self.folder / "targets.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.folder} is not a targets.py folder: {e}") from e
        if self.settings.get("format") != FORMAT:
            raise ValueError(f"{self.folder}/targets.json: format {self.settings.get('format')!r}, not {FORMAT!r}")
        self.files, self.where = [], {}  # where: key -> (shard, first row, rows)
        for i in range(self.settings["shards"]):
            path = self.folder / f"shard-{i:05d}.safetensors"
            if not path.exists():
                continue  # a run still producing, or stopped: the examples it holds are missing, and named if wanted
            f = safe_open(path, framework="pt")
            keys, offsets = f.get_tensor("keys").numpy(), f.get_tensor("offsets").tolist()
            for e, key in enumerate(keys):
                self.where[key.tobytes()] = (len(self.files), offsets[e], offsets[e + 1] - offsets[e])
            self.files.append(f)

    def check(self, examples, tokenizer, args):
        """Why this cache cannot serve these examples as train.py's flags read them (one line), or None."""
        if self.settings["tokenizer"] != tokenizer_hash(tokenizer):
            return f"--targets {self.folder} was made with another tokenizer than --model {args.model}'s"
        if self.settings["vocab_size"] != tokenizer.get_vocab_size(with_added_tokens=True):
            return f"--targets {self.folder} has vocabulary {self.settings['vocab_size']}"
        mine = data_settings(args)
        for flag in (k for k in DATA_FLAGS if k != "max_rows"):  # a row limit reads a part: each row is checked below
            if self.settings["data_flags"][flag] != mine[flag]:
                return (f"--targets {self.folder} was made with --{flag.replace('_', '-')} "
                        f"{self.settings['data_flags'][flag]}, this run has {mine[flag]}")
        self.keys = [content_key(e) for e in examples]
        missing = [i for i, key in enumerate(self.keys) if key not in self.where]
        if missing:
            return (f"--targets {self.folder} lacks {len(missing)} of this run's {len(examples)} examples (the first: "
                    f"example {missing[0]}): another --data, or a production not yet finished; rerun targets.py")
        return None

    def rows(self, micro_batch):
        """The cached TopK of a micro-batch's positions (N rows, in the order of its `positions`), on the host, for the
        examples that check() accepted."""
        parts = []
        for e in micro_batch["index"].tolist():
            if e >= 0:  # a filler row has no supervised position
                shard, first, n = self.where[self.keys[e]]
                f = self.files[shard]
                parts.append([f.get_slice(name)[first:first + n] for name in ("ids", "log_probs", "log_tail")])
        if not parts:
            k = self.settings["top_k"]
            return TopK(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))
        ids, log_probs, log_tail = (torch.cat(x) for x in zip(*parts))
        return TopK(ids.long(), log_probs, log_tail)


# ----------------------------------------------------------------------------------------------------------------------
# the producer

def preflight(args):
    """Everything that can be wrong with the command, the models' folders and the data, found before any process
    group or weight: (folders, tokenizer, examples, the settings that targets.json records, but the weights' hashes)."""
    if args.alpha != 0 and not (args.model and args.teacher_raw):
        sys.exit(f"error: --alpha {args.alpha} needs --model (the raw student) and --teacher-raw; alpha 0 needs none")
    if args.temperature <= 0 or min(args.top_k, args.shard_size, args.micro_batch_size, args.max_len) < 1:
        sys.exit("error: need --temperature > 0, and --top-k, --shard-size, --micro-batch-size, --max-len >= 1")
    dirs, tokenizer = {}, None
    for name, flag in MODEL_FLAGS.items():
        if getattr(args, flag) and (name == "t_ft" or args.alpha != 0):
            try:
                dirs[name] = checked_model_dir(getattr(args, flag))
                tok = load_tokenizer(dirs[name])
            except (OSError, ValueError) as e:
                sys.exit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)}: {e}")
            if tokenizer and tok.get_vocab(True) != tokenizer.get_vocab(True):
                sys.exit(f"error: --{flag.replace('_', '-')} has another tokenizer than the models before it: pi* "
                         "compares distributions over the same ids")
            tokenizer = tokenizer or tok
    examples, seen = [], set()
    for e in examples_from_arguments(args, tokenizer)[0]:  # each content once: a repeated example shares its rows
        if (key := content_key(e)) not in seen:
            seen.add(key)
            examples.append(e)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    settings = {"format": FORMAT, "alpha": args.alpha, "temperature": args.temperature,
                "top_k": min(args.top_k, vocab), "vocab_size": vocab, "tokenizer": tokenizer_hash(tokenizer),
                "data_flags": data_settings(args), "dtype": parallel.dtype_name(args.dtype),
                "micro_batch_size": args.micro_batch_size,  # with the dtype, what a shard's bytes depend on
                "examples": len(examples), "shard_size": args.shard_size,
                "shards": math.ceil(len(examples) / args.shard_size),
                "positions": int(sum(len(supervised(e)) for e in examples))}
    return dirs, tokenizer, examples, settings


def check_folder(out, settings):
    """Refuses, naming the first setting that differs, to add to a cache that other settings made."""
    path = out / "targets.json"
    if not path.exists():
        if any(out.glob("shard-*.safetensors")):
            sys.exit(f"error: {out} holds shards but no targets.json, which says what made them: give another --out, "
                     "or delete the shards")
        return
    saved = json.loads(path.read_text())
    key = next((k for k, v in settings.items() if k in saved and saved[k] != v), None)
    if key == "data_flags":
        flag = next(k for k, v in settings[key].items() if saved[key].get(k) != v)
        key, old, new = flag, saved["data_flags"].get(flag), settings["data_flags"][flag]
    elif key:
        old, new = saved[key], settings[key]
    if key:
        sys.exit(f"error: {out} holds targets made with {key.replace('_', '-')} {old}, not {new}: give another --out, "
                 "or delete it to start again")


def model_hashes(dirs):
    """{t_ft, t_raw, s_raw: hash of its config.json and safetensors files}, of those in dirs: every byte of the
    weights (at paper size some seconds a model)."""
    return {name: file_hash(folder / "config.json", *sorted(folder.glob("*.safetensors")))
            for name, folder in dirs.items()}


def shard_tensors(examples, models, args, vocab, device, pad_id, micro_batches):
    """The shard of `examples`: one forward of the frozen models per micro-batch (`micro_batches` of them, the rest
    fillers that keep FSDP's collectives in step with the other processes), pi* at every supervised position."""
    if examples:
        batches = Batches(examples, len(examples), args.micro_batch_size, pad_id=pad_id)
        steps = next(iter(batches))  # the whole shard in one step, its layout fixed by the shard alone
    else:
        steps = []
    filler = {"input_ids": torch.full((1, 1), pad_id), "positions": torch.zeros(0, dtype=torch.long),
              "labels": torch.full((1, 1), IGNORE)}
    rows, k = [None] * len(examples), min(args.top_k, vocab)
    for i in range(micro_batches):
        mb = steps[i] if i < len(steps) else filler
        ids, at, _ = step_inputs(mb, device)
        with torch.no_grad():
            logits = {name: m(ids, logits_at=at) for name, m in models.items()}  # (N, V_model) each
        kept = [TopK(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))]
        chunk = chunk_positions(vocab, device)  # pi* over the whole vocabulary, a chunk of positions at a time
        for c in range(0, len(at), chunk):
            t_ft, t_raw, s_raw = (logits[name][c:c + chunk, :vocab] if name in logits else None
                                  for name in ("t_ft", "t_raw", "s_raw"))
            kept.append(topk_target(delta_kd_target(t_ft, t_raw, s_raw, args.alpha, args.temperature), k))
        ids, log_probs, log_tail = (torch.cat([x.cpu() for x in xs]) for xs in zip(*kept))
        rows_of = mb["positions"].numpy() // mb["input_ids"].shape[1]  # each position's row
        for row, e in enumerate(mb["index"].tolist() if i < len(steps) else []):
            if e >= 0:
                mine = torch.from_numpy(np.flatnonzero(rows_of == row))
                rows[e] = (ids[mine].int(), log_probs[mine].float(), log_tail[mine].float().clamp(min=_LOG_ZERO))
    if not examples:  # fillers only: this process had no shard to make this round
        return None
    keys = np.frombuffer(b"".join(content_key(e) for e in examples), np.uint8).reshape(-1, 16)
    return {"keys": torch.tensor(keys), "offsets": torch.tensor(np.cumsum([0] + [len(r[0]) for r in rows])),
            "ids": torch.cat([r[0] for r in rows]), "log_probs": torch.cat([r[1] for r in rows]),
            "log_tail": torch.cat([r[2] for r in rows])}


def publish(tensors, path):
    """Written under a temporary name, then renamed: a shard exists whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a cache is shared as any file is
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)

    # --- set-up: the command, models, data and folder checked before any process group or weight
    dirs, tokenizer, examples, settings = preflight(args)
    out = Path(args.out)
    check_folder(out, settings)
    rank, world, device = parallel.start()
    hashes = [model_hashes(dirs) if rank == 0 else None]  # every byte of the weights: once, on rank 0
    dist.broadcast_object_list(hashes, src=0)
    settings["models"] = hashes[0]
    check_folder(out, settings)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "targets.json.tmp").write_text(json.dumps(settings, indent=1) + "\n")
        os.replace(out / "targets.json.tmp", out / "targets.json")
    stop = []  # SIGTERM: finish the shard in hand, then stop with the others
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    # --- the frozen models, built and sharded as train.py builds them
    mesh = init_device_mesh(device.type, (world,))
    dtype = parallel.DTYPES[parallel.dtype_name(args.dtype)]
    models = {name: parallel.build(folder, mesh, dtype, dtype, trainable=False) for name, folder in dirs.items()}
    for name, folder in dirs.items():
        load_weights(models[name], folder)
    pad_id, vocab = tokenizer.token_to_id("<|endoftext|>"), settings["vocab_size"]

    # --- the shards, round by round: shard r * world + rank on each process; every process runs as many forwards as
    # the busiest, for FSDP's collectives
    n, size = settings["shards"], args.shard_size
    t0, shown, done, tokens = time.perf_counter(), 0.0, 0, 0
    first = min((r for r in range(math.ceil(n / world)) if any(  # the first round with work left, for the ETA
        not (out / f"shard-{s:05d}.safetensors").exists() for s in range(r * world, min(n, (r + 1) * world)))),
        default=0)
    for r in range(math.ceil(n / world)):
        shard = r * world + rank
        path = out / f"shard-{shard:05d}.safetensors"
        mine = examples[shard * size:(shard + 1) * size] if shard < n and not path.exists() else []
        plan = Batches(mine, len(mine), args.micro_batch_size, pad_id=pad_id).layout(range(len(mine))) if mine else []
        most = torch.tensor(len(plan), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)  # the most micro-batches of any process this round
        tensors = shard_tensors(mine, models, args, vocab, device, pad_id, int(most))
        if mine:
            publish(tensors, path)
        made = torch.tensor([sum(len(e["input_ids"]) for e in mine), len(stop)], device=device)
        dist.all_reduce(made)  # every process's tokens this round, and whether any was told to stop
        done, tokens, elapsed = min(n, (r + 1) * world), tokens + int(made[0]), time.perf_counter() - t0
        if rank == 0 and (elapsed - shown > 10 or done == n):
            print(f"shards {done}/{n}, {tokens / elapsed:.0f} tokens/s, ETA "
                  f"{elapsed / (r + 1 - first) * (math.ceil(n / world) - r - 1):.0f} s", flush=True)
            shown = elapsed
        if made[1] and done < n:
            if rank == 0:
                print(f"stopped by SIGTERM after {done} of {n} shards; the same command resumes, keeping them",
                      flush=True)
            break
    del models
    parallel.end()
    if rank == 0 and done == n:  # complete.json: every shard is out (reproduce.sh's sign that the step is done)
        (out / "complete.json").write_text(json.dumps({"shards": n}) + "\n")  # bytes a resumed run reproduces
        print(f"wrote {n} shards of pi* (alpha {args.alpha}, T {args.temperature}, top {settings['top_k']} of "
              f"{vocab} ids) for {len(examples)} examples, {settings['positions']} positions, to {out} in "
              f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
