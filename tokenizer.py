"""Byte-level BPE tokenizers for Qwen, Qwen2/2.5, Phi-2 and the toy model, all run by tiktoken.

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
        added = {}  # text -> (id, special)
        if tj.exists():
            spec = _read_json(tj)
            model = spec.get("model") or {}
            if model.get("type") != "BPE":
                raise ValueError(f"{tj}: model.type must be 'BPE', got {model.get('type')!r}")
            for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
                if model.get(key):
                    raise ValueError(f"{tj}: model.{key}={model[key]!r} is not byte-level BPE")
            if "vocab" not in model or "merges" not in model:
                raise ValueError(f"{tj}: model needs 'vocab' and 'merges'")
            vocab, merges = model["vocab"], model["merges"]
            pattern = _pattern_from_pre_tokenizer(spec.get("pre_tokenizer"), tj)
            norm = _normalization_from(spec.get("normalizer"), tj)
            for t in spec.get("added_tokens", []):
                if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                    raise ValueError(f"{tj}: added token {t['content']!r} uses lstrip/rstrip/"
                                     "single_word, which this tokenizer does not implement")
                added[t["content"]] = (t["id"], t.get("special", True))
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            vocab = _read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
            # The slow Qwen2Tokenizer hard-codes Qwen's regex and NFC; GPT-2 style (Phi-2) has neither.
            qwen2 = str(cfg.get("tokenizer_class", "")).startswith("Qwen2")
            pattern, norm = (QWEN_PATTERN, "NFC") if qwen2 else (GPT2_PATTERN, None)
            if (folder / "added_tokens.json").exists():
                for text, i in _read_json(folder / "added_tokens.json").items():
                    added[text] = (i, True)
            for i, t in cfg.get("added_tokens_decoder", {}).items():
                added[t["content"]] = (int(i), t.get("special", True))
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
        folder = ckpt.resolve(folder)  # a training run's directory: its latest step
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
        """A regex matching the allowed specials and all added tokens; longest first, so that
        the leftmost-longest token wins as in HF tokenizers."""
        if allowed not in self._splitters:
            names = sorted({*allowed, *self.added_tokens}, key=lambda t: (-len(t), t))
            self._splitters[allowed] = re.compile("|".join(map(re.escape, names))) if names else None
        return self._splitters[allowed]

    def encode(self, text, allowed_special="all"):
        """allowed_special: "all", "none" (special-token text is encoded as plain text) or a set
        of special-token names to recognise."""
        if allowed_special == "all":
            allowed = frozenset(self.special_tokens)
        elif allowed_special == "none":
            allowed = frozenset()
        elif isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all', 'none' or a set of names, got {allowed_special!r}")
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
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


class StreamDecoder:
    """Decode tokens one at a time for streaming output: bytes of a character split across
    tokens are held back until the character is complete."""

    def __init__(self, tok):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, i):
        return self._utf8.decode(self.tok.token_bytes(i))

    def flush(self):
        """Emit what is held back (an incomplete character becomes U+FFFD) and reset."""
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
