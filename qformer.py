"""
The query path of the BLIP-2 Q-Former (Li et al. 2023), as MiniGPT-4 / MiniGPT4Qwen use it.

BLIP-2's Q-Former is a BERT-base whose layers also cross-attend to the image. For feeding an LLM
only the 32 learned query tokens go through it, so this file keeps just that path:

    image tokens -> ln_vision (fp32)                                   -> cross-attention keys/values
    query_tokens -> LayerNorm -> 12 x [self-attn, cross-attn (layers 0, 2, 4, ...), query FFN]

Every sub-layer is post-norm BERT style: norm(x + dense(f(x))), LayerNorm eps 1e-12, exact GELU.
The text-path pieces (word/position embeddings, the text FFN `intermediate`/`output`, the LM head)
are not built; convert.py ignores their checkpoint keys by an explicit list.

`ln_vision` (LayerNorm over the ViT output, eps 1e-5) lives here, not in vit.py: in LAVIS it is a
separate module trained with the Q-Former and stored in the BLIP-2 checkpoint, not in
eva_vit_g.pth, and it only ever feeds the Q-Former.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """BERT attention + its output sub-layer: norm(x + dense(attend(x -> context)))."""

    def __init__(self, hidden, n_head, kv_width):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, context):
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_head, -1).transpose(1, 2)
        k = self.key(context).view(B, context.shape[1], self.n_head, -1).transpose(1, 2)
        v = self.value(context).view(B, context.shape[1], self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # queries and image tokens: no mask
        return self.norm(x + self.dense(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """The query FFN (LAVIS `intermediate_query` + `output_query`): norm(x + fc2(gelu(fc1(x))))."""

    def __init__(self, hidden, ffn):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x):
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class Layer(nn.Module):
    def __init__(self, config, cross):
        super().__init__()
        self.self_attn = Attention(config.hidden, config.n_head, config.hidden)
        self.cross_attn = Attention(config.hidden, config.n_head, config.encoder_width) if cross else None
        self.mlp = MLP(config.hidden, config.ffn)

    def forward(self, x, image_embeds):
        x = self.self_attn(x, x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image_embeds)
        return self.mlp(x)


@dataclass
class QFormerConfig:
    hidden: int = 768          # BERT-base
    n_layer: int = 12
    n_head: int = 12
    ffn: int = 3072
    num_query: int = 32
    encoder_width: int = 1408  # width of the ViT tokens the queries cross-attend to
    cross_every: int = 2       # cross-attention on layers 0, cross_every, 2*cross_every, ...

    @staticmethod
    def preset(name, **overrides):
        if name not in QFORMER_PRESETS:
            raise ValueError(f"unknown Q-Former preset {name!r}; choose from {sorted(QFORMER_PRESETS)}")
        return QFormerConfig(**{**QFORMER_PRESETS[name], **overrides})


QFORMER_PRESETS = {
    "blip2": dict(),
    "tiny": dict(hidden=64, n_layer=2, n_head=4, ffn=256, num_query=8, encoder_width=64),
}


class QFormer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.ln_vision = nn.LayerNorm(config.encoder_width)  # eps 1e-5 (torch default), as LAVIS
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query, config.hidden))
        self.norm = nn.LayerNorm(config.hidden, eps=1e-12)  # BERT embeddings.LayerNorm
        self.layers = nn.ModuleList(Layer(config, cross=i % config.cross_every == 0) for i in range(config.n_layer))
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=0.02)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, image_embeds):
        """image_embeds [B, N, encoder_width] (raw ViT tokens) -> query outputs [B, num_query, hidden]."""
        w, b = self.ln_vision.weight, self.ln_vision.bias
        # ln_vision in fp32 whatever the ViT ran in (LAVIS's fp16-safe LayerNorm), then to the
        # Q-Former's own dtype so a bf16/fp16 ViT can feed an fp32 Q-Former.
        image_embeds = F.layer_norm(image_embeds.float(), w.shape, w.float(), b.float(), self.ln_vision.eps)
        image_embeds = image_embeds.to(self.query_tokens.dtype)
        x = self.norm(self.query_tokens.expand(image_embeds.shape[0], -1, -1))
        for layer in self.layers:
            x = layer(x, image_embeds)
        return x
