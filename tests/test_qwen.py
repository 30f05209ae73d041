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

from convert import llm_from_hf, load_llm, save_llm  # noqa: E402
from qwen import PRESETS, Qwen, QwenConfig, Rotary, ntk_alpha  # noqa: E402

V, PROMPT, NEW = 256, 24, 20


def randomize(model, seed):
    """Re-draw every parameter (HF init leaves biases 0 and norms 1, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def save_bin_shards(model, d, n=2):
    """The HF .bin shard layout (transformers 5 only writes safetensors): pytorch_model-0000i-of-
    0000n.bin + pytorch_model.bin.index.json, tied lm_head left out as save_pretrained does."""
    os.makedirs(d, exist_ok=True)
    model.config.save_pretrained(d)
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    keys, weight_map = list(state), {}
    for i in range(n):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: state[k].clone() for k in keys[i::n]}
        torch.save(part, os.path.join(d, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def save_hf(model, d, fmt):
    if fmt == "safetensors":
        model.save_pretrained(d, max_shard_size="20KB")  # several shards + index json
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    else:
        save_bin_shards(model, d)


def hf_qwen2(n_kv, tied, seed=0):
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return randomize(transformers.Qwen2ForCausalLM(cfg), seed)


def prompts(B=2, T=PROMPT, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def check_parity(ref, ours):
    """The parity suite shared with test_phi.py: ref is the HF model, ours the converted one."""
    idx = prompts()
    with torch.no_grad():
        want = ref(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # 20 greedy tokens
    want_tokens = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=NEW, do_sample=False,
                               pad_token_id=0)[:, PROMPT:]
    assert torch.equal(ours.generate(idx, NEW), want_tokens)
    # KV cache: a prefill, single steps, then a chunk, against one forward without cache
    seq = torch.cat([idx, want_tokens], 1)
    cache = ours.new_cache(2, seq.shape[1])
    with torch.no_grad():
        full, _ = ours(seq)
        parts = [ours(seq[:, :10], cache=cache)[0]]
        parts += [ours(seq[:, t:t + 1], cache=cache)[0] for t in range(10, 30)]
        parts.append(ours(seq[:, 30:], cache=cache)[0])
    assert cache.len == seq.shape[1]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    # left-padded batch equals each prompt alone (logits at real positions, then greedy tokens)
    lens = [PROMPT, 15, 7]
    rows = [prompts(1, n, seed=10 + n)[0] for n in lens]
    batch = torch.zeros(3, PROMPT, dtype=torch.long)
    mask = torch.zeros(3, PROMPT, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, lens)):
        batch[i, PROMPT - n:], mask[i, PROMPT - n:] = r, 1
    with torch.no_grad():
        padded, _ = ours(batch, attention_mask=mask)
        gen = ours.generate(batch, 12, attention_mask=mask)
        for i, (r, n) in enumerate(zip(rows, lens)):
            alone, _ = ours(r[None])
            torch.testing.assert_close(padded[i, PROMPT - n:], alone[0], atol=1e-5, rtol=0)
            assert torch.equal(gen[i], ours.generate(r[None], 12)[0])
    # and HF agrees on the padded batch
    want_pad = ref.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, want_pad[:, PROMPT:])


@pytest.mark.parametrize("n_kv,tied,fmt", [(2, True, "safetensors"), (4, False, "safetensors"),
                                           (2, False, "bin"), (4, True, "bin")],
                         ids=["gqa-tied-st", "mha-untied-st", "gqa-untied-bin", "mha-tied-bin"])
def test_qwen2_parity(tmp_path, n_kv, tied, fmt):
    ref = hf_qwen2(n_kv, tied)
    save_hf(ref, tmp_path / "hf", fmt)
    ours, config = llm_from_hf(str(tmp_path / "hf"), "qwen2")
    assert (config.n_kv_head, config.tie_embeddings) == (n_kv, tied)
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    check_parity(ref, ours.eval())
    # our checkpoint round trip
    save_llm(str(tmp_path / "ours"), ours, config)
    again, config2 = load_llm(str(tmp_path / "ours"))
    assert config2 == config
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
    """The toy preset: loss decreases on a memorised batch; targets -100 are ignored; generating
    under inference_mode first leaves nothing (rotary tables) that breaks a later backward."""
    torch.manual_seed(0)
    m = Qwen(QwenConfig.preset("tiny"))
    with torch.inference_mode():
        m.generate(prompts(1, 8) % 512, 2)
    assert set(PRESETS) >= {"qwen7b_chat", "qwen14b_chat", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "tiny"}
    idx = prompts(2, 16) % 512
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -100
    logits, loss = m(idx, targets=targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, :-1].reshape(-1, 512), idx[:, 1:].reshape(-1)))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        _, l2 = m(idx, targets=targets)
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
            loss = m(idx, targets=torch.roll(idx, -1, 1))[1]
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        saved.append(n[0])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert saved[1] < saved[0] / 2, saved  # only block inputs are kept for the backward
