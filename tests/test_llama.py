"""LLaMA / Vicuna (MiniGPT-4's LLM), qwen.py's third layout, against HF `transformers`: tiny random
LlamaForCausalLM checkpoints (MHA and GQA, tied and untied, safetensors and .bin shards) converted
with convert.py; the sentencepiece tokenizer against sentencepiece itself and HF's LlamaTokenizer on
a model trained here as LLaMA's was (BPE, byte fallback); Blip2 with a LLaMA text model end to end;
MiniGPT-4's projection checkpoint and its conversation template; full-size Vicuna counted on meta."""
import io

import pytest
import torch
from hypothesis import given, settings, strategies as st

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

import ckpt  # noqa: E402
import rehearse  # noqa: E402
import train  # noqa: E402
from conftest import LAYOUTS, V, blip2_batch, check_parity, randomize, save_hf  # noqa: E402
from convert import (convert_blip2_hf, convert_llama, convert_minigpt4, llm_from_hf,  # noqa: E402
                     tokenizer_from_hf)
from data import IGNORE, IMAGE_TOKEN, TEMPLATES, encode_conversation  # noqa: E402
from model import MMConfig, MultimodalLM, load_llm  # noqa: E402
from qwen import Qwen, QwenConfig  # noqa: E402
from tokenizer import SentencePieceTokenizer, StreamDecoder, Tokenizer  # noqa: E402

CORPUS = [
    "Hello world! It's a test: we're sure they'll say I'd've DONE it.",
    "北京是中华人民共和国的首都，也是一座历史悠久的城市。我爱自然语言处理！",
    "emoji 😀😃🎉👍🏽 👨‍👩‍👧‍👦 and flags 🇨🇳🇺🇸, ✓ ∑ ∞ ≠ café naïve Ünïcödé",
    "def f(x):\n    return x ** 2 + 3.14159  # square\n\n\tif x >= 10_000:\n\t\tprint(f'{x:>8}')",
    "numbers 1234567890 0.5 -42 3e10 2024-11-21 12:30:45 ¥100 €3,50",
    "spaces   runs     and\ttabs\t\t\tand\r\nwindows\r\n\r\nnewlines\n\n\n  \n end  ",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // C++\nx = {'a': [1, 2], \"b\": None}",
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
    "to you. Please answer my questions.###Human: <Img><ImageHere></Img> What is this? ###Assistant: A cat. ###",
]
UNSEEN = "🤖🦄🧠 中文字符串 é ü ñ ☃"  # mostly byte-fallback pieces
TEXTS = CORPUS + ["\n".join(CORPUS), "", " ", "  two leading", "\n", "x", "😀", UNSEEN, "###", "a###b"]
SPECIAL_TEXTS = ["<s>hello</s>", "Hi<s>there</s>x", "<unk>x<s></s>", "a</s>b<s>c"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


@pytest.fixture(scope="module")
def spdir(tmp_path_factory):
    """A sentencepiece model trained with LLaMA's options (BPE, byte fallback, digits split, no
    normalisation, whitespace kept, dummy prefix), as tokenizer.model in an HF-style directory."""
    d = tmp_path_factory.mktemp("llama_tok")
    out = io.BytesIO()
    text = CORPUS * 20 + [c.lower() for c in CORPUS] * 5 + [c.upper() for c in CORPUS] * 5
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=1000,
                                   hard_vocab_limit=False, **rehearse.LLAMA_SPM_OPTIONS)
    (d / "tokenizer.model").write_bytes(out.getvalue())
    return d


@pytest.fixture(scope="module")
def sp(spdir):
    return spm.SentencePieceProcessor(model_file=str(spdir / "tokenizer.model"))


@pytest.fixture(scope="module")
def ours(spdir):
    return SentencePieceTokenizer.from_hf(spdir)


def hf_tokenizer(spdir, legacy):
    from transformers import LlamaTokenizer
    return LlamaTokenizer.from_pretrained(str(spdir), legacy=legacy)


# ----------------------------------------------------------------------------- the tokenizer

def test_tokenizer_matches_sentencepiece(ours, sp):
    assert sp.is_byte(sp.piece_to_id("<0xF0>")) and ours.n_vocab == sp.get_piece_size()
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2} and ours.dummy_prefix
    for text in TEXTS + SPECIAL_TEXTS:
        ids = sp.encode(text)
        assert ours.encode(text, allowed_special="none") == ids, text
        assert ours.decode(ids) == sp.decode(ids) == text, text
    pieces = [sp.id_to_piece(i) for i in ours.encode(UNSEEN)]
    assert "<0xF0>" in pieces and pieces[0].startswith("▁")  # byte fallback, dummy prefix
    assert ours.encode("x") == sp.encode("x") and sp.id_to_piece(ours.encode("x")[0]).startswith("▁")
    cut = sp.encode("🤖")[:-1]  # a character cut short: each of its bytes becomes U+FFFD, as in sentencepiece
    assert ours.decode(cut) == sp.decode(cut) == "\ufffd" * 3


