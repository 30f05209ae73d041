"""
The public instruction-data formats, read as published, into one row shape for data.py.

parse_row turns a row of any layout below into dict(turns=[(role, text)], media=[paths],
video=bool, kind, format, task), with every image or video marked in the text by MiniGPT4Qwen's
`<Img><ImageHere></Img>`. The layouts, as their publishers' files and converters write them:

- LLaVA `conversations` (from human/gpt; `<image>` / `<video>` in the text): LLaVA-Pretrain
  blip_laion_cc_sbu_558k.json, LLaVA-Instruct llava_instruct_150k.json and llava_v1_5_mix665k.json.
  A row without "image" is text-only and kept; other keys ("id", "model") are ignored. As LLaVA's
  own preprocessing does, a conversation's leading gpt turn is dropped; so is a trailing human turn
  (nothing answers it, and encoding it would end the sample with a generation prompt).
- Video-ChatGPT's VideoInstruct-100K: the published {"video_id", "q", "a"} rows, and its training
  format {"id", "video": "v_....pkl", "conversations"}. Both name the video by its id (the .pkl is
  Video-ChatGPT's CLIP features): the file is the id plus one of VIDEO_EXTS under image_root.
- MiniGPT4Qwen / MPP-Qwen-Next {"image" | "video", "instruction", "output"}: strings for one turn,
  equal-length lists for several (the first instruction holding the placeholder).
- MiniGPT-4's cc_sbu_align `filter_cap.json`, {"annotations": [{"image_id", "caption"}]}: the image
  is image_id + ".jpg"; the prompt MiniGPT-4 draws at random is picked by a hash of the id, so a row
  always reads the same.
- Qwen-VL (its finetune format, and MindFormers' conversion of LLaVA): `conversations` with from
  user/assistant, no "image" key, the path inside the text as `Picture 1: <img>path</img>\\n`; the
  path becomes a placeholder, "Picture 1: " and `<ref>`/`<box>` stay as text.

A module of its own, below data.py (which tokenizes and decodes pixels), so that VLDataset and
`python datacheck.py` share one reader, and data.py stays readable in one sitting: the layouts, a
streaming JSON reader (a 665k-row, 1 GB list is never held as one object tree; it gives each row's
byte span, so that data.py's index can read one row again) and MediaIndex (one directory listing
instead of a stat per row) are 300 lines of their own.
"""
import codecs
import json
import os
import re
import zlib

IMAGE_PLACEHOLDER = "<Img><ImageHere></Img>"
IMAGE_HERE = "<ImageHere>"
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")  # VideoInstruct-100K ships .mp4 and .mkv
SUPPORTED = ("supported: LLaVA / Qwen-VL 'conversations', MiniGPT4Qwen 'instruction' + 'output', "
             "Video-ChatGPT 'video_id' + 'q' + 'a', MiniGPT-4 'image_id' + 'caption'")
# MiniGPT-4's stage-2 prompts (prompts/alignment.txt), which it draws at random for each caption
ALIGN_PROMPTS = [f"{IMAGE_PLACEHOLDER} {p}" for p in (
    "Describe this image in detail.", "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.", "Could you describe the contents of this image for me?")]
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
QWENVL_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
QWENVL_IMAGE = re.compile(r"<img>(.*?)</img>", re.DOTALL)


class MissingMedia(ValueError):
    """A row names an image or video file that is not there (counted apart by the checker)."""


def iter_rows(path, chunk=1 << 20, spans=False):
    """Yield the rows of a JSON list (`.json`) or of JSON lines (`.jsonl`) one at a time; with
    spans, (row, byte offset, byte length) so that a row can be read again alone (read_row). The
    list is decoded element by element by json's C scanner over a sliding buffer: memory is a
    chunk and a row, not the whole file's object tree."""
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            at = 0
            for n, line in enumerate(f, 1):
                start, at = at, at + len(line)
                if n == 1 and line.startswith(codecs.BOM_UTF8):  # a byte-order mark is not text
                    line, start = line[3:], 3
                if line.strip():
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise ValueError(f"{path}: invalid JSON on line {n} ({e})") from None
                    yield (row, start, len(line)) if spans else row
        return
    with open(path, "rb") as f:
        bom = f.read(3) == codecs.BOM_UTF8
    # newline="": the text keeps every byte's character, so character counts map to byte offsets
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row, start, length in _json_list(f, path, chunk, 3 if bom else 0):
            yield (row, start, length) if spans else row


def read_row(path, offset, length):
    """The row iter_rows(spans=True) found at (offset, length): one positional read, safe in any
    process (no shared file position)."""
    with open(path, "rb") as f:
        return json.loads(os.pread(f.fileno(), length, offset))


