"""Lesson 10, reference answers."""
import re

# per layer: q, k, v with biases 3 * (4096 * 4096 + 4096), o_proj 4096 * 4096, MLP 3 * 4096 * 11008,
# two RMSNorms 2 * 4096; plus embeddings and lm_head 2 * 151936 * 4096 and the final norm 4096
QWEN7B_BILLIONS = round((32 * (4 * 4096 * 4096 + 3 * 4096 + 3 * 4096 * 11008 + 2 * 4096)
                         + 2 * 151936 * 4096 + 4096) / 1e9, 2)

_RULES = [
    (r"transformer\.wte\.weight", "embed_tokens.weight"),
    (r"transformer\.h\.(\d+)\.ln_1\.weight", r"layers.\1.input_layernorm.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", r"layers.\1.self_attn.o_proj.weight"),
    (r"transformer\.h\.(\d+)\.ln_2\.weight", r"layers.\1.post_attention_layernorm.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.w1\.weight", r"layers.\1.mlp.up_proj.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.w2\.weight", r"layers.\1.mlp.gate_proj.weight"),   # w2 is the gated branch
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", r"layers.\1.mlp.down_proj.weight"),
    (r"transformer\.ln_f\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def qwen1_to_ours(key):
    for pattern, target in _RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target)
    raise KeyError(key)
