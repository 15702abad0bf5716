"""Qwen2 / Qwen2.5 decoder in plain PyTorch, reading and writing Hugging Face checkpoints.

It computes what transformers' Qwen2ForCausalLM computes (RMSNorm in fp32, half-split RoPE, GQA with q/k/v biases,
SwiGLU, tied embeddings), and its modules carry the checkpoint's tensor names, so weights load without a name map.
Its KV-cache passes (new_state, prefill, decode_step) serve generate.py, which decides what to decode.

References: Qwen2 Technical Report (arXiv:2407.10671); RoFormer (arXiv:2104.09864); GQA (arXiv:2305.13245);
transformers/models/qwen2/modeling_qwen2.py; nanoGPT and gpt-fast for the shape of the code.
"""
import contextlib
import functools
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# copied next to the weights on save, and fetched with them from the Hub
SIDE_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "generation_config.json"]


@dataclass
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: one K/V head per query head, as in transformers
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # transformers' default; every Qwen2.5 config says 1e6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # not used by the model; kept so that a saved config serves unchanged in transformers and vLLM
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must divide hidden_size "
                             f"{self.hidden_size} and be a multiple of num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_json(cls, path_or_dir):
        path = Path(path_or_dir)
        path = path / "config.json" if path.is_dir() else path
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from e

        rope = raw.get("rope_parameters") or {}  # transformers >= 5 writes this; Qwen's own files write rope_theta
        scaling, n_head = raw.get("rope_scaling") or {}, raw.get("num_attention_heads", 0)
        refusals = [  # (field, refused, why): what this model cannot run faithfully
            ("model_type", raw.get("model_type") != "qwen2", "only 'qwen2' is implemented"),
            ("rope_scaling", scaling.get("rope_type", scaling.get("type", "default")) != "default",
             "RoPE scaling is not implemented"),
            ("rope_parameters", rope.get("rope_type", "default") != "default", "RoPE scaling is not implemented"),
            ("use_sliding_window", raw.get("use_sliding_window"), "sliding-window attention is not implemented"),
            ("layer_types", any(t != "full_attention" for t in raw.get("layer_types") or []),
             "only full attention is implemented"),
            ("hidden_act", raw.get("hidden_act", "silu") != "silu", "Qwen2's MLP is SwiGLU: only 'silu' works"),
            ("attention_dropout", raw.get("attention_dropout"), "attention dropout is not implemented"),
            ("head_dim", (raw.get("head_dim") or 0) * n_head not in (0, raw.get("hidden_size")),
             "must be hidden_size / num_attention_heads"),
            *((f.name, f.default is MISSING and f.name not in raw, "missing") for f in fields(cls))]
        for field, refused, why in refusals:
            if refused:
                raise ValueError(f"{path}: field {field!r} = {raw.get(field)!r}: {why}")
        kwargs = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        kwargs["rope_theta"] = rope.get("rope_theta", kwargs.get("rope_theta", cls.rope_theta))
        return cls(**kwargs)

    def to_dict(self):
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                "rope_scaling": None, "use_sliding_window": False, **asdict(self)}


@functools.lru_cache
def rope_inv_freq(head_dim, theta, device):
    # made in fp32 on the CPU like transformers' buffer, so every device rotates by the same angles. Cached per device:
    # the copy to a GPU waits for the GPU, and would otherwise happen in every forward
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))
    return inv_freq.to(device)  # (D/2,)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    inv_freq = rope_inv_freq(head_dim, theta, position_ids.device)
    freqs = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, D), broadcasts over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, H, T, D)
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # half-split rotation, as the checkpoints were trained


def position_ids(input_ids, attention_mask):
    if attention_mask is None:
        return torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)  # (B, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): padding does not shift positions


