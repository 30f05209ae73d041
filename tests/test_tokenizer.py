"""tokenizer.py against HF `tokenizers`: one small BPE vocabulary trained here, written as
tokenizer.json, vocab.json + merges.txt and qwen.tiktoken, must give HF's ids in every format."""
import base64
import functools
import json
import unicodedata

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, trainers

from tokenizer import GPT2_PATTERN, QWEN_PATTERN, QWEN_SPECIALS, UNICODE_TO_BYTE, StreamDecoder, Tokenizer

CORPUS = [
    "Hello world! It's a test: we're sure they'll say I'd've DONE it.",
    "北京是中华人民共和国的首都，也是一座历史悠久的城市。我爱自然语言处理！",
    "emoji 😀😃🎉👍🏽 👨‍👩‍👧‍👦 and flags 🇨🇳🇺🇸, ✓ ∑ ∞ ≠ café naïve Ünïcödé",
    "def f(x):\n    return x ** 2 + 3.14159  # square\n\n\tif x >= 10_000:\n\t\tprint(f'{x:>8}')",
    "numbers 1234567890 0.5 -42 3e10 2024-11-21 12:30:45 ¥100 €3,50 ١٢٣ 一二三",
    "spaces   runs     and\ttabs\t\t\tand\r\nwindows\r\n\r\nnewlines\n\n\n  \n end  ",
    "   leading and trailing   \n",
    "ideographic\u3000space, no-break\u00a0space, and\u2003em space; line\u2028sep",
    "MiXeD CaSe 'S 'T 'RE don'T we'LL YOU'D",
    "<Img><ImageHere></Img> What is in the picture? 图片里有什么？",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // C++\nx = {'a': [1, 2], \"b\": None}",
    "combining e\u0301 vs \u00e9, Å vs A\u030a, ﬁ ligature, ｆｕｌｌｗｉｄｔｈ",
]
TRAIN_TEXT = CORPUS * 3 + [c.lower() for c in CORPUS] + [c.upper() for c in CORPUS]
SPECIAL_CASES = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n",
    "<|extra_0|><|extra_0|><|extra_204|>text<|endoftext|><|endoftext|>",
    "a<|im_end|b <|im_start |> <|extra_205|> <|extra_0|>",
]
UNSEEN = "🤖🦄🧠 中文字符串 é ü ñ"  # characters the trained vocab only covers in pieces
TEXTS = CORPUS + SPECIAL_CASES + ["\n".join(CORPUS), "", " ", "\n", "😀", UNSEEN]


def train_hf(kind, vocab_size=900):
    """A byte-level BPE trained on CORPUS, configured like Qwen2 ('qwen') or Phi-2 ('gpt2')."""
    tok = HFTokenizer(models.BPE())
    if kind == "qwen":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    # Specials appended after the BPE tokens, like Qwen (ids n_ranks + i) and GPT-2 (50256).
    if kind == "qwen":
        tok.add_special_tokens(QWEN_SPECIALS)
    else:
        tok.add_special_tokens(["<|endoftext|>"])
        # Phi-2 (CodeGen) adds overlapping runs of spaces/tabs as non-special tokens.
        tok.add_tokens([AddedToken(t, normalized=False) for t in ("    ", "\t\t", "  ")])
    return tok


