"""
LoRA (Hu et al., 2021, arXiv:2106.09685) on the LLM's Linears: y = W x + b + (alpha / r) * B A x.

W and b stay frozen; A [r, in] starts kaiming-uniform (as nn.Linear draws its weight, and PEFT its
lora_A) and B [out, r] at zero, so a fresh adapter changes nothing. Adapters replace the targeted
nn.Linear modules of the decoder blocks by name (`q_proj`, `o_proj`, `down_proj`, Phi's `dense`,
`fc1`...), keeping the Linear's own parameter names, so the base keys of a checkpoint load unchanged
and the adapters appear beside them as `<linear>.lora_A` / `.lora_B`. They live inside their blocks,
so a pipeline stage (which keeps its blocks) has exactly its own adapters, and each adapter's initial
A is drawn from a generator seeded by (seed, its name): any slicing of the model draws the same ones.

A LoRA run saves only what it trains (`trainable`: the adapters plus whatever the freeze preset
leaves trainable, e.g. llm_proj) in `adapters.safetensors`, with a fingerprint of the base weights
(`fingerprint`) that a merge or a resume checks against the base it rebuilds (`check_base`); `merge` folds the
adapters into W for export and chat. This file needs torch and ckpt only.
"""
import hashlib
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import ckpt

ADAPTERS = "adapters.safetensors"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update: base(x) + scale * (x A^T) B^T."""

    def __init__(self, base, r, alpha, generator):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the Linear's own parameters, same names
        out_features, in_features = base.weight.shape
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        a = torch.empty(r, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's rule, fan_in = in
        self.lora_A = nn.Parameter(a.to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **kw))
        self.scale = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def add_adapters(model, r, alpha, targets, seed=0, base=""):
    """Replace the Linears named in `targets` inside model.llm.layers by LoRALinear: comma separated
    leaf names (qwen.py: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; phi.py: q_proj,
    k_proj,v_proj,dense,fc1,fc2) or 'all', every Linear of the blocks (attention and MLP). On a
    pipeline stage: the blocks it holds. `model.lora` keeps the settings and the base's fingerprint
    for the checkpoint's config.json. Returns the number of adapters."""
    linears = sorted({n.rpartition(".")[2] for n, m in model.llm.layers.named_modules() if isinstance(m, nn.Linear)})
    names = linears if targets == "all" else [t for t in targets.split(",") if t]
    missing = [t for t in names if t not in linears]
    if r < 1 or not names or missing:
        raise ValueError(f"LoRA needs lora_r >= 1 and targets among the decoder blocks' Linears {linears} (or "
                         f"'all'), got lora_r={r}, lora_targets={targets!r}")
    model.llm.requires_grad_(False)  # the LLM learns through its adapters only
    n = 0
    for block_name, block in model.llm.layers.named_children():
        for name, m in list(block.named_modules()):
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] in names:
                full = f"llm.layers.{block_name}.{name}"
                g = torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32(full.encode()))
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, LoRALinear(m, r, alpha, g))
                n += 1
    model.lora = dict(r=r, alpha=alpha, targets=targets, base=base)
    return n


def trainable(module):
    """{name: parameter} of everything that learns (adapters and unfrozen parts): what a LoRA run saves."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(module, state):
    """Copy `state` into the trainable parameters of `module`: exactly those keys, every shape checked."""
    own = trainable(module)
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        msg = [f"missing trainable keys: {ckpt.few(missing)}" if missing else "",
               f"keys that are not trainable here: {ckpt.few(unexpected)}" if unexpected else "",
               f"shape mismatch: {ckpt.few(wrong)}" if wrong else ""]
        raise ckpt.CheckpointError("; ".join(m for m in msg if m))
    for k, p in own.items():
        p.copy_(state[k])
    return module


def fingerprint(state):
    """A sha256 over every tensor's name, shape and 256 evenly spaced values (as float64, so the
    file's dtype does not matter): cheap on a memory-mapped 7B checkpoint (a few pages per tensor),
    and any other base (another checkpoint, a fine-tuned copy) differs."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().reshape(-1)
        h.update(f"{k}{tuple(state[k].shape)}".encode())
        h.update(t[::max(1, t.numel() // 256)].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def check_base(d, saved, base=None):
    """Refuse a checkpoint (its config.json: `saved`) that is not a LoRA run's, or whose adapters
    were trained on another base than the one of fingerprint `base`."""
    if "lora" not in saved:
        raise ckpt.CheckpointError(f"{d}: not a LoRA checkpoint (its config.json has no 'lora' section)")
    if base is not None and saved["lora"]["base"] != base:
        raise ckpt.CheckpointError(f"{d}: the base weights built from the run's config are not the ones its LoRA adapters "
                                   f"were trained on (fingerprint {base[:12]} vs {saved['lora']['base'][:12]} saved)")


@torch.no_grad()
def merge(model):
    """Fold every adapter into its weight (W += scale * B A, computed in fp32) and put a plain
    nn.Linear back in its place: the exported model has the base's keys and no LoRA at run time."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.weight += (m.scale * m.lora_B.float() @ m.lora_A.float()).to(m.weight.dtype)
            with torch.device("meta"):
                linear = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None)
            linear.weight, linear.bias = m.weight, m.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model