def _json_list(f, path, chunk, at):
    """(row, byte offset, byte length) of each row; `at`: the bytes before the first character."""
    dec, buf, pos, seen, eof = json.JSONDecoder(), "", 0, 0, False  # seen: chars dropped from buf
    mark = 0  # buf[:mark] is counted in `at` (bytes)

    def fill(n):  # keep buf[pos:], append n more characters
        nonlocal buf, pos, seen, eof, mark
        byte_at(pos)
        more = f.read(n)
        seen, buf, pos, eof, mark = seen + pos, buf[pos:] + more, 0, not more, 0

    def byte_at(p):  # the byte offset of buf[p], counting each character once
        nonlocal at, mark
        at, mark = at + len(buf[mark:p].encode("utf-8")), p
        return at

    def peek():  # the next non-blank character, '' at the end of the file
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos:pos + 1]
            fill(chunk)

    def fail(msg, p):
        raise ValueError(f"{path}: invalid JSON ({msg} at char {seen + p})")

    def value():  # one JSON value at pos; a value cut by the buffer's end is decoded again with more text
        nonlocal pos
        while True:
            try:
                v, end = dec.raw_decode(buf, pos)
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as e:
                if eof:
                    fail(e.msg, e.pos)
            fill(max(chunk, len(buf) - pos))  # doubling: a long row costs log(size) reads
        start = byte_at(pos)
        pos = end
        return v, start, byte_at(end) - start

    def items(close, key=False):  # the elements of a list (or an object's key: value pairs) at pos
        nonlocal pos
        unterminated = "unterminated list" if close == "]" else "unterminated object"
        pos += 1
        if peek() == close:
            pos += 1
            return
        while True:
            if not peek():
                fail(unterminated, pos)
            if key:
                name, _, _ = value()
                if peek() != ":":
                    fail("expected ':'", pos)
                pos += 1
                peek()
                yield name
            else:
                yield value()
            sep = peek()
            if sep not in (",", close):
                fail(f"expected ',' or '{close}'" if sep else unterminated, pos)
            pos += 1
            if sep == close:
                break

    first, found = peek(), False
    if first == "[":
        yield from items("]")
    elif first == "{":  # MiniGPT-4's {"annotations": [...]}: its list is read as a file's
        for name in items("}", key=True):
            if name == "annotations" and peek() == "[" and not found:
                found = True
                yield from items("]")
            else:
                value()
    if first != "[" and not found:
        got = {"{": "an object", "": "an empty file"}.get(first, f"text starting {first!r}")
        raise ValueError(f"{path}: expected a JSON list of rows, got {got} ({SUPPORTED})")
    if peek():
        fail("data after the list", pos)


class MediaIndex:
    """Which files exist, from one listing per directory rather than a stat per row: LLaVA's
    665k rows name about 360k files in a handful of directories (coco/train2017 holds 118k)."""

    def __init__(self):
        self._dirs = {}

    def _names(self, folder):
        if folder not in self._dirs:
            try:
                with os.scandir(folder or ".") as it:
                    self._dirs[folder] = {e.name for e in it if not e.is_dir()}
            except OSError:
                self._dirs[folder] = frozenset()
        return self._dirs[folder]

    def exists(self, path):
        folder, name = os.path.split(path)
        return name in self._names(folder)

    def find_video(self, stem):
        """stem + the first of VIDEO_EXTS that exists, else None."""
        return next((stem + e for e in VIDEO_EXTS if self.exists(stem + e)), None)


def _str_list(x):
    return isinstance(x, list) and len(x) > 0 and all(isinstance(s, str) for s in x)


def _conversation_turns(conv):
    """LLaVA or Qwen-VL `conversations` -> (turns, Qwen-VL image paths or None for LLaVA)."""
    if not isinstance(conv, list) or not conv:
        raise ValueError("'conversations' must be a non-empty list")
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise ValueError(f"conversations[{j}] must be an object with a string 'value'")
        if t.get("from") not in {**LLAVA_ROLES, **QWENVL_ROLES}:
            raise ValueError(f"conversations[{j}]: unknown 'from' {t.get('from')!r}")
    qwenvl = any(t["from"] in ("user", "assistant") for t in conv)
    if qwenvl and any(t["from"] in ("human", "gpt") for t in conv):
        raise ValueError("'from' mixes LLaVA's human/gpt with Qwen-VL's user/assistant")
    roles, paths, turns = QWENVL_ROLES if qwenvl else LLAVA_ROLES, [], []
    for t in conv:
        text = t["value"]
        if qwenvl:
            paths += QWENVL_IMAGE.findall(text)
            text = QWENVL_IMAGE.sub(IMAGE_PLACEHOLDER, text)
        else:
            text = text.replace("<image>", IMAGE_PLACEHOLDER).replace("<video>", IMAGE_PLACEHOLDER)
        turns.append((roles[t["from"]], text))
    while turns and turns[0][0] == "assistant":
        turns = turns[1:]
    while turns and turns[-1][0] == "user":
        turns = turns[:-1]
    return turns, (paths if qwenvl else None)