def attention_mask_4d(attention_mask):
    """(B, 1, T, T) boolean mask, or None where plain causal attention is already exact."""
    if attention_mask is None or not (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        return None  # no padding, or right padding only: a real query never looks past itself
    real = attention_mask.bool()
    T = real.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    # a left-padding query has no real key before it; letting it see itself keeps its softmax finite
    return causal & (real[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=real.device))


class Qwen2RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # cast back before the weight, exactly as transformers does


# the fused kernels, without the math one: on CUDA it would build the (B, H, T, T) scores in fp32 (15 GB per layer at
# batch 16 and 2k tokens), so a masked call that no fused kernel takes fails instead
_FUSED_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def attend(q, k, v, mask, gqa):
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D); query head h reads K/V head h // (H / Hkv), as
    transformers' repeat_kv. mask: None (causal) or (B, 1, T, T) bool."""
    if mask is None:  # flash attention: no mask, and it reads a shared K/V head in place
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
    # an explicit mask: flash attention takes none, and on torch 2.9 the memory-efficient kernel takes no enable_gqa
    # beside one, so K/V are repeated to H heads here (a copy of K/V, far smaller than the scores it avoids)
    if gqa:
        B, Hkv, S, D = k.shape
        n_rep = q.size(1) // Hkv
        k, v = (t[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D) for t in (k, v))  # (B, H, S, D)
    with sdpa_kernel(_FUSED_ATTENTION) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        # a plain bool, fixed here: dynamo, compiling an FSDP block with dynamic=True, makes its int attributes
        # symbolic, and n_head // n_kv_head > 1 in forward would be a SymBool, which scaled_dot_product_attention
        # refuses (a graph break at every attention call)
        self.gqa = self.n_head > self.n_kv_head

    def forward(self, x, cos, sin, mask, kv_cache=None, pos=None):
        # kv_cache (keys, values), each (B, Hkv, S, D): a prefill (pos None) writes [0, T); a decode step (T = 1)
        # writes each row's key at its own index pos (B,) and reads all S, masked. mask None: causal over this call.
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None and pos is None:
            kv_cache[0][:, :, :T], kv_cache[1][:, :, :T] = k, v
        elif kv_cache is not None:  # tensor indices, written in place: the same graph for every position
            rows = torch.arange(B, device=pos.device)
            kv_cache[0][rows, :, pos], kv_cache[1][rows, :, pos] = k[:, :, 0], v[:, :, 0]  # (B, Hkv, D) each
            k, v = kv_cache  # (B, Hkv, S, D)
        n_rep = self.n_head // self.n_kv_head
        if T == 1:  # decoding: fold the query heads onto their shared K/V head instead of repeating K/V
            q = q.reshape(B, self.n_kv_head, n_rep, self.head_dim)  # (B, Hkv, n_rep, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, n_rep, D)
        else:
            y = attend(q, k, v, mask, self.gqa).transpose(1, 2)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, -1))  # (B, T, H*D) -> (B, T, C)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # keep only the block's input; recompute the rest in backward

    def forward(self, x, cos, sin, mask, kv_cache=None, pos=None):
        # inside forward, so that a compiled block compiles the checkpoint too (torchtitan's order: AC, compile, FSDP)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, kv_cache, pos)

    def _forward(self, x, cos, sin, mask, kv_cache=None, pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, cos, sin, mask, kv_cache=None, pos=None):
        x = self.embed_tokens(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if kv_cache is None else kv_cache[i], pos)
        return self.norm(x)


@dataclass
class DecodeState:
    """One model's KV cache for B slots. A slot holds one sequence from cache index 0, so that a prompt is prefilled at
    its own length (no padding); S, the positions per slot, is fixed for the whole generation."""
    cache: list  # per layer (keys, values), each (B, Hkv, S, D). Separate tensors: a compiled step writes its slot
    # in place, where slices of one (L, 2, ...) tensor would make torch.compile copy all of it at every layer
    pos: torch.Tensor  # (B,) long: each slot's length: where its next token goes, and that token's RoPE position


