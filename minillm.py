"""On-policy distillation: MiniLLM's policy gradient, and token-level KD on the student's own samples.

MiniLLM, Gu et al., ICLR 2024, https://arxiv.org/abs/2306.08543 (public code: microsoft/LMOps, minillm/). GKD, Agarwal
et al. 2024, https://arxiv.org/abs/2306.13649, is the token-level form that train.py --on-policy offers.

Derivation (the numbers tag the lines of code that compute each step)
--------------------------------------------------------------------
(1) MiniLLM minimises the sequence-level reverse KL from the student q_θ to the teacher p, for a prompt x:

        J(θ) = KL(q_θ(y|x) || p(y|x)) = -E_{y~q_θ}[ sum_t r_t ],    r_t = log p(y_t | y<t, x) - log q_θ(y_t | y<t, x).

(2) Policy gradient. d r_t / dθ = -∇log q(y_t), whose mean under y_t ~ q is 0, so only the sampling distribution's
    gradient remains, and causality drops the rewards before each token:

        ∇J = -E_{y~q}[ sum_k ∇log q(y_k) * sum_{t>=k} r_t ].

(3) Single-step decomposition. Split sum_{t>=k} r_t = r_k + R_{k+1}, R_{k+1} = sum_{t>k} r_t. The r_k part can be
    summed over the whole vocabulary instead of sampled: E_{y_k~q}[∇log q(y_k) r_k] = -∇KL(q(.|y<k) || p(.|y<k)) with
    the prefix held fixed. Hence

        ∇J = E_{y~q}[ sum_k ( ∇KL_k(q_θ || p)  -  R_{k+1} ∇log q(y_k) ) ]:

    the exact token-level reverse KL at every generated position (the single-step term, delta_kd_loss with
    divergence="rkl", alpha=0, lam=0), plus a policy gradient on the future return alone. (LMOps's code sums the
    return from t, so r_t is counted twice, once sampled and once exact; the paper, and this file, start at t+1.)

(4) Teacher-mixed sampling. Replies are drawn from p~ = (1 - m) q + m p, which keeps early, poor students from
    wandering off the teacher's support. Each long-term term is reweighted by w_k = q(y_k) / p~(y_k). The exact
    correction would multiply these ratios over the prefix and the future; MiniLLM keeps the current token's alone,
    trading that bias (exact at m = 0 and at the first token) for variance. The test suite measures it.

(5) Variance reduction, as MiniLLM does it: rewards are scaled and clipped; R_{k+1} is divided by its length (the
    mean future reward); then whitened over every token of the rollout batch. These trade bias for variance: with
    reward_scale 1, no clipping, length_norm=False and whiten=False, steps (3)-(6) are unbiased (tested).

(6) PPO. Several passes over one rollout batch use the surrogate rho_k = w_k * q_θ(y_k) / q_old(y_k), clipped:

        L_pg = sum_k max(-A_k rho_k, -A_k clip(rho_k, 1 - eps, 1 + eps)) / N.

    At θ = θ_old (the first pass), ∇L_pg = -sum_k A_k w_k ∇log q(y_k) / N: the long-term term of (3) and (4).

(7) One optimizer step: L = L_pg + L_single + lam * L_SFT, the last on the training data's replies (MiniLLM's
    pre-training term, which in LMOps is an LM and forward-KD loss on a plain-text corpus).

Old log-probabilities are those of the sampling pass itself, the probabilities each token was really drawn from
(LMOps recomputes them with a training forward; in fp32 the two agree to rounding). The reward is multiplied by
reward_scale (LMOps divides by its "reward_scaling"): after whitening either only moves the +-100 clip.
"""
import contextlib
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributed.fsdp import FSDPModule

from data import IGNORE, Batches, step_inputs, to_device
from deltakd import chunk_positions, delta_kd_loss
from generate import Decoder, sample, seed_of

CLIP = 0.2  # PPO's clip on rho, as MiniLLM's scripts
REWARD_CLIP = 100.0


def prompt_of(example):
    """The tokens before an example's last supervised reply: the prompt that reply answers."""
    supervised = np.asarray(example["labels"]) != IGNORE
    starts = np.flatnonzero(supervised & ~np.r_[False, supervised[:-1]])
    return [int(t) for t in example["input_ids"][:starts[-1]]]


@contextlib.contextmanager
def gathered(*models):
    """FSDP2: gather each model's parameters once for a whole rollout, instead of at every token of it."""
    units = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        # back to train.build's settings: blocks and an embedding unit reshard after forward; the other units of a
        # trained model (in train mode) do not
        resharded = {id(m) for model in models for m in [*model.model.layers, model.model.embed_tokens]}
        for m in units:
            m.set_reshard_after_forward(id(m) in resharded or not m.training, recurse=False)
            m.reshard()


