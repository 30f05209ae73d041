"""
The Qwen family of decoders in one file: Qwen v1 (Qwen-7B-Chat, Qwen-14B-Chat),
Qwen1.5 / Qwen2 / Qwen2.5 (HF `Qwen2ForCausalLM`) and, as a third layout, LLaMA / Vicuna
(HF `LlamaForCausalLM`, MiniGPT-4's LLM), which is Qwen2 without the q/k/v biases.

Both are pre-norm RMSNorm decoders with rotary attention (q/k/v with bias, output without) and a
SwiGLU MLP. v1 fuses q/k/v into one `c_attn` on disk (convert.py splits it) and, at inference
beyond its training length `seq_length`, stretches rotary with dynamic NTK and scales queries by
log-n (Qwen's own code). Qwen2 adds grouped-query attention and, for small sizes, tied embeddings.

Parameter names follow HF Qwen2 (= HF LLaMA), so either checkpoint loads by stripping `model.`.
The shared pieces (Rotary, KVCache, the mask/position logic and the `DecoderLM` top) are reused by
phi.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- shared pieces

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 and round before the weight, as both Qwen versions do; one fused op
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def ntk_alpha(length, seq_length):
    """Qwen v1 dynamic-NTK factor for a sequence of `length` tokens (1 within seq_length)."""
    return max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1)


class Rotary:
    """Rotate-half RoPE over the first `dim` channels of each head. Angles are computed in fp32
    (position * inv_freq, as HF does), tabulated for positions 0..n-1 and cached per dtype; a
    dynamic-NTK `alpha` stretches the base (base * alpha^(dim/(dim-2)))."""

    def __init__(self, dim, theta):
        self.dim, self.theta = dim, theta
        self._tables = {}  # (device, dtype) -> (cos, sin) [n, dim]

    def inv_freq(self, alpha=1.0, device=None):
        base = self.theta * alpha ** (self.dim / (self.dim - 2))
        return 1.0 / base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim)

    def table(self, n, device, dtype):
        """cos, sin [>=n, dim] for positions 0, 1, ..."""
        cos, sin = self._tables.get((device, dtype), (None, None))
        # a table made under torch.inference_mode cannot be saved for a later backward
        if cos is None or cos.shape[0] < n or (cos.is_inference() and not torch.is_inference_mode_enabled()):
            n = max(n, 2 * (0 if cos is None else cos.shape[0]), 256)  # grow geometrically
            freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), self.inv_freq(device=device))
            emb = torch.cat((freqs, freqs), -1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            self._tables[(device, dtype)] = (cos, sin)
        return cos, sin

    def __call__(self, position_ids, dtype, alpha=None):
        """cos, sin [B, 1, T, dim] for position_ids [B, T]; alpha [B] = per-row NTK factors."""
        if alpha is None:
            cos, sin = self.table(int(position_ids.max()) + 1, position_ids.device, dtype)
            return cos[position_ids][:, None], sin[position_ids][:, None]
        inv = torch.stack([self.inv_freq(float(a), position_ids.device) for a in alpha])  # [B, dim/2]
        freqs = position_ids.float()[:, :, None] * inv[:, None, :]
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, H, T, head_dim]; rotates the first cos.shape[-1] channels, passes the rest (Phi)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class KVCache:
    """Keys/values of every layer, allocated once: [n_layer, B, n_kv_head, max_len, head_dim].
    Each forward writes its T new positions at `len` and the model then advances `len`."""

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(n_layer, batch_size, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.per_layer = list(zip(self.k, self.v))  # views, so a decode step does no indexing
        self.len = 0
        self.ntk_alpha = None  # Qwen v1 fixes the NTK factor at prefill, as its own code does

    def update(self, layer, k, v):
        end = self.len + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache full: {end} positions needed, {self.k.shape[3]} allocated")
        k_all, v_all = self.per_layer[layer]
        k_all[:, :, self.len:end] = k
        v_all[:, :, self.len:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]


@dataclass
class Ctx:
    """What every block of one forward needs."""
    cos: torch.Tensor  # [T, rot] or [B, 1, T, rot]
    sin: torch.Tensor
    mask: torch.Tensor | None  # bool [B, 1, T, L]; None = plain causal (nothing to mask if T == 1)
    logn: torch.Tensor | None  # Qwen v1 query scale [B, 1, T, 1] beyond seq_length at inference
    cache: KVCache | None


def attend(q, k, v, ctx, layer):
    """Append k/v to the cache (if any) and run scaled_dot_product_attention; GQA heads shared."""
    if ctx.cache is not None:
        k, v = ctx.cache.update(layer, k, v)
    causal = ctx.mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])

# ----------------------------------------------------------------------------- loss and sampling

IGNORE = -100  # label of unsupervised positions (padding, prompts, image tokens)


def supervised(labels):
    """bool [B, T-1]: the positions t whose next label labels[t + 1] is supervised."""
    return labels[:, 1:] != IGNORE


def loss_sum(logits, labels, loss_norm="token"):
    """Summed loss of one (micro)batch; divide by the step's count of supervised tokens (or samples)
    to get the mean. labels are aligned with the inputs (not shifted): position t predicts
    labels[t + 1]. logits [B, T, V] at every position, or [N, V] at only the N positions of
    supervised(labels), in reading order (training needs no others). 'token': sum of the token
    cross-entropies (MiniGPT4Qwen). 'sample': sum over samples of each sample's mean token
    cross-entropy, so long answers do not outweigh short ones."""
    sup = supervised(labels)
    if logits.dim() == 3:
        logits = logits[:, :-1][sup]  # [N, V]
    ce = F.cross_entropy(logits.float(), labels[:, 1:][sup], reduction="none")  # [N]
    if loss_norm == "token":
        return ce.sum()
    per_row = ce.new_zeros(sup.shape[0]).index_add(0, sup.nonzero()[:, 0], ce)  # [B] summed per sample
    return (per_row / sup.sum(1).clamp(min=1)).sum()


def apply_repetition_penalty(logits, seen, penalty):
    """HF's (CTRL's) rule: for every token already in the sequence (seen [B, V] bool), divide a
    positive logit by `penalty` and multiply a negative one; penalty > 1 discourages repeats."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k logits of each row [B, V], then the smallest set of most likely tokens whose
    probability reaches top_p (HF's top-k / top-p warpers); the rest become -inf."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the more likely tokens already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token per row from logits [B, V]: argmax when temperature == 0, else sample from the
    tempered distribution after filter_logits."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

# ----------------------------------------------------------------------------- the decoder top


class DecoderLM(nn.Module):
    """The top of a decoder-only LM, shared by Qwen and Phi. Subclasses build `embed_tokens`,
    `layers`, `norm`, `lm_head`, `rotary`, and set `ntk_len` (Qwen v1's seq_length) or None."""

    grad_checkpointing = False  # recompute each block in backward to save activation memory

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _ntk(self, x, position_ids, attention_mask, cache, start, L):
        """Qwen v1 at inference beyond seq_length: the dynamic-NTK factors per row (fixed at prefill
        and kept in the cache) and the log-n query scale; (None, None) otherwise."""
        if self.ntk_len is None or self.training:
            return None, None
        if cache is not None and start > 0:
            alpha = cache.ntk_alpha
        else:
            lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else [L] * x.shape[0]
            alpha = [ntk_alpha(n, self.ntk_len) for n in lengths] if max(lengths) > self.ntk_len else None
            if cache is not None:
                cache.ntk_alpha = alpha
        logn = None
        if (L if position_ids is None else int(position_ids.max()) + 1) > self.ntk_len:
            n = (torch.arange(start, L, device=x.device)[None] if position_ids is None else position_ids).double() + 1
            logn = torch.where(n > self.ntk_len, n.log() / math.log(self.ntk_len), 1.0)
            logn = logn.to(x.dtype)[:, None, :, None]
        return alpha, logn

    @staticmethod
    def _mask(attention_mask, T, start, L, device):
        """Boolean attention mask [B, 1, T, L], or None for the plain causal case."""
        if attention_mask is not None and start == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            # right padding (collate's layout): a real token's earlier keys are all real, so plain
            # causal attention is exact at every real position, and faster; nothing reads the pads'
            attention_mask = None
        if attention_mask is None and (T == 1 or start == 0):
            return None
        q_idx = torch.arange(start, L, device=device)[:, None]
        k_idx = torch.arange(L, device=device)
        mask = (k_idx <= q_idx)[None, None]
        if attention_mask is not None:
            # a padded query attends to itself only, so no row is empty (sdpa would give NaN)
            mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_idx == q_idx)
        return mask

    def _ctx(self, x, position_ids, attention_mask, cache):
        B, T, _ = x.shape
        start = cache.len if cache is not None else 0
        L = start + T
        if attention_mask is not None:
            if attention_mask.shape != (B, L):
                raise ValueError(f"attention_mask must be [B, cached + new] = {(B, L)}, got {tuple(attention_mask.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None  # nothing padded: take the fast causal path
        if position_ids is None and attention_mask is not None:  # left padding: count real tokens
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        alpha, logn = self._ntk(x, position_ids, attention_mask, cache, start, L)
        if position_ids is None and alpha is None:  # positions start..L-1 in every row: a table slice
            cos, sin = self.rotary.table(L, x.device, x.dtype)
            cos, sin = cos[start:L], sin[start:L]
        else:
            if position_ids is None:
                position_ids = torch.arange(start, L, device=x.device).expand(B, T)
            cos, sin = self.rotary(position_ids, x.dtype, alpha)
        return Ctx(cos, sin, self._mask(attention_mask, T, start, L, x.device), logn, cache)

    def forward_blocks(self, x, blocks, position_ids=None, attention_mask=None):
        """Run `blocks` (any slice of self.layers) on hidden states x [B, T, C], without cache."""
        ctx = self._ctx(x, position_ids, attention_mask, None)
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return x

    def head(self, x):
        return self.lm_head(self.norm(x))

    def hidden(self, idx=None, inputs_embeds=None, position_ids=None, attention_mask=None, cache=None):
        """Final hidden states before `head`; advances the cache."""
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        if cache is None:  # training takes this path, the one the pipeline stages share
            return self.forward_blocks(x, self.layers, position_ids, attention_mask)
        ctx = self._ctx(x, position_ids, attention_mask, cache)
        for block in self.layers:
            x = block(x, ctx)
        cache.len += x.shape[1]
        return x

    def forward(self, idx=None, labels=None, inputs_embeds=None, position_ids=None, attention_mask=None, cache=None):
        """-> (logits [B, T, V], mean loss over supervised tokens). labels are aligned with idx, as
        everywhere in nanoMPP: position t predicts labels[t + 1]; IGNORE positions are skipped."""
        logits = self.head(self.hidden(idx, inputs_embeds, position_ids, attention_mask, cache))
        if labels is None:
            return logits, None
        return logits, loss_sum(logits, labels) / (labels[:, 1:] != IGNORE).sum().clamp(min=1)

    def new_cache(self, batch_size, max_len, dtype=None, device=None):
        attn = self.layers[0].self_attn
        p = self.embed_tokens.weight
        return KVCache(len(self.layers), batch_size, attn.n_kv_head, max_len, attn.head_dim,
                       dtype or p.dtype, device or p.device)

    @torch.no_grad()
    def generate(self, input_ids, inputs_embeds=None, attention_mask=None, max_new_tokens=512, temperature=0.0,
                 top_k=None, top_p=None, repetition_penalty=1.0, stop_ids=(), stream=None, seed=None,
                 generator=None):
        """The one decode loop (model.py's MultimodalLM.generate passes its spliced embeddings).

        Continues every row of input_ids [B, T], LEFT-padded (attention_mask 0 on the left pads),
        with the pre-allocated KV cache; inputs_embeds [B, T, C] replaces the token embeddings of
        the prompt. A row ends at its first stop token (not included in the output) or after
        max_new_tokens. `stream(tokens)` is called after each step that extended a row, one entry
        per row: its new token id, or None if it has finished. `seed` makes sampling reproducible
        (or pass a torch.Generator). Returns B lists of new token ids."""
        B, T = input_ids.shape
        dev = input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev, torch.long)
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("generate needs LEFT padding: attention_mask has a 0 after a 1")
        if seed is not None:
            generator = torch.Generator(dev).manual_seed(seed)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = self.new_cache(B, T + max_new_tokens, dtype=x.dtype, device=dev)
        # positions count real tokens only, so left padding changes nothing; only the last
        # position's logits are needed
        logits = self.head(self.hidden(inputs_embeds=x, attention_mask=mask, cache=cache)[:, -1])
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=dev)
        rows, cols = mask.nonzero(as_tuple=True)
        seen[rows, input_ids[rows, cols]] = True  # the repetition penalty counts the prompt, not pads
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out = [[] for _ in range(B)]
        for step in range(max_new_tokens):
            logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            done = done | torch.isin(tok, stop)
            new = [None if d else t for t, d in zip(tok.tolist(), done.tolist())]
            for row, t in zip(out, new):
                if t is not None:
                    row.append(t)
            if stream is not None and any(t is not None for t in new):
                stream(new)
            if done.all() or step == max_new_tokens - 1:
                break
            seen[torch.arange(B, device=dev), tok] = True
            mask = torch.cat((mask, mask.new_ones(B, 1)), 1)
            logits = self.head(self.hidden(tok[:, None], attention_mask=mask, cache=cache)[:, -1])
        return out