class Qwen2(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.compiled_decode = None  # compile_blocks() sets it
        self.tie_weights()

    def tie_weights(self):
        # on a plain model, to_empty() gives each module its own new parameter, which unties the shared one: re-tie
        # after it. Under FSDP2 the one DTensor stays registered in both modules, and this finds nothing to do
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.model.embed_tokens.weight:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _rope(self, pos):
        cfg, dtype = self.config, self.model.embed_tokens.weight.dtype
        return rope_cos_sin(pos, cfg.hidden_size // cfg.num_attention_heads, cfg.rope_theta, dtype)

    def forward(self, input_ids, attention_mask=None, state=None, logits_at=None, slot=None):
        """Logits (B, T, V); with logits_at, a LongTensor (N,) of flat positions into (B, T), those positions' logits
        only, (N, V): a loss that skips prompts and padding needs no others, and the lm_head's matmul and the logits
        shrink by their share. An index, not a mask: its length fixes N, so the host need not wait for the device.
        With a DecodeState, a decoding pass (prefill and decode_step make them): with `slot`, a prompt (1, T) written
        into that slot's rows of the cache, causal, at its own length (returns None); without, one token per slot
        (B, 1), each at its slot's own position (returns the next logits (B, V)). Decoding goes through here too, so
        that FSDP's hooks on the root see every pass."""
        if state is not None and slot is None:
            cos, sin = self._rope(state.pos[:, None])  # (B, 1, 1, D)
            # FSDP's hooks run at every wrapped block: a compiled step would trace into them and break there, so a
            # sharded model steps eagerly over its compiled blocks (torchtitan's order: the hooks outside compiled code)
            eager = isinstance(self, FSDPModule) or self.compiled_decode is None
            logits = (self._decode if eager else self.compiled_decode)(input_ids, cos, sin, state.pos, state.cache)
            state.pos.add_(1).clamp_(max=state.cache[0][0].size(2) - 1)  # an ended or empty slot rewrites its last
            return logits
        cos, sin = self._rope(position_ids(input_ids, attention_mask))
        cache = None if state is None else [(k[slot:slot + 1], v[slot:slot + 1]) for k, v in state.cache]  # views
        h = self.model(input_ids, cos, sin, attention_mask_4d(attention_mask), cache)
        if state is not None:
            return None
        return self.lm_head(h if logits_at is None else h.flatten(0, 1)[logits_at])  # (B, T, V) or (N, V)

    @torch.no_grad()
    def init_weights(self, generator=None):
        self.tie_weights()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, self.config.initializer_range, generator=generator)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, Qwen2RMSNorm):
                m.weight.fill_(1.0)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=torch.bfloat16, device="cpu"):
        path = resolve_model_dir(path_or_repo_id)
        with torch.device("meta"):
            model = cls(Qwen2Config.from_json(path)).to(dtype)  # cast on meta: no fp32 copy is ever made
        model.to_empty(device=device)
        load_weights(model, path)
        model.name_or_path = str(path)
        return model.eval()

    def save_pretrained(self, path, state_dict=None, tokenizer_dir=None, max_shard_size=5 * 10**9,
                        eos_token_id=None):
        """eos_token_id, if given, replaces the config's and generation_config.json's: a model trained on chats stops
        at <|im_end|>, which its base model's files do not say."""
        path = Path(path)
        # it replaces an earlier checkpoint or an empty folder, never anything else
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder: refusing to replace it")
        if path.is_dir() and any(path.iterdir()) and not (path / "config.json").exists():
            raise FileExistsError(f"{path} is a folder without config.json, not a checkpoint: refusing to replace it")
        if tokenizer_dir is not None and not Path(tokenizer_dir).exists():
            raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} does not exist")
        src = tokenizer_dir or getattr(self, "name_or_path", None)  # where the tokenizer files are copied from
        if src is not None:
            src = Path(src).parent if Path(src).is_file() else Path(src)  # tokenizer.json's folder
        sd = {k: v.detach() for k, v in (self.state_dict() if state_dict is None else state_dict).items()
              if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}  # tied: stored once
        shards, size = [{}], 0
        for name, t in sd.items():
            if shards[-1] and size + t.nbytes > max_shard_size:
                shards, size = shards + [{}], 0
            shards[-1][name], size = t, size + t.nbytes
        dtype = next(t.dtype for t in sd.values() if t.is_floating_point())

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:  # everything goes into tmp, which is renamed at the end: no half checkpoint under the final name
            config = {**self.config.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
            if eos_token_id is not None:
                config["eos_token_id"] = eos_token_id
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            names = ["model.safetensors"] if len(shards) == 1 else \
                [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            for fname, shard in zip(names, shards):  # one shard at a time is copied to the CPU
                shard = {k: t.to("cpu").contiguous() for k, t in shard.items()}
                save_file(shard, tmp / fname, metadata={"format": "pt"})
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(t.nbytes for t in sd.values())},
                         "weight_map": {k: f for f, shard in zip(names, shards) for k in shard}}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for name in SIDE_FILES:
                if src is not None and (src / name).exists():
                    shutil.copyfile(src / name, tmp / name)
            if eos_token_id is not None:
                gen = tmp / "generation_config.json"
                gen.write_text(json.dumps({**(json.loads(gen.read_text()) if gen.exists() else {}),
                                           "eos_token_id": eos_token_id}, indent=2) + "\n")
            # a folder cannot be renamed onto a non-empty one, so the old checkpoint steps aside first
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            if old.exists():
                shutil.rmtree(old)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def new_state(self, slots, max_len):
        """An empty KV cache of `slots` rows of max_len positions (the longest prompt and its reply)."""
        cfg, w = self.config, self.model.embed_tokens.weight  # under FSDP, call it gathered: the compute dtype
        shape = (slots, cfg.num_key_value_heads, max_len, cfg.hidden_size // cfg.num_attention_heads)
        # zeros, not empty: a masked key's value is still multiplied by 0, and 0 * garbage could be NaN
        zeros = functools.partial(torch.zeros, shape, dtype=w.dtype, device=w.device)
        cache = [(zeros(), zeros()) for _ in range(cfg.num_hidden_layers)]
        return DecodeState(cache, torch.zeros(slots, dtype=torch.long, device=w.device))

    @torch.no_grad()
    def prefill(self, state, slot, ids):
        """Write a prompt (a list of T ids) into positions [0, T) of one slot of the cache: causal, at its own length,
        with no padding and no mask, so that the fused attention kernels apply. decode_step goes on from there."""
        if len(ids):
            self(torch.as_tensor(ids, device=state.pos.device)[None], state=state, slot=slot)
        state.pos[slot] = len(ids)

    @torch.no_grad()
    def decode_step(self, state, tokens):
        """Feed one token per slot (B,), each at its slot's own position: the next logits (B, V)."""
        return self(tokens[:, None], state=state)

    def _decode(self, input_ids, cos, sin, pos, cache):
        # every shape here is fixed for the whole generation, so one compiled graph serves every token (gpt-fast)
        keys = torch.arange(cache[0][0].size(2), device=pos.device) <= pos[:, None]  # (B, S): the slot's tokens so far
        h = self.model(input_ids, cos, sin, keys[:, None, None, :], cache, pos)  # (B, 1, C)
        return self.lm_head(h[:, 0])  # (B, V)

    def compile_blocks(self, backend="inductor"):
        """torch.compile each block (training, evaluation, prefill) and the one-token decode step (generation; a
        model that FSDP wraps later decodes over its compiled blocks instead). Call it after gradient checkpointing
        is set and before fully_shard: torchtitan's order, which keeps FSDP's hooks outside the compiled code.
        backend: the tests trace with "eager", the same graphs without inductor's kernels."""
        # Dynamo keeps its graphs per code object: the blocks of every model share forward's cache, and its
        # recompile_limit of 8 variants, past which it runs eagerly. Models differ in shapes, and each adds its own
        # variants (grad mode, checkpointing, a padding mask, a KV cache, a batch of one): four models together
        # overflowed it. So each model gets a cache of its own where torch has them (isolate_recompiles: 2.13 does,
        # 2.9 does not), and one compiled callable serves all of its blocks, so a variant compiles once, not per layer
        isolated = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters \
            else {}
        block = torch.compile(nn.Module._call_impl, backend=backend, dynamic=True, **isolated)  # dynamic: shapes vary
        for layer in self.model.layers:  # in place: the parameter names, and so the checkpoints, stay the same
            layer._compiled_call_impl = functools.partial(block, layer)  # what nn.Module.compile sets, shared
        self.compiled_decode = torch.compile(self._decode, backend=backend)
        return self


def resolve_model_dir(path_or_repo_id):
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path  # a local folder: no Hub call at all
    name = str(path_or_repo_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name} is neither a model folder nor a Hub id like 'Qwen/Qwen2.5-1.5B'")
    try:  # with HF_HUB_OFFLINE=1, or without network, this is served from the local Hub cache
        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors",
                                                            "model.safetensors.index.json", *SIDE_FILES]))
    except Exception as e:
        raise FileNotFoundError(f"cannot fetch {name!r} from the Hub nor find it in the local cache: {e}") from e