@torch.no_grad()
def sample_replies(student, prompts, seeds, limits, stop_ids, vocab_size, teacher=None, mix=0.0, shape=None):
    """One reply per prompt (a list of token ids), drawn token by token from p~ = (1 - mix) q + mix p at temperature
    1, over the tokenizer's ids only (never an lm_head padding row), until a stop id or the prompt's limit of new
    tokens. Row i draws with seeds[i] (generate.sample's counter-based noise). Returns per row {tokens, log_q, log_p,
    log_mix}: the log-probabilities of each drawn token under the student, the teacher (the student's when there is
    none) and p~. The models decode together in one generate.Decoder with a slot per prompt: every prompt starts at
    once, and the rollout lasts as long as its longest reply whatever the slots do, so refilling could not make it
    shorter. shape = (prompt width, new tokens), at least this batch's, sizes the cache: give every rank the same
    (reply_limits), and a row sees the same cache, so the same arithmetic, on any number of processes."""
    T, N = shape or (max(map(len, prompts)), max(limits))

    def pick(logits, seeds, steps):
        log_q = F.log_softmax(logits[0][:, :vocab_size].float(), -1)  # (B, V)
        log_p = log_q if teacher is None else F.log_softmax(logits[1][:, :vocab_size].float(), -1)
        log_mix = log_q if mix == 0 else torch.logaddexp(log_q + math.log1p(-mix), log_p + math.log(mix))  # (4) p~
        tokens = sample(log_mix, 1.0, 1.0, seeds, steps)  # (B,)
        return tokens, torch.stack([x.gather(1, tokens[:, None])[:, 0] for x in (log_q, log_p, log_mix)], 1)

    models = [student] if teacher is None else [student, teacher]
    decoder = Decoder(models, len(prompts), T + N, stop_ids, pick=pick)
    out = [None] * len(prompts)
    for i, tokens, values in decoder.run(zip(range(len(prompts)), prompts, limits, seeds)):
        out[i] = {"tokens": tokens, **{k: [v[j] for v in values] for j, k in enumerate(("log_q", "log_p", "log_mix"))}}
    return out


def advantages(rewards, length_norm=True, whiten=True):
    """Per reply, A_k from the per-token rewards r (one array per reply): the future return R_{k+1}, divided by its
    length with length_norm, then whitened over all tokens of all replies with whiten."""
    out = []
    for r in rewards:
        future = np.r_[np.cumsum(r[::-1])[::-1][1:], 0.0]  # (3) R_{k+1} = sum_{t>k} r_t
        if length_norm:
            future = future / np.maximum(np.arange(len(r))[::-1], 1)  # (5) mean over the len(r) - 1 - k future tokens
        out.append(future)
    if whiten and out:  # (5) one mean and scale for the whole rollout batch
        flat = np.concatenate(out)
        out = [(a - flat.mean()) / (flat.std() + 1e-8) for a in out]
    return out


def policy_loss(logits, targets, log_q_old, adv, weight, vocab_size, num_tokens, clip=CLIP):
    """(6) The clipped surrogate, summed over positions and divided by num_tokens: logits (N, V) predict targets (N,);
    log_q_old, adv and weight are per position, (N,)."""
    log_q = _TokenLogProb.apply(logits, targets, vocab_size)  # (N,) log q_θ(y_k)
    rho = (log_q - log_q_old).exp() * weight  # (6) rho = w * q_θ / q_old
    return torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip, 1 + clip)).sum() / num_tokens  # (6)


class _TokenLogProb(torch.autograd.Function):
    """log softmax(logits)[y] per position, chunk by chunk: never an fp32 (N, V) tensor, in forward or in backward,
    where d log q(y) / d logits = onehot(y) - softmax(logits) is formed a chunk at a time from the saved logsumexp."""

    @staticmethod
    def forward(ctx, logits, y, vocab):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least; float64 stays float64 for the tests
        chunk = chunk_positions(vocab, logits.device)
        lse = torch.cat([x[:, :vocab].to(dtype).logsumexp(-1) for x in logits.split(chunk)])  # (N,)
        ctx.save_for_backward(logits, y, lse)
        ctx.vocab, ctx.chunk = vocab, chunk
        return logits.gather(1, y[:, None])[:, 0].to(dtype) - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        logits, y, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, len(logits), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            d = -(logits[rows, :ctx.vocab].to(lse.dtype) - lse[rows, None]).exp()  # -softmax
            d[torch.arange(len(d), device=d.device), y[rows]] += 1.0  # onehot(y) - softmax
            grad[rows, :ctx.vocab] = d * g[rows, None]
        return grad, None, None


