"""Data for deltakd: Qwen2.5 chat formatting with response-only labels, dataset loading, sharded batches.

    load_rows(spec) -> rows -> build_examples(rows, tokenizer, max_len) -> examples -> Batches(examples, ...)

- load_rows checks every row, so bad data fails before training starts, naming the file and line (JSON lines) or row
  (parquet, .json lists; 0-based). skip_bad=True skips bad rows instead and prints how many and why.
- build_examples tokenizes. Rows longer than max_len are cut on the right (labels too); rows whose prompt alone fills
  max_len keep no supervised token and are dropped, and the number dropped is printed.
- encode_chat tokenizes the whole rendered string (Qwen merges "\\n\\n" into one token, so encoding piece by piece
  would not match transformers' apply_chat_template) and takes the labels from the tokens' character offsets.
References: the Qwen2.5 chat template (ChatML); HuggingFaceH4/ultrachat_200k; nvidia/OpenMathReasoning.
"""
import hashlib
import itertools
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from tokenizers import Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant")  # tool calls are not part of this project's data
IGNORE = -100
HOLDOUT = 0.05  # the share of prompts held_out() puts in the test set
# Hub datasets we know: default split, and the only columns worth reading (OpenMathReasoning rows are large).
ADAPTERS = {"HuggingFaceH4/ultrachat_200k": ("train_sft", ["prompt_id", "messages"]),
            "nvidia/OpenMathReasoning": ("cot", ["problem", "generated_solution"])}

# ---------------------------------------------------------------------------- tokenizer and encoding

def load_tokenizer(path):
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    tok = Tokenizer.from_file(str(file))
    tok.no_truncation()  # a tokenizer.json may carry settings that would silently cut or pad our encodings
    tok.no_padding()
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{file}: special token(s) {', '.join(missing)} missing from the vocabulary")
    return tok


def _check_messages(messages, need_assistant=True):
    """Why a conversation cannot be rendered, or None. The text before ':' is the category skip_bad counts."""
    if not isinstance(messages, list):
        return f"bad messages: expected a list, got {type(messages).__name__}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"bad messages: message {i} is not a {{role, content}} object"
        if m["role"] not in ROLES:
            return f"unknown role: message {i} has role {m['role']!r}, expected one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"non-string content: message {i} ({m['role']}) has content of type {type(m['content']).__name__}"
        if m.get("weight", 1) not in (0, 1) or ("weight" in m and m["role"] != "assistant"):
            return f"bad weight: message {i} ({m['role']}) has weight {m['weight']!r}; only replies take 0 or 1"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"


def _render(messages, add_generation_prompt=False, need_assistant=True):
    """Qwen2.5's template without tools, plus the character spans to supervise: each reply's content + <|im_end|>,
    except replies with "weight": 0 (as in OpenAI's fine-tuning format), which are context only.
    The template puts a leading system message in its header and renders any later one as a turn, so every message
    comes out alike; only a missing system message changes the text (the default one is inserted)."""
    problem = _check_messages(messages, need_assistant)
    if problem:
        raise ValueError(problem)
    spans = []
    text = "" if messages and messages[0]["role"] == "system" else f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"] + "<|im_end|>"
        if m["role"] == "assistant" and m.get("weight", 1):
            spans.append((start, len(text)))
        text += "\n"  # not supervised: generation stops at <|im_end|>
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else ""), spans


def render_chat(messages, add_generation_prompt=False):
    return _render(messages, add_generation_prompt, need_assistant=False)[0]


