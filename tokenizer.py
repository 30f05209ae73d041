"""Byte-level BPE tokenizers for Qwen, Qwen2/2.5, Phi-2 and the toy model, all run by tiktoken, and
LLaMA / Vicuna's sentencepiece tokenizer, run by the sentencepiece library, behind the same interface.

Every tokenizer here is the same thing: a table of "mergeable ranks" (token bytes -> id; a lower
rank merges first), a pre-tokenizer regex, optional Unicode normalisation and some special tokens.
tiktoken does the regex split and the BPE merges in Rust; this file only loads the tables:

- `Tokenizer.from_qwen_tiktoken(path)`: Qwen-7B/14B-Chat's `qwen.tiktoken` (base64 rank lines),
  with the specials Qwen appends after the ranks (`<|endoftext|>` 151643 ... `<|extra_204|>`).
- `Tokenizer.from_hf(path)`: Hugging Face byte-level BPE (`tokenizer.json`, or `vocab.json` +
  `merges.txt`) as used by Qwen2/2.5 and Phi-2. HF merges pairs in merge-list order; tiktoken
  merges the adjacent pair whose concatenation has the lowest rank. The two agree when rank =
  HF id and ids grow with the merge order, which we check instead of assuming.
- `Tokenizer.toy(words)`: 256 byte tokens + whole-word tokens + Qwen's special-token names, so
  chat templates are the same code for the toy and for Qwen.
- `save(dir)` / `Tokenizer.load(dir)`: `tokenizer.tiktoken` + `tokenizer_config.json`, the files
  our checkpoints carry.
- `SentencePieceTokenizer.from_hf(dir)`: LLaMA / Vicuna's `tokenizer.model` (BPE with byte
  fallback: a character outside the vocabulary becomes its UTF-8 bytes as `<0xNN>` pieces; spaces
  are `▁` and every encoded text gets one `▁` in front, sentencepiece's add_dummy_prefix, which
  decoding removes again). Saved as `tokenizer.model` + `tokenizer_config.json`; `Tokenizer.load`
  returns whichever of the two kinds a directory holds.
"""
import base64
import codecs
import json
import os
import re
import unicodedata
from pathlib import Path

import tiktoken

import ckpt

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
NORMALIZATIONS = (None, "NFC", "NFD", "NFKC", "NFKD")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _read_rank_file(path):
    """`base64(token) rank` lines (qwen.tiktoken and our tokenizer.tiktoken) -> {bytes: rank}."""
    ranks = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'base64 rank', got {line[:60]!r}") from None
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: duplicate ranks")
    return ranks


def _allowed(allowed_special, special_tokens):
    """encode's allowed_special ("all", "none" or a set of names) -> frozenset of names."""
    if allowed_special == "all":
        return frozenset(special_tokens)
    if allowed_special == "none":
        return frozenset()
    if isinstance(allowed_special, str):
        raise ValueError(f"allowed_special must be 'all', 'none' or a set of names, got {allowed_special!r}")
    unknown = frozenset(allowed_special) - set(special_tokens)
    if unknown:
        raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
    return frozenset(allowed_special)


def _splitter(names):
    """A regex matching any of `names`, longest first, so that the leftmost-longest token wins as
    in HF tokenizers; None if there are none."""
    names = sorted(names, key=lambda t: (-len(t), t))
    return re.compile("|".join(map(re.escape, names))) if names else None


