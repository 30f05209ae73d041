"""model.py: parity with HF BLIP-2 (Qwen2 and Phi text models), the image splice, loss
normalisation and gradient accumulation, freezing presets, generation, checkpoints."""
import json

import pytest
import torch
import torch.nn.functional as F

from dataclasses import asdict

import ckpt
from conftest import blip2_batch, randomize
from convert import convert_blip2_hf, convert_minigpt4qwen, convert_phi, convert_qwen2
from data import collate
from model import FREEZE_PRESETS, MMConfig, MultimodalLM, save_llm, splice_images, supervised_count
from phi import PhiConfig
from qformer import QFormerConfig
from qwen import QwenConfig, apply_repetition_penalty, filter_logits, loss_sum
from vit import ViTConfig

IMG = 500  # the image token of the tiny vocabulary (512)
Q = 8      # tiny Q-Former queries


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def tiny_config(llm_type="qwen", **kw):
    if llm_type == "qwen1":  # Qwen v1: no GQA, untied, dynamic NTK beyond max_seq_len
        llm_type, llm = "qwen", QwenConfig(**{**QwenConfig.preset("tiny").__dict__, "version": "qwen1",
                                              "n_kv_head": 4, "tie_embeddings": False, "max_seq_len": 16})
    else:
        llm = QwenConfig.preset("tiny") if llm_type == "qwen" else PhiConfig.preset("tiny")
    return MMConfig(vit=ViTConfig.preset("tiny"), qformer=QFormerConfig.preset("tiny"), llm=llm, llm_type=llm_type,
                    **{"image_token_id": IMG, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MultimodalLM(tiny_config(**kw)).eval()


def sample(g, n_images, n_prompt, n_answer):
    """A training item: prompt words, one Q-token placeholder per image, a supervised answer."""
    ids = torch.randint(0, IMG, (n_prompt + n_answer,), generator=g).tolist()
    for i in range(n_images):
        pos = 1 + i * (Q + 1)
        ids[pos:pos] = [IMG] * Q
    labels = [-100] * (len(ids) - n_answer) + ids[len(ids) - n_answer:]
    return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                images=torch.randn(n_images, 3, 56, 56, generator=g))


def left_pad(prompts, pad=0):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ----------------------------------------------------------------------------- parity with HF BLIP-2

def hf_blip2(llm_type):
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    from transformers import PhiConfig as HFPhiConfig, Qwen2Config
    if llm_type == "qwen":
        text = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           rope_theta=1e6, tie_word_embeddings=True)
    else:
        text = HFPhiConfig(vocab_size=512, hidden_size=80, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=1024, partial_rotary_factor=0.4)
    config = Blip2Config(vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=56, patch_size=14),
                         qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=256),
                         text_config=text.to_dict(), num_query_tokens=Q, image_token_index=IMG)
    hf = Blip2ForConditionalGeneration(config)
    randomize(hf, seed=0)
    return hf.eval()


def convert_hf_blip2(hf, llm_type, tmp):
    """Our MultimodalLM from an HF Blip2ForConditionalGeneration saved to disk, through convert.py:
    the Blip2 vision kind (vit, qformer), the LLM kind (the HF text model saved on its own), and
    language_projection as a MiniGPT4Qwen-style model.pth holding llm_proj.* (the minigpt4qwen kind)."""
    hf.save_pretrained(tmp / "hf")
    hf.language_model.save_pretrained(tmp / "hf_llm")
    torch.save({"model": {"llm_proj." + k: v for k, v in hf.language_projection.state_dict().items()}},
               tmp / "proj.pth")
    convert_blip2_hf(str(tmp / "hf"), str(tmp / "vision"))
    (convert_qwen2 if llm_type == "qwen" else convert_phi)(str(tmp / "hf_llm"), str(tmp / "llm"))
    convert_minigpt4qwen(str(tmp / "proj.pth"), str(tmp / "proj"))
    model = MultimodalLM.from_parts(str(tmp / "vision"), str(tmp / "llm"), proj=str(tmp / "proj"),
                                    image_token_id=IMG).eval()
    # HF's post_layernorm (= ln_vision) takes the ViT's eps 1e-6; LAVIS's ln_vision uses 1e-5
    model.qformer.ln_vision.eps = hf.config.vision_config.layer_norm_eps
    return model