def _example(encoding, spans, tokenizer, max_len):
    """{input_ids, labels} from the encoding of a chat (spans: the characters to supervise) or of a plain text (spans
    None: all supervised, with <|endoftext|> appended so that the model learns where a document ends). A token can
    straddle a span's start: "assistant\\n" + a reply starting with "\\n" makes one "\\n\\n" token. It carries the
    reply's first character, so it is supervised: the rule transformers applies when a template has generation tags."""
    ids = encoding.ids
    if spans is None:
        ids = ids + [tokenizer.token_to_id("<|endoftext|>")]
        labels = ids
    else:
        labels, j = [], 0
        for token, (start, end) in zip(ids, encoding.offsets):  # offsets ascend, so one pass over the spans
            while j < len(spans) and spans[j][1] <= start:
                j += 1
            labels.append(token if j < len(spans) and end > spans[j][0] else IGNORE)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}  # [:None] keeps everything


def encode_chat(messages, tokenizer, max_len=None):
    text, spans = _render(messages)
    return _example(tokenizer.encode(text, add_special_tokens=False), spans, tokenizer, max_len)


def last_reply(messages):
    """The index of the last assistant message: the reply a prompt is made for, and evaluation scores."""
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))


def encode_prompt(messages, tokenizer):
    """The token ids of the prompt for the last reply: the turns before it and "<|im_start|>assistant\\n"."""
    text = render_chat(messages[:last_reply(messages)], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False).ids


def build_examples(rows, tokenizer, max_len=None, chunk=1024):
    """Rows from load_rows -> examples {input_ids, labels} as int32 arrays (Python int lists of a 200k-row set would
    take tens of GB). encode_batch in chunks: fast, without holding every Encoding at once."""
    examples, dropped = [], 0
    for c in range(0, len(rows), chunk):
        rendered = [_render(r["messages"]) if "messages" in r else (r["text"], None) for r in rows[c:c + chunk]]
        encodings = tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        for (_, spans), encoding in zip(rendered, encodings):
            ex = _example(encoding, spans, tokenizer, max_len)
            if all(label == IGNORE for label in ex["labels"]):
                dropped += 1
            else:
                examples.append({k: np.asarray(v, dtype=np.int32) for k, v in ex.items()})
    if dropped:
        print(f"build_examples: dropped {dropped} of {len(rows)} rows whose prompt alone fills max_len={max_len}")
    return examples

# ---------------------------------------------------------------------------- sources

def _split_matches(name, split):
    """Hub layouts: data/{split}-00000-of-00003-<hash>.parquet, {split}.jsonl, {split}/<anything>.parquet."""
    name = Path(name)
    return split is None or re.match(rf"{re.escape(split)}[-.]", name.name) or split in name.parts[:-1]


def read_file(file, columns=None):
    """Yield (where, id, row, problem) per row: the parsed row, or why that line could not be read. A broken parquet
    file or JSON list has no readable rows at all, so it fails even with skip_bad. evaluate.py reads with it too."""
    file = Path(file)
    raw = None if file.suffix == ".parquet" else file.read_bytes()
    if raw is None:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:
            raise ValueError(f"{file}: not a readable parquet file ({e})") from e
        missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{file}: missing column(s) {', '.join(missing)}")
        rows = (row for batch in pf.iter_batches(batch_size=256, columns=columns) for row in batch.to_pylist())
    elif file.suffix == ".json" and raw.lstrip().startswith(b"["):
        try:
            rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{file}:{line}: invalid UTF-8 at byte {e.start}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from e
    else:  # JSON lines, whatever the suffix. Not splitlines(): U+2028 and the like may sit inside a string.
        for n, line in enumerate(raw.split(b"\n"), 1):
            try:
                text = line.decode("utf-8")
                if text.strip():
                    yield f"{file}:{n}", f"{file.name}:{n}", json.loads(text), None
            except UnicodeDecodeError as e:
                yield f"{file}:{n}", None, None, f"invalid UTF-8: byte {e.start} of the line"
            except json.JSONDecodeError as e:
                yield f"{file}:{n}", None, None, f"malformed JSON: {e.msg} at column {e.colno}"
        return
    for n, row in enumerate(rows):
        yield f"{file} row {n}", f"{file.name}:{n}", row, None


