"""
plan.py: the memory a training run (or a chat) needs on each GPU, before renting one.

    python train.py --preset=mpp-qwen7b-sft --plan                       # per pipeline stage
    python train.py --preset=minigpt4qwen --plan --device_memory=24GB
    python chat.py --plan --model=tinygpt-v --dtype=bf16 --device_memory=8GB

Like DeepSpeed's memory estimators, but nothing is guessed from formulas that could drift from the
code: the real model is built under FakeTensorMode (torch._subclasses.fake_tensor: tensors with
shapes, dtypes and devices but no data, so Qwen-14B costs no memory and needs no weights), sliced
into stages by pipeline.split_layers exactly as PipelineRunner slices it, and run:

- weights: the stage's parameters and buffers in their dtypes (frozen parts in frozen_dtype);
  gradients: fp32 per trainable parameter; optimizer: AdamW's exp_avg and exp_avg_sq, fp32;
  dp buffer: with data parallelism, one more gradient-sized buffer (pipeline.py's flat
  all-reduce, DDP's buckets).
- activations: one microbatch's forward and backward of the stage (batch_size x max_len tokens,
  max_len includes the image tokens; full-length rows, as the pipeline's static shapes are)
  under the run's autocast and gradient checkpointing, while `LiveBytes`, a dispatch mode,
  counts the bytes of every tensor storage created and still alive. This measures what autograd
  saves (it saves only what the frozen/trainable split needs), autocast's bf16 weight copies,
  checkpointing's recompute and the backward's temporaries, with no model of any of it here.
  A pipeline stage holds more microbatches at once (1F1B: p - stage, GPipe: all m): each extra
  one costs what a second forward adds (autocast's weight copies are cached, not repeated).
- the optimizer step: AdamW run on the fake gradients, foreach on CUDA (a whole-model temporary
  per op) and per tensor on the CPU, as torch picks by default.

peak = weights + gradients + optimizer + dp buffer + max(activations phase, optimizer-step
temporaries). The gradients are taken to exist through the whole backward (the steady state of
accumulation and of a pipeline), so a step of a single microbatch may peak lower by up to them. What this does not see: the CUDA context and allocator fragmentation (so a plan
"fits" only if its peak leaves 10% of the device free), NCCL buffers, and CPU-side data loading.
The fake run uses the CPU's kernels; CUDA's flash/memory-efficient attention keeps O(T) per head
as the CPU's flash kernel does (both take the unmasked causal path here), so the numbers carry
over. tests/test_plan.py checks the plan against the measured peak RSS of real CPU steps.
"""
import re
import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model import MultimodalLM
from pipeline import schedule_table, peak_in_flight, split_layers, stage_costs

GiB = 2 ** 30
HEADROOM = 0.9  # a plan fits if its peak leaves 10% for the CUDA context and fragmentation


def parse_size(text):
    """'24GB' / '24GiB' / '8000MB' -> bytes (GB means GiB here, as nvidia-smi's MiB do)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(G|M)i?B\s*", text, re.I)
    if not m:
        raise ValueError(f"--device_memory={text!r}: expected a size like 24GB or 8000MB")
    return int(float(m[1]) * (GiB if m[2].upper() == "G" else 2 ** 20))


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created while it is active, until that storage is
    freed: `now` and `peak`. Storages that existed before (the weights, their gradients) are not
    counted; in-place ops on them create nothing."""

    def __init__(self):
        super().__init__()
        self.live, self.before, self.now, self.peak = set(), set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):  # an input made elsewhere (a cached table): its views are not new
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live | self.before:
                s = t.untyped_storage()
                self.before.add(s._cdata)
                weakref.finalize(s, self.before.discard, s._cdata)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in self.live and s._cdata not in self.before:
                    self.live.add(s._cdata)
                    self.now += s.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(s, self._free, s._cdata, s.nbytes())
        return out

    def _free(self, key, nbytes):
        self.live.discard(key)
        self.now -= nbytes

    def start(self, existing):
        """Forget the peak; `existing` tensors' storages are not new."""
        self.before = {t.untyped_storage()._cdata for t in existing}
        self.peak = self.now
        return self


def fake_model(config, frozen_dtype=torch.float32, grad_checkpointing=False):
    """The real MultimodalLM under FakeTensorMode: (mode, model). Use tensors only inside `mode`."""
    with torch.device("meta"):  # no init: a random init of fake tensors would ask for their values
        model = MultimodalLM(config).cast_frozen(frozen_dtype)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors' shapes
    with mode:
        model.to_empty(device="cpu")
    model.vit.grad_checkpointing = model.llm.grad_checkpointing = grad_checkpointing
    return mode, model


