"""Evaluate a model by the ROUGE of its generated replies.

    python evaluate.py --model runs/deltakd/final --data HuggingFaceH4/ultrachat_200k --max-examples 2000 --out DIR
    torchrun --nproc_per_node 8 evaluate.py ...           (the same scores, N times faster)
    python evaluate.py --predictions DIR/predictions.jsonl --out DIR2   (score saved replies, no model)
    python evaluate.py --diagnose --model RAW_STUDENT --teacher TEACHER_FT --teacher-raw TEACHER_RAW --data ...
                                                          (Delta-KD's target before any student trains)

ROUGE-1/2/L here are written from scratch and give exactly what Google's rouge-score 0.1.2 gives, which is the
ROUGE the distillation literature reports (MiniLLM and DistiLLM report rougeL with stemming), so our numbers can be
compared with theirs. Stemming is NLTK's Porter stemmer in its default NLTK_EXTENSIONS mode, the one rouge-score uses.

    >>> rouge("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog")["rouge1"]
    (0.75, 0.6666666666666666, 0.7058823529411765)

References:
    Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004.
    Porter, "An algorithm for suffix stripping", Program 14(3), 1980; NLTK's nltk/stem/porter.py.
    https://github.com/google-research/google-research/tree/master/rouge (rouge-score).
    Hyyro, "Bit-parallel LCS-length computation revisited", 2004 (the LCS below).
"""
import argparse
import bisect
import functools
import gc
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import SPECIAL_TOKENS, Batches, build_examples, encode_prompt, last_reply, load_rows, load_tokenizer, \
    read_file, render_chat, step_inputs
from deltakd import chunk_positions
from model import Decoder, Qwen2, Qwen2Config, checkpoint_shapes, resolve_model_dir, seed_of

# ----------------------------------------------------------------------------------------------------------------
# Porter stemmer, NLTK_EXTENSIONS mode (the paper's algorithm plus Martin Porter's and NLTK's later fixes)

# NLTK answers these from a table before running any step.
_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
              "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing", "howe": "howe",
              "cannings": "canning", "canning": "canning", "proceed": "proceed", "exceed": "exceed",
              "succeed": "succeed"}
# Suffix -> replacement, tried in order; the first suffix that matches decides, even if its condition then fails.
_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
          ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
          ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"), ("logi", "log")]
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", "")]
_STEP4 = [(suffix, "") for suffix in
          "al ance ence er ic able ible ant ement ment ent ion ou ism ate iti ous ive ize".split()]


def _cv(word):
    """The word as a string of 'c' (consonant) and 'v' (vowel); 'y' is a vowel only right after a consonant."""
    out = []
    for i, ch in enumerate(word):
        out.append("v" if ch in "aeiou" or (ch == "y" and i > 0 and out[-1] == "c") else "c")
    return "".join(out)


def _measure(stem):
    return _cv(stem).count("vc")  # m in [C](VC)^m[V]


def _ends_cvc(stem):
    # NLTK also counts a two-letter vowel-consonant stem ("at" in "ated") as *o.
    cv = _cv(stem)
    return (cv.endswith("cvc") and stem[-1] not in "wxy") or cv == "vc"


def _apply_rules(word, rules, condition):
    for suffix, replacement in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition(stem, suffix) else word
    return word


def _step1a(word):
    if word.endswith("ies") and len(word) == 4:  # NLTK: ties -> tie, not ti
        return word[:-1]
    return _apply_rules(word, [("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")], lambda stem, suffix: True)


def _step1b(word):
    if word.endswith("ied"):  # NLTK: tied -> tie, cried -> cri
        return word[:-1] if len(word) == 4 else word[:-2]
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        stem = word[: len(word) - len(suffix)]
        if word.endswith(suffix) and "v" in _cv(stem):
            break
    else:
        return word
    # Put back an 'e' that -ed / -ing took away, or undouble a consonant (hopp -> hop, but fall and hiss stay).
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if len(stem) >= 2 and stem[-1] == stem[-2] and _cv(stem)[-1] == "c":
        return stem[:-1] if stem[-1] not in "lsz" else stem
    return stem + "e" if _measure(stem) == 1 and _ends_cvc(stem) else stem


