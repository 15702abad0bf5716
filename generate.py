"""Generation: continuous batching over a fixed-shape KV cache, and sampling seeded per prompt.

    generate(model, input_ids, max_new_tokens=128)     a batch of prompts and their continuations, as HF's generate
    Decoder([model], slots, max_len).run(work)         many prompts, each taking a slot as one ends (evaluate.py)

model.py's Qwen2 gives the KV-cache passes (new_state, prefill, decode_step); this file decides which prompt runs in
which slot and which token comes next. Sampling is Gumbel-max with counter-based noise, so that a prompt's reply
depends on its seed alone: not on its slot, its neighbours or the number of processes.

References: Orca (Yu et al., OSDI 2022) for continuous batching; gpt-fast for the static cache and the one compiled
decode step; the Gumbel-max trick (Maddison et al., arXiv:1411.0030); C. Wellons' hash prospector (lowbias32).
"""
import functools
import math

import numpy as np
import torch


def generate(model, input_ids, attention_mask=None, max_new_tokens=128, temperature=0.0, top_p=1.0,
             eos_token_id=None, seed=0):
    """Prompts (B, T), padded on either side, and their continuations: (B, T + max_new_tokens), a row's tokens
    after its first eos id filled with the first eos id. Each row decodes in its own slot of a Decoder. seed: an
    int (row i samples with seed_of(seed, i)) or one seed per row."""
    B, T = input_ids.shape
    N = max_new_tokens
    if temperature < 0 or not 0 < top_p <= 1 or N < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 0: got {temperature, top_p, N}")
    eos = [] if eos_token_id is None else torch.tensor(eos_token_id).reshape(-1).tolist()
    real = [[True] * T] * B if attention_mask is None else attention_mask.bool().tolist()
    prompts = [[t for t, keep in zip(row, keeps) if keep] for row, keeps in zip(input_ids.tolist(), real)]
    if not all(prompts):
        raise ValueError("decoding needs prompts with at least one token each")
    seeds = [seed_of(seed, i) for i in range(B)] if isinstance(seed, int) else list(seed)
    out = torch.cat([input_ids, input_ids.new_full((B, N), eos[0] if eos else 0)], dim=1)  # (B, T+N), trainable on
    with torch.inference_mode():  # lighter than no_grad per op, which adds up over many small decode steps
        decoder = Decoder([model], B, T + N, eos, temperature, top_p)
        for i, tokens, _ in decoder.run(zip(range(B), prompts, [N] * B, seeds)):
            out[i, T:T + len(tokens)] = torch.tensor(tokens)
    return out