def test_tokenizer_matches_hf_llama_tokenizer(ours, spdir):
    """HF's LlamaTokenizer (a tokenizers Metaspace BPE built from the same file) gives the same ids
    and text, special tokens included, except that it adds no dummy prefix to a text (or a text
    after a special token) that already starts with a space, where sentencepiece adds one."""
    for legacy in (False, True):
        hf = hf_tokenizer(spdir, legacy)
        assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
        for text in TEXTS:
            want = hf.encode(text, add_special_tokens=False)
            assert ours.decode(want) == hf.decode(want), text
            if not text[:1].isspace():
                assert ours.encode(text) == want, text
    hf = hf_tokenizer(spdir, legacy=True)  # legacy: every piece between specials gets its prefix, as ours
    for text in SPECIAL_TEXTS:
        want = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == want, text
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=False), text
    pieces = lambda ids: "".join(hf.convert_ids_to_tokens(ids))
    for text in ("  two leading", "<s> x"):  # the difference: HF's text has one dummy-prefix ▁ less
        theirs = pieces(hf.encode(text, add_special_tokens=False))
        assert theirs.count("▁") == pieces(ours.encode(text)).count("▁") - 1, text


def test_special_tokens_and_token_id(ours, sp):
    assert [ours.token_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    ids = ours.encode("<s>hi</s>")
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == sp.encode("hi")
    assert 1 not in ours.encode("<s>hi</s>", allowed_special="none")
    assert ours.encode("<s>hi</s>", allowed_special={"</s>"})[-1] == 2
    assert ours.decode(ids) == "<s> hi</s>"  # specials decode to their names, as HF
    assert ours.token_id("###") == sp.piece_to_id("▁###") == ours.token_id("▁###")  # LLaMA's 835
    with pytest.raises(KeyError, match="'###Human' is not a single token"):
        ours.token_id("###Human")
    with pytest.raises(ValueError, match=r"not special tokens of this tokenizer: \['<\|im_end\|>'\]"):
        ours.encode("x", allowed_special={"<|im_end|>"})
    with pytest.raises(ValueError, match=r"token id 5000 is not in the vocabulary \(n_vocab \d+\)"):
        ours.decode([1, 5000])


def stream(tok, ids):
    dec = StreamDecoder(tok)
    return "".join(dec.push(i) for i in ids) + dec.flush()


def test_stream_decode_equals_full_decode(ours):
    for text in TEXTS + SPECIAL_TEXTS:
        ids = ours.encode(text)
        assert stream(ours, ids) == ours.decode(ids), text
    ids = ours.encode(UNSEEN)
    dec = StreamDecoder(ours)
    parts = [dec.push(i) for i in ids]
    assert parts[:5] == ["", "", "", "", "🤖"]  # the leading ▁ alone, then a character's four byte pieces


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999), max_size=30))
def test_stream_decode_property(ours, ids):
    ids = [i % ours.n_vocab for i in ids]
    assert stream(ours, ids) == ours.decode(ids)


PIECES = st.sampled_from(["<s>", "</s>", "<unk>", " ", "  ", "\t", "\n", "▁", "###", "Human:", "😀", "中文",
                          "123", "x", " the", "def ", "<0x41>", "\u3000"])


@settings(max_examples=200, deadline=None)
@given(st.lists(PIECES | st.text(max_size=5), max_size=10).map("".join))
def test_encode_property(ours, sp, text):
    assert ours.encode(text, allowed_special="none") == sp.encode(text)
    assert ours.decode(ours.encode(text)) == ours.decode(ours.encode(text, allowed_special="all"))


