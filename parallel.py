"""Processes, devices and sharding: the one set-up that every command runs on.

    rank, world, device = start()        torchrun's processes, or a plain `python x.py` as a world of one
    dtype = DTYPES[dtype_name(args.dtype)]
    model = build(folder, mesh, ...)     FSDP2: meta device -> checkpointing -> compile -> fully_shard -> to_empty
    ...
    end()

References: torchtitan (FSDP2 on the meta device, and the order of activation checkpointing, compile and FSDP).
"""
import datetime
import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model import Qwen2, Qwen2Config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(flag):
    """--dtype, or without one bf16 where CUDA is available and fp32 on the CPU: a key of DTYPES."""
    return flag or ("bf16" if torch.cuda.is_available() else "fp32")


def start():
    """(rank, world size, device), in a process group: torchrun's (it sets RANK and WORLD_SIZE), or a world of one in
    this process, so that one code path serves both. NCCL on GPUs, gloo on the CPU. The timeout is an hour, not
    NCCL's 10 minutes: rank 0 alone gathers and writes a final export while the others wait."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = dict(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1),
                 device_id=device if cuda else None)
    if "RANK" in os.environ:
        dist.init_process_group(**group)
    else:
        dist.init_process_group(**group, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def end():
    """Tear the group down once every rank is done with it, with nothing left for interpreter shutdown to collect
    (the caller has deleted its models; FSDP's hooks hold them in reference cycles): either race can end a finished
    run in gloo's "terminate called without an active exception"."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def build(model_dir, mesh, compute_dtype, storage_dtype, trainable, grad_ckpt=False, compile=None):
    """Meta device -> activation checkpointing -> compile -> fully_shard each block, then the root -> to_empty; the
    weights are not loaded yet (model.load_weights reads this rank's rows of each tensor, one at a time, so that no
    process ever holds a full copy). compile: None, or the torch.compile backend of the blocks ("inductor")."""
    prior = torch.get_default_dtype()
    torch.set_default_dtype(storage_dtype)  # made in it, not cast: fake tensors (measure.py) refuse a cast's swap
    try:
        with torch.device("meta"):
            model = Qwen2(Qwen2Config.from_json(model_dir))
    finally:
        torch.set_default_dtype(prior)
    for block in model.model.layers:
        block.gradient_checkpointing = grad_ckpt
    if compile:
        model.compile_blocks(compile)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    # The ends of a trained model stay gathered after forward, for the backward that follows at once; a frozen model
    # has no backward, so it gives them back. Untied, the embedding and [norm, lm_head] are units of their own, as in
    # torchtitan: each is gathered only while it runs, and lm_head's gradient is reduced as soon as it is made rather
    # than after the whole backward (2 x 1.0 GiB less at the 7B's SFT, bench.py memory). A tied matrix serves both
    # ends, so it stays in the root.
    if not model.config.tie_word_embeddings:
        fully_shard(model.model.embed_tokens, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=not trainable)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not trainable)
    model.to_empty(device=mesh.device_type)  # FSDP2 keeps a tied lm_head tied through to_empty
    if not trainable:
        model.requires_grad_(False).eval()
    model.name_or_path = str(model_dir)
    return model
