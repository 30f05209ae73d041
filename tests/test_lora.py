"""lora.py and LoRA runs of train.py: adapter gradients equal the explicit formula, a merge gives the
adapted model's logits, the toy learns a new task through its adapters, an adapter-only checkpoint is
small and resumes exactly (and refuses another base), and DDP / pipeline runs equal one process."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ckpt
import lora
import train
from model import MMConfig, MultimodalLM
from phi import PhiConfig
from qformer import QFormerConfig
from qwen import QwenConfig
from vit import ViTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(llm="qwen", freeze=("vit", "qformer")):
    llm_cfg = (QwenConfig if llm == "qwen" else PhiConfig).preset("tiny")
    torch.manual_seed(0)
    return MultimodalLM(MMConfig(vit=ViTConfig.preset("tiny"), qformer=QFormerConfig.preset("tiny"), llm=llm_cfg,
                                 llm_type=llm, freeze=freeze, image_token_id=5))


def batch(n=2, T=16, q=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 512, (n, T), generator=g)
    ids[:, 1:1 + q] = 5  # one image per row
    labels = ids.clone()
    labels[:, :1 + q] = -100
    return dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                images=torch.randn(n, 3, 56, 56, generator=g))


@torch.no_grad()
def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("llm", ["qwen", "phi"])
def test_gradients_equal_the_explicit_formula(llm, one_thread):
    """y = W x + b + s B A x with s = alpha / r: for the output gradient G of each adapted Linear and
    its input x (rows: every token), dL/dB = s G^T (x A^T) and dL/dA = s (G B)^T x; W, b get none."""
    model = tiny(llm)
    n = lora.add_adapters(model, r=4, alpha=8, targets="all")
    assert n == len(model.llm.layers) * (7 if llm == "qwen" else 6)  # q k v o gate up down | q k v dense fc1 fc2
    randomize_adapters(model)  # B = 0 at init would make dL/dA zero
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            m.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, [args[0].detach()]))
            m.register_full_backward_hook(lambda m, gin, gout, name=name: seen[name].append(gout[0]))
    model(batch())[1].backward()
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            x, G = (t.reshape(-1, t.shape[-1]).double() for t in seen[name])
            A, B = m.lora_A.double(), m.lora_B.double()
            torch.testing.assert_close(m.lora_B.grad.double(), m.scale * G.T @ (x @ A.T), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(m.lora_A.grad.double(), m.scale * (G @ B).T @ x, rtol=1e-4, atol=1e-7)
            assert m.weight.grad is None and (m.bias is None or m.bias.grad is None), name
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == set(lora.trainable(model)) == {n for n, _ in model.named_parameters()
                                                    if n.endswith(("lora_A", "lora_B")) or n.startswith("llm_proj.")}


@pytest.mark.parametrize("llm", ["qwen", "phi"])
def test_a_fresh_adapter_changes_nothing_and_a_merge_keeps_the_logits(llm, one_thread):
    model, b = tiny(llm).eval(), batch()
    base_keys = set(model.state_dict())
    with torch.no_grad():
        want = model(b)[0]
        lora.add_adapters(model, r=4, alpha=16, targets="q_proj,v_proj,fc2" if llm == "phi" else "q_proj,v_proj,down_proj")
        assert torch.equal(model(b)[0], want)  # B = 0
        randomize_adapters(model)
        adapted = model(b)[0]
        assert (adapted - want).abs().max() > 1e-2  # the adapters matter
        lora.merge(model)
        torch.testing.assert_close(model(b)[0], adapted, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == base_keys and not any(isinstance(m, lora.LoRALinear) for m in model.modules())


def test_bad_targets_are_refused_naming_the_blocks_linears():
    with pytest.raises(ValueError, match=r"targets among the decoder blocks' Linears \['dense', 'fc1', 'fc2', 'k_proj', "
                                         r"'q_proj', 'v_proj'\] \(or 'all'\), got lora_r=4, lora_targets='q_proj,o_proj'"):
        lora.add_adapters(tiny("phi"), r=4, alpha=8, targets="q_proj,o_proj")  # Phi calls o_proj `dense`
    with pytest.raises(ValueError, match="LoRA needs lora_r >= 1"):
        lora.add_adapters(tiny(), r=0, alpha=8, targets="all")


def test_fingerprint_ignores_dtype_and_sees_a_changed_tensor():
    state = {k: v.clone() for k, v in ckpt.state_of(tiny()).items()}
    fp = lora.fingerprint(state)
    assert lora.fingerprint({k: v.to(torch.bfloat16).float() for k, v in state.items()}) == \
        lora.fingerprint({k: v.to(torch.bfloat16) for k, v in state.items()})
    assert lora.fingerprint(state) == fp
    state["llm.layers.1.mlp.up_proj.weight"] += 1e-3
    assert lora.fingerprint(state) != fp