def test_save_load_picks_the_kind(ours, tmp_path):
    tok = SentencePieceTokenizer(ours.model_proto, {IMAGE_TOKEN: ours.n_vocab})
    tok.save(tmp_path / "sp")
    back = Tokenizer.load(tmp_path / "sp")
    assert isinstance(back, SentencePieceTokenizer) and back.special_tokens == tok.special_tokens
    for text in TEXTS + SPECIAL_TEXTS + [IMAGE_TOKEN + "x"]:
        assert back.encode(text) == tok.encode(text)
    assert tok.encode(f"a{IMAGE_TOKEN}b")[1] == ours.n_vocab and tok.n_vocab == ours.n_vocab + 1
    Tokenizer.toy(["red"]).save(tmp_path / "sp")
    with pytest.raises(ValueError, match="holds both tokenizer.tiktoken and tokenizer.model"):
        Tokenizer.load(tmp_path / "sp")
    with pytest.raises(ValueError, match=r"extra token '<s>' \(id 1\) clashes"):
        SentencePieceTokenizer(ours.model_proto, {"<s>": 1})

# ----------------------------------------------------------------------------- the decoder


def hf_llama(n_kv, tied, seed=0, vocab=V, layers=2):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=256,
                                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                                   eos_token_id=None)  # HF would stop at </s> = 2; check_parity never stops
    torch.manual_seed(seed)
    return randomize(transformers.LlamaForCausalLM(cfg), seed)


