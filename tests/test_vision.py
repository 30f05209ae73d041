"""vit.py / qformer.py / convert.py vision section against transformers' Blip2 (the reference).

Random tiny HF models are written out in the three public layouts (LAVIS eva_vit_g.pth, LAVIS
BLIP-2 .pth nested under "model", HF Blip2Model save_pretrained), converted with convert.py, and
our forward must match HF's within 1e-4 in fp32, also at a non-default image size.
"""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import Blip2Config, Blip2Model, Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

import ckpt
from ckpt import CheckpointError
from conftest import randomize
from convert import convert_blip2_hf, convert_blip2_lavis, convert_eva_vit_g
from model import vision_state
from qformer import QFormer, QFormerConfig
from vit import EVAViT, ViTConfig, interpolate_pos_embed

# different widths everywhere, so that a swapped dimension cannot go unnoticed
VIT = dict(img_size=56, patch_size=14, width=48, depth=2, n_head=4, mlp_dim=96)
QF = dict(hidden=32, n_layer=3, n_head=4, ffn=64, num_query=5, encoder_width=48, cross_every=2)


def hf_vision_config(depth):
    return Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=depth, num_attention_heads=4,
                             image_size=56, patch_size=14)


def hf_qformer_config():
    return Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                              encoder_hidden_size=48, cross_attention_frequency=2)



# Independent restatement of the public key layouts (HF -> LAVIS), to write LAVIS files.
def lavis_vit_keys(hf_sd):
    out = {}
    for k, t in hf_sd.items():
        if k.endswith("self_attn.qkv.bias"):
            q, _, v = t.chunk(3)
            pre = k.replace("encoder.layers.", "blocks.").replace("self_attn.qkv.bias", "attn.")
            out[pre + "q_bias"], out[pre + "v_bias"] = q, v
            continue
        for a, b in (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                     ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                     ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"),
                     ("self_attn.projection", "attn.proj")):
            k = k.replace(a, b)
        out[k] = t
    out.pop("post_layernorm.weight"), out.pop("post_layernorm.bias")
    return out


def lavis_qformer_keys(hf_sd):
    out = {}
    for k, t in hf_sd.items():
        k = k.replace("layernorm.", "embeddings.LayerNorm.").replace("attention.attention.", "attention.self.")
        out["Qformer.bert." + k.replace("crossattention.attention.", "crossattention.self.")] = t
    return out


