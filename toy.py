"""The synthetic toy of reproduce.sh: arithmetic word problems in chats, a pre-training corpus, a Qwen-like tokenizer.

    python toy.py --out DIR [--regime knowledge|premise|student-knows]    train.jsonl, test.jsonl, corpus.jsonl, ...

Three regimes, three answers to "what did the raw models learn before SFT?":
- knowledge: a corpus with none of the task's chats (worked problems as plain text, sums, short chats about sums).
  SFT teaches answering word problems in a chat, and the larger teacher knows more arithmetic than the student.
- premise: Delta-KD's premise (arXiv 2509.14526), that the raw student is a good base for the teacher's SFT shift.
  The corpus holds the same kind of word problems already in chats, replied in style A; SFT teaches style B, which
  carries the same content in a new frame: an opening line, "Step k: " before each step, a "Final answer:" line and a
  closing line. A quarter of the corpus is worked problems as plain text in style B: like a real base model, the raw
  ones know the frame's words and can read them (a first version without these texts left the frame's embeddings
  untrained, and the raw models lost the content inside it), but answer a chat in style A. The numbers are small
  (one-digit operands, two-digit results), so that the raw student can master the content as well as the raw
  teacher; reproduce.sh's gate checks it on test-style-a.jsonl, the test problems replied in style A.
- student-knows: the raw student knows facts that the teacher does not, the case where Delta-KD's target, which keeps
  the raw student's beliefs wherever SFT did not move the teacher, should win. The facts: the prices of 36 goods at a
  market (market.json), 1 to 9 dollars, each price for four goods. Both raw models' corpora state the prices of 12
  "shared" goods; only the raw student's states the other 24 (corpus.jsonl; the teacher's is corpus-teacher.jsonl).
  A corpus is the premise regime's, with three eighths of its problems about buying goods ("At the market, a lamp
  costs 7 dollars." opens their solutions), a tenth of its documents price lists, and a tenth sentences that name
  goods without their prices, every good in both corpora: both raw models know every good's name, and only the
  prices differ (a teacher that had never seen a good's name could not copy it into its reply, and FKL would teach
  that instead). The teacher's SFT data (sft.jsonl)
  replies in style B to the premise regime's problems and to buying problems about shared goods only: SFT cannot
  teach the student-only prices. The students' distillation data (train.jsonl) is style B too, and a fifth of it buys
  12 of the student-only goods, the "covered" ones: there the gold replies state the prices (so the SFT term teaches
  them to every student), FKL's target is the teacher's guess and Delta-KD's keeps the raw student's answer. The other
  12, "uncovered", appear in no training chat: there only what a student keeps of its raw knowledge can be right.
  The test (test.jsonl) is 35% covered, 35% uncovered, 15% shared and 15% premise problems, each row naming its kind
  and its facts; test-facts.jsonl holds its covered and uncovered problems in style B, for the gate, and
  test-facts-style-a.jsonl the same problems in style A.
No corpus holds a test problem, and no training or SFT chat repeats one.
"""
import argparse
import json
import random
import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from data import DEFAULT_SYSTEM, SPECIAL_TOKENS, render_chat