def _step1c(word):
    # NLTK: y -> i after any consonant that is not the whole stem (happy -> happi, cry -> cri, but enjoy, by).
    return word[:-1] + "i" if word.endswith("y") and len(word) > 2 and _cv(word[:-1])[-1] == "c" else word


def _step2(word):
    if word.endswith("alli") and _measure(word[:-4]) > 0:  # NLTK: -alli -> -al, then step 2 again
        return _step2(word[:-2])
    # NLTK measures -logi's stem with the 'l' still on.
    return _apply_rules(word, _STEP2, lambda stem, suffix: _measure(stem + "l" if suffix == "logi" else stem) > 0)


def _step4(word):
    return _apply_rules(word, _STEP4,
                        lambda stem, suffix: _measure(stem) > 1 and (suffix != "ion" or stem[-1] in "st"))


def _step5(word):
    if word.endswith("e"):
        m = _measure(word[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(word[:-1])):
            word = word[:-1]
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]
    return word


@functools.lru_cache(maxsize=1 << 20)  # a corpus has few distinct words; each is stemmed once
def porter_stem(word):
    """NLTK's PorterStemmer().stem(word) for a lowercase word."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    word = _step2(_step1c(_step1b(_step1a(word))))
    word = _apply_rules(word, _STEP3, lambda stem, suffix: _measure(stem) > 0)
    return _step5(_step4(word))


# ----------------------------------------------------------------------------------------------------------------
# ROUGE

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text, use_stemmer=False):
    """rouge-score's tokens: lowercased, split at all but [a-z0-9] ("café" -> "caf"), words over 3 letters stemmed."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split()
    if use_stemmer:
        tokens = [porter_stem(t) if len(t) > 3 else t for t in tokens]
    return tokens  # all match ^[a-z0-9]+$ already, so rouge-score's final filter would drop nothing


def _lcs_length(a, b):
    """Length of the longest common subsequence of two token lists, in O(len(a) * len(b) / wordsize).

    `v` holds one column of the classic DP table (rows: tokens of `a`) as differences: bit i is 0 where the column
    grows by one at row i, so the LCS is the number of zero bits. One addition per token of `b` updates the whole
    column (Hyyro 2004), and Python's big ints make a column any length. Carries above bit len(a) never reach the
    lower bits, hence a single mask at the end."""
    if len(a) < len(b):
        a, b = b, a  # loop over the shorter list
    match = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    mask = (1 << len(a)) - 1
    v = mask
    for token in b:
        u = v & match.get(token, 0)
        v = (v + u) | (v - u)
    return len(a) - (v & mask).bit_count()


def _scores(overlap, n_pred, n_ref):
    # rouge-score's conventions and operation order, so the floats match bit for bit.
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def rouge(prediction, reference, use_stemmer=False):
    """ROUGE-1, ROUGE-2 and ROUGE-L (precision, recall, F) of one prediction against one reference.

    Identical to rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer).score(reference,
    prediction): precision is over the prediction's tokens, recall over the reference's; an empty side scores 0."""
    pred, ref = tokenize(prediction, use_stemmer), tokenize(reference, use_stemmer)
    unigrams = sum((Counter(pred) & Counter(ref)).values())
    bigrams = sum((Counter(zip(pred, pred[1:])) & Counter(zip(ref, ref[1:]))).values())
    return {
        "rouge1": _scores(unigrams, len(pred), len(ref)),
        "rouge2": _scores(bigrams, len(pred) - 1, len(ref) - 1),  # -1 for an empty side: max(., 1) in _scores
        "rougeL": _scores(_lcs_length(pred, ref) if pred and ref else 0, len(pred), len(ref)),
    }


