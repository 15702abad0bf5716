"""The premise diagnostic: Delta-KD's target measured on a dataset's replies, before any student trains.

    python diagnose.py --model RAW_STUDENT --teacher TEACHER_FT --teacher-raw TEACHER_RAW --data ... --out DIR
    torchrun --nproc_per_node 8 diagnose.py ...           (each process reads its share; the same sums)

Where SFT did not move the teacher (pi_t_ft = pi_t_raw), pi* ∝ pi_t_ft^(1 - alpha) · pi_s_raw^alpha: at alpha = 1
the target there is the raw student, its mistakes included. Delta-KD transfers the teacher's SFT change, never its
base competence, so it can only help where the raw student already knows what the raw teacher knows. This pass
measures that on the data's replies: the three frozen models, teacher-forced over the supervised positions as
train.py sees them (encode_chat's labels, shifted), each pi at temperature 1 over the tokenizer's ids, and pi* by
deltakd.delta_kd_target. It writes DIR/diagnose.json and DIR/diagnose.md. It checks the premise; it does not pick
alpha.

Memory: each model's logits exist only at a micro-batch's supervised positions (logits_at), N x V in the compute
dtype, and the statistics are computed in fp32 over chunks of positions of 16 MiB (CPU) or 64 MiB (GPU) per
(positions, V) tensor, about ten alive at once. At paper size (Qwen2.5 7B/7B/1.5B in bf16, 33.5 GB of weights;
--micro-batch-size 4 of 2048-token chats, N <= 8192, V = 152,064) that is at most 3 x 2.5 GB of logits and 0.7 GB of
chunks: one 80 GB GPU holds it.
"""
import argparse
import bisect
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import parallel
from data import SPECIAL_TOKENS, Batches, build_examples, load_rows, load_tokenizer, render_chat, step_inputs
from deltakd import chunk_positions, delta_kd_target
from model import Qwen2, checked_model_dir

UNMOVED_KL = 0.01  # KL(t_ft || t_raw) below this: SFT did not move the teacher at that position
CLASSES = {"number": "a token with a digit",
           "copied": "a piece of a word that the question holds (names, items, the question's own words)",
           "word": "a piece of a word that the question lacks (the reply's template and reasoning words)",
           "format": "no letter or digit: punctuation, spaces, line breaks, the end of the reply"}
_WORD = re.compile(r"[^\W\d_]+")  # a run of letters
TAIL_K = (8, 16, 32, 64, 128)  # the k of targets.py --top-k whose left-out mass is reported
TAIL_BINS = (-12.0, 0.0, 600)  # log10 of the mass, from 1e-12 to 1, in bins of 0.02 (a factor of 1.05)


def token_classes(messages, tokenizer, mark=None):
    """The class of each token of the rendered chat, an index into CLASSES, from the characters it covers; with
    `mark` (a compiled regex), the tokens that cover a character of what its first group (or it) matches are class
    len(CLASSES), "marked", whatever they are otherwise (only replies' tokens are ever counted)."""
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
    if mark is not None:
        spans = [match.span(1 if mark.groups else 0) for match in mark.finditer(text)]
        for i, (start, end) in enumerate(encoding.offsets):
            if any(start < b and a < end for a, b in spans):
                classes[i] = len(CLASSES)
    return np.asarray(classes, dtype=np.int8)


