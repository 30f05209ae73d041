"""phi.py against HF PhiForCausalLM: partial rotary, parallel block, biases everywhere; the
TinyGPT-V variant (per-head-interleaved fused query_key_value, q/k LayerNorm, RMSNorm on the
attention output) against HF Phi with qk_layernorm plus that RMSNorm hooked in; Phi-2 size."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from convert import llm_from_hf  # noqa: E402
from model import load_llm, save_llm  # noqa: E402
from phi import Phi, PhiConfig  # noqa: E402
from conftest import V, check_parity, prompts, randomize, save_hf  # noqa: E402


def hf_phi(qk_layernorm=False, seed=0):
    cfg = transformers.PhiConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.4,
                                 qk_layernorm=qk_layernorm, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(seed)
    m = randomize(transformers.PhiForCausalLM(cfg), seed)
    assert m.model.layers[0].self_attn.rotary_ndims == 6  # partial: 6 of 16 channels per head
    return m


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_phi_parity(tmp_path, fmt):
    ref = hf_phi()
    save_hf(ref, tmp_path / "hf", fmt)
    ours, config = llm_from_hf(str(tmp_path / "hf"), "phi")
    assert not config.tinygptv and ours.lm_head.bias is not None
    check_parity(ref, ours.eval())
    save_llm(str(tmp_path / "ours"), ours)
    again = load_llm(str(tmp_path / "ours"))
    idx = prompts()
    with torch.no_grad():
        assert torch.equal(again.eval()(idx)[0], ours(idx)[0])


def export_tinygptv(ref, d, seed=7):
    """HF Phi (qk_layernorm) -> TinyGPT-V keys: q/k/v fused per head as [head, (q|k|v), head_dim],
    plus a random `post_layernorm` RMSNorm weight per layer (returned so the reference can use it)."""
    sd, c = ref.state_dict(), ref.config
    H = c.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    out, post = {}, []
    for k, v in sd.items():
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        if ".self_attn.q_proj." in k:
            parts = [sd[k.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")]
            fused = torch.stack([p.view(H, -1, *p.shape[1:]) for p in parts], 1)
            out[k.replace("q_proj", "query_key_value")] = fused.reshape(-1, *parts[0].shape[1:])
        else:
            out[k] = v
    for i in range(c.num_hidden_layers):
        w = 1 + 0.1 * torch.randn(c.hidden_size, generator=g)
        out[f"model.layers.{i}.post_layernorm.weight"] = w
        post.append(w)
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "model.safetensors"))
    c.save_pretrained(d)
    return post


def test_tinygptv_variant(tmp_path):
    ref = hf_phi(qk_layernorm=True, seed=2)
    post = export_tinygptv(ref, tmp_path / "tgv")
    with open(tmp_path / "tgv" / "config.json") as f:
        assert json.load(f)["qk_layernorm"] is True

    def rms_hook(w):  # TinyGPT-V's LlamaRMSNorm(eps 1e-6) on the attention output
        def hook(module, args, output):
            y = output[0]
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w
            return (y, *output[1:])
        return hook

    for layer, w in zip(ref.model.layers, post):
        layer.self_attn.register_forward_hook(rms_hook(w))
    ours, config = llm_from_hf(str(tmp_path / "tgv"), "phi")
    assert config.tinygptv
    check_parity(ref, ours.eval())


def test_phi2_parameter_count():
    with torch.device("meta"):
        m = Phi(PhiConfig.preset("phi-2"))
        t = Phi(PhiConfig.preset("tinygptv"))
    n = sum(p.numel() for p in m.parameters())
    assert round(n / 1e9, 2) == 2.78
    # TinyGPT-V adds q/k LayerNorms (2 x 2 x 80) and one RMSNorm (2560) per layer
    assert sum(p.numel() for p in t.parameters()) - n == 32 * (4 * 80 + 2560)


def test_phi_bf16_close_to_fp32():
    """bf16 weights run end to end and stay close to the fp32 logits."""
    torch.manual_seed(0)
    m = Phi(PhiConfig.preset("tiny")).eval()
    idx = prompts() % 512
    with torch.no_grad():
        want = m(idx)[0]
        got = m.to(torch.bfloat16)(idx)[0]
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05
