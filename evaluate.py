"""Evaluate a model by the ROUGE of its generated replies.

    python evaluate.py --model runs/deltakd/final --data HuggingFaceH4/ultrachat_200k --max-examples 2000 --out DIR
    torchrun --nproc_per_node 8 evaluate.py ...           (the same scores, N times faster)
    python evaluate.py --predictions DIR/predictions.jsonl --out DIR2   (score saved replies, no model)

Replies are decoded greedily by generate.py's continuous batching and scored by rouge.py, which gives exactly what
Google's rouge-score gives. Beside ROUGE: R-L with the numbers masked, R-L of the numbers alone, and the share of
right \\boxed{} answers, which say where a reply goes wrong. --write-data turns the replies into SeqKD's data.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data import encode_prompt, last_reply, load_rows, load_tokenizer, \
    read_file
import parallel
from generate import Decoder, seed_of
from model import Qwen2, checked_model_dir
from rouge import corpus_rouge, rouge, tokenize

# ----------------------------------------------------------------------------------------------------------------
# Command line: generate replies with model.py to data.py's conversations, score them, write them out

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Score a model's replies to conversations, or saved replies, by ROUGE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model folder or Hub id, with its tokenizer in the same folder")
    p.add_argument("--data", help="conversations: a .jsonl/.json/.parquet file, a folder of them, or a Hub dataset id")
    p.add_argument("--split", default="test_sft",
                   help="split of a folder or Hub dataset, optionally with a row range like cot[100000:101000]")
    p.add_argument("--max-examples", type=int, help="use the first N rows only (after --holdout and --max-len)")
    p.add_argument("--holdout", choices=["train", "test"],
                   help="split the prompts by a hash of each: 'test' scores only those held out from training "
                        "(train.py --holdout train), each once; 'train' the others (SeqKD data for training)")
    p.add_argument("--max-len", type=int,
                   help="keep only conversations whose chat, up to the scored reply, fits in this many tokens: "
                        "train.py --drop-long's rule")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of stopping")
    p.add_argument("--max-prompt-len", type=int, default=2048,
                   help="longest prompt in tokens: longer ones lose their oldest turns (the system prompt and the "
                        "last user turn stay), so that a long history cannot run prefill out of memory")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="longest reply; the ROUGE ceiling it allows (the reference cut there) is reported")
    p.add_argument("--batch-size", type=int, default=16,
                   help="decode slots: replies decoded at once. A reply that ends gives its slot to the next prompt "
                        "(continuous batching)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, the same replies for any process count")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds sampling: each prompt draws with a seed made from this and its index in the data, so "
                        "that its reply does not depend on the batch, the slot or the number of processes")
    p.add_argument("--dtype", choices=list(parallel.DTYPES), help="compute dtype; none: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks and the one-token decode step (fixed shapes: one graph serves every "
                        "token). Measured on a 2-core CPU, fp32, small model (bench.py model): generation 0.76x "
                        "transformers' time against eager's 0.80x, after 11-110 s of compiling, so off by default; "
                        "not yet measured on a GPU (bench.py gpu)")
    p.add_argument("--out", default="runs/eval",
                   help="folder for predictions.jsonl and summary.json. Each reply is also appended to "
                        "replies/rank-<N>.jsonl as it ends: the same command run again reuses them, after a crash too")
    p.add_argument("--predictions", metavar="FILE.jsonl",
                   help="score this file's {prediction, reference, id (optional)} rows instead of generating: "
                        "another system's outputs, or SeqKD data")
    p.add_argument("--write-data", metavar="FILE.jsonl",
                   help="for SeqKD (train.py --data FILE.jsonl): also write the data's rows {id, messages} with "
                        "the last assistant reply replaced by the model's, the earlier (gold) replies kept as context "
                        "only (\"weight\": 0), and the replies cut at --max-new-tokens left out")
    return p.parse_args(argv)


def check_args(args):
    default = get_args([])
    def flags(keys):
        return ", ".join(f"--{k.replace('_', '-')}" for k in keys)
    given = [k for k, v in vars(args).items() if k not in ("predictions", "out") and v != getattr(default, k)]
    if args.predictions and given:  # every flag but --out serves a model, so with --predictions none may be given
        sys.exit(f"error: --predictions scores saved replies: it takes no {flags(given)}")
    if not args.predictions and not (args.model and args.data):
        sys.exit("error: need --model and --data, or --predictions FILE.jsonl")
    if args.predictions and not Path(args.predictions).is_file():
        sys.exit(f"error: --predictions {args.predictions}: no such file")
    for flag in ("max_examples", "max_new_tokens", "batch_size", "max_len", "max_prompt_len"):
        if (value := getattr(args, flag)) is not None and value < 1:
            sys.exit(f"error: --{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        sys.exit(f"error: need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")


def read_predictions(path):
    """Every row of a predictions file, checked before any is scored. data.py reads it: lines end at "\\n" only."""
    rows = []
    for where, rid, row, problem in read_file(path):
        if problem:
            sys.exit(f"error: {where}: {problem}")
        for field in ("prediction", "reference"):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                sys.exit(f"error: {where}: missing field {field!r} (a string)")
        rows.append({"id": str(row.pop("id", rid)), **row})  # the id load_rows would give it
    if not rows:
        sys.exit(f"error: --predictions {path}: no rows")
    return rows


def prompt_within(messages, tokenizer, max_len):
    """The turns before the last reply, the oldest exchanges dropped until their prompt fits in max_len tokens (the
    system prompt and the last user turn stay): (turns, prompt token ids), or (None, None) if even those do not fit."""
    last = last_reply(messages)
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    starts = [k for k in range(len(head), last) if messages[k]["role"] == "user"] or [len(head)]
    for k in starts:  # from the whole history down to the last user turn alone
        ids = encode_prompt(head + messages[k:last + 1], tokenizer)  # with the reply, which encode_prompt leaves out
        if len(ids) <= max_len:
            return head + messages[k:last], ids
    return None, None


def model_files(path):
    """--model's folder and its tokenizer, checked before any weight is read."""
    try:
        model_dir = checked_model_dir(path)
        return model_dir, load_tokenizer(model_dir)  # the model's own: a missing one is an error, not a default
    except (OSError, ValueError) as e:
        sys.exit(f"error: --model {path}: {e}")