# ----------------------------------------------------------------------------- Qwen

class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        bias = config.version != "llama"  # Qwen biases q/k/v; LLaMA has no bias anywhere
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.logn is not None:
            q = q * ctx.logn
        y = attend(q, k, v, ctx, self.layer)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); Qwen v1 calls these w2, w1, c_proj."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x, ctx):
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    n_layer: int = 24
    n_head: int = 14
    n_kv_head: int = 2  # < n_head: grouped-query attention (Qwen2); v1 has n_kv_head == n_head
    n_embd: int = 896
    intermediate_size: int = 4864  # MLP width; Qwen v1's HF config states twice this
    rope_theta: float = 1e6
    max_seq_len: int = 32768  # v1: `seq_length`, beyond which dynamic NTK + log-n apply at inference
    tie_embeddings: bool = True
    version: str = "qwen2"  # 'qwen1' | 'qwen2' (Qwen1.5 / 2 / 2.5) | 'llama' (qwen2 without biases)
    rms_eps: float = 1e-6  # LLaMA-1 / Vicuna 1e-6, LLaMA-2 1e-5

    @staticmethod
    def preset(name):
        if name not in QWEN_PRESETS:
            raise ValueError(f"unknown Qwen preset {name!r}; choose from {sorted(QWEN_PRESETS)}")
        return QwenConfig(**QWEN_PRESETS[name])