def stage_parts(model, ranges, stage):
    """(name, tensor) of the parameters and buffers stage `stage` keeps (PipelineRunner's slicing:
    the first keeps the vision side and embed_tokens, the last norm and lm_head; a tied head
    weight is on both), each tensor once."""
    lo, hi = ranges[stage]
    first, last = stage == 0, stage == len(ranges) - 1
    keep = (("vit.", "qformer.", "llm_proj.", "llm.embed_tokens.") if first else ()) + \
           (("llm.norm.", "llm.lm_head.") if last else ()) + tuple(f"llm.layers.{i}." for i in range(lo, hi))
    out, seen = [], set()
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name.startswith(keep) and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _stage_forward(model, lo, hi, first, last, B, T, x_dtype):
    """PipelineRunner.stage_forward on made-up inputs. Only the image splice differs: masked_scatter
    behind a count check of the image tokens is data-dependent (fake tensors have no values), so
    the image features take the first positions by a cat, which makes a tensor of the same size."""
    llm, cfg = model.llm, model.config
    if first:
        x = llm.embed_tokens(torch.zeros(B, T, dtype=torch.long))
        pixels = torch.zeros(B, 3, cfg.vit.img_size, cfg.vit.img_size)  # one image per row
        f = model.encode_images(pixels).to(x.dtype)  # [B, num_query, d]
        x = torch.cat((f, x[:, f.shape[1]:]), 1)
    else:  # the received activation; the engine makes it require grad
        x = torch.zeros(B, T, llm.config.n_embd, dtype=x_dtype, requires_grad=True)
    x = llm.forward_blocks(x, [llm.layers[i] for i in range(lo, hi)])  # no attention_mask: full-length rows
    if last:  # every row full-length and supervised: the head and cross-entropy at all T - 1 positions, as
        # training runs them (qwen.loss_sum picks those positions by a boolean mask, which fake tensors cannot)
        logits = llm.head(x[:, :-1]).flatten(0, 1).float()
        return F.cross_entropy(logits, torch.zeros(B * (T - 1), dtype=torch.long), reduction="sum")
    return x


def plan_training(config, batch_size, seq_len, grad_accum=1, num_stages=1, nproc=None, schedule="1f1b",
                  grad_checkpointing=False, frozen_dtype=torch.float32, autocast=True, device="cuda"):
    """One dict per pipeline stage: blocks, params, trainable, and the bytes of weights, grads,
    optimizer, dp_buffer, activations (one microbatch's fwd+bwd peak plus the other in-flight
    microbatches), optimizer_step (its temporaries), peak, in_flight."""
    nproc = nproc or num_stages  # default: one replica
    if nproc % num_stages:
        raise ValueError(f"--nproc={nproc} is not a multiple of --num_stages={num_stages}")
    mode, model = fake_model(config, frozen_dtype, grad_checkpointing)
    ranges = split_layers(config.llm.n_layer, num_stages, *stage_costs(model, seq_len))
    dp = nproc // num_stages
    dtype = torch.bfloat16 if autocast else torch.float32
    plans = []
    for s, (lo, hi) in enumerate(ranges):
        first, last = s == 0, s == num_stages - 1
        parts = stage_parts(model, ranges, s)
        params = [t for n, t in parts if isinstance(t, torch.nn.Parameter)]
        train = [p for p in params if p.requires_grad]
        block_dtype = next(model.llm.layers[lo].parameters()).dtype  # pipeline.py's activation dtype
        k = 1 if num_stages == 1 else peak_in_flight(schedule_table(schedule, num_stages, s, grad_accum))
        with mode:
            for p in train:  # steady state: gradients exist (and are summed into in place)
                p.grad = torch.zeros_like(p)
            tracker = LiveBytes().start([t for _, t in parts] + [p.grad for p in train])
            with tracker, torch.autocast("cpu", dtype=dtype, enabled=autocast):
                out = _stage_forward(model, lo, hi, first, last, batch_size, seq_len, block_dtype)
                forward_peak, held, extra = tracker.peak, tracker.now, 0
                if k > 1:  # what one more in-flight microbatch adds
                    out2 = _stage_forward(model, lo, hi, first, last, batch_size, seq_len, block_dtype)
                    extra = tracker.now - held
                    del out2
                    tracker.peak = tracker.now
                if out.requires_grad:
                    out.backward(None if last else torch.zeros_like(out))
                del out
            act = max(forward_peak, tracker.peak)  # one microbatch's forward and backward
            step = 0
            if train:
                opt = torch.optim.AdamW(train, foreach=device == "cuda")
                opt.step()  # creates the state; the second step shows the step's own temporaries
                state = [v for st in opt.state.values() for v in st.values()]
                with LiveBytes().start([t for _, t in parts] + [p.grad for p in train] + state) as tracker:
                    opt.step()
                step = tracker.peak
            for p in train:
                p.grad = None
        sizes = dict(weights=sum(t.numel() * t.element_size() for _, t in parts),
                     grads=sum(p.numel() * p.element_size() for p in train),
                     optimizer=sum(2 * p.numel() * p.element_size() for p in train))
        sizes["dp_buffer"] = sizes["grads"] if dp > 1 else 0
        sizes["activations"] = act + (k - 1) * extra
        sizes["optimizer_step"] = step
        static = sizes["weights"] + sizes["grads"] + sizes["optimizer"] + sizes["dp_buffer"]
        plans.append(dict(stage=s, blocks=(lo, hi), params=sum(p.numel() for p in params),
                          trainable=sum(p.numel() for p in train), in_flight=k, **sizes,
                          peak=static + max(sizes["activations"], step)))
    return plans