def load_chats(args, tokenizer):
    try:
        rows = load_rows(args.data, split=args.split, max_rows=args.max_examples, skip_bad=args.skip_bad_rows,
                         holdout=args.holdout,
                         fit=(tokenizer, args.max_len) if args.max_len else None)
    except (OSError, ValueError) as e:  # data.py's messages name the file and line
        sys.exit(f"error: {e}" + ("; pass --split, e.g. train or cot[100000:101000]" if "for split" in str(e) else ""))
    chats = [r for r in rows if "messages" in r]  # load_rows lets through only chats with an assistant turn
    if not chats:
        sys.exit(f"error: --data {args.data}: none of its {len(rows)} rows is a conversation with an assistant turn")
    if len(chats) < len(rows):
        print(f"skipping {len(rows) - len(chats)} plain-text rows of {args.data}: they have no reply to compare with")
    return chats


def load_examples(args, tokenizer):
    chats = load_chats(args, tokenizer)
    examples, cut = [], 0
    for r in chats:
        r["last"] = last_reply(r["messages"])
        r["context"], r["prompt"] = prompt_within(r["messages"], tokenizer, args.max_prompt_len)
        cut += r["context"] != r["messages"][:r["last"]]
        if r["prompt"] is not None:
            examples.append(r)
    if cut:
        print(f"--max-prompt-len {args.max_prompt_len}: cut {cut} of {len(chats)} prompts to their latest turns, and "
              f"left out the {len(chats) - len(examples)} whose last user turn alone does not fit")
    if not examples:
        sys.exit(f"error: --max-prompt-len {args.max_prompt_len}: no prompt fits")
    return examples


def rouge_ceiling(references, tokenizer, max_new_tokens):
    """What a perfect reply could score under --max-new-tokens: each reference cut to that many tokens, against itself
    (stemmed F, mean over examples). Below 1, the setting caps the metric for every model alike."""
    cut = [tokenizer.decode(e.ids[:max_new_tokens]) for e in tokenizer.encode_batch(references,
                                                                                   add_special_tokens=False)]
    return corpus_rouge([rouge(c, r, use_stemmer=True) for c, r in zip(cut, references)])