def _kl(log_p, log_q):  # KL(p || q) at each position: (C, V) -> (C,)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def diagnose_batch(models, micro_batch, vocab, alphas, sums, tails):
    """Adds one micro-batch's per-position values to sums, (classes, {all positions, unmoved ones}, values): the
    count, the three models' hits, unmoved, raw-student-only errors, KL(t_ft || t_raw), then per alpha pi*'s hits,
    its hits on raw-student-only errors, KL(pi* || t_ft), KL(pi* || s_raw), its fixes (t_ft's argmax wrong, pi*'s
    right) and its breaks (t_ft right, pi* wrong). tails (alphas, TAIL_K, bins): a histogram of pi*'s mass outside
    its top k, per position, by log10 in TAIL_BINS."""
    # the supervised positions as train.py reads them: each flat position's gold token and its class, (N,) each
    ids, at, gold, classes = step_inputs(micro_batch, sums.device, fields=("labels", "classes"))
    classes = classes.long()
    with torch.no_grad():
        logits = {name: model(ids, logits_at=at) for name, model in models.items()}  # (N, V_model) each
    chunk = chunk_positions(vocab, sums.device)
    for c in range(0, len(gold), chunk):
        y = gold[c:c + chunk]
        rows = {name: x[c:c + chunk, :vocab] for name, x in logits.items()}  # (C, V) each
        t, t_raw, s_raw = (F.log_softmax(rows[name].float(), dim=-1) for name in ("t_ft", "t_raw", "s_raw"))  # T = 1
        t_ok, t_raw_ok, s_raw_ok = (log_p.argmax(-1) == y for log_p in (t, t_raw, s_raw))
        shift = _kl(t, t_raw)  # how far SFT moved the teacher here
        unmoved = shift < UNMOVED_KL
        student_only = t_ok & t_raw_ok & ~s_raw_ok  # a raw-student-only error
        values = [torch.ones_like(shift), t_ok, t_raw_ok, s_raw_ok, unmoved, student_only, shift]
        for j, alpha in enumerate(alphas):
            log_target = delta_kd_target(rows["t_ft"], rows["t_raw"], rows["s_raw"], alpha, 1.0)  # log pi*
            ok = log_target.argmax(-1) == y
            values += [ok, ok & student_only, _kl(log_target, t), _kl(log_target, s_raw), ok & ~t_ok, ~ok & t_ok]
            # log of the mass from each rank on, the most likely first: at rank k, what a top-k cache leaves out
            rest = log_target.sort(-1, descending=True).values.flip(-1).logcumsumexp(-1).flip(-1)  # (C, V)
            for i, k in enumerate(TAIL_K):
                log_tail = rest[:, k] / math.log(10) if k < vocab else torch.full_like(y, -math.inf, dtype=rest.dtype)
                tails[j, i] += torch.bincount(_tail_bin(log_tail), minlength=tails.size(-1)).to(tails.dtype)
        values = torch.stack(values, 1).double()  # (C, F)
        k = classes[c:c + chunk]
        sums[:, 0].index_add_(0, k, values)
        sums[:, 1].index_add_(0, k, values * unmoved[:, None])


def _tail_bin(log10_mass):
    """The histogram bin of each log10 of a mass: TAIL_BINS's bins, the first for masses below 10^TAIL_BINS[0], 0
    included."""
    lo, hi, n = TAIL_BINS
    return ((log10_mass - lo) / (hi - lo) * n).floor().clamp(-1, n - 1).long() + 1


def _tail_quantiles(counts):
    """{median, p99} of the masses in a histogram (counts over the bins), each the upper edge of its bin, so an upper
    bound at the bins' width; 0 where it falls in the first bin."""
    lo, hi, n = TAIL_BINS
    cumulative, total = counts.cumsum(0), counts.sum()
    def edge(b):
        return 0.0 if b == 0 else 10 ** (lo + b * (hi - lo) / n)
    return {q: edge(int((cumulative < p * total).sum())) for q, p in (("median", 0.5), ("p99", 0.99))}


def _summary(v, alphas):
    """diagnose.json's record of one set of positions, from its sums v (a list of F floats)."""
    n, student_only = v[0], v[5]
    def share(x, of):
        return x / of if of else None
    return {"positions": int(n), "accuracy": {"t_ft": share(v[1], n), "t_raw": share(v[2], n),
                                              "s_raw": share(v[3], n)},
            "unmoved_share": share(v[4], n), "raw_student_only_errors": share(student_only, n),
            "teacher_shift": share(v[6], n),  # mean KL(t_ft || t_raw)
            "alphas": [{"alpha": a, "accuracy": share(v[7 + 6 * j], n), "kl_to_teacher": share(v[9 + 6 * j], n),
                        "kl_to_raw_student": share(v[10 + 6 * j], n),
                        "accuracy_on_raw_student_only_errors": share(v[8 + 6 * j], student_only),
                        "fixes": share(v[11 + 6 * j], n), "breaks": share(v[12 + 6 * j], n)}
                       for j, a in enumerate(alphas)]}