def write_hf(tok, folder, tokenizer_class):
    """tokenizer.json, and vocab.json + merges.txt + tokenizer_config.json in a separate folder."""
    (folder / "json").mkdir()
    (folder / "files").mkdir()
    tok.save(str(folder / "json" / "tokenizer.json"))
    tok.model.save(str(folder / "files"))
    added = {str(i): {"content": t.content, "special": t.special}
             for i, t in tok.get_added_tokens_decoder().items()}
    cfg = {"tokenizer_class": tokenizer_class, "added_tokens_decoder": added}
    (folder / "files" / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_qwen_tiktoken(tok, path):
    """The same vocab as Qwen ships it: base64 of the token bytes and the rank, one per line."""
    vocab = tok.get_vocab(with_added_tokens=False)
    lines = [f"{base64.b64encode(bytes(UNICODE_TO_BYTE[c] for c in t)).decode()} {i}"
             for t, i in sorted(vocab.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    hf = train_hf("qwen")
    write_hf(hf, folder, "Qwen2Tokenizer")
    write_qwen_tiktoken(hf, folder / "qwen.tiktoken")
    return hf, folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    hf = train_hf("gpt2")
    write_hf(hf, folder, "CodeGenTokenizer")
    return hf, folder


def assert_same_ids(ours, hf, texts=TEXTS):
    for text in texts:
        want = hf.encode(text).ids
        assert ours.encode(text) == want, text
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=False), text


def test_qwen_formats_match_hf(qwen):
    hf, folder = qwen
    assert len(hf.get_vocab(with_added_tokens=False)) == 900
    toks = [Tokenizer.from_qwen_tiktoken(folder / "qwen.tiktoken"), Tokenizer.from_hf(folder / "json"),
            Tokenizer.from_hf(folder / "json" / "tokenizer.json"), Tokenizer.from_hf(folder / "files")]
    for ours in toks:
        assert ours.pattern == QWEN_PATTERN and ours.normalization == "NFC"
        assert ours.n_vocab == hf.get_vocab_size() == 900 + 208
        assert ours.token_id("<|endoftext|>") == 900 and ours.token_id("<|extra_204|>") == 1107
        assert_same_ids(ours, hf)


def test_gpt2_formats_match_hf(gpt2):
    hf, folder = gpt2
    for ours in Tokenizer.from_hf(folder / "json"), Tokenizer.from_hf(folder / "files"):
        assert ours.pattern == GPT2_PATTERN and ours.normalization is None
        assert ours.special_tokens == {"<|endoftext|>": 900}
        assert ours.added_tokens == {"    ": 901, "\t\t": 902, "  ": 903}
        assert_same_ids(ours, hf)
        # Non-special added tokens are split out even when specials are plain text, as in HF.
        ids = ours.encode("a     b<|endoftext|>", allowed_special="none")
        assert ids[1] == 901 and 900 not in ids and ours.decode(ids) == "a     b<|endoftext|>"
        assert ours.encode("      ") == [901, 903]  # leftmost-longest, as HF


def test_transformers_reads_the_same_files(qwen, gpt2):
    """vocab.json + merges.txt carry no regex or normaliser: we infer them from tokenizer_class
    (Qwen2Tokenizer vs CodeGenTokenizer, Phi-2's), as transformers does."""
    from transformers import AutoTokenizer
    for _, folder in qwen, gpt2:
        ref, ours = AutoTokenizer.from_pretrained(str(folder / "files")), Tokenizer.from_hf(folder / "files")
        for text in TEXTS:
            assert ours.encode(text) == ref.encode(text), text


def test_merges_as_strings(qwen, tmp_path):
    """Older tokenizer.json files (e.g. Qwen2's) write merges as "a b" strings, not pairs."""
    hf, folder = qwen
    spec = json.loads((folder / "json" / "tokenizer.json").read_text())
    assert isinstance(spec["model"]["merges"][0], list)
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert_same_ids(Tokenizer.from_hf(tmp_path / "tokenizer.json"), hf)


def test_gpt2_vocab_with_endoftext_inside(gpt2, tmp_path):
    """GPT-2 / Phi-2 keep <|endoftext|> in vocab.json and name it in tokenizer_config.json."""
    folder = gpt2[1]
    vocab = json.loads((folder / "files" / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text((folder / "files" / "merges.txt").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    ours = Tokenizer.from_hf(tmp_path)
    assert ours.special_tokens == {"<|endoftext|>": 900}
    ref = HFTokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens(["<|endoftext|>"])
    assert_same_ids(ours, ref)
    assert ours.encode("x<|endoftext|>")[-1] == 900


PIECES = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|extra_0|>", "<|", "|>",
                          " ", "  ", "    ", "\t", "\n", "\r\n", "\u3000", "'s", "'LL", "e\u0301",
                          "😀", "🇨🇳", "中文", "123", "_", "x", " the", "def ", "()", "{}"])
MIXED = st.lists(PIECES | st.text(max_size=6), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(MIXED)
def test_parity_property(qwen, gpt2, text):
    """Random mixtures of specials, whitespace, scripts and arbitrary Unicode: HF's ids."""
    for hf, folder in qwen, gpt2:
        assert _ours(folder).encode(text) == hf.encode(text).ids


@functools.cache
def _ours(folder):
    return Tokenizer.from_hf(folder / "json")


def test_round_trip_and_nfc(qwen):
    ours = Tokenizer.from_hf(qwen[1] / "json")
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)
        assert ours.decode(ours.encode(text, allowed_special="none")) == unicodedata.normalize("NFC", text)
    assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9")


def test_allowed_special(qwen):
    ours = Tokenizer.from_qwen_tiktoken(qwen[1] / "qwen.tiktoken")
    text = "<|im_start|>user\nhi<|im_end|><|extra_0|>"
    ids = ours.encode(text)
    assert ids[0] == 901 and ids[-2:] == [902, 903]
    plain = ours.encode(text, allowed_special="none")
    assert not set(plain) & set(ours.special_tokens.values())
    assert ours.decode(plain) == text
    only = ours.encode(text, allowed_special={"<|im_end|>"})
    assert 902 in only and 901 not in only and 903 not in only
    assert ours.decode(only) == text
    with pytest.raises(ValueError, match=r"not special tokens of this tokenizer: \['<\|nope\|>'\]"):
        ours.encode(text, allowed_special={"<|nope|>"})


def test_not_merge_ordered_is_rejected(qwen, tmp_path):
    files = qwen[1] / "files"
    vocab = json.loads((files / "vocab.json").read_text())
    merges = (files / "merges.txt").read_text()
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[400], by_id[600]  # two merge results: swapping them breaks the merge order
    vocab[a], vocab[b] = 600, 400
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(merges)
    with pytest.raises(ValueError, match=r"vocab is not merge-ordered: merge #\d+ .* makes id \d+, "
                                         r"not above the previous merge's id 600"):
        Tokenizer.from_hf(tmp_path)
    # A multi-byte token no merge produces would be unreachable for HF but not for tiktoken.
    vocab[a], vocab[b] = 400, 600
    vocab["ĠunreachableĠ"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"vocab ids \[900\] are not produced by any merge"):
        Tokenizer.from_hf(tmp_path)


def test_bad_files(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"qwen.tiktoken:2: expected 'base64 rank'"):
        Tokenizer.from_qwen_tiktoken(tmp_path / "qwen.tiktoken")
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\n")
    with pytest.raises(ValueError, match="needs all 256 single bytes"):
        Tokenizer.from_qwen_tiktoken(tmp_path / "qwen.tiktoken")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, nor vocab.json"):
        Tokenizer.from_hf(tmp_path)


def test_toy_save_load(tmp_path):
    toy = Tokenizer.toy(["red", "green", "blue", "circle", "square"])
    assert toy.n_vocab < 300
    assert toy.encode(" red circle") == [toy.token_id(" red"), toy.token_id(" circle")]
    assert toy.encode("assistant\n") == [toy.token_id("assistant"), ord("\n")]
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>"):
        assert toy.encode(name) == [toy.token_id(name)] and toy.token_id(name) >= 256
    toy.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.special_tokens == toy.special_tokens and back.n_vocab == toy.n_vocab
    for text in TEXTS:
        assert back.encode(text) == toy.encode(text)
        assert back.decode(toy.encode(text)) == unicodedata.normalize("NFC", text)
    with pytest.raises(ValueError, match="letters only, got 'two words'"):
        Tokenizer.toy(["two words"])
    with pytest.raises(KeyError, match="'nope' is not a single token"):
        toy.token_id("nope")


def test_hf_save_load_keeps_added_tokens(gpt2, tmp_path):
    hf, folder = gpt2
    Tokenizer.from_hf(folder / "json").save(tmp_path)
    assert_same_ids(Tokenizer.load(tmp_path), hf)


TOY = Tokenizer.toy(["red", "green"])


def stream(tok, ids):
    dec = StreamDecoder(tok)
    parts = [dec.push(i) for i in ids]
    return parts, dec.flush()


def test_stream_decoder_holds_partial_characters():
    toy = Tokenizer.toy(["red"])
    ids = toy.encode("a😀你")  # byte tokens only: 1 + 4 + 3 bytes
    assert len(ids) == 8
    parts, tail = stream(toy, ids)
    assert parts == ["a", "", "", "", "😀", "", "", "你"] and tail == ""
    parts, tail = stream(toy, ids[:3])
    assert parts == ["a", "", ""] and tail == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_stream_decoder_property_text(text):
    parts, tail = stream(TOY, TOY.encode(text))
    assert "".join(parts) == unicodedata.normalize("NFC", text) and tail == ""


def test_stream_decoder_on_bpe_tokens_that_split_characters(qwen):
    """The trained vocab has tokens holding part of a character (invalid UTF-8 on their own)."""
    ours = Tokenizer.from_hf(qwen[1] / "json")
    for text in TEXTS:
        ids = ours.encode(text)
        parts, tail = stream(ours, ids)
        assert "".join(parts) == ours.decode(ids) and tail == ""
    ids = ours.encode(UNSEEN)
    assert ours.token_bytes(ids[0]) == "🤖".encode()[:2]  # a token holding half a character
    parts, tail = stream(ours, ids)
    assert parts[:3] == ["", "", "🤖"] and "".join(parts) == UNSEEN and tail == ""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=40))
def test_stream_decoder_property_bytes(ids):
    """Arbitrary (also invalid) byte sequences: streaming output equals one-shot decode."""
    parts, tail = stream(TOY, ids)
    assert "".join(parts) + tail == TOY.decode(ids)



def test_bad_ids_and_arguments():
    with pytest.raises(ValueError, match=r"token id 5000 is not in the vocabulary \(n_vocab 277\)"):
        TOY.decode([1, 2, 5000])
    with pytest.raises(ValueError, match="token id -1 is not in the vocabulary"):
        StreamDecoder(TOY).push(-1)
    with pytest.raises(ValueError, match="allowed_special must be 'all', 'none' or a set of names"):
        TOY.encode("x", allowed_special="<|im_end|>")
    with pytest.raises(ValueError, match="has id 3, which another token already has"):
        Tokenizer({bytes([b]): b for b in range(256)}, {"<|x|>": 3}, QWEN_PATTERN)