def generation_settings(args, model_dir, examples, dtype):
    """What a reply depends on, in the order a mismatch is reported: a rerun reuses replies only under the same."""
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_dir).glob("*.safetensors"))
    def digest(x):
        return hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]
    return {"model": str(Path(model_dir).resolve()), "weights": digest(weights), "dtype": dtype,
            **{k: getattr(args, k) for k in ("data", "split", "max_examples", "holdout", "max_len", "skip_bad_rows",
                                             "max_prompt_len", "max_new_tokens", "temperature", "top_p", "seed")},
            "prompts": digest([(e["id"], e["prompt"]) for e in examples])}


def check_reusable(folder, settings):
    """Refuses, in one line naming the setting, to add replies to those that another command made."""
    saved = json.loads((folder / "settings.json").read_text()) if (folder / "settings.json").exists() else settings
    key = next((k for k, v in settings.items() if saved.get(k) != v), None)
    if key:
        what = {"weights": f"--model's weights changed since {folder}'s replies were made",
                "prompts": f"--data gives other prompts than those {folder}'s replies answer"}.get(key)
        flag = f"--{key.replace('_', '-')}"
        sys.exit(f"error: {what or f'{folder} holds replies made with {flag} {saved.get(key)}, not {settings[key]}'}"
                 f": give another --out, or delete {folder} to start again")


def read_replies(folder):
    """{example index: record} from every process's file; a line that a crash cut off (no final newline) is not
    kept, so its reply is made again."""
    replies = {}
    for path in sorted(folder.glob("rank-*.jsonl")):
        for n, line in enumerate(path.read_bytes().split(b"\n")[:-1], 1):
            try:
                record = json.loads(line)
            except ValueError as e:
                sys.exit(f"error: {path}:{n}: not a reply that evaluate.py wrote ({e}); delete the file to redo them")
            replies[record["index"]] = record
    return replies


def append_reply(f, record):
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()  # on disk as soon as it is made: a crash loses only the replies in progress


def generate_replies(model, tokenizer, examples, todo, args, folder, rank, world):
    """Decodes the prompts of `todo` (example indices) that this process takes, --batch-size at a time with continuous
    batching, appending each reply to folder/rank-<rank>.jsonl as it ends. Processes take the next prompt as they free
    a slot, from a counter shared through torch.distributed's store (its add is atomic on any backend), so that all
    stay busy to the end."""
    stops = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    store = dist.distributed_c10d._get_default_store()  # a private, stable API

    def mine():  # the next prompt that no process has taken yet
        while (k := store.add("evaluate/taken", 1) - 1) < len(todo):
            yield todo[k]
    # the same shapes on every process (no more slots than prompts; a cache that fits the longest prompt of all): a
    # row's arithmetic, and so its reply, is the same whichever process decodes it
    longest = max(len(e["prompt"]) for e in examples)
    decoder = Decoder([model], min(args.batch_size, len(todo)), longest + args.max_new_tokens, stops,
                      args.temperature, args.top_p)
    work = ((i, examples[i]["prompt"], args.max_new_tokens, seed_of(args.seed, i)) for i in mine())
    path = folder / f"rank-{rank}.jsonl"
    if path.exists():  # cut a line that a crash left half-written: the new ones must start on a line of their own
        os.truncate(path, path.read_bytes().rfind(b"\n") + 1)
    t0, shown, steps = time.perf_counter(), 0.0, 0

    def progress(ended):
        rate = ended / (time.perf_counter() - t0)
        print(f"{f'rank 0 of {world}: ' if world > 1 else ''}{ended}/{len(todo)} examples, {rate:.2f} examples/s, "
              f"ETA {(len(todo) - ended) / rate:.0f} s, decode slot utilization {decoder.utilization:.1%}"
              f"{' (rank 0)' if world > 1 else ''}", file=sys.stderr, flush=True)
    with open(path, "a", encoding="utf-8") as f, torch.inference_mode():
        for i, tokens, _ in decoder.run(work):
            finished = bool(tokens) and tokens[-1] in stops
            append_reply(f, {"index": i, "id": examples[i]["id"], "finished": finished, "tokens": len(tokens),
                             "slot_steps": decoder.slot_steps - steps,  # since this process's last reply
                             "prediction": tokenizer.decode(tokens[:len(tokens) - finished], skip_special_tokens=True)})
            steps, ended = decoder.slot_steps, store.add("evaluate/ended", 1)
            if rank == 0 and time.perf_counter() - t0 - shown > 10:  # a line per 10 s keeps logs readable
                progress(ended)
                shown = time.perf_counter() - t0
    if rank == 0 and steps:
        progress(store.add("evaluate/ended", 0))