def diagnosis_text(d):
    """diagnose.json as Markdown: the tables, and what they mean for Delta-KD in plain words."""
    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}%"
    def kl(x):  # (rounding can leave -1e-9)
        return "—" if x is None else f"{max(x, 0.0):.3f}"
    def points(fixes, breaks):
        return "—" if fixes is None else f"{100 * (fixes - breaks):+.1f} points"
    acc, top, unmoved = d["accuracy"], d["alphas"][-1], d["unmoved"]
    lines = [f"{d['positions']} supervised positions in {d['examples']} chats; every pi at temperature 1 over the "
             f"tokenizer's {d['vocab_size']} ids. Accuracy (argmax = the gold token): fine-tuned teacher "
             f"{pct(acc['t_ft'])}, raw teacher {pct(acc['t_raw'])}, raw student {pct(acc['s_raw'])}. SFT left the "
             f"teacher unmoved (KL(t_ft‖t_raw) < {d['unmoved_kl']}) at {pct(d['unmoved_share'])} of the positions; "
             "raw-student-only errors (both teachers right, the raw student wrong): "
             f"{pct(d['raw_student_only_errors'])} of the positions.", "",
             "| alpha | pi* right | fixes | breaks | fixes − breaks | on raw-student-only errors | KL(pi*‖t_ft) | "
             "KL(pi*‖s_raw) | unmoved: KL(pi*‖t_ft) | unmoved: KL(pi*‖s_raw) |", "|---" * 10 + "|"]
    for a, u in zip(d["alphas"], unmoved["alphas"]):
        lines.append(f"| {a['alpha']:g} | {pct(a['accuracy'])} | {pct(a['fixes'])} | {pct(a['breaks'])} | "
                     f"{points(a['fixes'], a['breaks'])} | {pct(a['accuracy_on_raw_student_only_errors'])} | "
                     f"{kl(a['kl_to_teacher'])} | {kl(a['kl_to_raw_student'])} | {kl(u['kl_to_teacher'])} | "
                     f"{kl(u['kl_to_raw_student'])} |")
    lines += ["", "fixes: the share of positions where the fine-tuned teacher's argmax is wrong and pi*'s right; "
              "breaks: right, and pi*'s wrong. pi*'s accuracy is the teacher's plus fixes minus breaks."]
    lines += ["", f"By the class of the gold token (accuracy; pi* at alpha = {top['alpha']:g}). "
              + "; ".join(f"{name}: {what}" for name, what in d["class_meaning"].items()) + ".", "",
              "| class | positions | share of KL(t_ft‖t_raw) | t_ft | t_raw | s_raw | pi* | fixes | breaks | "
              "raw-student-only errors |", "|---" * 10 + "|"]
    for name, c in d["classes"].items():
        lines.append(f"| {name} | {pct(c['share'])} | {pct(c['teacher_shift_share'])} | "
                     f"{pct(c['accuracy']['t_ft'])} | {pct(c['accuracy']['t_raw'])} | {pct(c['accuracy']['s_raw'])} | "
                     f"{pct(c['alphas'][-1]['accuracy'])} | {pct(c['alphas'][-1]['fixes'])} | "
                     f"{pct(c['alphas'][-1]['breaks'])} | {pct(c['raw_student_only_errors'])} |")
    lines += ["", "pi*'s mass outside its top k, median / 99th percentile over the positions, at temperature 1: what "
              "targets.py --top-k k leaves to one tail bucket, and the bound on its cost (deltakd.py (8): at most "
              "2 T r of the gradient per position, r this mass; bins of a factor 1.05, each value an upper bound).", "",
              "| alpha | " + " | ".join(f"k = {k}" for k in TAIL_K) + " |", "|---" * (len(TAIL_K) + 1) + "|"]
    for row in d["tail_mass"]:
        cells = [" / ".join(f"{row[str(k)][q]:.1e}" if row[str(k)][q] else "< 1e-12" for q in ("median", "p99"))
                 for k in TAIL_K]
        lines.append(f"| {row['alpha']:g} | " + " | ".join(cells) + " |")
    a, u = top["alpha"], unmoved["alphas"][-1]
    lines += ["", "What it means for Delta-KD:"]
    best = max(d["alphas"], key=lambda x: x["fixes"] - x["breaks"])
    lines.append(f"- At alpha = {a:g}, pi* fixes {pct(top['fixes'])} of the positions and breaks {pct(top['breaks'])} "
                 f"(net {points(top['fixes'], top['breaks'])}); the net is largest at alpha = {best['alpha']:g} "
                 f"({points(best['fixes'], best['breaks'])}). " +
                 ("Somewhere the raw student knows what the fine-tuned teacher does not: Delta-KD's target can "
                  "correct the teacher there." if best["fixes"] > best["breaks"] else
                  "The raw student corrects the fine-tuned teacher nowhere that outweighs what it breaks: the "
                  "target can only lose to the teacher's."))
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


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the raw student s_raw: a folder or a Hub id")
    p.add_argument("--teacher", required=True, help="the fine-tuned teacher t_ft")
    p.add_argument("--teacher-raw", required=True, help="the same teacher before its SFT, t_raw")
    p.add_argument("--data", required=True,
                   help="conversations: a .jsonl/.json/.parquet file, a folder of them, or a Hub dataset id")
    p.add_argument("--split", default="test_sft",
                   help="split of a folder or Hub dataset, optionally with a row range like cot[100000:101000]")
    p.add_argument("--max-examples", type=int, help="use the first N chats only (after --holdout and --max-len)")
    p.add_argument("--holdout", choices=["train", "test"],
                   help="split the prompts by a hash of each, as train.py and evaluate.py do")
    p.add_argument("--max-len", type=int,
                   help="keep only chats that fit in this many tokens, up to their last reply: train.py --drop-long's "
                        "rule")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of stopping")
    p.add_argument("--mark", type=re.compile, metavar="REGEX",
                   help="report the tokens of what this regular expression matches in a reply (its first group, if it "
                        "has one) as a class of their own, 'marked': say, the facts a reply states")
    p.add_argument("--alphas", type=alpha_list, default="0,0.25,0.5,0.75,1", help="Delta-KD's alphas, comma-separated")
    p.add_argument("--micro-batch-size", type=int, default=8,
                   help="chats per forward pass; with the positions chunked, memory holds at most this many times "
                        "the longest chat's supervised positions of logits, per model")
    p.add_argument("--dtype", choices=list(parallel.DTYPES), help="compute dtype; none: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", required=True, help="folder for diagnose.json and diagnose.md")
    return p.parse_args(argv)