def _minigpt4qwen_turns(row):
    missing = [k for k in ("instruction", "output") if k not in row]
    if missing:
        raise ValueError(f"missing key {missing[0]!r} (need 'instruction' and 'output', "
                         "or LLaVA 'conversations')")
    ins, out = row["instruction"], row["output"]
    if isinstance(ins, str) and isinstance(out, str):
        ins, out = [ins], [out]
    elif not (_str_list(ins) and _str_list(out)):
        raise ValueError("'instruction' and 'output' must both be strings or both be "
                         "non-empty lists of strings")
    if len(ins) != len(out):
        raise ValueError(f"'instruction' has {len(ins)} turns but 'output' has {len(out)}")
    return [t for pair in zip(ins, out) for t in (("user", pair[0]), ("assistant", pair[1]))]


def _videochatgpt_turns(row):
    missing = [k for k in ("video_id", "q", "a") if k not in row]
    if missing:
        raise ValueError(f"missing key {missing[0]!r} (Video-ChatGPT rows need 'video_id', 'q' and 'a')")
    if not all(isinstance(row[k], str) for k in ("video_id", "q", "a")):
        raise ValueError("'video_id', 'q' and 'a' must be strings")
    return [("user", f"{IMAGE_PLACEHOLDER} {row['q']}"), ("assistant", row["a"])]


def _caption_turns(row):
    if not (isinstance(row.get("image_id"), str) and isinstance(row.get("caption"), str)):
        raise ValueError("MiniGPT-4 rows need a string 'image_id' and a string 'caption'")
    return [("user", ALIGN_PROMPTS[zlib.crc32(row["image_id"].encode()) % len(ALIGN_PROMPTS)]),
            ("assistant", row["caption"])]


def parse_row(row, image_root, index=None):
    """One JSON row of any supported layout -> dict(turns, media (paths), video (bool), kind
    ('text-only', 'single image', 'multi-image', 'video'), format, task, user_turns).
    ValueError says what is wrong; MissingMedia (a ValueError) when a file is not there."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    index = index or MediaIndex()
    qwenvl_paths, video_id = None, None
    if "conversations" in row:
        turns, qwenvl_paths = _conversation_turns(row["conversations"])
        fmt = "llava" if qwenvl_paths is None else "qwen-vl"
    elif "instruction" in row or "output" in row:
        turns, fmt = _minigpt4qwen_turns(row), "minigpt4qwen"
    elif "image_id" in row or "caption" in row:
        turns, fmt = _caption_turns(row), "minigpt4"
    elif {"video_id", "q", "a"} & set(row):
        turns, fmt, video_id = _videochatgpt_turns(row), "videochatgpt", row["video_id"]
    else:
        raise ValueError(f"unknown row layout with keys {sorted(row)} ({SUPPORTED})")
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("no assistant turn: nothing to learn from")
    if "image" in row and "video" in row:
        raise ValueError("a row has 'image' or 'video', not both")
    media, video = row.get("image", row.get("video", [])), "video" in row or video_id is not None
    if fmt == "minigpt4":
        media = row["image_id"] + ".jpg"
    if isinstance(media, str):
        media = [media]
    if not (media == [] or _str_list(media)) or ("video" in row and len(media) != 1):
        raise ValueError(f"'image' must be a path or a list of paths, 'video' one path; got {media!r}")
    if qwenvl_paths:
        if media:
            raise ValueError("a Qwen-VL row names its images in <img>...</img>, not also in 'image'")
        remote = [p for p in qwenvl_paths if re.match(r"[a-z]+://", p)]
        if remote:
            raise ValueError(f"remote image {remote[0]!r}: download it and give a path under image_root")
        media = qwenvl_paths
    media = [os.path.join(image_root, m) for m in media]
    if video_id is not None or (video and media[0].endswith(".pkl")):  # a video named by its id
        stem = os.path.join(image_root, video_id) if video_id is not None else media[0][:-4]
        found = index.find_video(stem)
        if found is None:
            raise MissingMedia(f"video file not found: {stem}{{{','.join(VIDEO_EXTS)}}}")
        media = [found]
    for m in media:
        if not index.exists(m):
            raise MissingMedia(f"{'video' if video else 'image'} file not found: {m}")
    wrong = [role for role, text in turns if role != "user" and IMAGE_HERE in text]
    if wrong:
        raise ValueError(f"image placeholder in a {wrong[0]} turn; placeholders go in user turns")
    n_here = sum(text.count(IMAGE_HERE) for _, text in turns)
    if video and (n_here != 1 or sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns) != 1):
        raise ValueError(f"a video row needs exactly one {IMAGE_PLACEHOLDER}, found {n_here} {IMAGE_HERE}")
    if not video and n_here != len(media):
        raise ValueError(f"{n_here} image placeholders but {len(media)} images")
    if "task" in row and not isinstance(row["task"], str):
        raise ValueError(f"'task' must be a string, got {row['task']!r}")
    kind = "video" if video else {0: "text-only", 1: "single image"}.get(len(media), "multi-image")
    return dict(turns=turns, media=media, video=video, kind=kind, format=fmt, task=row.get("task"),
                user_turns=sum(role == "user" for role, _ in turns))