@pytest.mark.parametrize("llm_type", ["qwen", "phi"])
def test_blip2_parity_with_transformers(llm_type, tmp_path):
    hf = hf_blip2(llm_type)
    model = convert_hf_blip2(hf, llm_type, tmp_path)
    ids, mask, pixels, labels = blip2_batch(IMG, Q)
    with torch.no_grad():
        want = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        got, loss = model(dict(input_ids=ids, attention_mask=mask, images=pixels, labels=labels))
    real = mask.bool()
    assert (got[real] - want.logits[real]).abs().max() < 1e-4
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-5)  # loss_norm 'token' = HF's mean
    # greedy continuation of a prompt with image placeholders, with the repetition penalty
    for penalty in (1.0, 1.5):
        out = hf.generate(pixel_values=pixels[:2], input_ids=ids[:1], max_new_tokens=12, do_sample=False,
                          repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)
        ours = model.generate(ids[:1], pixels[:2], max_new_tokens=12, repetition_penalty=penalty)
        assert ours[0] == out[0, ids.shape[1]:].tolist()
        assert len(set(ours[0])) >= 3  # a real continuation, not one token repeated


# ----------------------------------------------------------------------------- the image splice

def test_splice_puts_each_image_at_its_placeholders():
    q, d = 3, 4
    ids = torch.tensor([[1, 9, 9, 9, 2, 3, 9, 9, 9, 4],
                        [9, 9, 9, 5, 6, 7, 8, 1, 2, 3]])
    embeds = torch.randn(2, 10, d)
    features = torch.stack([torch.stack([torch.full((d,), 10.0 * i + j) for j in range(q)]) for i in range(3)])
    out = splice_images(embeds, ids, features, image_token_id=9)
    expected = embeds.clone()
    for (row, start), image in zip([(0, 1), (0, 6), (1, 0)], features):  # reading order
        expected[row, start:start + q] = image
    assert torch.equal(out, expected)


def test_splice_errors():
    embeds = torch.zeros(2, 6, 4)
    ids = torch.tensor([[9, 9, 9, 9, 1, 2], [9, 9, 1, 2, 3, 4]])  # 6 tokens = 2 x 3, but row 0 has 4
    with pytest.raises(ValueError, match=r"^row 0 has 4 image tokens, not a multiple of 3: an image "
                                         r"placeholder was cut \(truncation\?\)$"):
        splice_images(embeds, ids, torch.zeros(2, 3, 4), 9)
    with pytest.raises(ValueError, match=r"^6 image tokens \(id 9\) in input_ids but 1 images x 3 queries = 3: "
                                         r"every image needs one <ImageHere> expanded to num_query tokens$"):
        splice_images(embeds, ids, torch.zeros(1, 3, 4), 9)
    with pytest.raises(ValueError, match=r"^6 image tokens \(id 9\) in input_ids but no images: "):
        splice_images(embeds, ids, None, 9)


def test_multi_image_and_video_frames_in_order():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(4, 3, 56, 56, generator=g)  # a 3-frame "video" for row 0, one image for row 1
    row0 = [1, 2] + [IMG] * (3 * Q) + [3]
    row1 = [4] + [IMG] * Q + [5] * (len(row0) - Q - 1)
    ids = torch.tensor([row0, row1])
    with torch.no_grad():
        x = model.embed(ids, frames)
        singles = [model.encode_images(f[None])[0] for f in frames]
        tokens = model.llm.embed_tokens(ids)
    slots = [x[0, 2 + k * Q:2 + (k + 1) * Q] for k in range(3)] + [x[1, 1:1 + Q]]
    for got, want in zip(slots, singles):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    text = ids != IMG
    assert torch.equal(x[text], tokens[text])
    with torch.no_grad():  # reversing the frames reverses the blocks of row 0
        y = model.embed(ids, frames[[2, 1, 0, 3]])
    torch.testing.assert_close(y[0, 2:2 + Q], x[0, 2 + 2 * Q:2 + 3 * Q], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- loss

def test_loss_token_and_sample_normalisation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100  # row 0: 4 supervised targets (positions 3..6)
    labels[1, :6] = -100  # row 1: 1 supervised target
    labels[2, 1:] = -100  # row 2: none (labels[2, 0] is never a target)
    batch = dict(labels=labels)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    # token: the usual shifted mean over supervised tokens (MiniGPT4Qwen / HF)
    assert supervised_count(batch, "token") == 5
    mean = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss_sum(logits, labels, "token") / 5, mean)
    # sample: mean over the samples that have a target of each sample's token mean
    assert supervised_count(batch, "sample") == 2
    want = (ce[0].sum() / 4 + ce[1].sum() / 1) / 2
    torch.testing.assert_close(loss_sum(logits, labels, "sample") / 2, want)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_norm", ["token", "sample"])