def _hub_shards(repo, split):
    """The dataset's parquet files for split, and whether that list came from the local cache."""
    try:
        names, cached = HfApi().list_repo_files(repo, repo_type="dataset"), False
    except Exception as e:  # offline (HF_HUB_OFFLINE=1) or no network: list the copy in the local HF cache
        try:
            root = Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
        except Exception:
            raise ConnectionError(f"cannot list the files of Hub dataset {repo} ({e}), and it is not cached") from e
        names, cached = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()], True
        print(f"load_rows: the Hub did not answer, so the files of {repo} are listed from the local cache, which "
              "holds only what earlier runs downloaded (with a row limit, only the shards they needed)")
    shards = sorted(n for n in names if n.endswith(".parquet") and _split_matches(n, split))
    if not shards:
        raise ValueError(f"Hub dataset {repo}: no parquet files for split {split!r}")
    return shards, cached


def _normalise(row, rid):
    """Any supported row shape -> ({"id", "messages"} or {"id", "text"}, None), or (None, why not)."""
    if not isinstance(row, dict):
        return None, f"bad row: expected an object, got {type(row).__name__}"
    rid = str(row.get("id", row.get("prompt_id", rid)))  # UltraChat names its rows by prompt_id
    if "messages" not in row:
        for question, answer in (("prompt", "response"), ("problem", "generated_solution")):  # 2nd: OpenMathReasoning
            if question in row and answer in row:
                row = {"messages": [{"role": "user", "content": row[question]},
                                    {"role": "assistant", "content": row[answer]}]}
                break
    if "messages" in row:
        problem = _check_messages(row["messages"])
        if problem:
            return None, problem
        keys = ("role", "content", "weight")
        return {"id": rid, "messages": [{k: m[k] for k in keys if k in m} for m in row["messages"]]}, None
    if "text" in row:
        if not isinstance(row["text"], str):
            return None, "non-string content: field text"
        return {"id": rid, "text": row["text"]}, None
    return None, f"bad row: none of messages, prompt+response, problem+generated_solution, text in {sorted(row)}"


def held_out(row):
    """Whether a hash of the row's prompt (everything before its last reply) puts it in the held-out HOLDOUT share.
    A dataset with several replies per prompt, like OpenMathReasoning's ~10 solutions per problem, then never trains
    on a test prompt, whatever the row order."""
    prompt = row["messages"][:last_reply(row["messages"])] if "messages" in row else row["text"]
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") < HOLDOUT * 2**64, digest


def fits(rows, tokenizer, max_len):
    """Per row: whether its chat up to its last reply (a text: all of it, and <|endoftext|>) fits in max_len tokens,
    so that nothing supervised is cut, the closing <|im_end|> included."""
    texts = [_render(r["messages"][:last_reply(r["messages"]) + 1])[0] if "messages" in r else r["text"] for r in rows]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [len(e.ids) + ("text" in r) <= max_len for e, r in zip(encodings, rows)]