class Tokenizer:
    """A byte-level BPE tokenizer: tiktoken for the ordinary text, plus our own handling of
    special and added tokens (leftmost-longest match, as HF does; tiktoken's own special-token
    regex has no defined order between overlapping tokens such as Phi-2's runs of spaces)."""

    def __init__(self, ranks, special_tokens, pattern, normalization=None, added_tokens=None):
        """ranks: {token bytes: id}; special_tokens: {text: id}, matched in text only when allowed;
        added_tokens: {text: id}, HF's non-special added tokens, always matched (Phi-2's runs of
        spaces); normalization: a `unicodedata` form applied before encoding, or None."""
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"byte-level BPE needs all 256 single bytes; missing {missing[:8]}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.special_tokens = dict(special_tokens)
        self.added_tokens = dict(added_tokens or {})
        self.pattern, self.normalization = pattern, normalization
        both = set(self.special_tokens) & set(self.added_tokens)
        if both:
            raise ValueError(f"tokens both special and added: {sorted(both)}")
        extra = {**self.special_tokens, **self.added_tokens}
        used = set(ranks.values())
        for text, i in extra.items():
            if i in used:
                raise ValueError(f"token {text!r} has id {i}, which another token already has")
            used.add(i)
        self._ranks = ranks
        self._extra = extra
        self._enc = tiktoken.Encoding("nanompp", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=extra)
        self.n_vocab = self._enc.n_vocab  # max id + 1: the embedding rows a model needs
        self._splitters = {}

    dummy_prefix = False  # byte-level BPE adds nothing in front of a text (see SentencePieceTokenizer)
    utf8_errors = "replace"  # a broken character -> one U+FFFD, as HF's byte-level decoder

    # --- loaders ---------------------------------------------------------------------------
    @classmethod
    def from_qwen_tiktoken(cls, path):
        """Qwen-7B/14B-Chat `qwen.tiktoken`; specials get ids len(ranks) + i, as Qwen assigns them."""
        ranks = _read_rank_file(path)
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps")
        specials = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIALS)}
        return cls(ranks, specials, QWEN_PATTERN, "NFC")

    @classmethod
    def from_hf(cls, path):
        """HF byte-level BPE: a `tokenizer.json` file, or a directory holding `tokenizer.json` or
        `vocab.json` + `merges.txt` (+ `added_tokens.json` / `tokenizer_config.json`)."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        tj = folder / "tokenizer.json" if path.is_dir() else path
        cfg_path = folder / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.exists() else {}
        if tj.exists():
            vocab, merges, pattern, norm, added = _read_tokenizer_json(tj)
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            vocab, merges, pattern, norm, added = _read_vocab_merges(folder, cfg)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")
        # Tokens named in tokenizer_config.json (GPT-2's <|endoftext|> lives in vocab.json only).
        named = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        for t in named + list(cfg.get("additional_special_tokens") or []):
            text = t.get("content") if isinstance(t, dict) else t
            if text in vocab and text not in added:
                added[text] = (vocab[text], True)
        ranks = _ranks_from_merges(vocab, merges, added, tj if tj.exists() else folder / "vocab.json")
        specials = {t: i for t, (i, special) in added.items() if special}
        plain = {t: i for t, (i, special) in added.items() if not special}
        return cls(ranks, specials, pattern, norm, plain)

    @classmethod
    def toy(cls, words, n_extra=8):
        """The toy model's tokenizer: bytes 0..255 (rank = byte value), then `word` and ` word`
        for each word (plus the ChatML role words), then Qwen's special-token names. Words must be
        letters only so that each one is a single piece of Qwen's split regex."""
        if not 1 <= n_extra <= 205:
            raise ValueError(f"n_extra must be 1..205 (Qwen has <|extra_0|>..<|extra_204|>), got {n_extra}")
        ranks = {bytes([b]): b for b in range(256)}
        for w in [*words, "system", "user", "assistant"]:
            if not w.isalpha():
                raise ValueError(f"toy tokenizer words must be letters only, got {w!r}")
            for piece in (w, " " + w):
                ranks.setdefault(piece.encode(), len(ranks))
        specials = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIALS[:3 + n_extra])}
        return cls(ranks, specials, QWEN_PATTERN, "NFC")

    # --- our checkpoint format -----------------------------------------------------------------
    def files(self):
        """{file name: text} of our format, to save beside a model (ckpt.write_files)."""
        lines = [f"{base64.b64encode(b).decode()} {i}\n"
                 for b, i in sorted(self._ranks.items(), key=lambda kv: kv[1])]
        cfg = dict(pattern=self.pattern, normalization=self.normalization,
                   special_tokens=self.special_tokens, added_tokens=self.added_tokens)
        return {"tokenizer.tiktoken": "".join(lines),
                "tokenizer_config.json": json.dumps(cfg, indent=1, ensure_ascii=False)}

    def save(self, folder):
        """Write files() into `folder`, each file atomically."""
        os.makedirs(folder, exist_ok=True)
        for name, text in self.files().items():
            ckpt.atomic_write(os.path.join(folder, name), text)

    @classmethod
    def load(cls, folder):
        """Our tokenizer files in `folder`: tokenizer.tiktoken (this class) or tokenizer.model
        (SentencePieceTokenizer)."""
        folder = ckpt.resolve(folder)  # a training run's directory: its latest step
        kinds = [f for f in ("tokenizer.tiktoken", "tokenizer.model") if (Path(folder) / f).exists()]
        if len(kinds) == 2:
            raise ValueError(f"{folder}: holds both tokenizer.tiktoken and tokenizer.model; which tokenizer?")
        if kinds == ["tokenizer.model"]:
            return SentencePieceTokenizer.load(folder)
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg = _read_json(cfg_path)
        keys = {"pattern", "normalization", "special_tokens", "added_tokens"}
        if set(cfg) != keys:
            raise ValueError(f"{cfg_path}: expected keys {sorted(keys)}, got {sorted(cfg)}")
        ranks = _read_rank_file(Path(folder) / "tokenizer.tiktoken")
        return cls(ranks, cfg["special_tokens"], cfg["pattern"], cfg["normalization"],
                   cfg["added_tokens"])

    # --- encode / decode -------------------------------------------------------------------------
    def _splitter(self, allowed):
        """The allowed specials and all added tokens, as one regex (cached per allowed set)."""
        if allowed not in self._splitters:
            self._splitters[allowed] = _splitter({*allowed, *self.added_tokens})
        return self._splitters[allowed]

    def encode(self, text, allowed_special="all"):
        """allowed_special: "all", "none" (special-token text is encoded as plain text) or a set
        of special-token names to recognise."""
        allowed = _allowed(allowed_special, self.special_tokens)
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        splitter = self._splitter(allowed)
        if splitter is None:
            return self._enc.encode_ordinary(text)
        ids, start = [], 0
        for m in splitter.finditer(text):
            ids += self._enc.encode_ordinary(text[start:m.start()])
            ids.append(self._extra[m.group()])
            start = m.end()
        return ids + self._enc.encode_ordinary(text[start:])

    def token_bytes(self, i):
        try:
            return self._enc.decode_single_token_bytes(i)
        except (KeyError, OverflowError, TypeError):
            raise ValueError(f"token id {i!r} is not in the vocabulary (n_vocab {self.n_vocab})") from None

    def decode(self, ids):
        """Invalid UTF-8 (e.g. a cut-off character) becomes U+FFFD, as in HF's decoder."""
        try:
            data = self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            for i in ids:
                self.token_bytes(i)  # raises naming the bad id
            raise
        return data.decode("utf-8", errors="replace")

    def token_id(self, name):
        """Id of a special/added token, or of a text that is exactly one ordinary token."""
        if name in self._extra:
            return self._extra[name]
        if name.encode() in self._ranks:
            return self._ranks[name.encode()]
        raise KeyError(f"{name!r} is not a single token of this tokenizer")