def test_microbatches_with_global_count_give_full_batch_gradients(loss_norm):
    model = tiny_model(loss_norm=loss_norm).train()
    g = torch.Generator().manual_seed(0)
    samples = [sample(g, 1, 6, 3), sample(g, 2, 4, 9), sample(g, 0, 5, 1), sample(g, 1, 3, 6)]
    full = collate(samples, pad_id=0)
    model(full)[1].backward()
    want = grads(model)
    assert len(want) == len(list(model.parameters()))

    micro = [collate(samples[:1], pad_id=0), collate(samples[1:], pad_id=0)]  # padded differently
    count = sum(supervised_count(mb, loss_norm) for mb in micro)
    model.zero_grad()
    for mb in micro:
        model(mb, count=count)[1].backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-7, msg=name)

    model.zero_grad()  # the per-microbatch mean (local counts) is a different objective
    sum(model(mb)[1] for mb in micro).backward()
    assert not torch.allclose(grads(model)["llm_proj.weight"], want["llm_proj.weight"], rtol=1e-2)


# ----------------------------------------------------------------------------- freezing

@pytest.mark.parametrize("preset,trainable", [("pretrain", ("llm_proj.",)), ("sft", ("llm_proj.", "llm.")),
                                              ((), ("vit.", "qformer.", "llm_proj.", "llm."))])
def test_freeze_presets(preset, trainable):
    model = tiny_model(freeze=preset).train()
    names = {n for n, _ in model.named_parameters()}
    want = {n for n in names if n.startswith(trainable)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    frozen = [p for p in ("vit", "qformer", "proj", "llm") if p in FREEZE_PRESETS.get(preset, ())]
    assert [name for name, m in model.parts().items() if not m.training] == frozen
    g = torch.Generator().manual_seed(0)
    model(collate([sample(g, 1, 4, 3), sample(g, 2, 3, 2)], pad_id=0))[1].backward()
    assert set(grads(model)) == want


def test_frozen_image_path_builds_no_graph():
    model = tiny_model(freeze=("vit", "qformer", "proj"))
    assert not model.encode_images(torch.randn(1, 3, 56, 56)).requires_grad
    model.set_frozen("pretrain")
    assert model.encode_images(torch.randn(1, 3, 56, 56)).requires_grad
    with pytest.raises(ValueError, match=r"unknown parts to freeze \['vision'\]"):
        model.set_frozen(["vision"])


# ----------------------------------------------------------------------------- generation

def prompts(g):
    rows = [[1, 2] + [IMG] * Q + [3, 4, 5], [6, 7, 8], [9] + [IMG] * Q + [10] + [IMG] * Q + [11, 12]]
    return rows, [torch.randn(1, 3, 56, 56, generator=g), torch.zeros(0, 3, 56, 56),
                  torch.randn(2, 3, 56, 56, generator=g)]


def test_generate_uses_cache_like_full_recompute():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    rows, images = prompts(g)
    ids = torch.tensor([rows[2]])
    out = model.generate(ids, images[2], max_new_tokens=10)[0]
    with torch.no_grad():
        x = model.embed(ids, images[2])
        for tok in out:
            assert model.llm(inputs_embeds=x)[0][0, -1].argmax().item() == tok
            x = torch.cat((x, model.llm.embed_tokens(torch.tensor([[tok]]))), 1)


@pytest.mark.parametrize("llm_type", ["qwen", "qwen1", "phi"])
def test_batched_left_padded_equals_one_by_one(llm_type):
    model = tiny_model(llm_type=llm_type)
    g = torch.Generator().manual_seed(0)
    rows, images = prompts(g)
    alone = [model.generate(torch.tensor([r]), im, max_new_tokens=8)[0] for r, im in zip(rows, images)]
    ids, mask = left_pad(rows)
    assert model.generate(ids, torch.cat(images), attention_mask=mask, max_new_tokens=8) == alone


def test_stop_tokens_and_stream():
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(0)
    rows, images = prompts(g)
    ids, mask = left_pad(rows)
    kw = dict(attention_mask=mask, max_new_tokens=12, temperature=1.0, seed=0)
    free = model.generate(ids, torch.cat(images), **kw)
    # one row stops early while the others go on; then every row stops at its second token
    for stops in ({free[0][3]}, {ref[1] for ref in free}):
        steps = []
        out = model.generate(ids, torch.cat(images), stop_ids=stops, stream=steps.append, **kw)
        assert out == [ref[:min([ref.index(s) for s in stops if s in ref] + [len(ref)])] for ref in free]
        assert len(steps) == max(len(o) for o in out)  # no call once every row has stopped
        for r in range(3):  # the stream carries each row's tokens, then None once the row stopped
            column = [s[r] for s in steps]
            assert column == out[r] + [None] * (len(steps) - len(out[r]))
    assert len(out[0]) <= 1 and len(steps) <= 1


def test_sampling_top_k_1_is_greedy_and_seed_reproduces():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    rows, images = prompts(g)
    ids, mask = left_pad(rows)
    pixels = torch.cat(images)
    greedy = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=8)
    assert model.generate(ids, pixels, attention_mask=mask, max_new_tokens=8, temperature=0.8, top_k=1) == greedy
    a = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a == b and a != greedy