def corpus_rouge(scores):
    """Corpus ROUGE from per-example rouge() results: the mean F over examples, per ROUGE type.

    MiniLLM and DistiLLM average the same way (their Natural-Instructions scoring script, times 100). rouge-score's
    BootstrapAggregator reports the median of 1,000 bootstrap resample means instead, which is random and can differ
    from the mean in the last digits. math.fsum rounds once, so the result does not depend on the example order."""
    if not scores:
        raise ValueError("corpus_rouge: no scores to average")
    return {key: math.fsum(s[key][2] for s in scores) / len(scores) for key in ("rouge1", "rouge2", "rougeL")}


# ----------------------------------------------------------------------------------------------------------------
# Command line: generate replies with model.py to data.py's conversations, score them, write them out

def alpha_list(text):
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, like 0,0.5,1, got {text!r}") from None


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
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="compute dtype; none: bf16 on CUDA, fp32 on CPU")
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
    g = p.add_argument_group("the premise diagnostic: one teacher-forced pass of three frozen models over the "
                             "replies, no generation")
    g.add_argument("--diagnose", action="store_true",
                   help="write DIR/diagnose.json: how often each model's and Delta-KD's target's argmax is the gold "
                        "token, and how far the target lies from the teacher and the raw student; --model is then "
                        "the raw student")
    g.add_argument("--teacher", help="--diagnose: the fine-tuned teacher")
    g.add_argument("--teacher-raw", help="--diagnose: the same teacher before its SFT")
    g.add_argument("--alphas", type=alpha_list, default="0,0.25,0.5,0.75,1",
                   help="--diagnose: Delta-KD's alphas, comma-separated")
    g.add_argument("--micro-batch-size", type=int, default=8,
                   help="--diagnose: chats per forward pass; with the positions chunked, memory holds at most this "
                        "many times the longest chat's supervised positions of logits, per model")
    p.add_argument("--write-data", metavar="FILE.jsonl",
                   help="for SeqKD (train.py --data FILE.jsonl): also write the data's rows {id, messages} with "
                        "the last assistant reply replaced by the model's, the earlier (gold) replies kept as context "
                        "only (\"weight\": 0), and the replies cut at --max-new-tokens left out")
    return p.parse_args(argv)


DIAGNOSE_FLAGS = ("diagnose", "teacher", "teacher_raw", "alphas", "micro_batch_size")
GENERATION_FLAGS = ("max_prompt_len", "max_new_tokens", "batch_size", "temperature", "top_p", "seed", "compile",
                    "write_data")


def check_args(args):
    default = get_args([])
    flags = lambda keys: ", ".join(f"--{k.replace('_', '-')}" for k in keys)  # noqa: E731
    given = [k for k, v in vars(args).items() if k not in ("predictions", "out") and v != getattr(default, k)]
    if args.predictions and given:  # every flag but --out serves a model, so with --predictions none may be given
        sys.exit(f"error: --predictions scores saved replies: it takes no {flags(given)}")
    wrong = [k for k in given if k in (GENERATION_FLAGS if args.diagnose else DIAGNOSE_FLAGS)]
    if wrong:
        sys.exit(f"error: {flags(wrong)}: " + ("--diagnose generates nothing" if args.diagnose else
                                                "only for --diagnose"))
    if not args.predictions and not (args.model and args.data):
        sys.exit("error: need --model and --data, or --predictions FILE.jsonl")
    if args.diagnose and not (args.teacher and args.teacher_raw):
        sys.exit("error: --diagnose needs --teacher (fine-tuned) and --teacher-raw, and --model the raw student")
    if args.predictions and not Path(args.predictions).is_file():
        sys.exit(f"error: --predictions {args.predictions}: no such file")
    for flag in ("max_examples", "max_new_tokens", "batch_size", "max_len", "max_prompt_len", "micro_batch_size"):
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