def checked_model_dir(path_or_repo_id, weights=True):
    """A model's folder, checked before any weight is read: found (a local folder or a Hub download), its config read,
    and, with weights, its safetensors headers, where a truncated download shows up. Raises OSError or ValueError."""
    path = resolve_model_dir(path_or_repo_id)
    Qwen2Config.from_json(path)
    if weights:
        checkpoint_shapes(path)
    return path


def checkpoint_shapes(path):
    """{tensor name: (file, shape)} of a safetensors checkpoint folder, read from the file headers only."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif any(p.suffix in (".bin", ".pt", ".pth") for p in path.iterdir()):
        raise ValueError(f"{path} holds only pickle checkpoints (.bin/.pt), which this loader refuses to unpickle; "
                         "convert them to safetensors (transformers: save_pretrained(safe_serialization=True))")
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    shapes = {}
    for fname in files:
        if not (path / fname).exists():
            raise FileNotFoundError(f"{index} lists {fname}, which is not there")
        try:
            with safe_open(path / fname, framework="pt") as f:
                shapes.update({k: (fname, tuple(f.get_slice(k).get_shape())) for k in f.keys()})
        except SafetensorError as e:  # safe_open checks that the header and the file size agree
            raise ValueError(f"{path / fname} is truncated or corrupt, not a whole safetensors file ({e})") from e
    return shapes


@torch.no_grad()
def load_weights(model, path):
    path = Path(path)
    model.tie_weights()
    params = model.state_dict(keep_vars=True)
    ckpt = checkpoint_shapes(path)  # checked in full before any tensor is read
    if model.config.tie_word_embeddings:  # the shared matrix is stored once, as embed_tokens
        params.pop("lm_head.weight")
        ckpt.pop("lm_head.weight", None)  # some exporters write the copy anyway; transformers ignores it too
    missing, unexpected = sorted(params.keys() - ckpt.keys()), sorted(ckpt.keys() - params.keys())
    mismatched = [f"{k}: checkpoint {ckpt[k][1]} vs model {tuple(p.shape)}"
                  for k, p in params.items() if k in ckpt and ckpt[k][1] != tuple(p.shape)]
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint {path} does not fit the model:\n  missing: {missing}\n"
                         f"  unexpected: {unexpected}\n  shape mismatch: {mismatched}")
    placed = {str(p.placements): k for k, p in params.items()  # {placement: a parameter placed so}
              if isinstance(p, DTensor) and p.placements != (Shard(0),)}
    if placed:  # FSDP2's default sharding is the only one whose rows are found below
        raise ValueError(f"load_weights reads DTensor parameters sharded (Shard(0),) on a 1-D mesh only: {placed}")
    for fname in sorted({f for f, _ in ckpt.values()}):
        with safe_open(path / fname, framework="pt") as f:
            for name in (k for k in f.keys() if k in params):  # one tensor in memory at a time
                p = params[name]
                if isinstance(p, DTensor):  # FSDP2: this rank reads only its own rows, split as torch.chunk splits
                    rows = -(-p.shape[0] // p.device_mesh.size())  # ceil: the last ranks hold fewer rows, or none
                    start = p.device_mesh.get_local_rank() * rows
                    p = p.to_local()
                    t = f.get_slice(name)[start:start + p.shape[0]]
                else:
                    t = f.get_tensor(name)
                p.copy_(t.to(device=p.device, dtype=p.dtype))