_NUMBER = re.compile(r"[0-9]+")


def boxed_answer(text):
    """The content of the last \\boxed{...} in text, nested braces matched, stripped; None without a closed one."""
    start, depth = text.rfind("\\boxed{"), 0
    for end in range(start + 6, len(text) if start >= 0 else 0):  # from the opening brace
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 7:end].strip()
    return None


def what_went_wrong(prediction, reference):
    """Scores beside ROUGE that say where a reply goes wrong, each None where it does not apply: stemmed R-L F with
    every number masked (the words and the format), R-L of the numbers alone (the reference holds some), and whether
    the final \\boxed{} answers are equal (the reference has one, as OpenMathReasoning's and the toy's do)."""
    def numbers(text):
        return " ".join(_NUMBER.findall(text))
    answer = boxed_answer(reference)
    return {"rougeL_numbers_masked": rouge(_NUMBER.sub("0", prediction), _NUMBER.sub("0", reference),
                                           use_stemmer=True)["rougeL"][2],
            "rougeL_numbers_only": rouge(numbers(prediction), numbers(reference))["rougeL"][2]
            if _NUMBER.search(reference) else None,
            "boxed_correct": None if answer is None else boxed_answer(prediction) == answer}


def write_results(records, out, **meta):
    """Scores the records, writes predictions.jsonl and summary.json, prints the table."""
    plain = [rouge(r["prediction"], r["reference"]) for r in records]
    stemmed = [rouge(r["prediction"], r["reference"], use_stemmer=True) for r in records]
    for r, a, b in zip(records, plain, stemmed):
        r["scores"] = {**{k: f for k, (_, _, f) in a.items()}, **{f"{k}_stemmed": f for k, (_, _, f) in b.items()},
                       **what_went_wrong(r["prediction"], r["reference"])}
    def mean_length(field):
        return math.fsum(len(tokenize(r[field])) for r in records) / len(records)
    summary = {**meta, "examples": len(records), "rouge": corpus_rouge(plain), "rouge_stemmed": corpus_rouge(stemmed),
               "mean_prediction_tokens": mean_length("prediction"), "mean_reference_tokens": mean_length("reference")}
    masked, numbers, boxed = ([r["scores"][key] for r in records if r["scores"][key] is not None]  # where it applies
                              for key in ("rougeL_numbers_masked", "rougeL_numbers_only", "boxed_correct"))
    def mean(values):
        return math.fsum(values) / len(values) if values else None
    summary.update(rougeL_numbers_masked=mean(masked), rougeL_numbers_only=mean(numbers),
                   number_references=len(numbers), boxed_accuracy=mean(boxed), boxed_references=len(boxed))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'':9}{'R-1':>7}{'R-2':>7}{'R-L':>7}   (F x 100, mean over {len(records)} examples)")
    for name, key in (("plain", "rouge"), ("stemmed", "rouge_stemmed")):
        print(f"{name:9}" + "".join(f"{100 * summary[key][k]:7.2f}" for k in ("rouge1", "rouge2", "rougeL")))
    if "ceiling_stemmed" in summary:
        print(f"{'ceiling':9}" + "".join(f"{100 * summary['ceiling_stemmed'][k]:7.2f}" for k in ("rouge1", "rouge2",
              "rougeL")) + "   (stemmed: each reference cut at --max-new-tokens; a perfect reply scores this)")
    def show(key):
        return "n/a" if summary[key] is None else f"{100 * summary[key]:.2f}"
    print(f"R-L (stemmed, x 100) with every number masked {show('rougeL_numbers_masked')}, of the numbers alone "
          f"{show('rougeL_numbers_only')} (the {summary['number_references']} references that hold numbers); final "
          f"\\boxed{{}} answer equal to the reference's in {show('boxed_accuracy')}% of the "
          f"{summary['boxed_references']} replies whose reference has one")
    print(f"mean length in ROUGE tokens: prediction {summary['mean_prediction_tokens']:.1f}, reference "
          f"{summary['mean_reference_tokens']:.1f}\nwrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")