@pytest.mark.parametrize("llm_type", ["qwen", "phi"])
def test_generate_in_bfloat16(llm_type):
    """bf16 greedy tokens equal fp32's, except after a step where fp32 itself is a near-tie (its
    top two logits closer than bf16 can resolve): random tiny models have such ties."""
    model = tiny_model(llm_type=llm_type)
    g = torch.Generator().manual_seed(0)
    rows, images = prompts(g)
    ids, mask = left_pad(rows)
    fp32 = model.generate(ids, torch.cat(images), attention_mask=mask, max_new_tokens=6)
    half = tiny_model(llm_type=llm_type).to(torch.bfloat16).generate(ids, torch.cat(images), attention_mask=mask,
                                                                    max_new_tokens=6)
    assert [len(o) for o in half] == [6, 6, 6]
    agree = 0
    for row, pixels, a, b in zip(rows, images, fp32, half):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agree += k
        if k < len(a):  # the fp32 logits at the first difference: bf16 took the runner-up of a tie
            with torch.no_grad():
                logits = model(dict(input_ids=torch.tensor([row + a[:k]]), images=pixels))[0][0, -1]
            assert logits[a[k]] - logits[b[k]] < 0.01, (k, logits.topk(2))
    assert agree >= 12, (fp32, half)  # most tokens agree: the bf16 path is not merely "some output"


def test_generate_rejects_right_padding():
    model = tiny_model()
    with pytest.raises(ValueError, match="generate needs LEFT padding: attention_mask has a 0 after a 1"):
        model.generate(torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)


def test_logit_processors_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 12), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.7), want)
    assert torch.equal(TopKLogitsWarper(5)(ids, logits.clone()), filter_logits(logits, top_k=5))
    for p in (0.3, 0.9):
        assert torch.equal(TopPLogitsWarper(p)(ids, logits.clone()).isinf(), filter_logits(logits, top_p=p).isinf())


# ----------------------------------------------------------------------------- config and checkpoints

def test_config_dict_roundtrip():
    for config in (tiny_config(), tiny_config("phi", proj="mlp2", freeze="sft", loss_norm="sample")):
        d = json.loads(json.dumps(config.to_dict()))
        assert MMConfig.from_dict(d) == config
    with pytest.raises(ValueError, match=r"MMConfig: unknown keys \['colour'\]"):
        MMConfig.from_dict({**tiny_config().to_dict(), "colour": 1})
    with pytest.raises(ValueError, match=r"MMConfig: qformer.encoder_width 64 != vit.width 1408"):
        MMConfig(qformer=QFormerConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"MMConfig: image_token_id 151646 outside the LLM vocabulary"):
        tiny_config(image_token_id=151646)
    assert {MMConfig.preset(name).llm_type for name in ("minigpt4qwen", "mpp-qwen14b", "tinygpt-v")} == {"qwen", "phi"}


@pytest.mark.parametrize("llm_type,proj", [("qwen", "linear"), ("phi", "mlp2")])
def test_checkpoint_roundtrip(tmp_path, llm_type, proj):
    model = tiny_model(llm_type=llm_type, proj=proj, proj_hidden=32)
    model.save(tmp_path, train={"step": 3})
    assert json.loads((tmp_path / "config.json").read_text())["train"] == {"step": 3}
    loaded = MultimodalLM.from_checkpoint(tmp_path, freeze="sft").eval()
    assert loaded.config.freeze == ("vit", "qformer") and not loaded.vit.training
    if model.config.llm.__dict__.get("tie_embeddings"):
        assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    batch = collate([sample(g, 1, 4, 3), sample(g, 2, 3, 2)], pad_id=0)
    with torch.no_grad():
        assert torch.equal(model(batch)[0], loaded(batch)[0])
    half = MultimodalLM.from_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def save_vision_and_llm(model, d):
    """model's vit + qformer and its LLM as the two converted directories from_parts reads."""
    save_llm(str(d / "llm"), model.llm)
    vision = {k: v for k, v in ckpt.state_of(model).items() if k.startswith(("vit.", "qformer."))}
    ckpt.save(str(d / "vision"), vision, {"vit": asdict(model.config.vit), "qformer": asdict(model.config.qformer)})