_QWEN1 = dict(rope_theta=10000.0, tie_embeddings=False, version="qwen1")
_LLAMA = dict(vocab_size=32000, rope_theta=10000.0, max_seq_len=2048, tie_embeddings=False, version="llama")
QWEN_PRESETS = {
    "qwen7b_chat": dict(_QWEN1, vocab_size=151936, n_layer=32, n_head=32, n_kv_head=32, n_embd=4096,
                        intermediate_size=11008, max_seq_len=8192),
    "qwen14b_chat": dict(_QWEN1, vocab_size=152064, n_layer=40, n_head=40, n_kv_head=40, n_embd=5120,
                         intermediate_size=13696, max_seq_len=2048),
    "qwen2.5-0.5b": dict(),
    "qwen2.5-1.5b": dict(n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, intermediate_size=8960),
    "qwen2.5-7b": dict(vocab_size=152064, n_layer=28, n_head=28, n_kv_head=4, n_embd=3584,
                       intermediate_size=18944, tie_embeddings=False),
    # LLaMA-7B / -13B shapes (Vicuna v1.1+, MiniGPT-4's LLM): 32000 sentencepiece tokens, 2048 positions
    # (the Vicuna v0 delta has 32001 rows, FastChat's pad token; convert.py reads the size from config.json)
    "vicuna-7b": dict(_LLAMA, n_layer=32, n_head=32, n_kv_head=32, n_embd=4096, intermediate_size=11008),
    "vicuna-13b": dict(_LLAMA, n_layer=40, n_head=40, n_kv_head=40, n_embd=5120, intermediate_size=13824),
    "tiny": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128,
                 max_seq_len=1024),
}


class Qwen(DecoderLM):
    def __init__(self, config):
        super().__init__()
        if config.version not in ("qwen1", "qwen2", "llama"):
            raise ValueError(f"QwenConfig.version must be 'qwen1', 'qwen2' or 'llama', got {config.version!r}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.rms_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config.n_embd // config.n_head, config.rope_theta)
        self.ntk_len = config.max_seq_len if config.version == "qwen1" else None