def check_args(args):
    for flag in ("max_examples", "max_len", "micro_batch_size"):
        if (value := getattr(args, flag)) is not None and value < 1:
            sys.exit(f"error: --{flag.replace('_', '-')} must be at least 1, got {value}")


def frozen_model_dirs(args):
    """{t_ft, t_raw, s_raw: folder} and their one tokenizer, each folder checked before any weight is read."""
    dirs, tokenizer = {}, None
    for flag, name in (("model", "s_raw"), ("teacher", "t_ft"), ("teacher-raw", "t_raw")):
        path = getattr(args, flag.replace("-", "_"))
        try:
            dirs[name] = checked_model_dir(path)
            tok = load_tokenizer(dirs[name])  # the model's own: a missing one is an error, not a default
        except (OSError, ValueError) as e:
            sys.exit(f"error: --{flag} {path}: {e}")
        if tokenizer and tok.get_vocab(True) != tokenizer.get_vocab(True):
            sys.exit(f"error: --{flag} has a different tokenizer from --model's: the three models' distributions "
                     "must be over the same ids")
        tokenizer = tokenizer or tok
    return dirs, tokenizer


def load_chats(args, tokenizer):
    """The data's chats that have a reply to supervise, checked before any weight is read."""
    try:
        rows = load_rows(args.data, split=args.split, max_rows=args.max_examples, skip_bad=args.skip_bad_rows,
                         holdout=args.holdout, fit=(tokenizer, args.max_len) if args.max_len else None)
    except (OSError, ValueError) as e:  # data.py's messages name the file and line
        sys.exit(f"error: {e}" + ("; pass --split, e.g. train or cot[100000:101000]" if "for split" in str(e) else ""))
    chats = [r for r in rows if "messages" in r and any(m["role"] == "assistant" and m.get("weight", 1)
                                                        for m in r["messages"])]
    if not chats:
        sys.exit(f"error: --data {args.data}: none of its {len(rows)} rows is a chat with a reply to supervise")
    return chats