def test_from_parts_starts_a_random_projection(tmp_path):
    model = tiny_model()
    save_vision_and_llm(model, tmp_path)
    built = MultimodalLM.from_parts([tmp_path / "vision"], tmp_path / "llm", image_token_id=IMG, llm_type="qwen",
                                    freeze="pretrain")
    with pytest.raises(ValueError, match=r"MMConfig: llm config is a QwenConfig, llm_type is 'phi'"):
        MultimodalLM.from_parts(tmp_path / "vision", tmp_path / "llm", image_token_id=IMG, llm_type="phi")
    assert not any(t.is_meta for t in built.state_dict().values())
    assert {n for n, p in built.named_parameters() if p.requires_grad} == {"llm_proj.weight", "llm_proj.bias"}
    ours, theirs = model.state_dict(), built.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("llm_proj."))
    assert not torch.equal(ours["llm_proj.weight"], theirs["llm_proj.weight"])


def _v1_keys(state):
    """Our Qwen keys -> Qwen v1's (the layout of MiniGPT4Qwen's llm_model.*), fusing q/k/v."""
    out = {"transformer.wte.weight": state["embed_tokens.weight"], "transformer.ln_f.weight": state["norm.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(len({k.split(".")[1] for k in state if k.startswith("layers.")})):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        for w in ("weight", "bias"):
            out[h + "attn.c_attn." + w] = torch.cat([state[p + f"self_attn.{x}_proj.{w}"] for x in "qkv"])
        out.update({h + "ln_1.weight": state[p + "input_layernorm.weight"],
                    h + "ln_2.weight": state[p + "post_attention_layernorm.weight"],
                    h + "attn.c_proj.weight": state[p + "self_attn.o_proj.weight"],
                    h + "mlp.w1.weight": state[p + "mlp.up_proj.weight"],
                    h + "mlp.w2.weight": state[p + "mlp.gate_proj.weight"],
                    h + "mlp.c_proj.weight": state[p + "mlp.down_proj.weight"]})
    return out


def test_minigpt4qwen_stage_checkpoints_load_every_key(tmp_path):
    """Stage 1 (model.pth: llm_proj) and stage 2 (unfreeze_llm_model.pth: llm_proj + the fine-tuned
    Qwen v1 under llm_model.*) replace the base weights; nothing is dropped silently."""
    base, tuned = tiny_model(0, llm_type="qwen1"), tiny_model(1, llm_type="qwen1")
    save_vision_and_llm(base, tmp_path)
    proj = {"llm_proj." + k: v for k, v in tuned.llm_proj.state_dict().items()}
    llm = {"llm_model." + k: v for k, v in _v1_keys(tuned.llm.state_dict()).items()}
    torch.save({"model": proj}, tmp_path / "model.pth")
    torch.save({"model": {**proj, **llm}}, tmp_path / "unfreeze_llm_model.pth")
    def build(pth):
        convert_minigpt4qwen(str(pth), str(pth) + ".ours")
        return MultimodalLM.from_parts(tmp_path / "vision", tmp_path / "llm", proj=str(pth) + ".ours", image_token_id=IMG)
    stage1, stage2 = build(tmp_path / "model.pth"), build(tmp_path / "unfreeze_llm_model.pth")
    assert ckpt.load_config(str(tmp_path / "unfreeze_llm_model.pth.ours"))["parts"] == ["llm", "llm_proj"]
    for model, llm_from in ((stage1, base), (stage2, tuned)):
        got = model.state_dict()
        for k, v in {**tuned.state_dict(), **{k: v for k, v in base.state_dict().items() if k.startswith(("vit.", "qformer."))},
                     **{"llm." + k: v for k, v in llm_from.llm.state_dict().items()}}.items():
            assert torch.equal(got[k], v), k
    torch.save({"model": {**proj, "t5_proj.weight": torch.zeros(2)}}, tmp_path / "odd.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected keys \(no rename rule, not ignored\): \['t5_proj.weight'\]"):
        build(tmp_path / "odd.pth")
