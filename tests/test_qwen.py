"""qwen.py against HF Qwen2ForCausalLM (the reference): random tiny models saved as HF checkpoints
(sharded safetensors, .bin shards), converted, then logits, greedy tokens, KV cache and left
padding compared; the Qwen v1 layout via an export of the MHA reference; dynamic NTK + log-n;
full-size presets counted on the meta device."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from conftest import LAYOUTS, V, check_parity, hf_qwen2, prompts, randomize, save_hf  # noqa: E402
from convert import llm_from_hf  # noqa: E402
from model import load_llm, save_llm  # noqa: E402
from qwen import IGNORE, QWEN_PRESETS, Qwen, QwenConfig, Rotary, ntk_alpha  # noqa: E402

@LAYOUTS
def test_qwen2_parity(tmp_path, n_kv, tied, fmt):
    ref = hf_qwen2(n_kv, tied)
    save_hf(ref, tmp_path / "hf", fmt)
    ours, config = llm_from_hf(str(tmp_path / "hf"), "qwen2")
    assert (config.n_kv_head, config.tie_embeddings) == (n_kv, tied)
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    check_parity(ref, ours.eval())
    # our checkpoint round trip
    save_llm(str(tmp_path / "ours"), ours)
    again = load_llm(str(tmp_path / "ours"))
    assert again.config == config
    idx = prompts()
    with torch.no_grad():
        assert torch.equal(again.eval()(idx)[0], ours(idx)[0])


def export_qwen1(ref, d, seq_length):
    """Write an MHA Qwen2 reference in the Qwen v1 (remote-code) key layout and config."""
    sd, c = ref.state_dict(), ref.config
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for t in ("weight", "bias"):
            out[h + f"attn.c_attn.{t}"] = torch.cat([sd[p + f"self_attn.{n}_proj.{t}"] for n in "qkv"])
        out[h + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[h + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[h + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[h + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        out[h + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[h + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "model.safetensors"))
    cfg = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
               num_attention_heads=c.num_attention_heads, intermediate_size=2 * c.intermediate_size,
               seq_length=seq_length, rotary_emb_base=10000, rotary_pct=1.0, layer_norm_epsilon=1e-6,
               use_dynamic_ntk=True, use_logn_attn=True, kv_channels=c.hidden_size // c.num_attention_heads)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_qwen1_layout_parity(tmp_path):
    ref = hf_qwen2(4, False, seed=3)
    export_qwen1(ref, tmp_path / "v1", seq_length=256)
    ours, config = llm_from_hf(str(tmp_path / "v1"), "qwen1")
    assert (config.version, config.intermediate_size, config.max_seq_len) == ("qwen1", 128, 256)
    check_parity(ref, ours.eval())  # within seq_length, v1 is plain rope


def test_ntk_alpha_formula():
    S = 2048
    assert [ntk_alpha(n, S) for n in (1, S // 2, S, S + 1, 2 * S, 2 * S + 1, 4 * S, 4 * S + 1)] == [1, 1, 1, 3, 3, 7, 7, 15]
    # the stretched base: base * alpha^(d/(d-2))
    pos = torch.arange(40)[None]
    cos, sin = Rotary(16, 10000.0)(pos, torch.float32, alpha=[3])
    cos2, sin2 = Rotary(16, 10000.0 * 3 ** (16 / 14))(pos, torch.float32)
    torch.testing.assert_close((cos, sin), (cos2, sin2))


def v1_reference(m, idx, S):
    """Qwen v1 inference beyond seq_length, written out eagerly: NTK base, log-n, causal softmax."""
    B, T = idx.shape
    hd, H = m.config.n_embd // m.config.n_head, m.config.n_head
    base = m.config.rope_theta * ntk_alpha(T, S) ** (hd / (hd - 2))
    inv = 1.0 / base ** (torch.arange(0, hd, 2).float() / hd)
    f = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    logn = torch.tensor([math.log(i + 1, S) if i + 1 > S else 1.0 for i in range(T)])[:, None]

    def rope(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = m.embed_tokens(idx)
    for blk in m.layers:
        a, h = blk.self_attn, blk.input_layernorm(x)
        q, k, v = (p(h).view(B, T, H, hd).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = rope(q) * logn, rope(k)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + a.o_proj((att @ v).transpose(1, 2).reshape(B, T, -1))
        x = x + blk.mlp(blk.post_attention_layernorm(x))
    return m.head(x)


def test_qwen1_dynamic_ntk_logn_beyond_seq_length():
    torch.manual_seed(0)
    S = 16
    v1 = randomize(Qwen(QwenConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, intermediate_size=128,
                                   rope_theta=10000.0, max_seq_len=S, tie_embeddings=False, version="qwen1")), 5)
    v2 = Qwen(QwenConfig(**{**v1.config.__dict__, "version": "qwen2"})).eval()
    v2.load_state_dict(v1.state_dict())
    short, long = prompts(2, S), prompts(2, 2 * S + 3)
    with torch.no_grad():
        assert torch.equal(v1(short)[0], v2(short)[0])  # identical to plain rope within seq_length
        got = v1(long)[0]
        torch.testing.assert_close(got, v1_reference(v1, long, S), atol=1e-5, rtol=0)
        assert (got - v2(long)[0]).abs().max() > 1e-3
        v1.train(), v2.train()  # training never stretches
        assert torch.equal(v1(long)[0], v2(long)[0])


# published sizes: Qwen-7B 7.72B, Qwen-14B 14.17B, Qwen2.5-0.5B 0.49B, -1.5B 1.54B, -7B 7.62B
@pytest.mark.parametrize("name,billions", [("qwen7b_chat", 7.72), ("qwen14b_chat", 14.17), ("qwen2.5-0.5b", 0.49),
                                           ("qwen2.5-1.5b", 1.54), ("qwen2.5-7b", 7.62)])
def test_preset_parameter_counts(name, billions):
    with torch.device("meta"):
        m = Qwen(QwenConfig.preset(name))
    assert round(sum(p.numel() for p in m.parameters()) / 1e9, 2) == billions


def test_tiny_preset_trains():
    """The toy preset: loss decreases on a memorised batch; IGNORE labels are skipped; generating
    under inference_mode first leaves nothing (rotary tables) that breaks a later backward."""
    torch.manual_seed(0)
    m = Qwen(QwenConfig.preset("tiny"))
    with torch.inference_mode():
        m.generate(prompts(1, 8) % 512, max_new_tokens=2)
    assert set(QWEN_PRESETS) >= {"qwen7b_chat", "qwen14b_chat", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "tiny"}
    idx = prompts(2, 16) % 512
    labels = idx.clone()  # aligned: position t predicts labels[t + 1]
    labels[:, 5] = IGNORE
    logits, loss = m(idx, labels)
    keep = torch.ones(2, 15, dtype=torch.bool)
    keep[:, 4] = False  # the prediction of position 5 is skipped
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, :-1][keep], idx[:, 1:][keep]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        _, l2 = m(idx, labels)
        l2.backward()
        opt.step()
    assert l2.item() < loss.item() / 2


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = Qwen(QwenConfig.preset("tiny"))
    idx = prompts(2, 16) % 512
    grads, saved = [], []
    for on in (False, True):
        m.grad_checkpointing = on
        m.zero_grad()
        n = [0]
        def pack(t):
            n[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(idx, idx)[1]
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        saved.append(n[0])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert saved[1] < saved[0] / 2, saved  # only block inputs are kept for the backward


def test_right_padding_takes_the_causal_path_and_keeps_real_positions_exact():
    """collate pads on the right: no mask is built (plain causal attention), and every real
    position's logits equal its row run alone. Left padding (generation) still gets a mask."""
    torch.manual_seed(0)
    m = Qwen(QwenConfig.preset("tiny")).eval()
    lens = [16, 11, 5]
    rows = [prompts(1, n, seed=n)[0] % 512 for n in lens]
    idx, mask = torch.zeros(3, 16, dtype=torch.long), torch.zeros(3, 16, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, lens)):
        idx[i, :n], mask[i, :n] = r, 1
    assert m._mask(mask, 16, 0, 16, "cpu") is None
    assert m._mask(mask.flip(1), 16, 0, 16, "cpu") is not None
    with torch.no_grad():
        padded, _ = m(idx, attention_mask=mask)
        for i, (r, n) in enumerate(zip(rows, lens)):
            torch.testing.assert_close(padded[i, :n], m(r[None])[0][0], atol=1e-5, rtol=0)