REGIMES = ("knowledge", "premise", "student-knows")
NAMES = "Ava Ben Chloe Dev Emma Farid Grace Hugo Iris Jonas Kira Liam Maya Noah Olga Priya Sam Tara".split()
ITEMS = "apples pencils stickers marbles books cookies stamps shells cards beads".split()
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")  # Qwen2's pre-tokenizer: single digits, newline runs kept together
# Qwen2.5's template without its tools branch: this project has no tool calls. Shipped in the toy
# tokenizer_config.json, so that transformers' apply_chat_template renders the toy chats as render_chat does.
CHAT_TEMPLATE = ("{%- if not messages or messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\n"
                 + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + "
                 "m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
                 "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def problem(rng, small=False):
    """(question, solution steps, answer) in one of seven shapes with varied names, items and numbers: a model must
    read the question to choose the steps, and carry its numbers through them. small: the premise regime's numbers."""
    a, b = rng.sample(NAMES, 2)
    item, kind, r = rng.choice(ITEMS), rng.randrange(7), rng.randint
    def n(usual, little):  # (lo, hi) ranges
        return r(*(little if small else usual))
    if kind == 0:
        x, y = n((5, 60), (5, 20)), n((2, 40), (2, 9))
        z = r(1, x + y)
        return (f"{a} has {x} {item}. {b} gives {a} {y} more, and then {a} loses {z}. How many {item} does {a} have "
                f"now?", [f"{a} starts with {x} {item}.", f"After getting {y} more, {a} has {x} + {y} = {x + y}.",
                          f"After losing {z}, {a} has {x + y} - {z} = {x + y - z}."], x + y - z)
    if kind == 1:
        k, p = n((2, 9), (2, 5)), n((2, 15), (2, 9))
        bill = next(v for v in (20, 50, 100, 200) if v >= k * p)
        return (f"{a} buys {k} {item} for ${p} each and pays with a ${bill} bill. How much change does {a} get?",
                [f"The {item} cost {k} x {p} = {k * p} dollars.",
                 f"The change is {bill} - {k * p} = {bill - k * p} dollars."], bill - k * p)
    if kind == 2:
        k, each, kept = n((2, 9), (2, 5)), n((2, 12), (2, 9)), n((1, 9), (1, 5))
        total = k * each + kept
        return (f"{a} has {total} {item}, keeps {kept} and shares the rest equally among {k} friends. How many {item} "
                f"does each friend get?", [f"{a} shares {total} - {kept} = {total - kept} {item}.",
                                           f"Each friend gets {total - kept} / {k} = {each} {item}."], each)
    if kind == 3:
        w, h = n((2, 30), (2, 9)), n((2, 30), (2, 9))
        return (f"{a}'s garden is {w} m wide and {h} m long. What is its perimeter in meters?",
                [f"The perimeter is 2 x ({w} + {h}).", f"{w} + {h} = {w + h}, and 2 x {w + h} = {2 * (w + h)}."],
                2 * (w + h))
    if kind == 4:
        w, h = n((2, 30), (2, 9)), n((2, 30), (2, 9))
        return (f"{a}'s garden is {w} m wide and {h} m long. What is its area in square meters?",
                ["The area is the width times the length.", f"{w} x {h} = {w * h}."], w * h)
    if kind == 5:
        s1, h1, s2, h2 = n((20, 90), (2, 9)), n((2, 5), (2, 4)), n((20, 90), (2, 9)), n((2, 5), (2, 4))
        return (f"{a} drives at {s1} km/h for {h1} hours, then at {s2} km/h for {h2} hours. How far does {a} drive in "
                f"total?", [f"First part: {s1} x {h1} = {s1 * h1} km.", f"Second part: {s2} x {h2} = {s2 * h2} km.",
                            f"Total: {s1 * h1} + {s2 * h2} = {s1 * h1 + s2 * h2} km."], s1 * h1 + s2 * h2)
    x, m = n((2, 25), (2, 9)), n((2, 6), (2, 5))
    return (f"{a} has {x} {item}. {b} has {m} times as many. How many {item} do they have together?",
            [f"{b} has {m} x {x} = {m * x} {item}.", f"Together they have {x} + {m * x} = {x + m * x} {item}."],
            x + m * x)


def knowledge_reply(rng, steps, answer):
    intro = rng.choice(["", "Let's solve this step by step.\n", "We work it out one step at a time.\n"])
    return intro + "\n".join(steps) + f"\nThe answer is \\boxed{{{answer}}}."


def style_a(steps, answer):
    """The premise regime's pre-training style: the steps, one a line, and the boxed answer."""
    return "\n".join(steps) + f"\nThe answer is \\boxed{{{answer}}}."


def style_b(steps, answer):
    """The premise regime's SFT style: style A's steps and boxed answer, word for word, in a new frame."""
    lines = [f"Step {k}: {step}" for k, step in enumerate(steps, 1)]
    return ("Let's solve this step by step.\n" + "\n".join(lines) + f"\nFinal answer: \\boxed{{{answer}}}.\n"
            "I hope this helps!")


def _chat(rid, question, reply, answer):
    return {"id": rid, "answer": str(answer), "messages": [{"role": "user", "content": question},
                                                           {"role": "assistant", "content": reply}]}


def chats(n, seed=0, regime="knowledge", style="B"):
    """n distinct word problems as {"id", "answer", "messages"} rows, in the style of OpenMathReasoning. The premise
    regime replies in style B (SFT's), or A; the same seed gives the same problems in either style."""
    rng, rows, seen = random.Random(f"chats-{seed}"), [], set()
    while len(rows) < n:
        question, steps, answer = problem(rng, small=regime == "premise")
        if question not in seen:
            seen.add(question)
            reply = knowledge_reply(rng, steps, answer) if regime == "knowledge" else \
                (style_b if style == "B" else style_a)(steps, answer)
            rows.append(_chat(f"toy-{len(rows)}", question, reply, answer))
    return rows


def corpus(n, seed=0, regime="knowledge", exclude=()):
    """Text to pre-train raw models, leaving out the questions in `exclude` (the test set's).
    knowledge: worked problems, sums, and short chats about sums. Real base models have seen chat markup before
    their SFT, so the toy ones do too; what SFT adds is answering word problems in a chat.
    premise: word problems in chats replied in style A, rendered with the chat template; a quarter of them as plain
    text in style B, the way a base model has seen step-by-step solutions outside chats."""
    rng, rows, exclude = random.Random(f"corpus-{seed}"), [], set(exclude)
    while len(rows) < n:
        kind, question = rng.random(), None
        if regime == "premise":
            question, steps, answer = problem(rng, small=True)
            text = f"Problem: {question}\nSolution: {style_b(steps, answer)}" if kind < 0.25 else \
                render_chat(_chat("", question, style_a(steps, answer), answer)["messages"])
        elif kind < 0.5:
            question, steps, answer = problem(rng)
            text = f"Problem: {question}\nSolution: {knowledge_reply(rng, steps, answer)}"
        elif kind < 0.75:
            text = " ".join(_sum(rng) for _ in range(rng.randint(3, 8)))
        else:
            text = _sum(rng)
            text = render_chat([{"role": "user", "content": f"What is {text.split(' =')[0]}?"},
                                {"role": "assistant", "content": text}])
        if question not in exclude:
            rows.append({"id": f"corpus-{len(rows)}", "text": text})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# student-knows: a market whose prices only the raw student's corpus states

GOODS = [(g, {"scarf": "scarves", "brush": "brushes"}.get(g, g + "s")) for g in (  # (singular, plural)
    "lamp kettle umbrella scarf candle basket mirror teapot blanket hammer ladder bucket pillow wallet helmet jacket "
    "glove sock bowl plate spoon brush comb towel kite drum flute radio clock vase rug stool tent rope lantern "
    "whistle").split()]
FACT = re.compile(r"costs (\d+) dollars")  # a fact's value in a reply (reproduce.sh gives diagnose.py --mark it)


def market(seed=0):
    """{good: (price, kind)}: 12 goods of each kind, shared, covered and uncovered; in each kind every price from 1 to
    9 and three more, so that a model that does not know a good's price guesses it right about 1 time in 9."""
    rng = random.Random(f"market-{seed}")
    goods = [g for g, _ in GOODS]
    rng.shuffle(goods)
    out = {}
    for k, kind in enumerate(("shared", "covered", "uncovered")):
        prices = list(range(1, 10)) + rng.sample(range(1, 10), 3)
        rng.shuffle(prices)
        out.update({g: (p, kind) for g, p in zip(goods[12 * k:12 * (k + 1)], prices)})
    return out


def _a(good):
    return ("an " if good[0] in "aeiou" else "a ") + good


def _fact(good, price):
    return f"At the market, {_a(good)} costs {price} dollars."


def buying(rng, goods, prices):
    """A problem about buying some of `goods` at the market: (question, steps, answer, {good: price})."""
    a, plural, shape = rng.choice(NAMES), dict(GOODS), rng.randrange(3)
    if shape == 1:
        g, h = rng.sample(goods, 2)
        k, m = rng.randint(2, 5), rng.randint(2, 5)
        p, q = prices[g], prices[h]
        return (f"{a} buys {k} {plural[g]} and {m} {plural[h]} at the market. How much does {a} pay?",
                [_fact(g, p), _fact(h, q), f"{a} pays {k} x {p} + {m} x {q} = {k * p} + {m * q} = {k * p + m * q} "
                 "dollars."], k * p + m * q, {g: p, h: q})
    g = rng.choice(goods)
    p = prices[g]
    if shape == 0:
        k = rng.randint(2, 9)
        return (f"{a} buys {k} {plural[g]} at the market. How much does {a} pay?",
                [_fact(g, p), f"{a} pays {k} x {p} = {k * p} dollars."], k * p, {g: p})
    x = rng.randint(10, 20)  # not from p: a small x would tell a bound on the price
    return (f"{a} has {x} dollars and buys {_a(g)} at the market. How much money does {a} have left?",
            [_fact(g, p), f"{a} has {x} - {p} = {x - p} dollars left."], x - p, {g: p})


def market_chats(n, rng, seen, mix, prices, kinds, style="B"):
    """n new problems as chat rows: `mix` {kind: share} of buying problems by the kind of their goods ("none": the
    premise regime's problems). Each row names its kind and its facts. `seen` holds the questions already used."""
    goods = {kind: [g for g, (_, k) in kinds.items() if k == kind] for kind in ("shared", "covered", "uncovered")}
    order = [kind for kind, share in mix.items() for _ in range(round(share * n))][:n]
    order += [next(iter(mix))] * (n - len(order))
    rng.shuffle(order)  # the kinds mixed: a row limit takes some of each
    rows = []
    for kind in order:
        while True:
            if kind == "none":
                (question, steps, answer), facts = problem(rng, small=True), {}
            else:
                question, steps, answer, facts = buying(rng, goods[kind], prices)
            if question not in seen:
                break
        seen.add(question)
        reply = (style_b if style == "B" else style_a)(steps, answer)
        rows.append({**_chat(f"toy-{len(seen)}", question, reply, answer), "kind": kind, "facts": facts})
    return rows


def _mentions(rng, goods):
    """Sentences that name goods, singular and plural, without a price."""
    plural, sentences = dict(GOODS), []
    for g in rng.sample(goods, rng.randint(4, 8)):
        a = rng.choice(NAMES)
        sentences.append(rng.choice([f"{a} has {_a(g)}.", f"{a} looks at the {plural[g]}.",
                                     f"The {plural[g]} are on the shelf.", f"{a} wants {_a(g)} from the market."]))
    return " ".join(sentences)


def market_corpus(n, seed, known, prices, exclude):
    """The premise regime's corpus with buying problems about the `known` goods (a third of the problems), price lists
    of them (a tenth of the documents) and sentences that name every good without its price (a tenth): the raw
    student knows every price, the raw teacher the shared ones, and both know every good's name."""
    rng, rows = random.Random(f"corpus-{seed}-{len(known)}"), []
    while len(rows) < n:
        kind = rng.random()
        if kind < 0.2:
            text = " ".join(_fact(g, prices[g]) for g in rng.sample(known, rng.randint(4, 8))) if kind < 0.1 else \
                _mentions(rng, list(prices))
            rows.append({"id": f"corpus-{len(rows)}", "text": text})
            continue
        question, steps, answer = buying(rng, known, prices)[:3] if kind < 0.5 else problem(rng, small=True)
        if question in exclude:
            continue
        text = f"Problem: {question}\nSolution: {style_b(steps, answer)}" if rng.random() < 0.25 else \
            render_chat(_chat("", question, style_a(steps, answer), answer)["messages"])
        rows.append({"id": f"corpus-{len(rows)}", "text": text})
    return rows


def student_knows(n_train, n_test, n_corpus, seed):
    """The student-knows regime's files (see the module's docstring), as {name: rows}."""
    kinds = market(seed)
    prices = {g: p for g, (p, _) in kinds.items()}
    rng, seen = random.Random(f"chats-{seed}"), set()
    test = market_chats(n_test, rng, seen, {"covered": 0.35, "uncovered": 0.35, "shared": 0.15, "none": 0.15},
                        prices, kinds)
    sft = market_chats(n_train, rng, seen, {"none": 0.75, "shared": 0.25}, prices, kinds)
    train = market_chats(n_train, rng, seen, {"none": 0.6, "shared": 0.2, "covered": 0.2}, prices, kinds)
    facts = [r for r in test if r["kind"] in ("covered", "uncovered")]
    in_style_a = [{**r, "messages": [r["messages"][0], {"role": "assistant", "content": style_a(
        [line.split(": ", 1)[1] for line in r["messages"][1]["content"].split("\n") if line.startswith("Step ")],
        r["answer"])}]} for r in facts]
    questions = [r["messages"][0]["content"] for r in test]
    return {"train": train, "sft": sft, "test": test, "test-facts": facts, "test-facts-style-a": in_style_a,
            "corpus": market_corpus(n_corpus, seed, list(prices), prices, questions),
            "corpus-teacher": market_corpus(n_corpus // 3, seed, [g for g, (_, k) in kinds.items() if k == "shared"],
                                            prices, questions)}


def _sum(rng):
    x, op, y = rng.randint(1, 99), rng.choice("+-x"), rng.randint(1, 12)
    value = {"+": x + y, "-": x - y, "x": x * y}[op]
    return f"{x} {op} {y} = {value}."


def train_tokenizer(texts, vocab_size=768):
    """Byte-level BPE laid out like Qwen's: NFC, Qwen's split regex, byte level, special tokens after the BPE vocab.
    Offsets are not trimmed: encode_chat's labels need every token's exact character span."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Train on the text between special tokens: that is what encode() sees.
    special = "|".join(map(re.escape, SPECIAL_TOKENS))
    tok.train_from_iterator([piece for t in texts for piece in re.split(special, t) if piece], trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def main():
    p = argparse.ArgumentParser(description="write the toy's chats, pre-training corpus and tokenizer")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--regime", choices=REGIMES, default="knowledge",
                   help="what the raw models pre-train on: the task's knowledge without its chats, the task's chats "
                        "in another reply style (Delta-KD's premise), or that and facts that only the raw student "
                        "knows (student-knows)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes byte-identical files")
    p.add_argument("--n-train", type=int, default=4000, help="training chats (train.jsonl)")
    p.add_argument("--n-test", type=int, default=200, help="held-out chats (test.jsonl)")
    p.add_argument("--n-corpus", type=int, default=8000, help="pre-training documents (corpus.jsonl)")
    p.add_argument("--vocab-size", type=int, default=768, help="most tokens, special tokens included")
    args = p.parse_args()

    # --- data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.regime == "student-knows":
        files = student_knows(args.n_train, args.n_test, args.n_corpus, args.seed)
        (out / "market.json").write_text(json.dumps({g: {"price": p, "kind": k} for g, (p, k) in
                                                     market(args.seed).items()}, indent=1) + "\n")
    else:
        rows = chats(args.n_train + args.n_test, args.seed, args.regime)
        files = {"train": rows[:args.n_train], "test": rows[args.n_train:]}
        test_questions = [r["messages"][0]["content"] for r in files["test"]]
        if args.regime == "premise":  # the gate's data: the same test problems, replied in the pre-training style
            files["test-style-a"] = chats(args.n_train + args.n_test, args.seed, args.regime, style="A")[args.n_train:]
        files["corpus"] = corpus(args.n_corpus, args.seed, args.regime, exclude=test_questions)
    for name, part in files.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    # --- tokenizer
    tok = train_tokenizer([render_chat(r["messages"]) for r in files["train"]] + [r["text"] for r in files["corpus"]],
                          args.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "model_max_length": 32768, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote the {args.regime} regime's {len(files['train'])} train and {len(files['test'])} test chats, "
          f"{len(files['corpus'])} corpus texts and a {tok.get_vocab_size(with_added_tokens=True)}-token tokenizer "
          f"to {out}")


if __name__ == "__main__":
    main()