def load_rows(spec, split=None, max_rows=None, skip_bad=False, holdout=None, fit=None):
    """Rows of a file, or of one split of a folder or Hub dataset. With split None: a Hub dataset's default split
    (ADAPTERS, else "train"); a folder's "train" files if it has any (from a `python toy.py` folder, train.jsonl
    alone, not mixed with test.jsonl, corpus.jsonl and tokenizer.json), else all its files.

    Filters, in this order: holdout="train" leaves out the rows held_out() puts in the test share, holdout="test"
    keeps only those, each prompt once; fit=(tokenizer, max_len) keeps the rows that fit (see fits()). Then a split
    may end in a range of the rows left, like "cot[0:1000]", and max_rows caps their number. Only the shards up to
    the last row needed are downloaded."""
    split, first, last = re.fullmatch(r"(.*?)(?:\[(\d*):(\d*)\])?", split or "").groups()
    split, first = split or None, int(first or 0)
    stop = min(int(last) if last else math.inf, first + max_rows if max_rows else math.inf)  # in rows kept
    if holdout not in (None, "train", "test"):
        raise ValueError(f"holdout must be None, 'train' or 'test', got {holdout!r}")
    path, suffixes, cached = Path(spec), (".jsonl", ".json", ".parquet"), False
    if path.is_file():
        sources = [read_file(path)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in suffixes)
        if split is None and any(_split_matches(p.relative_to(path), "train") for p in files):
            split = "train"
        files = [p for p in files if _split_matches(p.relative_to(path), split)]
        if not files:
            raise FileNotFoundError(f"{path}: no .jsonl/.json/.parquet files for split {split!r}" if split
                                    else f"{path}: no .jsonl/.json/.parquet files")
        sources = map(read_file, files)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)) and path.suffix not in suffixes:
        default_split, columns = ADAPTERS.get(str(spec), ("train", None))
        shards, cached = _hub_shards(str(spec), split or default_split)
        # A generator: shards download one at a time, and with a row limit only until there are enough rows.
        sources = (read_file(hf_hub_download(str(spec), s, repo_type="dataset"), columns) for s in shards)
    else:
        raise FileNotFoundError(f"{spec}: no such file or folder, and not a Hub dataset id (owner/name)")
    def kept(rows):  # fit: tokenized 1024 rows at a time
        return [r for r, ok in zip(rows, fits(rows, *fit) if fit else [True] * len(rows)) if ok]

    rows, pending, bad, seen, read = [], [], Counter(), set(), 0
    for where, rid, row, problem in itertools.chain.from_iterable(sources):
        if problem is None:
            row, problem = _normalise(row, rid)
        if problem and not skip_bad:
            raise ValueError(f"{where}: {problem} (--skip-bad-rows, or skip_bad=True, skips bad rows)")
        if problem:
            bad[problem.split(":")[0]] += 1
            continue
        if holdout:
            test, key = held_out(row)
            if test != (holdout == "test") or key in seen:
                continue
            if test:
                seen.add(key)
        read += 1
        pending.append(row)
        if fit is None or len(pending) == 1024:
            rows += kept(pending)
            pending = []
            if len(rows) >= stop:  # before the next shard is fetched
                break
    else:
        rows += kept(pending)
    rows = rows[first:stop] if stop < math.inf else rows[first:]
    if bad:
        print(f"load_rows: skipped {sum(bad.values())} bad rows of {spec}: "
              + ", ".join(f"{n} {why}" for why, n in sorted(bad.items())))
    if fit:
        print(f"load_rows: {spec}: {len(rows)} rows kept of {read} read{' (' + holdout + ' share)' if holdout else ''}"
              f"; the others' chats do not fit in {fit[1]} tokens")
    if cached and len(rows) < stop - first < math.inf:  # a limit, not met: the listing may have missed shards
        print(f"load_rows: {spec} gave {len(rows)} rows, fewer than the {stop - first} asked for; its files were "
              "listed from the local cache, which may lack shards")
    if not rows:
        raise ValueError(f"{spec}: no usable rows")
    return rows

# ---------------------------------------------------------------------------- batches