def model_files(flag, path):
    """A model's folder and its tokenizer, checked before any weight is read."""
    try:
        model_dir = resolve_model_dir(path)
        Qwen2Config.from_json(model_dir)
        checkpoint_shapes(model_dir)  # the file headers only: a truncated download shows up here, not after loading
        return model_dir, load_tokenizer(model_dir)  # the model's own: a missing one is an error, not a default
    except (OSError, ValueError) as e:
        sys.exit(f"error: --{flag} {path}: {e}")


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
    digest = lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]
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
    store = dist.distributed_c10d._get_default_store() if world > 1 else dist.HashStore()  # a private, stable API

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
    numbers = lambda text: " ".join(_NUMBER.findall(text))  # noqa: E731
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
    mean_length = lambda field: math.fsum(len(tokenize(r[field])) for r in records) / len(records)
    summary = {**meta, "examples": len(records), "rouge": corpus_rouge(plain), "rouge_stemmed": corpus_rouge(stemmed),
               "mean_prediction_tokens": mean_length("prediction"), "mean_reference_tokens": mean_length("reference")}
    masked, numbers, boxed = ([r["scores"][key] for r in records if r["scores"][key] is not None]  # where it applies
                              for key in ("rougeL_numbers_masked", "rougeL_numbers_only", "boxed_correct"))
    mean = lambda values: math.fsum(values) / len(values) if values else None  # noqa: E731
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
    show = lambda key: "n/a" if summary[key] is None else f"{100 * summary[key]:.2f}"  # noqa: E731
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


# ----------------------------------------------------------------------------------------------------------------
# The premise diagnostic (--diagnose): Delta-KD's target, measured before any student trains
#
# Where SFT did not move the teacher (pi_t_ft = pi_t_raw), pi* ∝ pi_t_ft^(1 - alpha) · pi_s_raw^alpha: at alpha = 1
# the target there is the raw student, its mistakes included. Delta-KD transfers the teacher's SFT change, never its
# base competence, so it can only help where the raw student already knows what the raw teacher knows. This pass
# measures that on the data's replies: the three frozen models, teacher-forced over the supervised positions as
# train.py sees them (encode_chat's labels, shifted), each pi at temperature 1 over the tokenizer's ids, and pi* by
# deltakd.py's formula. It checks the premise; it does not pick alpha.
#
# Memory: each model's logits exist only at a micro-batch's supervised positions (logits_at), N x V in the compute
# dtype, and the statistics are computed in fp32 over chunks of positions of 16 MiB (CPU) or 64 MiB (GPU) per
# (positions, V) tensor, about ten alive at once. At paper size (Qwen2.5 7B/7B/1.5B in bf16, 33.5 GB of weights;
# --micro-batch-size 4 of 2048-token chats, N <= 8192, V = 152,064) that is at most 3 x 2.5 GB of logits and 0.7 GB of
# chunks: one 80 GB GPU holds it, and torchrun runs one share of the data per process with the same sums.

UNMOVED_KL = 0.01  # KL(t_ft || t_raw) below this: SFT did not move the teacher at that position
CLASSES = {"number": "a token with a digit",
           "copied": "a piece of a word that the question holds (names, items, the question's own words)",
           "word": "a piece of a word that the question lacks (the reply's template and reasoning words)",
           "format": "no letter or digit: punctuation, spaces, line breaks, the end of the reply"}
_WORD = re.compile(r"[^\W\d_]+")  # a run of letters


def token_classes(messages, tokenizer):
    """The class of each token of the rendered chat, an index into CLASSES, from the characters it covers."""
    text = render_chat(messages)
    question = {w.lower() for m in messages if m["role"] == "user" for w in _WORD.findall(m["content"])}
    words = [(m.start(), m.group().lower()) for m in _WORD.finditer(text)]
    starts = [start for start, _ in words]
    special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    encoding, classes = tokenizer.encode(text, add_special_tokens=False), []
    for token, (start, end) in zip(encoding.ids, encoding.offsets):
        piece = text[start:end]
        letter = next((start + i for i, ch in enumerate(piece) if ch.isalpha()), None)
        if token in special or (letter is None and not any(ch.isdigit() for ch in piece)):
            classes.append(3)
        elif any(ch.isdigit() for ch in piece):
            classes.append(0)
        else:  # the whole word the token's first letter belongs to, which the token may only be a piece of
            classes.append(1 if words[bisect.bisect_right(starts, letter) - 1][1] in question else 2)
    return np.asarray(classes, dtype=np.int8)