def global_count(micro_batches, device):
    """The number of counted positions in a step's micro-batches over all ranks: what every loss term is divided by.
    Their lengths, on the host: nothing waits for the device."""
    n = to_device(torch.tensor(sum(len(mb["positions"]) for mb in micro_batches)), device)
    dist.all_reduce(n)
    return n


def reply_limits(prompts, args, device):
    """Each prompt's limit of new tokens (--max-new-tokens, within --max-len), and the sampling shape (prompt width,
    new tokens) as the maximum over all ranks, for sample_replies: the same on every rank, whatever the world size."""
    limits = [min(args.max_new_tokens, args.max_len - len(p)) for p in prompts]
    shape = torch.tensor([max(map(len, prompts)), max(limits)], device=device)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    return limits, shape.tolist()


def on_policy_batches(student, examples, micro_batches, step, args, stop_ids, vocab_size, rank, world, pad_id):
    """--on-policy (GKD): this step's examples with each reply replaced by the student's own sample for its prompt, at
    temperature 1, laid out again like data. The samples are gathered first, so that every rank lays out the same
    step: the union over ranks is the same examples whatever the world size. Returns (micro-batches, stats)."""
    t0 = time.perf_counter()
    mine = [i for mb in micro_batches for i in mb["index"].tolist() if i >= 0]
    prompts = [prompt_of(examples[i]) for i in mine]
    limits, shape = reply_limits(prompts, args, student.lm_head.weight.device)
    with gathered(student):
        replies = sample_replies(student, prompts, [seed_of(args.seed, step, i) for i in mine], limits, stop_ids,
                                 vocab_size, shape=shape)
    everyone = [None] * world
    dist.all_gather_object(everyone, [(p + r["tokens"], len(p)) for p, r in zip(prompts, replies)])
    rows = [row for part in everyone for row in part]  # (prompt + reply, prompt length)
    samples = [{"input_ids": np.array(ids), "labels": np.array([IGNORE] * n + ids[n:])} for ids, n in rows]
    step_batches = next(iter(Batches(samples, len(samples), args.micro_batch_size, rank, world, 0, pad_id)))
    return step_batches, {"reply_len": float(np.mean([len(ids) - n for ids, n in rows])),
                          "gen_tokens": float(sum(len(ids) - n for ids, n in rows)), "gen_s": time.perf_counter() - t0}