codecs.register_error("byte_fallback", lambda e: ("\ufffd" * (e.end - e.start), e.end))


class SentencePieceTokenizer:
    """LLaMA / Vicuna's sentencepiece model (`tokenizer.model`) with Tokenizer's interface.

    sentencepiece encodes ordinary text; this class adds the special tokens: the model's control
    pieces (`<s>`, `</s>`) and `<unk>`, which sentencepiece never makes from text, and `extra`
    names outside the model (the image slot), all matched in text only when allowed. Every piece
    of text between two specials is encoded on its own and so gets its own dummy-prefix `▁`, as
    with the (legacy) LlamaTokenizer that MiniGPT-4 ran with. HF's LlamaTokenizer (Metaspace) adds
    no `▁` to a text that already starts with a space, nor (legacy=False, its default) to a text
    after a special token; everywhere else it gives sentencepiece's ids."""

    def __init__(self, model_proto, extra=None):
        """model_proto: the bytes of a tokenizer.model; extra: {name: id} special tokens beyond the
        model's pieces (ids from its size up, or the id of <unk>, which byte-fallback text never
        produces)."""
        import sentencepiece  # only LLaMA-family checkpoints need it
        self.model_proto = bytes(model_proto)
        sp = self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        n = sp.get_piece_size()
        pieces = [sp.id_to_piece(i) for i in range(n)]
        named = {p: i for i, p in enumerate(pieces) if sp.is_control(i) or sp.is_unknown(i)}
        self.extra = dict(extra or {})
        for name, i in self.extra.items():
            if name in named or sp.piece_to_id(name) != sp.unk_id() or not (i >= n or i == sp.unk_id()):
                raise ValueError(f"extra token {name!r} (id {i}) clashes with a piece of the sentencepiece model")
        ids = [i for i in self.extra.values() if i != sp.unk_id()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"extra tokens share an id: {self.extra}")
        self.special_tokens = {**named, **self.extra}
        self.added_tokens = {}  # Tokenizer's always-matched plain tokens: sentencepiece has none
        self.n_vocab = max([n] + [i + 1 for i in self.extra.values()])
        self._bytes = [bytes([int(p[3:5], 16)]) if sp.is_byte(i) else p.replace("▁", " ").encode()
                       for i, p in enumerate(pieces)]
        # a special decodes to its name (as HF); the model's own names last, so an extra token on
        # <unk>'s id still decodes as <unk>
        for name, i in [*self.extra.items(), *named.items()]:
            self._bytes += [None] * (i + 1 - len(self._bytes))  # None: an id no token has
            self._bytes[i] = name.encode()
        # sentencepiece's add_dummy_prefix, read from its behaviour (the option sits in the model's protobuf)
        self.dummy_prefix = sp.encode_as_pieces("x")[0].startswith("▁")
        self._splitters = {}

    utf8_errors = "byte_fallback"  # every byte of a broken character -> U+FFFD, as sentencepiece and HF

    @classmethod
    def from_hf(cls, path):
        """A tokenizer.model file, or an HF directory holding one; tokens HF adds beyond the model
        (added_tokens.json, tokenizer_config.json's added_tokens_decoder) become extra specials."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        tok = cls((folder / "tokenizer.model" if path.is_dir() else path).read_bytes())
        added = _read_json(folder / "added_tokens.json") if (folder / "added_tokens.json").exists() else {}
        if (folder / "tokenizer_config.json").exists():
            decoder = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
            added.update({t["content"]: int(i) for i, t in decoder.items()})
        n = tok._sp.get_piece_size()
        for name, i in added.items():
            if i < n and tok._sp.id_to_piece(i) != name:
                raise ValueError(f"{folder}: added token {name!r} has id {i}, which is the model's piece "
                                 f"{tok._sp.id_to_piece(i)!r}")
        extra = {name: i for name, i in added.items() if i >= n}
        return cls(tok.model_proto, extra) if extra else tok

    # --- our checkpoint format -----------------------------------------------------------------
    def files(self):
        cfg = {"format": "sentencepiece", "extra_special_tokens": self.extra}
        return {"tokenizer.model": self.model_proto,
                "tokenizer_config.json": json.dumps(cfg, indent=1, ensure_ascii=False)}

    save = Tokenizer.save

    @classmethod
    def load(cls, folder):
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg = _read_json(cfg_path)
        if set(cfg) != {"format", "extra_special_tokens"} or cfg["format"] != "sentencepiece":
            raise ValueError(f"{cfg_path}: expected format 'sentencepiece' and extra_special_tokens, got {sorted(cfg)}")
        return cls((Path(folder) / "tokenizer.model").read_bytes(), cfg["extra_special_tokens"])

    # --- encode / decode -------------------------------------------------------------------------
    def encode(self, text, allowed_special="all"):
        allowed = _allowed(allowed_special, self.special_tokens)
        if allowed not in self._splitters:
            self._splitters[allowed] = _splitter(allowed)
        splitter = self._splitters[allowed]
        if splitter is None:
            return self._sp.encode(text)
        ids, start = [], 0
        for m in splitter.finditer(text):
            ids += self._sp.encode(text[start:m.start()]) if m.start() > start else []
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        return ids + (self._sp.encode(text[start:]) if start < len(text) else [])

    def token_bytes(self, i):
        if not isinstance(i, int) or not 0 <= i < len(self._bytes) or self._bytes[i] is None:
            raise ValueError(f"token id {i!r} is not in the vocabulary (n_vocab {self.n_vocab})")
        return self._bytes[i]

    def decode(self, ids):
        """The pieces' bytes joined, invalid UTF-8 as U+FFFD, less the one leading space that the
        dummy prefix added (as sentencepiece and HF decode)."""
        text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors=self.utf8_errors)
        return text[1:] if self.dummy_prefix and text.startswith(" ") else text

    def token_id(self, name):
        """Id of a special token, of a text that encodes to one token ('###' -> '▁###', as a template's
        `end` is encoded), or of a piece by its name."""
        if name in self.special_tokens:
            return self.special_tokens[name]
        ids = self._sp.encode(name)
        if len(ids) == 1:
            return ids[0]
        i = self._sp.piece_to_id(name)
        if i != self._sp.unk_id():
            return i
        raise KeyError(f"{name!r} is not a single token of this tokenizer")


class StreamDecoder:
    """Decode tokens one at a time for streaming output: bytes of a character split across
    tokens are held back until the character is complete; a sentencepiece dummy-prefix space at
    the very start is dropped, as the full decode drops it."""

    def __init__(self, tok):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=tok.utf8_errors)
        self._start = True

    def push(self, i):
        data = self.tok.token_bytes(i)
        if self._start and data:
            self._start = False
            if self.tok.dummy_prefix and data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self):
        """Emit what is held back (an incomplete character becomes U+FFFD) and reset."""
        self._start = True
        return self._utf8.decode(b"", final=True)


# --- HF byte-level BPE -> tiktoken ranks ----------------------------------------------------------
def _byte_to_unicode():
    """GPT-2's map from bytes to printable characters, in which HF byte-level vocabs are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    other = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(other)}}


UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def _to_bytes(token, where):
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise ValueError(f"{where}: token {token!r} has {e.args[0]!r}, not a byte-level character") from None


def _read_tokenizer_json(tj):
    """(vocab, merges, pattern, normalization, added {text: (id, special)}) of an HF tokenizer.json."""
    spec = _read_json(tj)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{tj}: model.type must be 'BPE', got {model.get('type')!r}")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise ValueError(f"{tj}: model.{key}={model[key]!r} is not byte-level BPE")
    if "vocab" not in model or "merges" not in model:
        raise ValueError(f"{tj}: model needs 'vocab' and 'merges'")
    added = {}
    for t in spec.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise ValueError(f"{tj}: added token {t['content']!r} uses lstrip/rstrip/"
                             "single_word, which this tokenizer does not implement")
        added[t["content"]] = (t["id"], t.get("special", True))
    return (model["vocab"], model["merges"], _pattern_from_pre_tokenizer(spec.get("pre_tokenizer"), tj),
            _normalization_from(spec.get("normalizer"), tj), added)


def _read_vocab_merges(folder, cfg):
    """The same from the slow-tokenizer files vocab.json + merges.txt (+ added_tokens.json)."""
    vocab, merges = _read_json(folder / "vocab.json"), _read_merges(folder / "merges.txt")
    # The slow Qwen2Tokenizer hard-codes Qwen's regex and NFC; GPT-2 style (Phi-2) has neither.
    qwen2 = str(cfg.get("tokenizer_class", "")).startswith("Qwen2")
    pattern, norm = (QWEN_PATTERN, "NFC") if qwen2 else (GPT2_PATTERN, None)
    added = {}
    if (folder / "added_tokens.json").exists():
        for text, i in _read_json(folder / "added_tokens.json").items():
            added[text] = (i, True)
    for i, t in cfg.get("added_tokens_decoder", {}).items():
        added[t["content"]] = (int(i), t.get("special", True))
    return vocab, merges, pattern, norm, added


