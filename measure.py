"""What decides a GPU run, measured on any machine: host syncs, memory traffic, and the per-GPU peak memory.

    with HostSyncs() as syncs: ...          each op that would make a GPU's host wait for the device, by kind
    train_step_syncs(argv)                  those of each optimizer step of train.py main(argv)
    loss_passes(vocab, chunk)               delta_kd_loss's passes over memory per chunk, eager and compiled
    memory_of_step(args, world, device)     the per-GPU peak of a train.py step, from fake tensors: nothing allocated,
                                            so a 7B model's run is estimated on a laptop (python bench.py memory)

The tests count with HostSyncs; bench.py reports all of them. They use private torch APIs that have long been stable
(TorchDispatchMode, FakeTensorMode, the fake process group); a torch that lacks one says which.
"""
import argparse
import contextlib
import gc
import io
import json
import os
import re
import sys
import tempfile
import time
import weakref
from collections import Counter
from pathlib import Path
from unittest import mock

import huggingface_hub
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import parallel
import train
from deltakd import _CHUNK_BYTES, delta_kd_loss
from model import Qwen2Config, rope_inv_freq
from targets import MODEL_FLAGS


def timed(fn, sync):
    """Seconds that fn() takes, the device's queue drained before and after (sync: torch.cuda.synchronize on a GPU)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------------
# host syncs: the ops that make a GPU's host wait for the device

# aten ops whose result (or output shape) depends on tensor data, so that on a GPU the host must wait for every queued
# kernel before it can go on. Under a TorchDispatchMode they are seen on any device, so they are counted on the CPU.
_SYNC_OPS = {"aten._local_scalar_dense": ".item() / bool() / int() / float()", "aten.is_nonzero": "bool()",
             "aten.nonzero": "nonzero", "aten.masked_select": "masked_select", "aten._unique2": "unique",
             "aten.unique_consecutive": "unique_consecutive", "aten.equal": "torch.equal"}
# These never reach the dispatcher on a CPU tensor (they read its memory directly), so they are counted at the method.
_SYNC_METHODS = ("tolist", "cpu", "numpy")


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, by kind, the data-dependent ops run inside `with HostSyncs() as syncs:`: each one would stop a GPU's
    queue (the host waits for the device), whatever the device they run on here. Boolean-mask indexing (x[mask],
    x[mask] = v) and repeat_interleave without output_size count too; their output shape depends on the data.
    .tolist(), .cpu() and .numpy() count on any tensor, a host one too: the hot path should not need them.
    Uses torch.utils._python_dispatch.TorchDispatchMode, a private but long-stable torch API."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def _count(self, kind):
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _SYNC_OPS:
            self._count(_SYNC_OPS[name])
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self._count("boolean-mask indexing")
        elif name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None and len(args) < 3:
            self._count("repeat_interleave")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {m: getattr(torch.Tensor, m) for m in _SYNC_METHODS}
        for m, original in self._saved.items():
            def counted(tensor, *a, _m=m, _original=original, **k):
                self._count(f".{_m}()")
                return _original(tensor, *a, **k)
            setattr(torch.Tensor, m, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for m, original in self._saved.items():
            setattr(torch.Tensor, m, original)
        return super().__exit__(*exc)

    @property
    def total(self):
        return sum(self.counts.values())


def train_step_syncs(argv):
    """train.py's main(argv), run in this process under HostSyncs: the host syncs of each optimizer step after the
    first (which holds the setup), as {kind: count}, from the end of one optimizer step to the end of the next. Left
    out: the optimizer's own step (on the CPU, AdamW reads its step counter, a host tensor that no GPU waits for;
    on CUDA it is fused) and the rollouts (minillm.py's sampling, counted by its own bench). Give --log-every and
    --save-every beyond --max-steps: then only the last step logs and saves, after its optimizer step."""
    import minillm
    import train
    steps, excluded = [], Counter()

    def left_out(fn):
        def run(*args, **kwargs):
            before = Counter(syncs.counts)
            try:
                return fn(*args, **kwargs)
            finally:
                excluded.update(Counter(syncs.counts) - before)
        return run

    def step_begins(optimizer, args, kwargs):
        step_begins.before = Counter(syncs.counts)

    def step_ends(optimizer, args, kwargs):
        excluded.update(Counter(syncs.counts) - step_begins.before)
        steps.append(Counter(syncs.counts) - excluded)  # cumulative, the left-out syncs taken away

    with HostSyncs() as syncs, mock.patch.object(train, "on_policy_batches", left_out(train.on_policy_batches)), \
            mock.patch.object(minillm.MiniLLM, "rollout", left_out(minillm.MiniLLM.rollout)), \
            contextlib.redirect_stdout(io.StringIO()):  # train.py's log
        hooks = [register_optimizer_step_pre_hook(step_begins),
                 register_optimizer_step_post_hook(step_ends)]
        try:
            train.main(argv)
        finally:
            for hook in hooks:
                hook.remove()
    return [dict(after - before) for before, after in zip(steps, steps[1:])]


# ---------------------------------------------------------------------------------------------------------------------
# memory traffic: delta_kd_loss's passes over a (chunk, vocab) tensor, eager and compiled

class _Traffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes that eager aten ops read and write in tensors of at least `size` elements (views move nothing), split
    into those inside deltakd._chunk and those around it. Uses the private TorchDispatchMode, as HostSyncs does."""

    def __init__(self, size):
        super().__init__()
        self.size, self.inside, self.bytes = size, False, {"chunk": 0, "around": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(x, torch.Tensor)]
            self.bytes["chunk" if self.inside else "around"] += sum(x.nbytes for x in tensors if x.numel() >= self.size)
        return out


def _kernel_traffic(code, vocab):
    """From inductor's C++ for a chunk: the loops over (chunk, vocab) and the bytes per row they read and write. Each
    loop nest over the rows (x0) that has a loop over the vocabulary (x1) is one pass; within it, every distinct
    pointer indexed by x1 moves vocab elements of its type per row."""
    size = {"float": 4, "double": 8, "at::BFloat16": 2, "at::Half": 2, "bool": 1, "int64_t": 8, "int32_t": 4}
    signature = re.search(r'extern "C"\s+void\s+kernel\((.*?)\)', code, re.S).group(1)
    types = {name: size[t] for t, name in re.findall(r"(?:const )?([\w:]+)\* (\w+)", signature)}
    types.update({alias: types[name] for alias, name in re.findall(r"auto (\w+ptr\d+) = (\w+ptr\d+);", code)})
    nests = re.split(r"for\(int64_t x0=", code)[1:]  # from each loop over the rows to the next
    loops, per_row = 0, 0
    for nest in nests:
        if f"x1<static_cast<int64_t>({vocab}L)" not in nest:
            continue
        loops += 1
        pointers = {name for name, index in re.findall(r"(\w+ptr\d+)(?: \+ |\[)static_cast<int64_t>\(([^;]{0,80})",
                                                          nest) if "x1" in index}
        per_row += sum(types.get(p, 4) * vocab for p in pointers)
    return loops, per_row


def loss_passes(vocab, chunk):
    """Full passes over a (chunk, vocab) fp32 tensor per chunk, eager and fused, from one chunk's forward+backward:
    eager from the aten ops (bytes read and written, in units of the tensor's 4 x chunk x vocab bytes); fused from
    the ops around the compiled kernel plus the kernel's own loops, read from inductor's generated code."""
    import deltakd
    from torch._inductor.utils import run_and_get_code
    s, t, t_raw, s_raw = (torch.randn(chunk, vocab, dtype=torch.bfloat16) for _ in range(4))
    labels = torch.randint(0, vocab, (chunk,))  # every position counted: one chunk

    def run():
        delta_kd_loss(s.requires_grad_(), labels, t, t_raw, s_raw, fused=False).backward()
    unit = 4 * chunk * vocab
    traffic = _Traffic(chunk * vocab // 2)
    chunk_fn = deltakd._chunk

    def inside(*args):
        traffic.inside = True
        try:
            return chunk_fn(*args)
        finally:
            traffic.inside = False
    with mock.patch.object(deltakd, "_chunk", inside), traffic:
        run()
    args = (s.detach(), t, t_raw, s_raw, labels, torch.ones(chunk), 1.0, 1.0, 0.5, "fkl", torch.tensor(1.0),
            torch.bfloat16)  # the arguments the fused loss passes for one chunk
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph brings no code to read
        _, code = run_and_get_code(torch.compile(chunk_fn, dynamic=False, fullgraph=True), *args)
    loops, per_row = _kernel_traffic("\n".join(code), vocab)
    around = traffic.bytes["around"] / unit
    return {"eager": traffic.bytes["chunk"] / unit + around, "around": around, "kernel_loops": loops,
            "kernel": per_row * chunk / unit}


# ---------------------------------------------------------------------------------------------------------------------
# memory: the per-GPU peak of a train.py step, from fake tensors

# Qwen2.5's config.json files as the Hub has them, for Hub ids that are not in the local cache: estimates run offline
QWEN25 = {f"Qwen/Qwen2.5-{size}": Qwen2Config(
    vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
    num_key_value_heads=kv, tie_word_embeddings=tied, rope_theta=1e6, bos_token_id=151643, eos_token_id=151643)
    for size, (hidden, inter, layers, heads, kv, vocab, tied) in {
        "0.5B": (896, 4864, 24, 14, 2, 151936, True), "1.5B": (1536, 8960, 28, 12, 2, 151936, True),
        "7B": (3584, 18944, 28, 28, 4, 152064, False)}.items()}
# The paper's runs (reproduce.sh paper, UltraChat): the teacher's SFT, each student method, and two variations
_PAPER = ["--max-len", "2048", "--micro-batch-size", "2", "--grad-ckpt"]
_TEACHERS = ["--teacher", "Qwen/Qwen2.5-7B", "--teacher-raw", "Qwen/Qwen2.5-7B"]
MEMORY_RUNS = {
    "teacher SFT (7B)": ["--model", "Qwen/Qwen2.5-7B", "--loss", "sft", *_PAPER],
    "teacher SFT, no --grad-ckpt": ["--model", "Qwen/Qwen2.5-7B", "--loss", "sft", *_PAPER[:4]],
    **{f"student {loss} (1.5B)": ["--model", "Qwen/Qwen2.5-1.5B", "--loss", loss, *_TEACHERS, *_PAPER]
       for loss in ("sft", "fkl", "rkl", "deltakd")},
    "deltakd, --micro-batch-size 8": ["--model", "Qwen/Qwen2.5-1.5B", "--loss", "deltakd", *_TEACHERS, *_PAPER[:2],
                                      "--micro-batch-size", "8", "--grad-ckpt"],
    "deltakd, no --grad-ckpt": ["--model", "Qwen/Qwen2.5-1.5B", "--loss", "deltakd", *_TEACHERS, *_PAPER[:4]],
}


def private_torch():
    """The private torch APIs that the estimate needs, or one line saying which one this torch lacks."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.testing._internal.distributed.fake_pg import FakeStore
        collectives = (torch.ops.c10d._allgather_base_.default, torch.ops.c10d._reduce_scatter_base_.default)
        return FakeTensorMode, FakeStore, collectives, torch._C._current_graph_task_id
    except (ImportError, AttributeError) as e:
        sys.exit(f"error: the memory estimate needs private torch APIs (FakeTensorMode, the fake process group, c10d's "
                 f"_allgather_base_ and _reduce_scatter_base_, _current_graph_task_id) that torch {torch.__version__} "
                 f"lacks: {e}")


def _local(t):
    return t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t


class _WorstCase(torch.utils._python_dispatch.TorchDispatchMode):
    """Answers, under fake tensors, the data-dependent ops of a step, whose values fake tensors do not have, as for the
    worst case: every mask all True (every position supervised), every check passing, and a loss backpropagated by a
    plain .backward() (an incoming gradient of 1). A value it has no answer for fails naming the op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, torch.distributed.tensor.DTensor) for t in types):
            return NotImplemented  # DTensor runs first and comes back with its local tensors
        aten = torch.ops.aten
        if func is aten.nonzero.default:
            return args[0].new_empty((args[0].numel(), args[0].dim()), dtype=torch.long)
        if func is aten._pin_memory.default:  # fake tensors cannot pin; a pinned host copy takes no GPU memory
            return args[0]
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            indices = []
            for i in args[1]:  # an all-True mask of k dims selects every position: k flat integer indices
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    for d, n in enumerate(i.shape):
                        shape = [1] * i.dim()
                        shape[d] = n
                        indices.append(torch.arange(n, device=i.device).view(shape).expand(i.shape).reshape(-1))
                else:
                    indices.append(i)
            return func(args[0], indices, *args[2:], **kwargs)
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default):
            if args[0].dtype == torch.bool:
                return True
            if args[0].is_floating_point():
                return 1.0
            raise RuntimeError(f"bench.py memory: the step reads {func} of a {args[0].dtype} tensor, whose value fake "
                               "tensors do not have; give _WorstCase its worst-case answer")
        return func(*args, **kwargs)


class PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of the live tensor storages on this rank, by kind, and their peak: what a GPU's caching allocator
    counts as allocated (up to its 512-byte rounding). Parameters: every model's shards, and the blocks FSDP gathers
    (the storages it resizes, and its all-gather buffers); gradients: FSDP's reduce-scatter buffers, of which the
    sharded gradients are views; optimizer state; activations: all else (activations, logits, the loss's chunks, a
    block's unsharded gradients until FSDP reduces them). `where` says where in the step the peak fell."""
    KINDS = ("parameters", "gradients", "optimizer state", "activations")

    def __init__(self, models, optimizer):
        super().__init__()
        _, _, (self._all_gather, self._reduce_scatter), self._graph_task = private_torch()
        self.live = {}  # id(storage) -> [bytes, kind]
        self.now = dict.fromkeys(self.KINDS, 0)
        self.peak, self.where = dict(self.now), ""
        for p in (p for m in models.values() for p in m.parameters()):
            self._add(_local(p).untyped_storage(), "parameters")
        for t in (t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)):
            self._add(_local(t).untyped_storage(), "optimizer state")
        # where: the innermost model part running forward (a block recomputes its forward in backward under
        # --grad-ckpt), the micro-batch (each runs every model once), and the optimizer step
        self.names = {id(m): name for name, m in models.items()}
        self.names.update({id(b): f"{name} block {i}" for name, m in models.items()
                           for i, b in enumerate(m.model.layers)})
        self.names.update({id(m.lm_head): f"{name} lm_head" for name, m in models.items()})
        self.roots, self.model_calls, self.running, self.optimizing = {id(m) for m in models.values()}, 0, [], False
        self.optimizer = optimizer

    def _add(self, storage, kind):
        if id(storage) not in self.live:
            self.live[id(storage)] = [storage.nbytes(), kind]
            self.now[kind] += storage.nbytes()
            weakref.finalize(storage, self._free, id(storage))

    def _free(self, key):
        size, kind = self.live.pop(key)
        self.now[kind] -= size

    def _retag(self, tensor, kind):
        self._add(tensor.untyped_storage(), kind)
        entry = self.live[id(tensor.untyped_storage())]
        self.now[entry[1]] -= entry[0]
        self.now[kind] += entry[0]
        entry[1] = kind

    def _update(self):
        if sum(self.now.values()) > sum(self.peak.values()):
            self.peak = dict(self.now)
            inner = next((self.names[i] for i in reversed(self.running) if i in self.names), None)
            if self.optimizing:
                self.where = "the optimizer step"
            elif self._graph_task() != -1:
                self.where = "the backward" + (f", {inner} recomputing its forward" if inner else "")
            else:
                self.where = f"{inner} forward" if inner else "the loss"
            self.where += f" (micro-batch {-(-self.model_calls // len(self.roots))})"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, torch.distributed.tensor.DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func is self._all_gather:
            self._retag(args[0], "parameters")
        elif func is self._reduce_scatter:
            self._retag(args[0], "gradients")
            self._retag(args[1], "gradients")
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), "activations")
        self._update()
        return out

    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_

        def resize_(storage, size):  # FSDP gathers a block into storages it resizes, bypassing the dispatcher
            resize(storage, size)
            self._add(storage, "parameters")
            entry = self.live[id(storage)]
            self.now[entry[1]] += storage.nbytes() - entry[0]
            entry[0] = storage.nbytes()
            self._update()
        torch.UntypedStorage.resize_ = resize_

        def enter(module, *_):
            self.running.append(id(module))
            self.model_calls += id(module) in self.roots and self._graph_task() == -1

        def leave(*_):
            self.running.pop()

        def optimizing(*_):
            self.optimizing = True
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
                       torch.nn.modules.module.register_module_forward_hook(leave),
                       self.optimizer.register_step_pre_hook(optimizing)]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def report(self):
        gib = {kind.split()[0] + "_gib": size / 2**30 for kind, size in self.peak.items()}
        return {"peak_gib": sum(self.peak.values()) / 2**30, **gib, "where": self.where}