class MiniLLM:
    """train.py --loss minillm: rollout phases and the PPO passes over them, one optimizer step per call of step().

    A phase samples --num-rollouts replies to prompts of the training data (their own stream, seeded apart from the
    data order), then runs --ppo-epochs passes over them in global batches of --batch-size: ppo_epochs x num_rollouts
    / batch_size optimizer steps. Each rank samples its share; the rollouts are then gathered, so that every rank
    holds the whole batch and lays out its PPO steps exactly as Batches lays out data, independent of world size.
    Sampling is seeded by (seed, phase, example), so a phase restarted from its first step draws the same replies:
    train.py checkpoints at phase boundaries only, and resume is exact."""

    def __init__(self, args, examples, student, teacher, vocab_size, stop_ids, rank, world, device, pad_id):
        self.args, self.examples, self.student, self.teacher = args, examples, student, teacher
        self.vocab_size, self.stop_ids, self.rank, self.world, self.device = vocab_size, stop_ids, rank, world, device
        self.pad_id = pad_id
        self.prompts = Batches(examples, args.num_rollouts, args.micro_batch_size, rank, world, args.seed + 1, pad_id)
        self.steps_per_phase = args.ppo_epochs * args.num_rollouts // args.batch_size
        self.minibatches, self.rollout_stats = None, {}

    def rollout(self, phase):
        t0, args = time.perf_counter(), self.args
        self.prompts.epoch, self.prompts.step = divmod(phase, len(self.prompts))
        mine = [i for mb in next(iter(self.prompts)) for i in mb["index"].tolist() if i >= 0]
        prompts = [prompt_of(self.examples[i]) for i in mine]
        limits, shape = reply_limits(prompts, args, self.device)
        with gathered(self.student, self.teacher):
            replies = sample_replies(self.student, prompts, [seed_of(args.seed, phase, i) for i in mine], limits,
                                     self.stop_ids, self.vocab_size, self.teacher, args.mix, shape)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, list(zip(mine, prompts, replies)))
        rollouts = sorted((r for part in everyone for r in part), key=lambda r: r[0])  # the same order on every rank
        rollouts = [(i, p, r) for i, p, r in rollouts if r["tokens"]]
        log_q, log_p, log_mix = ([np.array(r[k]) for _, _, r in rollouts] for k in ("log_q", "log_p", "log_mix"))
        rewards = [np.clip(args.reward_scale * (p - q), -REWARD_CLIP, REWARD_CLIP)  # (1), (5) r = log p - log q_old
                   for p, q in zip(log_p, log_q)]
        adv = advantages(rewards)  # (3), (5)
        examples = []
        for (_, prompt, reply), q, m, a in zip(rollouts, log_q, log_mix, adv):
            zeros = [0.0] * len(prompt)
            examples.append({"input_ids": np.array(prompt + reply["tokens"]),
                             "labels": np.array([IGNORE] * len(prompt) + reply["tokens"]),
                             "log_q_old": np.r_[zeros, q], "adv": np.r_[zeros, a],
                             "weight": np.r_[zeros, np.exp(q - m)]})  # (4) w = q_old / p~
        buffer = Batches(examples, args.batch_size, args.micro_batch_size, self.rank, self.world,
                         seed_of(args.seed, phase), self.pad_id)
        self.minibatches = (mb for _ in range(args.ppo_epochs) for mb in buffer)  # each pass a new shuffle
        tokens = np.concatenate(log_q) if log_q else np.zeros(1)
        self.rollout_stats = {"reward": float(np.concatenate(rewards).mean()) if rewards else 0.0,
                              "rkl": float((tokens - np.concatenate(log_p)).mean()) if log_p else 0.0,
                              "reply_len": float(np.mean([len(q) for q in log_q])) if log_q else 0.0,
                              "gen_tokens": float(sum(len(q) for q in log_q)), "gen_s": time.perf_counter() - t0}

    def step(self, step, data_micro_batches):
        """Backward of one optimizer step: a PPO minibatch and the SFT term on the data's micro-batches. Returns this
        rank's share of each logged value (train.py sums them over ranks)."""
        args, W, dev = self.args, self.world, self.device
        if step % self.steps_per_phase == 0 or self.minibatches is None:
            self.rollout(step // self.steps_per_phase)
            for _ in range(step % self.steps_per_phase):  # resumed inside a phase (a finished run, extended): its
                next(self.minibatches)  # rollouts come from the current weights, so this one point is not exact
        gen_s, gen_tokens = self.rollout_stats.pop("gen_s", 0.0), self.rollout_stats.pop("gen_tokens", 0.0)
        rollout_mbs = next(self.minibatches)
        num_tokens = global_count(rollout_mbs, dev) / W
        pg_sum = kd_sum = tokens = 0.0
        for mb in rollout_mbs:  # logits at the reply's positions only
            ids, at, target, *per_token = step_inputs(mb, dev, ("labels", "log_q_old", "adv", "weight"))
            with torch.no_grad():
                t_logits = self.teacher(ids, logits_at=at)
            logits = self.student(ids, logits_at=at)  # (N, V)
            single, parts = delta_kd_loss(logits, target, t_logits, alpha=0.0, lam=0.0, divergence="rkl",
                                          vocab_size=self.vocab_size, num_tokens=num_tokens, return_parts=True,
                                          positions=torch.arange(len(target), device=dev))
            pg = policy_loss(logits, target, *per_token, self.vocab_size, num_tokens)  # (6)
            (pg + single).backward()  # (7) L_pg + L_single
            pg_sum, kd_sum = pg_sum + pg.detach(), kd_sum + parts["kd"]
            tokens += mb["attention_mask"].sum()
        data_tokens = global_count(data_micro_batches, dev) / W
        sft_sum = 0.0
        for mb in data_micro_batches:
            ids, at, target = step_inputs(mb, dev)
            sft = delta_kd_loss(self.student(ids, logits_at=at), target, None, lam=1.0, vocab_size=self.vocab_size,
                                num_tokens=data_tokens, positions=torch.arange(len(target), device=dev))
            (args.lam * sft).backward()  # (7) + lam * L_SFT
            sft_sum += sft.detach()
            tokens += mb["attention_mask"].sum()
        share = {k: v / W for k, v in self.rollout_stats.items()}  # the same on every rank
        return {"loss": (pg_sum + kd_sum + args.lam * sft_sum) / W, "sft": sft_sum / W, "kd": kd_sum / W,
                "pg": pg_sum / W, **share, "tokens": tokens, "gen_s": gen_s / W, "gen_tokens": gen_tokens / W}