def _kl(log_p, log_q):  # KL(p || q) at each position: (C, V) -> (C,)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def diagnose_batch(models, micro_batch, vocab, alphas, sums):
    """Adds one micro-batch's per-position values to sums, (classes, {all positions, unmoved ones}, values): the
    count, the three models' hits, unmoved, raw-student-only errors, KL(t_ft || t_raw), then per alpha pi*'s hits,
    its hits on raw-student-only errors, KL(pi* || t_ft) and KL(pi* || s_raw)."""
    # the supervised positions as train.py reads them: each flat position's gold token and its class, (N,) each
    ids, at, gold, classes = step_inputs(micro_batch, sums.device, fields=("labels", "classes"))
    classes = classes.long()
    with torch.no_grad():
        logits = {name: model(ids, logits_at=at) for name, model in models.items()}  # (N, V_model) each
    chunk = chunk_positions(vocab, sums.device)
    for c in range(0, len(gold), chunk):
        y = gold[c:c + chunk]
        t, t_raw, s_raw = (F.log_softmax(logits[name][c:c + chunk, :vocab].float(), dim=-1)  # (C, V) log pi, T = 1
                           for name in ("t_ft", "t_raw", "s_raw"))
        t_ok, t_raw_ok, s_raw_ok = (log_p.argmax(-1) == y for log_p in (t, t_raw, s_raw))
        shift = _kl(t, t_raw)  # how far SFT moved the teacher here
        unmoved = shift < UNMOVED_KL
        student_only = t_ok & t_raw_ok & ~s_raw_ok  # a raw-student-only error
        values = [torch.ones_like(shift), t_ok, t_raw_ok, s_raw_ok, unmoved, student_only, shift]
        for alpha in alphas:
            log_target = F.log_softmax(t + alpha * (s_raw - t_raw), dim=-1)  # log pi*: deltakd.py's (2) and (3)
            ok = log_target.argmax(-1) == y
            values += [ok, ok & student_only, _kl(log_target, t), _kl(log_target, s_raw)]
        values = torch.stack(values, 1).double()  # (C, F)
        k = classes[c:c + chunk]
        sums[:, 0].index_add_(0, k, values)
        sums[:, 1].index_add_(0, k, values * unmoved[:, None])


def _summary(v, alphas):
    """diagnose.json's record of one set of positions, from its sums v (a list of F floats)."""
    n, student_only = v[0], v[5]
    share = lambda x, of: x / of if of else None  # noqa: E731
    return {"positions": int(n), "accuracy": {"t_ft": share(v[1], n), "t_raw": share(v[2], n),
                                              "s_raw": share(v[3], n)},
            "unmoved_share": share(v[4], n), "raw_student_only_errors": share(student_only, n),
            "teacher_shift": share(v[6], n),  # mean KL(t_ft || t_raw)
            "alphas": [{"alpha": a, "accuracy": share(v[7 + 4 * j], n), "kl_to_teacher": share(v[9 + 4 * j], n),
                        "kl_to_raw_student": share(v[10 + 4 * j], n),
                        "accuracy_on_raw_student_only_errors": share(v[8 + 4 * j], student_only)}
                       for j, a in enumerate(alphas)]}


