"""
Phi-2 (HF `PhiForCausalLM`) and the TinyGPT-V variant of it.

Phi-2 is a parallel decoder: one LayerNorm feeds both attention and the MLP, x + attn(h) + mlp(h).
Rotary covers only the first 32 of 80 channels per head, the MLP is gelu (tanh approximation),
every Linear has a bias (lm_head too), and attention scores are computed in fp32.
TinyGPT-V (`tinygptv=True`) adds a per-head LayerNorm on q and k before rotary and an RMSNorm on
the attention output; its fused per-head-interleaved `query_key_value` is split by convert.py.

Rotary, the KV cache, attention and the model top (forward, cache, generate) come from qwen.py.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen import DecoderLM, RMSNorm, Rotary, apply_rope, attend


class PhiAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.dense = nn.Linear(self.n_head * self.head_dim, config.n_embd)
        self.qk_layernorm = config.tinygptv
        if self.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if x.dtype != torch.float32:  # Phi-2 overflows fp16 scores: attend in fp32
            y = attend(q.float(), k.float(), v.float(), ctx, self.layer).to(x.dtype)
        else:
            y = attend(q, k, v, ctx, self.layer)
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))


class PhiMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.n_embd, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # HF "gelu_new"


class PhiBlock(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config, layer)
        self.mlp = PhiMLP(config)
        # TinyGPT-V normalises the attention branch (LlamaRMSNorm, eps 1e-6) before the sum
        self.post_layernorm = RMSNorm(config.n_embd, 1e-6) if config.tinygptv else nn.Identity()

    def forward(self, x, ctx):
        h = self.input_layernorm(x)
        return x + self.post_layernorm(self.self_attn(h, ctx)) + self.mlp(h)


@dataclass
class PhiConfig:
    vocab_size: int = 51200
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    n_embd: int = 2560
    intermediate_size: int = 10240
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.4  # rotary on the first 0.4 * 80 = 32 channels of each head
    max_seq_len: int = 2048
    layer_norm_eps: float = 1e-5
    tinygptv: bool = False  # TinyGPT-V: q/k LayerNorm per head + RMSNorm on the attention output

    @staticmethod
    def preset(name):
        if name not in PHI_PRESETS:
            raise ValueError(f"unknown Phi preset {name!r}; choose from {sorted(PHI_PRESETS)}")
        return PhiConfig(**PHI_PRESETS[name])


PHI_PRESETS = {
    "phi-2": dict(),
    "tinygptv": dict(tinygptv=True),
    "tiny": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, intermediate_size=256),
}


class Phi(DecoderLM):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(PhiBlock(config, i) for i in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(self._init_weights)
        head_dim = config.n_embd // config.n_head
        self.rotary = Rotary(int(head_dim * config.partial_rotary_factor), config.rope_theta)
        self.ntk_len = None

    def new_cache(self, batch_size, max_len, dtype=None, device=None):
        """Attention runs in fp32 (above), so the cache keeps fp32 keys/values whatever the weights."""
        return super().new_cache(batch_size, max_len, torch.float32, device)