def lavis_text_path(seed):
    """Keys a real LAVIS BLIP-2 file carries that the query path never uses."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(s, generator=g)
    keys = {"Qformer.bert.embeddings.word_embeddings.weight": r(30, 32),
            "Qformer.bert.embeddings.position_embeddings.weight": r(16, 32),
            "Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
            "Qformer.cls.predictions.bias": r(30), "t5_proj.weight": r(40, 32), "t5_proj.bias": r(40)}
    for i in range(3):
        keys.update({f"Qformer.bert.encoder.layer.{i}.intermediate.dense.weight": r(64, 32),
                     f"Qformer.bert.encoder.layer.{i}.output.LayerNorm.weight": r(32)})
    return keys


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    vision = randomize(Blip2VisionModel(hf_vision_config(depth=3)), seed=1)  # 3 blocks: the last one is dropped
    with torch.no_grad():  # LAVIS has no key bias: its slot must be zero for HF to be a LAVIS reference
        for layer in vision.encoder.layers:
            layer.self_attn.qkv.bias[48:96] = 0
    qformer = randomize(Blip2QFormerModel(hf_qformer_config()), seed=2)
    query_tokens = 0.5 * torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3))
    return vision, qformer, query_tokens


def hf_vit(vision, pixels, depth=2):
    """HF vision tokens after `depth` blocks, before post_layernorm (= the raw EVA output)."""
    with torch.no_grad():
        x = vision.embeddings(pixels, interpolate_pos_encoding=True)
        for layer in vision.encoder.layers[:depth]:
            x = layer(x)
    return x


def hf_qformer(vision, qformer, query_tokens, image_embeds):
    ln = vision.post_layernorm  # LAVIS ln_vision: eps 1e-5
    with torch.no_grad():
        ctx = F.layer_norm(image_embeds, ln.weight.shape, ln.weight, ln.bias, 1e-5)
        return qformer(query_embeds=query_tokens.expand(len(ctx), -1, -1), encoder_hidden_states=ctx).last_hidden_state


def ours(tmp_ckpt, img_size=56, qformer=False):
    model = torch.nn.Module()
    model.vit = EVAViT(ViTConfig(**{**VIT, "img_size": img_size}))
    if qformer:
        model.qformer = QFormer(QFormerConfig(**QF))
    ckpt.load_into(model, vision_state(tmp_ckpt, model.vit.config.grid), cast=True)
    return model.eval()


def pixels(size, n=2, seed=4):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("size", [56, 84])
def test_eva_vit_g_lavis_layout(hf, tmp_path, dtype, size):
    vision = hf[0]
    src = {k: t.to(dtype) for k, t in lavis_vit_keys(vision.state_dict()).items()}
    assert "blocks.2.mlp.fc1.weight" in src  # the extra last block, as in the 40-block file
    torch.save(src, tmp_path / "eva_vit_g.pth")
    convert_eva_vit_g(str(tmp_path / "eva_vit_g.pth"), str(tmp_path / "out"), ViTConfig(**VIT))
    state, config = ckpt.load(str(tmp_path / "out"))
    assert config == {"vit": VIT} and not any(k.startswith("vit.blocks.2.") for k in state)
    assert {t.dtype for t in state.values()} == {dtype}  # an fp16 file stays fp16
    model = ours(str(tmp_path / "out"), img_size=size)
    ref = vision if dtype == torch.float32 else randomize_like_rounded(vision, dtype)
    x = pixels(size)
    got = model.vit(x)
    assert got.shape == (2, 1 + (size // 14) ** 2, 48)
    torch.testing.assert_close(got, hf_vit(ref, x), atol=1e-4, rtol=1e-4)


def randomize_like_rounded(vision, dtype):
    """The HF reference with its weights rounded through `dtype`, computed in fp32."""
    import copy
    ref = copy.deepcopy(vision)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    return ref


def test_blip2_lavis_layout(hf, tmp_path):
    vision, qformer, query_tokens = hf
    vsd = {k: v for k, v in lavis_vit_keys(vision.state_dict()).items() if not k.startswith("blocks.2.")}
    src = {**{"visual_encoder." + k: t for k, t in vsd.items()},  # a BLIP-2 model holds 39 blocks
           "ln_vision.weight": vision.post_layernorm.weight, "ln_vision.bias": vision.post_layernorm.bias,
           "query_tokens": query_tokens, **lavis_qformer_keys(qformer.state_dict()), **lavis_text_path(5)}
    torch.save({"model": src, "optimizer": {}, "epoch": 3}, tmp_path / "blip2.pth")
    convert_blip2_lavis(str(tmp_path / "blip2.pth"), str(tmp_path / "out"), ViTConfig(**VIT), QFormerConfig(**QF))
    for size in (56, 84):
        model, x = ours(str(tmp_path / "out"), size, qformer=True), pixels(size)
        torch.testing.assert_close(model.qformer(model.vit(x)), hf_qformer(vision, qformer, query_tokens, hf_vit(vision, x)),
                                   atol=1e-4, rtol=1e-4)

    # the usual file: Q-Former, ln_vision and queries only (the frozen ViT is not saved)
    qonly = {k: t for k, t in src.items() if not k.startswith("visual_encoder.")}
    torch.save({"model": qonly}, tmp_path / "qonly.pth")
    convert_blip2_lavis(str(tmp_path / "qonly.pth"), str(tmp_path / "qout"), ViTConfig(**VIT), QFormerConfig(**QF))
    state, config = ckpt.load(str(tmp_path / "qout"))
    assert set(config) == {"qformer"} and all(k.startswith("qformer.") for k in state)
    image_embeds = 3e-3 * torch.randn(2, 17, 48)  # variance ~ eps: ln_vision's 1e-5 must be exact
    model = torch.nn.Module()
    model.qformer = QFormer(QFormerConfig(**QF))
    ckpt.load_into(model, vision_state(str(tmp_path / "qout")))
    torch.testing.assert_close(model.qformer(image_embeds), hf_qformer(vision, qformer, query_tokens, image_embeds),
                               atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def hf_blip2(tmp_path_factory):
    from transformers import OPTConfig
    torch.manual_seed(0)
    config = Blip2Config(vision_config=hf_vision_config(depth=2).to_dict(), qformer_config=hf_qformer_config().to_dict(),
                         text_config=OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                               num_attention_heads=2, max_position_embeddings=32,
                                               word_embed_proj_dim=16).to_dict(), num_query_tokens=5)
    model = randomize(Blip2Model(config), seed=6)  # k-bias slots random too: softmax ignores them
    # HF's post_layernorm reuses the ViT eps (1e-6); LAVIS's ln_vision, which it stands for, uses 1e-5
    model.vision_model.post_layernorm.eps = 1e-5
    d = tmp_path_factory.mktemp("hf_blip2")
    model.save_pretrained(d / "blip2")
    return model, d


@pytest.mark.parametrize("size", [56, 84])
def test_blip2_hf_layout(hf_blip2, size):
    model, d = hf_blip2
    out = str(d / "ours")
    convert_blip2_hf(str(d / "blip2"), out)  # configs read from config.json
    _, config = ckpt.load(out)
    assert config == {"vit": VIT, "qformer": QF}
    ours_model, x = ours(out, size, qformer=True), pixels(size)
    with torch.no_grad():
        # HF resizes the position grid on the fly with the same rule LAVIS applies at load time
        # (bicubic, align_corners=False, CLS kept), so HF itself is the reference at 84 px too.
        ref = model.get_qformer_features(x, interpolate_pos_encoding=True)
        ref = ref if torch.is_tensor(ref) else ref.last_hidden_state
    torch.testing.assert_close(ours_model.qformer(ours_model.vit(x)), ref, atol=1e-4, rtol=1e-4)


def test_interpolate_pos_embed_is_lavis_rule():
    pe = torch.randn(1, 257, 8)
    assert interpolate_pos_embed(pe, 16) is pe
    for size, tokens in ((224, 257), (364, 677), (448, 1025)):
        assert interpolate_pos_embed(pe, size // 14).shape == (1, tokens, 8)
    got = interpolate_pos_embed(pe.half(), 26)
    grid = pe[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    assert got.dtype == torch.float32 and torch.equal(got[:, :1], pe[:, :1].half().float())
    hand = F.interpolate(grid.half().float(), size=(26, 26), mode="bicubic", align_corners=False)
    torch.testing.assert_close(got[:, 1:], hand.permute(0, 2, 3, 1).reshape(1, -1, 8), atol=0, rtol=0)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_full_size_parameter_counts():
    with torch.device("meta"):
        vit40 = EVAViT(ViTConfig.preset("eva_vit_g", depth=40))
        vit = EVAViT(ViTConfig.preset("eva_vit_g"))
        qformer = QFormer(QFormerConfig.preset("blip2"))
    d, m = 1408, 6144
    block = 3 * d * d + 2 * d + (d * d + d) + 4 * d + (d * m + m) + (m * d + d)  # qkv, q/v bias, proj, norms, mlp
    stem = 3 * 14 * 14 * d + d + d + 257 * d  # patch conv, cls, pos
    assert count(vit40) == stem + 40 * block == 1_011_143_296  # "EVA-ViT-g (40 blocks) about 1.0B"
    assert count(vit) == stem + 39 * block
    h, f, e = 768, 3072, 1408
    attn = lambda kv: (h * h + h) + 2 * (kv * h + h) + (h * h + h) + 2 * h
    layer = lambda i: attn(h) + (attn(e) if i % 2 == 0 else 0) + (h * f + f) + (f * h + h) + 2 * h
    assert count(qformer) == 32 * h + 2 * e + 2 * h + sum(layer(i) for i in range(12))
    # BLIP-2 reports 188M for the whole Q-Former; adding back the text path we do not build
    # (word + position embeddings, the 12 text FFNs) lands within 2% of that.
    text_path = 30522 * h + 512 * h + 12 * ((h * f + f) + (f * h + h) + 2 * h)
    assert abs(count(qformer) + text_path - 188e6) / 188e6 < 0.02


@pytest.fixture
def eva_file(hf, tmp_path):
    def write(edit):
        src = lavis_vit_keys(hf[0].state_dict())
        edit(src)
        torch.save(src, tmp_path / "eva.pth")
        return str(tmp_path / "eva.pth")
    return write


def test_bad_checkpoints(eva_file, tmp_path):
    cfg, out = ViTConfig(**VIT), str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"^missing keys: vit\.blocks\.0\.norm1\.weight$"):
        convert_eva_vit_g(eva_file(lambda s: s.pop("blocks.0.norm1.weight")), out, cfg)
    with pytest.raises(CheckpointError, match=r"shape mismatch: vit\.blocks\.1\.mlp\.fc1\.weight \(95, 48\) vs model \(96, 48\)"):
        convert_eva_vit_g(eva_file(lambda s: s.update({"blocks.1.mlp.fc1.weight": torch.zeros(95, 48)})), out, cfg)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(no rename rule, not ignored\): \['norm\.weight'\]"):
        convert_eva_vit_g(eva_file(lambda s: s.update({"norm.weight": torch.ones(48)})), out, cfg)
    with pytest.raises(CheckpointError, match=r"unexpected keys: vit\.blocks\.3\.norm1\.weight"):  # only the last block goes
        convert_eva_vit_g(eva_file(lambda s: s.update({"blocks.3.norm1.weight": torch.ones(48)})), out, cfg)
    torch.save({"model": {"query_tokens": torch.zeros(1, 5, 32), "Qformer.bert.pooler.dense.weight": torch.zeros(1)}},
               tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match=r"\['Qformer\.bert\.pooler\.dense\.weight'\]"):
        convert_blip2_lavis(str(tmp_path / "b.pth"), out, cfg, QFormerConfig(**QF))
    assert not (tmp_path / "out").exists()  # nothing written for a rejected checkpoint


def test_vit_forward_rules():
    torch.manual_seed(0)
    vit, qformer = EVAViT(ViTConfig.preset("tiny")), QFormer(QFormerConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"EVAViT expects 56x56 images, got \(64, 64\)"):
        vit(torch.randn(1, 3, 64, 64))
    x = torch.randn(2, 3, 56, 56)
    y = vit(x)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.grad_checkpointing = True
    y2 = vit(x)
    y2.square().mean().backward()
    torch.testing.assert_close(y2, y)
    for g, p in zip(grads, vit.parameters()):
        torch.testing.assert_close(p.grad, g)
    # a bf16 ViT feeds an fp32 Q-Former: ln_vision runs in fp32 and hands over in the Q-Former's dtype
    out = qformer(vit.to(torch.bfloat16)(x))
    assert out.dtype == torch.float32 and out.shape == (2, 8, 64)