class Batches:
    """Each item is one optimizer step for this rank: a list of micro-batches, dicts of LongTensors (rows, T) with
    input_ids, attention_mask (1 on real tokens), labels, and index (each row's example, -1 for a filler), and
    positions (N,): the flat positions in (rows, T) whose next token is supervised, the only logits a loss needs.

    Step s of epoch e uses the global batch perm_e[s*B:(s+1)*B] whatever the world size. With the loss normalised by
    the global token count (train.py), any arrangement of those examples over ranks and micro-batches gives the same
    update up to float order, so they are arranged for compute, not by chance:
    - sorted by length and cut into runs of similar length, so that little of a micro-batch is padding;
    - each micro-batch holds at most micro_batch_size x (the longest example) tokens, padding included: the memory
      the user asked for, while a micro-batch of short rows holds more of them;
    - as few micro-batches per rank as that allows, each run's cost (rows x padded length) made as even as possible,
      and dealt so that the ranks' micro-batches at each index cost about the same: FSDP waits at every micro-batch
      for the slowest rank.
    Every rank runs the same number of micro-batches (FSDP collectives hang otherwise): a rank with nothing left gets
    a filler, one token whose label is -100 (it attends to itself, since a row attending to nothing gives NaN).
    Iterating runs to the end of the current epoch; state_dict() always names the next step, so resume is exact."""

    def __init__(self, examples, batch_size, micro_batch_size, rank=0, world_size=1, seed=0, pad_id=0):
        if not examples:
            raise ValueError("Batches: no examples")
        if min(batch_size, micro_batch_size) < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Batches: need batch_size >= 1, micro_batch_size >= 1 and 0 <= rank < world_size, got "
                             f"{batch_size}, {micro_batch_size}, rank {rank} of {world_size}")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.lengths = np.array([len(e["input_ids"]) for e in examples])
        self.longest = int(self.lengths.max())
        self.max_tokens = micro_batch_size * self.longest
        self.steps_per_epoch = -(-len(examples) // batch_size)
        self.epoch = self.step = 0

    def __len__(self):
        return self.steps_per_epoch

    def __iter__(self):
        epoch, B = self.epoch, self.batch_size
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))  # the same on every rank
        while self.epoch == epoch:
            runs = self.layout(perm[self.step * B:(self.step + 1) * B])
            self.step += 1  # before the yield, so that state_dict() names the next step
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = epoch + 1, 0
            yield [self._collate(run) for run in runs[self.rank::self.world_size]]

    def padded(self, n):
        # rounded up to a multiple of 8: fewer distinct shapes for the kernels to tune and cache
        return min(-(-n // 8) * 8, self.longest)

    def layout(self, indices):
        """One global step's examples as world_size x K runs of example indices, run j going to rank j % world_size
        as its micro-batch j // world_size. An empty run is a filler."""
        order = sorted(indices, key=lambda i: (-self.lengths[i], i))  # longest first; the index breaks ties
        W = self.world_size
        fewest = W * -(-len(self._cut(order, self.max_tokens)) // W)  # the fewest runs per rank the memory cap allows
        # A round of W runs costs its costliest on every rank. One more round can cut both padding and waiting.
        return min((self._balanced(order, slots) for slots in (fewest, fewest + W)),
                   key=lambda runs: sum(self._cost(runs[k]) for k in range(0, len(runs), W)))

    def _cost(self, run):  # of a micro-batch: rows x padded length, set by its first (longest) row
        return len(run) * self.padded(self.lengths[run[0]]) if run else 0

    def _cut(self, order, cap):
        """Greedy: each run takes rows in order while its cost stays within cap (a single row always fits)."""
        runs, start = [], 0
        for k in range(1, len(order) + 1):
            if k == len(order) or (k + 1 - start) * self.padded(self.lengths[order[start]]) > cap:
                runs.append(order[start:k])
                start = k
        return runs

    def _balanced(self, order, slots):
        """`slots` runs whose costs are as even as the row lengths allow, costliest first."""
        lo, hi = max(self._cost([i]) for i in order), self.max_tokens
        while lo < hi:  # the smallest cap that still fits in `slots` runs
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(self._cut(order, mid)) <= slots else (mid + 1, hi)
        runs = self._cut(order, lo)
        while len(runs) < slots and any(len(run) > 1 for run in runs):  # an idle slot: split the costliest run
            run = max((run for run in runs if len(run) > 1), key=self._cost)
            k = min(range(1, len(run)), key=lambda k: max(self._cost(run[:k]), self._cost(run[k:])))
            runs.remove(run)
            runs += [run[:k], run[k:]]
        return sorted(runs, key=self._cost, reverse=True) + [[]] * (slots - len(runs))

    def _collate(self, run):
        rows = [self.examples[i] for i in run] or [None]  # None: a filler row
        lengths = [1 if r is None else len(r["input_ids"]) for r in rows]
        T = self.padded(max(lengths))
        # input_ids and labels, and any other per-token field an example carries (minillm.py's rollouts), as floats
        fill = {"input_ids": self.pad_id, "labels": IGNORE}
        batch = {k: torch.full((len(rows), T), fill.get(k, 0), dtype=torch.long if k in fill else torch.float32)
                 for k in self.examples[0]}
        batch["attention_mask"] = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            batch["attention_mask"][i, :n] = 1
            for k in r or ():
                batch[k][i, :n] = torch.as_tensor(r[k])
        batch["index"] = torch.tensor([int(i) for i in run] or [-1])
        # found here, on the host, from the examples' labels: the step then never waits for the device to count them
        batch["positions"] = torch.from_numpy(np.concatenate(
            [i * T + np.flatnonzero(np.asarray(r["labels"][1:]) != IGNORE) for i, r in enumerate(rows) if r is not None]
            or [[]]).astype(np.int64))
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state):
        # World size and micro-batch size may change between runs; these fix the order of the examples.
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("num_examples", len(self.examples))):
            if state[key] != mine:
                raise ValueError(f"cannot resume: saved {key}={state[key]}, this run has {mine}")
        self.epoch, self.step = state["epoch"], state["step"]


# ---------------------------------------------------------------------------- the data flags of train.py and targets.py

def add_data_arguments(parser):
    """The data flags, one definition for every command that reads training data (train.py, targets.py): the same
    flags give the same examples. Returns the argument group, for a command's own data flags."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="a .jsonl/.json/.parquet file, a folder of them, or a Hub dataset id")
    g.add_argument("--split", help="dataset split, optionally with a row range like cot[:100000] (default: "
                                   "train_sft for UltraChat, cot for OpenMathReasoning)")
    g.add_argument("--max-rows", type=int, help="read at most this many rows (downloads only the shards needed)")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of stopping")
    g.add_argument("--max-len", type=int, default=2048, help="longest sequence in tokens; longer rows are cut")
    g.add_argument("--drop-long", action="store_true",
                   help="drop the rows whose chat does not fit in --max-len instead of cutting them (a cut reply loses "
                        "its end and its <|im_end|>); --max-rows then counts the rows kept")
    g.add_argument("--holdout", choices=["train", "test"],
                   help="split the prompts by a hash of each (data.HOLDOUT of them held out for testing): 'train' "
                        "leaves the held-out ones out, as evaluate.py --holdout test scores exactly those")
    return g


def examples_from_arguments(args, tokenizer):
    """(examples, whether the data are chats) as the data flags ask; exits naming the file and line of bad data."""
    try:
        rows = load_rows(args.data, split=args.split, max_rows=args.max_rows, skip_bad=args.skip_bad_rows,
                         holdout=args.holdout, fit=(tokenizer, args.max_len) if args.drop_long else None)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --data: {e}")
    return build_examples(rows, tokenizer, args.max_len), any("messages" in r for r in rows)


def to_device(x, device):
    """A host tensor on `device`, copied from pinned memory without blocking: a copy from pageable memory makes the
    host wait until the device has run everything queued before it."""
    return x if device.type == "cpu" else x.pin_memory().to(device, non_blocking=True)


def step_inputs(micro_batch, device, fields=("labels",)):
    """What a training forward needs of a micro-batch, on `device`: input_ids (rows, T), positions (N,), and each of
    `fields` (per-token tensors like labels) at the tokens the positions predict, (N,). The logits at flat position
    i predict the token at i + 1, in the same row: no position is a row's last."""
    at = micro_batch["positions"]
    return [to_device(x, device) for x in (micro_batch["input_ids"], at,
                                           *(micro_batch[k].flatten()[at + 1] for k in fields))]