def _read_merges(path):
    merges = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#version") or not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path}:{n}: expected 'left right', got {line!r}")
        merges.append(pair)
    return merges


def _ranks_from_merges(vocab, merges, added, where):
    """rank = HF id, after checking that HF's merge order and tiktoken's rank order agree: every
    merge result is a vocab token whose id is larger than the previous merge's, and every
    multi-byte token is produced by exactly one merge."""
    ranks = {}
    for text, i in vocab.items():
        if text in added:
            if added[text][0] != i:
                raise ValueError(f"{where}: {text!r} has id {i} in the vocab but {added[text][0]} as added token")
            continue
        b = _to_bytes(text, where)
        if b in ranks:
            raise ValueError(f"{where}: tokens {text!r} and id {ranks[b]} have the same bytes")
        ranks[b] = i
    produced, last = set(), -1
    for k, m in enumerate(merges):
        left, right = m.split(" ") if isinstance(m, str) else m
        a, b = _to_bytes(left, where), _to_bytes(right, where)
        ab = a + b
        if a not in ranks or b not in ranks or ab not in ranks:
            raise ValueError(f"{where}: merge #{k} {left!r} + {right!r} uses or makes a token not in the vocab")
        if ab in produced:
            raise ValueError(f"{where}: merge #{k} {left!r} + {right!r} makes a token an earlier merge made")
        if ranks[ab] <= last:
            raise ValueError(f"{where}: vocab is not merge-ordered: merge #{k} {left!r} + {right!r} "
                             f"makes id {ranks[ab]}, not above the previous merge's id {last}")
        produced.add(ab)
        last = ranks[ab]
    orphans = [i for b, i in ranks.items() if len(b) > 1 and b not in produced]
    if orphans:
        raise ValueError(f"{where}: vocab ids {sorted(orphans)[:8]} are not produced by any merge")
    return ranks


def _pattern_from_pre_tokenizer(pre, where):
    """Qwen2: Split(regex, isolated) then ByteLevel(use_regex=False); GPT-2/Phi-2: ByteLevel with
    its built-in regex (= GPT2_PATTERN)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0] and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        byte_level, pattern = steps[0], GPT2_PATTERN
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
          and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        byte_level, pattern = steps[1], steps[0]["pattern"]["Regex"]
    else:
        raise ValueError(f"{where}: unsupported pre_tokenizer {json.dumps(pre)[:200]}")
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{where}: ByteLevel add_prefix_space=true is not supported")
    return pattern


def _normalization_from(norm, where):
    if norm is None:
        return None
    if norm.get("type") in NORMALIZATIONS[1:]:
        return norm["type"]
    raise ValueError(f"{where}: unsupported normalizer {json.dumps(norm)[:200]}")