def write_seqkd_data(path, examples, records):
    """Each conversation with the model's reply in place of its last one, for SeqKD. The earlier replies are the
    data's own (gold) text: kept as context, with "weight": 0, so that SeqKD supervises the teacher's words only. A
    reply cut at --max-new-tokens is left out: encode_chat supervises the <|im_end|> after it, which would teach
    stopping mid-solution."""
    kept = [(ex, r) for ex, r in zip(examples, records) if r["finished"]]
    if not kept:
        sys.exit(f"error: --write-data: all {len(records)} replies were cut at --max-new-tokens; raise it")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex, r in kept:
            reply = {"role": "assistant", "content": r["prediction"]}
            context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in r["messages"]]
            turns = [*context, reply, *ex["messages"][ex["last"] + 1:]]
            f.write(json.dumps({"id": ex["id"], "messages": turns}, ensure_ascii=False) + "\n")
    print(f"wrote {len(kept)} conversations with the model's replies to {path}, left out {len(records) - len(kept)} "
          f"of {len(records)} replies cut at --max-new-tokens")


def main(argv=None):
    args = get_args(argv)
    check_args(args)

    # --- saved replies: scoring only
    if args.predictions:
        return write_results(read_predictions(args.predictions), Path(args.out), predictions=args.predictions)

    # --- model folder, tokenizer and data, all checked before any weight is read
    model_dir, tokenizer = model_files(args.model)
    examples = load_examples(args, tokenizer)

    # --- replies that an earlier run of this command wrote (under --out, as they ended): read before any process of
    # this run appends to them, and reused
    dtype = parallel.dtype_name(args.dtype)
    folder = Path(args.out) / "replies"
    settings = generation_settings(args, model_dir, examples, dtype)
    check_reusable(folder, settings)
    reused = read_replies(folder)
    # the longest prompts first, so that running out of memory happens at once
    todo = [i for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]["prompt"]), i)) if i not in reused]

    # --- processes
    rank, world, device = parallel.start()
    if rank == 0:
        if reused:
            print(f"reusing {len(reused)} of {len(examples)} replies from {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.tmp").write_text(json.dumps(settings, indent=1) + "\n")
        (folder / "settings.tmp").replace(folder / "settings.json")

    # --- generation: continuous batching over --batch-size slots; every process takes the next prompt as it frees a
    # slot, and a reply is the same whichever process, slot and neighbours it gets
    model = None
    if todo:
        model = Qwen2.from_pretrained(model_dir, parallel.DTYPES[dtype], device)
        if args.compile:
            model.compile_blocks()
    dist.barrier()  # every process has read the replies before any appends to them
    if todo:
        generate_replies(model, tokenizer, examples, todo, args, folder, rank, world)
    del model
    parallel.end()
    if rank != 0:
        return
    replies = read_replies(folder)

    # --- scores and files, in the data's order
    records = [{"id": ex["id"], "messages": ex["context"], "prediction": replies[i]["prediction"],
                "reference": ex["messages"][ex["last"]]["content"], "finished": replies[i]["finished"]}
               for i, ex in enumerate(examples)]
    meta = {k: getattr(args, k) for k in ("model", "data", "split", "holdout", "max_len", "max_prompt_len",
                                          "max_new_tokens", "temperature", "top_p", "seed")}
    ceiling = rouge_ceiling([r["reference"] for r in records], tokenizer, args.max_new_tokens)
    # live-row decode steps over slots x steps, over the runs that made these replies (a measurement: it varies with
    # the number of processes and with where a crash cut a run)
    utilization = sum(r["tokens"] for r in replies.values()) / sum(r["slot_steps"] for r in replies.values())
    write_results(records, Path(args.out), **meta, dtype=dtype, unfinished=sum(not r["finished"] for r in records),
                  ceiling_stemmed=ceiling, decode_slot_utilization=utilization)
    print(f"decode slot utilization {utilization:.1%}: live-row decode steps / (slots x steps), all processes")
    if args.write_data:
        write_seqkd_data(args.write_data, examples, records)


if __name__ == "__main__":
    main()
