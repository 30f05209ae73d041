"""tokenizer.py on the real Qwen vocabulary, against Alibaba's own reference tokenizer.

The published `qwen.tiktoken` (151,643 ranks, the file every Qwen-7B/14B-Chat repo carries) ships
inside the `dashscope` wheel on PyPI as `dashscope/resources/qwen.tiktoken`, next to Alibaba's
reference `dashscope/tokenizers/qwen_tokenizer.py`. That reference imports cleanly (its package
pulls in dashscope's SDK dependencies, which pip installs with it), so nothing is replicated
here: the ids come from `dashscope.tokenizers.get_tokenizer("qwen-7b-chat")`, the publisher's
own code path (NFC, Qwen's split regex, specials numbered from 151643, via tiktoken).
"""
import hashlib
import importlib.util
import unicodedata

import pytest

if importlib.util.find_spec("dashscope") is None:
    pytest.skip("dashscope is not installed (pip install dashscope): it ships the real qwen.tiktoken and "
                "Alibaba's reference QwenTokenizer", allow_module_level=True)

from dashscope.tokenizers import get_tokenizer  # noqa: E402

from download import QWEN_TIKTOKEN  # noqa: E402
from tokenizer import StreamDecoder, Tokenizer  # noqa: E402

CORPUS = [
    "Hello world! It's a test: we're sure they'll say I'd've DONE it, DON'T YOU'LL.",
    "北京是中华人民共和国的首都，也是一座历史悠久的城市。我爱自然语言处理！图片里有什么？",
    "混合 mixed 文本 text，全角ｆｕｌｌｗｉｄｔｈ，日本語のテキスト、한국어 텍스트, Ελληνικά, русский, عربى",
    "def f(x):\n    return x ** 2 + 3.14159  # square\n\n\tif x >= 10_000:\n\t\tprint(f'{x:>8}')\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // C++\nx = {'a': [1, 2], \"b\": None}",
    "emoji 😀😃🎉👍🏽 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 symbols ✓ ∑ ∞ ≠ café naïve e\u0301 A\u030a ﬁ",
    "numbers 1234567890 0.5 -42 3e10 2024-11-21 12:30:45 ¥100 €3,50 ١٢٣ 一二三",
    "spaces   runs     and\ttabs\t\t\tand\r\nwindows\r\n\r\nnewlines\n\n\n  \n end  ",
    "   leading and trailing   \n",
    "ideographic\u3000space, no-break\u00a0space, em\u2003space, line\u2028separator, zero\u200bwidth",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<Img><|extra_0|><|extra_0|></Img> 描述这张图片<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>a<|extra_204|>b<|im_end|b <|im_start |> <|extra_205|> <|extra_0|>",
    "", " ", "\n", "😀", "a",
]
# One 100,000-character line (the reference encodes up to 100,000 characters in one piece; beyond that
# it cuts the text into chunks, which changes the ids at the cuts).
LONG_LINE = (" ".join(CORPUS).replace("\n", " ").replace("\r", " ") * 200)[:100_000]
TEXTS = CORPUS + ["\n".join(CORPUS), LONG_LINE]


@pytest.fixture(scope="module")
def ref():
    return get_tokenizer("qwen-7b-chat")


@pytest.fixture(scope="module")
def tok(ref):
    return Tokenizer.from_qwen_tiktoken(ref._vocab_file)


def test_the_file_is_the_published_vocabulary(ref, tok):
    data = open(ref._vocab_file, "rb").read()
    assert len(data.splitlines()) == 151643
    name, size, sha256 = QWEN_TIKTOKEN  # what download.py expects from the HF repos
    assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha256)
    assert tok.n_vocab == ref._tokenizer.n_vocab == 151643 + 3 + 205


def test_special_ids_are_qwen_7b_chats(ref, tok):
    assert tok.token_id("<|endoftext|>") == ref.eod_id == 151643
    assert tok.token_id("<|im_start|>") == ref.im_start_id == 151644
    assert tok.token_id("<|im_end|>") == ref.im_end_id == 151645
    assert tok.token_id("<|extra_0|>") == 151646  # MiniGPT4Qwen's image placeholder
    assert tok.token_id("<|extra_204|>") == 151850
    for name, i in ref._special_tokens.items():
        assert tok.token_id(name) == i


def test_every_id_has_the_references_bytes(ref, tok):
    for i in range(tok.n_vocab):
        expected = ref.decoder[i]
        assert tok.token_bytes(i) == (expected.encode() if isinstance(expected, str) else expected), i


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_ids_match_the_reference(ref, tok, i):
    text = TEXTS[i]
    assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    # specials as plain text: the reference's tiktoken call with nothing allowed and nothing refused
    assert tok.encode(text, allowed_special="none") == ref.encode(text, allowed_special=set())


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_decode_round_trips_whole_and_token_by_token(ref, tok, i):
    text = TEXTS[i]
    ids = tok.encode(text)
    assert tok.decode(ids) == ref.decode(ids) == unicodedata.normalize("NFC", text)
    stream = StreamDecoder(tok)
    assert "".join(stream.push(t) for t in ids) + stream.flush() == tok.decode(ids)


def test_a_character_cut_between_tokens_decodes_as_the_reference_does(ref, tok):
    ids = tok.encode("😀👨‍👩‍👧‍👦")
    for cut in range(1, len(ids)):
        assert tok.decode(ids[:cut]) == ref.decode(ids[:cut])
        stream = StreamDecoder(tok)
        assert "".join(stream.push(t) for t in ids[:cut]) + stream.flush() == ref.decode(ids[:cut])