def _memory_model_dir(name, tmp):
    """A folder with name's config.json: the folder itself, the local Hub cache's copy, or a built-in config."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json") if name.count("/") == 1 else None
    if isinstance(cached, str):
        return Path(cached).parent
    if name not in QWEN25:
        sys.exit(f"error: {name} is not a model folder, nor in the local Hub cache, nor one of the built-in configs "
                 f"({', '.join(QWEN25)})")
    folder = tmp / name.replace("/", "--")
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(QWEN25[name].to_dict()))
    return folder


@contextlib.contextmanager
def measured_step(args, world, device, fake):
    """One step of train.py's token-level loss, as step(micro_batches), with its models {"student", ...} and optimizer,
    built by train.build_models and train.make_optimizer over the process group already made and run by
    train.kd_backward, unchanged: each micro-batch --micro-batch-size x --max-len tokens, every position supervised
    (the worst case). With fake=True, on fake tensors (every shape as on rank 0 of `world`, nothing computed); on
    real ones, the weights are left uninitialised: no value changes what is allocated or what a kernel does. On the
    CPU the loss's chunks are sized as on a GPU."""
    FakeTensorMode = private_torch()[0]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        dirs = {name: _memory_model_dir(getattr(args, flag), Path(tmp)) for name, flag in MODEL_FLAGS.items()
                if getattr(args, flag)}
        vocab_size = min(Qwen2Config.from_json(d).vocab_size for d in dirs.values())  # as delta_kd_loss's default
        mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (world,))
        if fake:  # model.py caches the RoPE frequencies per device: no fake tensor may outlive its mode there
            rope_inv_freq.cache_clear()
            stack.callback(rope_inv_freq.cache_clear)
            stack.enter_context(FakeTensorMode())
            stack.enter_context(_WorstCase())
        if device.type == "cpu":
            stack.enter_context(mock.patch.dict(_CHUNK_BYTES, cpu=_CHUNK_BYTES["other"]))
        compute_dtype = parallel.DTYPES[args.dtype]
        student, frozen = train.build_models(dirs, args, mesh, compute_dtype)
        models = {"student": student, **frozen}
        optimizer = train.make_optimizer(student, args, fused=True)
        B, T = args.micro_batch_size, args.max_len
        batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "labels": torch.zeros(B, T, dtype=torch.long),
                 "attention_mask": torch.ones(B, T, dtype=torch.long),
                 "positions": torch.arange(B * T).view(B, T)[:, :-1].flatten()}  # each row's last predicts nothing

        def step(micro_batches):
            train.kd_backward(student, frozen, [batch] * micro_batches, train.loss_settings(args), vocab_size, device,
                              world)
            torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        yield step, models, optimizer