def alpha_list(text):
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, like 0,0.5,1, got {text!r}") from None


def main(argv=None):
    args = get_args(argv)
    check_args(args)

    # --- the three models' files, one tokenizer, and the data, all checked before any weight is read
    dirs, tokenizer = frozen_model_dirs(args)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    chats = load_chats(args, tokenizer)
    examples = build_examples(chats, tokenizer, args.max_len)  # whole chats: --max-len left out the longer ones
    assert len(examples) == len(chats)  # so each example is its chat's
    for ex, chat in zip(examples, chats):
        ex["classes"] = token_classes(chat["messages"], tokenizer, args.mark)[:len(ex["input_ids"])]
    classes = {**CLASSES, **({"marked": f"a token of what --mark {args.mark.pattern!r} matches in a reply"}
                             if args.mark else {})}

    # --- processes and models; each process reads its share of the data, as train.py's data.Batches deals it
    rank, world, device = parallel.start()
    dtype = parallel.dtype_name(args.dtype)
    models = {name: Qwen2.from_pretrained(path, parallel.DTYPES[dtype], device) for name, path in dirs.items()}
    batches = Batches(examples, len(examples), args.micro_batch_size, rank, world,
                      pad_id=tokenizer.token_to_id("<|endoftext|>"))
    sums = torch.zeros(len(classes), 2, 7 + 6 * len(args.alphas), dtype=torch.float64, device=device)
    tails = torch.zeros(len(args.alphas), len(TAIL_K), TAIL_BINS[2] + 1, dtype=torch.float64, device=device)
    for micro_batch in next(iter(batches)):  # one step holds every example
        diagnose_batch(models, micro_batch, vocab, args.alphas, sums, tails)
    dist.all_reduce(sums)
    dist.all_reduce(tails)
    del models
    parallel.end()
    if rank != 0:
        return

    # --- diagnose.json, diagnose.md, and the same text printed
    sums = sums.cpu()
    total = sums.sum(0)
    def share(k, j):
        return (sums[k, 0, j] / total[0, j]).item() if total[0, j] else None
    result = {**_summary(total[0].tolist(), args.alphas), "unmoved": _summary(total[1].tolist(), args.alphas),
              "tail_mass": [{"alpha": a, **{str(k): _tail_quantiles(tails[j, i].cpu()) for i, k in enumerate(TAIL_K)}}
                            for j, a in enumerate(args.alphas)],
              "classes": {name: {**_summary(sums[k, 0].tolist(), args.alphas), "share": share(k, 0),
                                 "teacher_shift_share": share(k, 6)}  # of the positions, of KL(t_ft || t_raw)
                          for k, name in enumerate(classes)}, "class_meaning": classes,
              "unmoved_kl": UNMOVED_KL, "examples": len(examples), "vocab_size": vocab, "dtype": dtype,
              "models": {"s_raw": args.model, "t_ft": args.teacher, "t_raw": args.teacher_raw}, "data": args.data}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = diagnosis_text(result)
    (out / "diagnose.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "diagnose.md").write_text(text)
    print(text + f"wrote {out / 'diagnose.json'} and {out / 'diagnose.md'}")


if __name__ == "__main__":
    main()