def diagnosis_text(d):
    """diagnose.json as Markdown: the tables, and what they mean for Delta-KD in plain words."""
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    kl = lambda x: "—" if x is None else f"{max(x, 0.0):.3f}"  # noqa: E731  (rounding can leave -1e-9)
    acc, top, unmoved = d["accuracy"], d["alphas"][-1], d["unmoved"]
    lines = [f"{d['positions']} supervised positions in {d['examples']} chats; every pi at temperature 1 over the "
             f"tokenizer's {d['vocab_size']} ids. Accuracy (argmax = the gold token): fine-tuned teacher "
             f"{pct(acc['t_ft'])}, raw teacher {pct(acc['t_raw'])}, raw student {pct(acc['s_raw'])}. SFT left the "
             f"teacher unmoved (KL(t_ft‖t_raw) < {d['unmoved_kl']}) at {pct(d['unmoved_share'])} of the positions; "
             "raw-student-only errors (both teachers right, the raw student wrong): "
             f"{pct(d['raw_student_only_errors'])} of the positions.", "",
             "| alpha | pi* right | on raw-student-only errors | KL(pi*‖t_ft) | KL(pi*‖s_raw) | unmoved: KL(pi*‖t_ft) "
             "| unmoved: KL(pi*‖s_raw) |", "|---|---|---|---|---|---|---|"]
    for a, u in zip(d["alphas"], unmoved["alphas"]):
        lines.append(f"| {a['alpha']:g} | {pct(a['accuracy'])} | {pct(a['accuracy_on_raw_student_only_errors'])} | "
                     f"{kl(a['kl_to_teacher'])} | {kl(a['kl_to_raw_student'])} | {kl(u['kl_to_teacher'])} | "
                     f"{kl(u['kl_to_raw_student'])} |")
    lines += ["", f"By the class of the gold token (accuracy; pi* at alpha = {top['alpha']:g}). "
              + "; ".join(f"{name}: {what}" for name, what in CLASSES.items()) + ".", "",
              "| class | positions | share of KL(t_ft‖t_raw) | t_ft | t_raw | s_raw | pi* | raw-student-only errors |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in d["classes"].items():
        lines.append(f"| {name} | {pct(c['share'])} | {pct(c['teacher_shift_share'])} | "
                     f"{pct(c['accuracy']['t_ft'])} | {pct(c['accuracy']['t_raw'])} | {pct(c['accuracy']['s_raw'])} | "
                     f"{pct(c['alphas'][-1]['accuracy'])} | {pct(c['raw_student_only_errors'])} |")
    a, u = top["alpha"], unmoved["alphas"][-1]
    lines += ["", "What it means for Delta-KD:"]
    if d["raw_student_only_errors"]:
        fixed = top["accuracy_on_raw_student_only_errors"]
        lines.append(f"- At alpha = {a:g}, pi* is right on {pct(fixed)} of the positions where only the raw student "
                     f"errs ({pct(d['raw_student_only_errors'])} of all positions): " +
                     ("expect Delta-KD to inherit the raw student's mistakes there." if fixed < 0.5 else
                      "there the teacher's shift outweighs most of the raw student's mistakes."))
    else:
        lines.append("- The raw student errs nowhere that both teachers are right: it holds the teachers' content.")
    if unmoved["positions"]:
        lines.append(f"- Where SFT left the teacher unmoved ({pct(d['unmoved_share'])} of the positions), the target "
                     f"at alpha = {a:g} is KL {kl(u['kl_to_raw_student'])} from the raw student and "
                     f"{kl(u['kl_to_teacher'])} from the fine-tuned teacher, and right {pct(u['accuracy'])} of the "
                     f"time (raw student {pct(unmoved['accuracy']['s_raw'])}, fine-tuned teacher "
                     f"{pct(unmoved['accuracy']['t_ft'])}): there Delta-KD teaches the raw student's own "
                     "distribution, not the teacher's.")
    lines.append(f"- Over all positions pi* at alpha = {a:g} is right {pct(top['accuracy'])} of the time, the "
                 f"fine-tuned teacher {pct(acc['t_ft'])}: a student that matched the target exactly would be right "
                 "as often as pi*. This checks the premise; it does not choose alpha.")
    return "\n".join(lines) + "\n"


def diagnose(args):
    # --- the three models' files, one tokenizer, and the data, all checked before any weight is read
    dirs, tokenizer = {}, None
    for flag, name in (("model", "s_raw"), ("teacher", "t_ft"), ("teacher-raw", "t_raw")):
        dirs[name], tok = model_files(flag, getattr(args, flag.replace("-", "_")))
        if tokenizer and tok.get_vocab(True) != tokenizer.get_vocab(True):
            sys.exit(f"error: --{flag} has a different tokenizer from --model's: the three models' distributions "
                     "must be over the same ids")
        tokenizer = tokenizer or tok
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    chats = [c for c in load_chats(args, tokenizer) if any(m["role"] == "assistant" and m.get("weight", 1)
                                                          for m in c["messages"])]  # a reply to supervise
    examples = build_examples(chats, tokenizer, args.max_len)  # whole chats: --max-len left out the longer ones
    assert len(examples) == len(chats)  # so each example is its chat's
    for ex, chat in zip(examples, chats):
        ex["classes"] = token_classes(chat["messages"], tokenizer)[:len(ex["input_ids"])]

    # --- processes and models; each process reads its share of the data, as train.py's data.Batches deals it
    rank, world, device = start_processes()
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    models = {name: Qwen2.from_pretrained(path, DTYPES[dtype], device) for name, path in dirs.items()}
    batches = Batches(examples, len(examples), args.micro_batch_size, rank, world,
                      pad_id=tokenizer.token_to_id("<|endoftext|>"))
    sums = torch.zeros(len(CLASSES), 2, 7 + 4 * len(args.alphas), dtype=torch.float64, device=device)
    for micro_batch in next(iter(batches)):  # one step holds every example
        diagnose_batch(models, micro_batch, vocab, args.alphas, sums)
    if dist.is_initialized():
        dist.all_reduce(sums)
        del models
        end_processes()
    if rank != 0:
        return

    # --- diagnose.json, diagnose.md, and the same text printed
    sums = sums.cpu()
    total = sums.sum(0)
    share = lambda k, j: (sums[k, 0, j] / total[0, j]).item() if total[0, j] else None  # noqa: E731
    result = {**_summary(total[0].tolist(), args.alphas), "unmoved": _summary(total[1].tolist(), args.alphas),
              "classes": {name: {**_summary(sums[k, 0].tolist(), args.alphas), "share": share(k, 0),
                                 "teacher_shift_share": share(k, 6)}  # of the positions, of KL(t_ft || t_raw)
                          for k, name in enumerate(CLASSES)},
              "unmoved_kl": UNMOVED_KL, "examples": len(examples), "vocab_size": vocab, "dtype": dtype,
              "models": {"s_raw": args.model, "t_ft": args.teacher, "t_raw": args.teacher_raw}, "data": args.data}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = diagnosis_text(result)
    (out / "diagnose.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "diagnose.md").write_text(text)
    print(text + f"wrote {out / 'diagnose.json'} and {out / 'diagnose.md'}")


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def start_processes():
    """(rank, world size, device). torchrun sets WORLD_SIZE; a plain `python evaluate.py` is one process, without a
    process group."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), device


def end_processes():
    """Tear gloo down only once every rank is done with it, and with nothing left for interpreter shutdown to collect
    (the caller has deleted its models): either race can end a finished run in "terminate called without an active
    exception"."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    args = get_args(argv)
    check_args(args)

    # --- saved replies: scoring only
    if args.predictions:
        return write_results(read_predictions(args.predictions), Path(args.out), predictions=args.predictions)

    # --- the premise diagnostic: a teacher-forced pass of three models, no generation
    if args.diagnose:
        return diagnose(args)

    # --- model folder, tokenizer and data, all checked before any weight is read
    model_dir, tokenizer = model_files("model", args.model)
    examples = load_examples(args, tokenizer)

    # --- replies that an earlier run of this command wrote (under --out, as they ended): read before any process of
    # this run appends to them, and reused
    dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    folder = Path(args.out) / "replies"
    settings = generation_settings(args, model_dir, examples, dtype)
    check_reusable(folder, settings)
    reused = read_replies(folder)
    # the longest prompts first, so that running out of memory happens at once
    todo = [i for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]["prompt"]), i)) if i not in reused]

    # --- processes
    rank, world, device = start_processes()
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
        model = Qwen2.from_pretrained(model_dir, DTYPES[dtype], device)
        if args.compile:
            model.compile_blocks()
    if dist.is_initialized():
        dist.barrier()  # every process has read the replies before any appends to them
    if todo:
        generate_replies(model, tokenizer, examples, todo, args, folder, rank, world)
    if dist.is_initialized():
        del model
        end_processes()
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