class Decoder:
    """Continuous batching (Orca, vLLM) over `slots` rows of a fixed-shape KV cache per model (gpt-fast's static
    cache). A step feeds one token per slot to every model, the same shapes at every token (one compiled graph), and
    `pick` chooses every row's next token in one call. A row ends at a stop id or at its own limit of new tokens; its
    slot then takes the next prompt, prefilled at its own length. Tokens stay on the device: the host looks once per
    `every` steps, in one copy (one sync), to learn which rows have ended. A row's steps after it ended and before the
    host saw it are idle, and utilization counts them so: live-row steps / (slots x steps).

    Several models can decode the same tokens (MiniLLM samples from a student-teacher mixture): pick(logits, seeds,
    steps) -> (tokens (B,), values (B, F) or None), with one logits (B, V) per model, each row's prompt seed and the
    number of tokens its reply has so far; the values (say, log-probabilities) come back with each token."""

    def __init__(self, models, slots, max_len, stop_ids=(), temperature=0.0, top_p=1.0, pick=None, every=16):
        self.models, self.slots, self.every, self.stop_ids = models, slots, every, set(stop_ids)
        self.states = [m.new_state(slots, max_len) for m in models]
        self.pick = pick or (lambda logits, seeds, steps: (sample(logits[0], temperature, top_p, seeds, steps), None))
        dev = self.states[0].pos.device
        self.stops = torch.tensor(list(stop_ids) or [-1], device=dev)
        # per slot: the token it feeds next, its prompt's seed, its reply's length so far and limit, whether it ended
        long = functools.partial(torch.zeros, slots, dtype=torch.long, device=dev)
        self.tokens, self.seeds, self.n, self.limits = long(), long(), long(), long()
        self.done = torch.ones(slots, dtype=torch.bool, device=dev)  # an empty slot counts as ended: it is not live
        self.live_steps = self.slot_steps = 0

    @property
    def utilization(self):
        return self.live_steps / max(self.slot_steps, 1)

    def add(self, slot, prompt, limit, seed, twin=None):
        if len(prompt) + limit - 1 > self.states[0].cache[0][0].size(2):  # the reply's last token is never fed
            raise ValueError(f"a prompt of {len(prompt)} tokens and {limit} new ones do not fit the cache's "
                             f"{self.states[0].cache[0][0].size(2)} positions")
        for model, state in zip(self.models, self.states):
            if twin is None:  # the prompt's last token is fed by the next step, which samples after it
                model.prefill(state, slot, prompt[:-1])
            else:  # the same prompt is in slot `twin` already: copy its rows, the very same values, for less work
                for k, v in state.cache:
                    k[slot], v[slot] = k[twin], v[twin]
                state.pos[slot] = state.pos[twin]
        self.tokens[slot], self.seeds[slot], self.n[slot], self.limits[slot] = prompt[-1], seed, 0, limit
        self.done[slot] = False

    def step(self):
        logits = [model.decode_step(state, self.tokens) for model, state in zip(self.models, self.states)]
        tokens, values = self.pick(logits, self.seeds, self.n)
        live = ~self.done
        self.n += live
        self.done |= torch.isin(tokens, self.stops) | (self.n >= self.limits)
        self.tokens = tokens
        record = torch.where(live, tokens, -1)[:, None].double()  # (B, 1): the token, -1 for a row that had ended
        return record if values is None else torch.cat([record, values.double()], 1)  # (B, 1 + F)

    def run(self, work, refill=True):
        """Decodes each (key, prompt, limit, seed) of `work`, taking the next one whenever a slot is free (refill=False:
        only once every slot is, which is static batching). Yields (key, tokens, values) as each reply ends, its stop
        id included."""
        work, rows = iter(work), {}  # rows: slot -> (key, limit, tokens, values)
        while True:
            free = [s for s in range(self.slots) if s not in rows]
            filling, added = refill or len(free) == self.slots, {}  # added: prompt -> its slot, this round
            while filling and free and (item := next(work, None)) is not None:
                key, prompt, limit, seed = item
                if limit < 1:
                    yield key, [], []
                    continue
                self.add(free[0], prompt, limit, seed, added.get(tuple(prompt)))
                added[tuple(prompt)] = free[0]
                rows[free.pop(0)] = (key, limit, [], [])
            if not rows:
                return
            # no row outlives its limit: once the work runs out, the last steps stop there instead of idling on
            k = min(self.every, max(limit - len(tokens) for _, limit, tokens, _ in rows.values()))
            records = torch.stack([self.step() for _ in range(k)], 1).tolist()  # (B, k, 1 + F): the one sync
            self.slot_steps += k * self.slots
            for slot, steps in enumerate(records):
                if slot not in rows:
                    continue
                key, limit, tokens, values = rows[slot]
                for token, *value in steps:
                    if token < 0:
                        break
                    tokens.append(int(token))
                    values.append(value)
                    self.live_steps += 1
                    if tokens[-1] in self.stop_ids or len(tokens) == limit:
                        del rows[slot]
                        yield key, tokens, values
                        break


def seed_of(*parts):
    """One sampling seed per prompt, from the run's seed and whatever names the prompt (a step or phase, an example):
    the same replies for any number of processes and however the prompts are laid out."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _mul32(x, c):  # x * c mod 2^32, for x in [0, 2^32): in 16-bit halves of c, so that no int64 product overflows
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x):  # lowbias32 (C. Wellons' hash prospector): flip any input bit, and each output bit flips half the time
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def gumbel(seeds, steps, vocab_size):
    """(B, V) standard Gumbel noise, counter-based: entry (b, v) is a hash of (seeds[b], steps[b], v), so a row's draw
    depends on nothing else (not its slot, the batch, the other prompts or the process) and needs no generator."""
    row = _hash32(_hash32(_hash32(seeds & 0xFFFFFFFF) ^ (seeds >> 32)) ^ (steps & 0xFFFFFFFF))  # (B,), seeds < 2^63
    ids = _hash32(torch.arange(vocab_size, device=seeds.device))  # (V,)
    u = (_hash32(row[:, None] ^ ids).double() + 0.5) / 2**32  # (B, V) uniform in (0, 1), 32 bits
    return -torch.log(-torch.log(u))


def sample(logits, temperature=0.0, top_p=1.0, seeds=None, steps=None):
    """Each row's next token (B,): the argmax at temperature 0, else a draw from softmax(logits / temperature) cut to
    its top-p nucleus. A draw is argmax(log p + Gumbel noise), which is distributed as p (the Gumbel-max trick), with
    the noise of `gumbel`: one call for every row, each seeded by its prompt's seed and its reply's length so far.
    Tokens rarer than about 1e-10 are drawn less often than that: the noise's uniforms have 32 bits."""
    if temperature == 0:
        return logits.argmax(-1)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)  # (B, V)
    if top_p < 1:  # nucleus: the most likely tokens until their mass reaches top_p, at least one
        sorted_logp, idx = logp.sort(dim=-1, descending=True)
        p = sorted_logp.exp()
        logp = logp.scatter(-1, idx, sorted_logp.masked_fill(p.cumsum(-1) - p >= top_p, -math.inf))
    return (logp + gumbel(seeds, steps, logp.size(-1))).argmax(-1)