@LAYOUTS
def test_llama_parity(tmp_path, n_kv, tied, fmt):
    ref = hf_llama(n_kv, tied)
    save_hf(ref, tmp_path / "hf", fmt)
    convert_llama(str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert ckpt.load_config(str(tmp_path / "ours"))["arch"] == "llama"
    ours = load_llm(str(tmp_path / "ours")).eval()
    c = ours.config
    assert (c.version, c.n_kv_head, c.tie_embeddings, c.rms_eps) == ("llama", n_kv, tied, 1e-5)
    assert not any(n.endswith("bias") for n, _ in ours.named_parameters())
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    check_parity(ref, ours)


def test_llama_tokenizer_converted_with_an_image_slot(tmp_path, spdir, ours):
    """The image slot takes a spare embedding row if the model has one, else <unk>'s id."""
    n = ours.n_vocab
    for rows, slot in ((n + 8, n), (n, 0)):
        hf = hf_llama(2, False, vocab=rows, layers=1)
        hf.save_pretrained(tmp_path / f"hf{rows}")
        (tmp_path / f"hf{rows}" / "tokenizer.model").write_bytes((spdir / "tokenizer.model").read_bytes())
        convert_llama(str(tmp_path / f"hf{rows}"), str(tmp_path / f"ours{rows}"))
        tok = Tokenizer.load(tmp_path / f"ours{rows}")
        assert tok.token_id(IMAGE_TOKEN) == slot and tok.encode("hi") == ours.encode("hi")
    assert tokenizer_from_hf(str(tmp_path / f"hf{n}"), n).special_tokens[IMAGE_TOKEN] == 0


def test_llama_config_refuses_what_is_not_implemented(tmp_path):
    ref = hf_llama(2, False, layers=1)
    ref.config.attention_bias = True
    ref.save_pretrained(tmp_path / "hf")
    with pytest.raises(ckpt.CheckpointError, match="LLaMA config: only silu, no attention/MLP biases"):
        llm_from_hf(str(tmp_path / "hf"), "llama")


# published sizes: Vicuna-7B (LLaMA-7B) 6.74B, Vicuna-13B 13.02B
@pytest.mark.parametrize("name,billions", [("vicuna-7b", 6.74), ("vicuna-13b", 13.02)])
def test_vicuna_parameter_counts(name, billions):
    with torch.device("meta"):
        m = Qwen(QwenConfig.preset(name))
    assert round(sum(p.numel() for p in m.parameters()) / 1e9, 2) == billions


def test_minigpt4_presets():
    config = MMConfig.preset("minigpt4-vicuna7b")
    got = (config.llm_type, config.llm.version, config.qformer.num_query, config.image_token_id)
    assert got == ("llama", "llama", 32, 0)
    with torch.device("meta"):
        proj = MultimodalLM.proj_module(config)
    assert tuple(proj.weight.shape) == (4096, 768)
    cfg = train.parse_args(["--preset=minigpt4-vicuna7b-finetune"])
    assert (cfg.model, cfg.freeze, cfg.lr, cfg.max_iters) == ("minigpt4-vicuna7b", "pretrain", 3e-5, 1000)

# ----------------------------------------------------------------------------- BLIP-2 + LLaMA end to end


IMG, Q = 500, 8


def test_blip2_llama_parity_with_transformers(tmp_path):
    """HF Blip2ForConditionalGeneration with a LLaMA text model against ours, built from the parts
    convert.py writes: blip2_hf (vision), llama (the text model), minigpt4 (the projection, saved as
    MiniGPT-4's pretrained_minigpt4.pth names it: llama_proj under "model")."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    text = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                    rms_norm_eps=1e-6)
    config = Blip2Config(vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=56, patch_size=14),
                         qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=256),
                         text_config=text.to_dict(), num_query_tokens=Q, image_token_index=IMG)
    torch.manual_seed(0)
    hf = randomize(Blip2ForConditionalGeneration(config), seed=0)
    hf.save_pretrained(tmp_path / "hf")
    hf.language_model.save_pretrained(tmp_path / "hf_llm")
    proj = {"llama_proj." + k: v for k, v in hf.language_projection.state_dict().items()}
    torch.save({"model": proj}, tmp_path / "pretrained_minigpt4.pth")
    convert_blip2_hf(str(tmp_path / "hf"), str(tmp_path / "vision"))
    convert_llama(str(tmp_path / "hf_llm"), str(tmp_path / "llm"))
    convert_minigpt4(str(tmp_path / "pretrained_minigpt4.pth"), str(tmp_path / "proj"))
    model = MultimodalLM.from_parts(str(tmp_path / "vision"), str(tmp_path / "llm"), proj=str(tmp_path / "proj"),
                                    image_token_id=IMG).eval()
    assert model.config.llm_type == "llama" and model.config.llm.version == "llama"
    model.qformer.ln_vision.eps = hf.config.vision_config.layer_norm_eps  # HF's post_layernorm eps

    ids, mask, pixels, labels = blip2_batch(IMG, Q, IGNORE)
    with torch.no_grad():
        want = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        got, loss = model(dict(input_ids=ids, attention_mask=mask, images=pixels, labels=labels))
    real = mask.bool()
    assert (got[real] - want.logits[real]).abs().max() < 1e-4
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-5)
    out = hf.generate(pixel_values=pixels[:2], input_ids=ids[:1], max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    greedy = model.generate(ids[:1], pixels[:2], max_new_tokens=12)[0]
    assert greedy == out[0, ids.shape[1]:].tolist() and len(set(greedy)) >= 3

    torch.save({"model": {**proj, "llama_model.lm_head.weight": torch.zeros(2)}}, tmp_path / "odd.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected keys \(no rename rule, not ignored\): "
                                                   r"\['llama_model.lm_head.weight'\]"):
        convert_minigpt4(str(tmp_path / "odd.pth"), str(tmp_path / "odd"))

# ----------------------------------------------------------------------------- MiniGPT-4's template


def test_minigpt4_template_layout_and_loss_mask(ours, sp):
    tok = SentencePieceTokenizer(ours.model_proto, {IMAGE_TOKEN: ours.n_vocab})
    img, nq = tok.token_id(IMAGE_TOKEN), 4
    turns = [("user", "<Img><ImageHere></Img> What is this?"), ("assistant", "A cat."),
             ("user", "What colour?"), ("assistant", "Black and white.")]
    ids, labels = encode_conversation(tok, turns, nq, template="minigpt4")
    system = TEMPLATES["minigpt4"]["system"]
    assert system.startswith("Give the following image: <Img>ImageContent</Img>. You will be able to see")
    # each segment encoded on its own (its own dummy prefix), as MiniGPT-4 tokenizes its segments
    end = sp.encode("###")
    prompt1 = sp.encode(system + "###Human: <Img>") + [img] * nq + sp.encode("</Img> What is this?###Assistant:")
    answer1 = sp.encode("A cat.") + end
    prompt2 = sp.encode("Human: What colour?###Assistant:")
    answer2 = sp.encode("Black and white.") + end
    assert ids == [1] + prompt1 + answer1 + prompt2 + answer2
    masked = [IGNORE] * (1 + len(prompt1))
    assert labels == masked + answer1 + [IGNORE] * len(prompt2) + answer2
    assert end == [tok.token_id(TEMPLATES["minigpt4"]["stops"][0])] == [sp.piece_to_id("▁###")]
    assert tok.decode([i for i in ids if i != img]) == (
        f"<s> {system}###Human: <Img> </Img> What is this?###Assistant: A cat. ### Human: What colour?###Assistant: "
        "Black and white. ###")
    # a prompt for generation ends with "###Assistant:", MiniGPT-4's get_prompt; no system: none
    gen, gen_labels = encode_conversation(tok, turns[:3], nq, template="minigpt4", system=None)
    assert tok.decode(gen[1:]).startswith("Human: <Img>") and tok.decode(gen).endswith("###Assistant:")
    assert gen[-len(prompt2):] == prompt2 and gen_labels[-len(prompt2):] == [IGNORE] * len(prompt2)