def plan_chat(config, dtype=torch.bfloat16, context=None, new_tokens=512):
    """Inference: weights in `dtype`, the KV cache of one conversation of `context` positions (the
    LLM's max_seq_len by default) and the prefill's temporaries (the prompt: context - new_tokens
    positions, one image). Returns a dict of bytes: weights, kv_cache, prefill, peak."""
    with torch.device("meta"):
        model = MultimodalLM(config).to(dtype).eval()
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # to_empty reads the meta tensors' shapes
    with mode:
        model.to_empty(device="cpu")
        llm, T = model.llm, context or config.llm.max_seq_len
        weights = [*model.parameters(), *model.buffers()]
        with LiveBytes().start(weights) as tracker, torch.no_grad():
            cache = llm.new_cache(1, T)
            kv = tracker.now
            f = model.encode_images(torch.zeros(1, 3, config.vit.img_size, config.vit.img_size))
            x = llm.embed_tokens(torch.zeros(1, T - new_tokens, dtype=torch.long))
            x = torch.cat((f.to(x.dtype), x[:, f.shape[1]:]), 1)  # the splice, as in _stage_forward
            del f
            llm.head(llm.hidden(inputs_embeds=x, cache=cache)[:, -1])
            peak = tracker.peak
    size = sum(t.numel() * t.element_size() for t in set(weights))
    return dict(params=sum(p.numel() for p in model.parameters()), weights=size, kv_cache=kv,
                prefill=peak - kv, peak=size + peak, context=T)


def gb(n):
    return f"{n / GiB:6.2f}"


def format_training(plans, device_memory=None):
    """The per-rank table that train.py --plan prints, and the verdict."""
    head = (f"{'stage':>5} {'blocks':>7} {'params':>8} {'trainable':>9} {'weights':>7} {'grads':>6} {'optim':>6} "
            f"{'dp buf':>6} {'acts':>6} {'in fl.':>6} {'opt step':>8} {'peak':>6}")
    lines = [head + "   (GB = 2^30 bytes)"]
    for p in plans:
        lo, hi = p["blocks"]
        lines.append(f"{p['stage']:5d} {f'{lo}-{hi - 1}':>7} {p['params'] / 1e9:7.3f}B {p['trainable'] / 1e9:8.3f}B "
                     f"{gb(p['weights']):>7} {gb(p['grads'])} {gb(p['optimizer'])} {gb(p['dp_buffer'])} "
                     f"{gb(p['activations'])} {p['in_flight']:6d} {gb(p['optimizer_step']):>8} {gb(p['peak'])}")
    worst = max(p["peak"] for p in plans)
    lines.append(f"peak per rank {worst / GiB:.2f} GB" + verdict(worst, device_memory))
    return "\n".join(lines)


def verdict(peak, device_memory):
    if device_memory is None:
        return ""
    ok = peak <= HEADROOM * device_memory
    return (f": {'fits' if ok else 'does NOT fit'} in {device_memory / GiB:g} GB "
            f"({peak / device_memory:.0%} of it; fits means <= {HEADROOM:.0%})")


def format_chat(p, device_memory=None):
    return (f"params {p['params'] / 1e9:.3f}B: weights {p['weights'] / GiB:.2f} GB, KV cache {p['kv_cache'] / GiB:.2f} GB "
            f"({p['context']} positions), prefill {p['prefill'] / GiB:.2f} GB; peak {p['peak'] / GiB:.2f} GB"
            + verdict(p["peak"], device_memory))