def memory_of_step(args, world, device, fake=True):
    """The peak of one steady train.py step on rank 0 (measured_step): AdamW's state already made, two micro-batches,
    then the clip and the optimizer step. PeakMemory's report."""
    with measured_step(args, world, device, fake) as (step, models, optimizer):
        step(1)  # untracked: AdamW's state appears, and fused AdamW's first step allocates once more
        with PeakMemory(models, optimizer) as tracker:
            step(2)  # the second micro-batch runs with the first one's gradients held, as every later one does
    return tracker.report()


def allocator_peak(run, device):
    """(run(), the peak of the bytes that the allocator handed out during it, in GiB). On CUDA, the caching
    allocator's max_memory_allocated. On the CPU, torch.profiler's memory events (each allocation and free that the
    allocator reports, kineto_results: a private API), summed in order. The events carry sizes, not addresses, so a
    tensor made before and freed during the run would count as a negative allocation: the garbage collector runs first
    and not during the run (a test process holds earlier tests' cyclic garbage)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return run(), torch.cuda.max_memory_allocated(device) / 2**30
    gc.collect()
    gc.disable()
    try:
        with torch.profiler.profile(profile_memory=True) as prof:
            result = run()
    finally:
        gc.enable()
    now = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        now += event.nbytes()
        peak = max(peak, now)
    return result, peak / 2**30


def memory_args(argv):
    p = argparse.ArgumentParser(prog="bench.py memory", description="The per-GPU peak of a train.py step, estimated "
                                "on the CPU with fake tensors. Takes train.py's arguments (--model, --teacher, "
                                "--teacher-raw, --loss, --micro-batch-size, --max-len, --grad-ckpt, --dtype, ...; "
                                "Hub ids of Qwen2.5 0.5B, 1.5B, 7B not in the local cache use built-in configs); "
                                "without them, the paper's runs.")
    p.add_argument("--world-size", type=int, default=8, help="processes (GPUs) that FSDP shards over")
    p.add_argument("--json", action="store_true", help="print one JSON object with peak_gib")
    p.add_argument("--real", action="store_true", help="measure real tensors instead, on this torchrun world")
    mine, rest = p.parse_known_args(argv)
    if not rest:
        return mine, None
    args = train.get_args(rest + ["--data", "(unused)", "--out", "(unused)"])
    train.check_args(args)
    if args.loss == "minillm" or args.on_policy:
        sys.exit("error: bench.py memory estimates the token-level steps (sft, fkl, rkl, deltakd); MiniLLM's and "
                 "--on-policy's rollouts hold the gathered models and their KV caches (README, Memory)")
    args.dtype = args.dtype or "bf16"  # the GPU's default
    return mine, args


def report_memory(argv=()):
    mine, args = memory_args(list(argv))
    FakeTensorMode, FakeStore, _, _ = private_torch()
    if mine.real:  # under torchrun: this world's real tensors, counted alike, and the allocator's own peak
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        report, report["allocator_peak_gib"] = allocator_peak(
            lambda: memory_of_step(args, torch.distributed.get_world_size(), device, fake=False), device)
        if torch.distributed.get_rank() == 0:
            print(json.dumps(report) if mine.json else report)
        torch.distributed.destroy_process_group()
        return report
    runs = {"": args} if args else {name: memory_args(["--world-size", str(mine.world_size), *run])[1]
                                    for name, run in MEMORY_RUNS.items()}
    if not mine.json:
        print(f"per-GPU peak of one train.py step, rank 0 of {mine.world_size}, estimated with fake tensors (torch "
              f"{torch.__version__}): the live tensors' bytes, what torch.cuda.max_memory_allocated would report; "
              "not counted: the CUDA context (about 0.5-1 GiB), NCCL's buffers, and the caching allocator's cached "
              "blocks and fragmentation (max_memory_reserved minus max_memory_allocated)")
    reports = {}
    for name, run in runs.items():
        torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=mine.world_size)
        try:
            reports[name] = r = memory_of_step(run, mine.world_size, torch.device("cpu"))
        finally:
            torch.distributed.destroy_process_group()
        if mine.json:
            continue
        print(f"  {name or ' '.join(argv)}")
        print(f"    peak {r['peak_gib']:6.2f} GiB = parameters {r['parameters_gib']:.2f} + gradients "
              f"{r['gradients_gib']:.2f} + optimizer state {r['optimizer_gib']:.2f} + activations "
              f"{r['activations_gib']:.2f}; at {r['where']}")
    if mine.json:
        print(json.dumps(reports[""] if args else reports))
    return reports
