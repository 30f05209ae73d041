"""
Data for nanoMPP: images, videos, the chat template with Qwen's loss mask, and the dataset.

Reproduces the input side of MiniGPT4Qwen / MPP-Qwen-Next: BLIP-2 image preprocessing, the
`<Img><ImageHere></Img>` placeholder whose `<ImageHere>` becomes num_query_tokens copies of
`<|extra_0|>`, videos as up to 32 frames sampled at a fixed interval, and ChatML with the loss mask
of Qwen's finetune recipe. The public row formats (LLaVA, Video-ChatGPT, MiniGPT4Qwen, Qwen-VL)
are read by formats.py; `python datacheck.py FILE --image_root DIR` reports on a file.
Image preprocessing lives here rather than in vit.py so that model files import with torch alone:
Pillow and PyAV are data concerns.

Truncation policy: a sequence longer than max_len is cut at max_len, but only after the turn that
holds its last image (so every image token, `</Img>` and the closing `<|im_end|>` survive). A row
whose images do not fit that way is dropped when the dataset is built, with one warning giving the
count; it is never silently misaligned. Malformed rows raise an error naming the file and the row,
or with skip_bad=True are skipped with one counted warning.

Start-up: the rows are validated and tokenized once, into an index (per row its byte span in the
file, kind, task, media, token count) that index.py stores beside the data file, keyed by its content,
the tokenizer, the template and the settings; later runs and every rank read it (665k LLaVA rows with
Qwen's vocabulary: 3-4 s and 400 MB per process, against minutes and 2 GB when every process parsed
and kept every row), and __getitem__ reads, parses and tokenizes its row again.
"""
import array
from collections.abc import Sequence
import json
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from formats import IMAGE_HERE, IMAGE_PLACEHOLDER, MediaIndex, iter_rows, parse_row, read_row
from index import digest, file_digest, load_index
from model import IGNORE

MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP-2's (CLIP's) normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN, _STD = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
MAX_IMAGE_PIXELS = 64_000_000  # ~8000x8000; bigger files are refused before any decoding
IMAGE_TOKEN = "<|extra_0|>"
SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")

# The chat templates, one per LLM family: the text that closes every answer (supervised, so the
# model learns to end) and the tokens that end generation. data.py builds prompts and labels from
# it, evaluate.py cuts gold answers with it, chat.py stops on it; `pad` fills batches.
# ChatML (Qwen v1 and v2): <|im_start|>role\n text <|im_end|>\n per turn.
# phi (TinyGPT-V / MiniGPT-v2 style): "[INST] question [/INST]" + " answer<|endoftext|>"; TinyGPT-V
# ends answers with "###", we with Phi-2's own <|endoftext|>, one id to stop on.
# minigpt4 (LLaMA / Vicuna, Vision-CAIR/MiniGPT-4 minigpt4/conversation/conversation.py, CONV_VISION):
# "<s>{system}###Human: {question}###Assistant: {answer}###Human: ..."; answers end with "###" (the
# stage-2 config's end_sym), and generation stops on "▁###" (835 in LLaMA's vocabulary, the first of
# MiniGPT-4's two stop sequences; the other, "##" "#" as "###" reads right after a word, is two
# tokens, which single-token stops cannot express) or on Vicuna's </s>.
TEMPLATES = {
    "chatml": dict(end="<|im_end|>\n", stops=("<|im_end|>", "<|im_start|>", "<|endoftext|>"), pad="<|endoftext|>"),
    "phi": dict(end="<|endoftext|>", stops=("<|endoftext|>",), pad="<|endoftext|>"),
    "minigpt4": dict(end="###", stops=("###", "</s>"), pad="</s>",
                     system="Give the following image: <Img>ImageContent</Img>. You will be able to see the "
                            "image once I provide it to you. Please answer my questions."),
}
LLM_TEMPLATES = {"qwen": "chatml", "phi": "phi", "llama": "minigpt4"}  # MMConfig.llm_type -> its template

# --- images -------------------------------------------------------------------------------------


def _check_path(path, what):
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} path is a directory: {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")


def to_rgb(img):
    """Any PIL mode -> RGB. Transparency is composited over white (a plain convert would show
    the colour hidden under alpha 0); 16-bit grey is scaled to 8 bits (convert would clip at 255)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path, name=None):
    """Open an image file as RGB with its EXIF orientation applied; errors name the file. `path` may
    also be a binary file object (serve.py's uploaded bytes, through the same checks), `name`
    naming it in errors."""
    if hasattr(path, "read"):
        src, path = path, name or "image data"
    else:
        src = path = os.fspath(path)
        _check_path(path, "image")
    too_large = f"image too large (decompression bomb?): {path}"
    try:
        with warnings.catch_warnings():  # Pillow only warns between its limit and twice it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src)
    except UnidentifiedImageError:
        raise ValueError(f"not an image file (unrecognised format): {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{too_large} ({e})") from None
    with img:  # Image.open read only the header: refuse huge images before decoding them
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{too_large} is {img.width}x{img.height}, more than "
                             f"data.MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS} pixels")
        try:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
        except (OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"truncated or corrupt image file: {path} ({e})") from None


def _uniform(lo, hi, generator):
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _random_crop_box(w, h, generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box: area fraction in `scale`, log-uniform aspect ratio,
    10 tries, then a centre crop clamped to `ratio`."""
    for _ in range(10):
        area = w * h * _uniform(*scale, generator)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), generator))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x = torch.randint(0, w - cw + 1, (), generator=generator).item()
            y = torch.randint(0, h - ch + 1, (), generator=generator).item()
            return x, y, x + cw, y + ch
    cw, ch = w, h
    if w / h < ratio[0]:
        ch = round(w / ratio[0])
    elif w / h > ratio[1]:
        cw = round(h * ratio[1])
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


def preprocess(img, size, train=False, generator=None):
    """PIL image -> normalised FloatTensor[3, size, size]. Eval: bicubic resize of the whole image
    (aspect not kept, as BLIP-2). Train: random resized crop (scale 0.5-1) and a horizontal flip
    with p=0.5, drawn from `generator` or torch's global RNG (so torch.manual_seed controls it)."""
    img = to_rgb(img)
    box = _random_crop_box(*img.size, generator) if train else (0, 0, *img.size)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if train and torch.rand((), generator=generator).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - _MEAN) / _STD

# --- videos -------------------------------------------------------------------------------------


def _open_video(path):
    import av
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read video file: {path} ({e})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"no video stream in file: {path}")
    return container


def count_video_packets(path):
    """Cheap frame-count estimate (demux only, no decoding), used to validate rows up front."""
    import av
    _check_path(path, "video")
    with _open_video(path) as c:
        try:
            return sum(1 for p in c.demux(c.streams.video[0]) if p.size)
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot read video file: {path} ({e})") from None


def video_frame_indices(total, max_frames):
    """The frames MiniGPT4Qwen keeps of a video of `total` frames: every max(1, total // max_frames)-th,
    at most max_frames of them."""
    return list(range(0, total, max(1, total // max_frames)))[:max_frames]


def load_video(path, max_frames=32):
    """Decode up to max_frames RGB frames at a fixed interval (video_frame_indices), as MiniGPT4Qwen
    does. The frame count comes from demuxing (packets, no decoding); one threaded decoding pass
    then converts to RGB only the frames kept (a kept frame needs its predecessors decoded anyway:
    inter-coded streams cannot skip them). Should the decoder yield another number of frames than
    the container's packets, a second pass selects from the true count, so the frames are always
    those a count of decoded frames would pick."""
    import av
    from av.video.reformatter import VideoReformatter
    path = os.fspath(path)
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    to_rgb24 = VideoReformatter()  # reused: frame.to_image() would set up a converter per frame

    def decode(keep):
        frames, total = [], 0
        with _open_video(path) as c:
            c.streams.video[0].thread_type = "AUTO"  # frame and slice threads: the same frames, sooner
            for i, frame in enumerate(c.decode(video=0)):
                total += 1
                if i in keep:
                    frames.append(Image.fromarray(to_rgb24.reformat(frame, format="rgb24").to_ndarray()))
        return frames, total

    packets = count_video_packets(path)  # also checks that the path exists
    try:
        frames, total = decode(set(video_frame_indices(packets, max_frames)))
        if total != packets:
            frames, _ = decode(set(video_frame_indices(total, max_frames)))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video file: {path} ({e})") from None
    if not frames:
        raise ValueError(f"video has no decodable frames: {path}")
    return frames

# --- chat template and loss mask ----------------------------------------------------------------


def _turn(t):
    role, text = (t["role"], t["content"]) if isinstance(t, dict) else t
    if role not in ROLES or not isinstance(text, str):
        raise ValueError(f"a turn must be (role in {ROLES}, str), got {t!r}")
    return role, text


def _encode(tok, turns, num_query_tokens, n_frames=None, template="chatml", system=SYSTEM):
    """encode_conversation, plus media_end: the index just past the turn holding the last image
    token (0 if none), the earliest place a truncation may cut."""
    enc = lambda s: tok.encode(s, allowed_special="none")  # user text never becomes control tokens
    image_id = tok.token_id(IMAGE_TOKEN)
    ids, labels, media_end = [], [], 0

    def add(part, supervised):
        ids.extend(part)
        labels.extend(part if supervised else [IGNORE] * len(part))

    def content(role, text):
        if role != "user":  # placeholders are only expanded where the data puts images
            return enc(text)
        if n_frames is not None:
            text = text.replace(IMAGE_PLACEHOLDER, "<Img>" + IMAGE_HERE * n_frames + "</Img>")
        out = []
        for k, piece in enumerate(text.split(IMAGE_HERE)):
            out += [image_id] * (num_query_tokens if k else 0) + enc(piece)
        return out

    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    end = tok.encode(TEMPLATES[template]["end"], allowed_special="all")
    turns = [_turn(t) for t in turns]
    if template == "chatml":
        if system is not None and (not turns or turns[0][0] != "system"):
            turns = [("system", system)] + turns
        start, nl = tok.token_id("<|im_start|>"), enc("\n")
        for role, text in turns:
            body = content(role, text)
            add([start], True)  # Qwen's recipe supervises every turn's boundary tokens
            add(enc(role) + nl, False)
            add(body, role == "assistant")
            add(end, True)
            media_end = len(ids) if image_id in body else media_end
        if turns and turns[-1][0] == "user":  # a prompt for generation: open the assistant turn
            add([start] + enc("assistant") + nl, False)
    elif template == "minigpt4":
        # Each segment (prompt, answer, end) is encoded on its own, as MiniGPT-4 tokenizes its prompt
        # segments, so each starts with sentencepiece's dummy-prefix space; only answers and their
        # "###" are supervised (its training targets). The default `system` is ChatML's: use ours.
        system = TEMPLATES[template]["system"] if system == SYSTEM else system
        head = "" if system is None else system + "###"
        add([tok.token_id("<s>")], False)
        for role, text in turns:
            if role == "system":
                head = text + "###"
            elif role == "user":
                body = content(role, f"{head}Human: {text}###Assistant:")
                add(body, False)
                head, media_end = "", len(ids) if image_id in body else media_end
            else:
                add(enc(text) + end, True)
    else:  # phi
        for role, text in turns:
            if role == "assistant":
                add(enc(" " + text) + end, True)
                continue
            body = content(role, f"[INST] {text} [/INST]" if role == "user" else text + "\n")
            add(body, False)
            media_end = len(ids) if image_id in body else media_end
    return ids, labels, media_end


def encode_conversation(tok, turns, num_query_tokens, n_frames=None, template="chatml", system=SYSTEM):
    """turns: [(role, text)] or [{"role", "content"}], roles system/user/assistant. Returns
    (input_ids, labels), labels aligned with input_ids (not shifted), IGNORE (-100) where unsupervised.
    ChatML mask (Qwen's finetune recipe): every turn keeps <|im_start|> and its closing
    <|im_end|> \\n; system and user text (role word included) are IGNORE; in assistant turns the
    role word and its \\n are IGNORE and the content is kept. `<ImageHere>` in user text becomes
    num_query_tokens image tokens; with n_frames (a video) each `<Img><ImageHere></Img>` first
    becomes `<Img>` + `<ImageHere>` x n_frames + `</Img>`. ChatML: `system` is prepended unless the
    turns start with one (None: no system turn). A conversation ending with a user turn gets the
    assistant header appended, ready for generation. template="phi": TinyGPT-V style
    "[INST] {user} [/INST]" + " {answer}<|endoftext|>", only answers and their end token
    supervised, no default system prompt (a system turn in `turns` is masked plain text)."""
    ids, labels, _ = _encode(tok, turns, num_query_tokens, n_frames, template, system)
    return ids, labels

# --- dataset ------------------------------------------------------------------------------------


def fit(n_tokens, media_end, max_len):
    """The truncation policy: 'fits', 'truncated' (cut at max_len, after the turn holding the last
    image) or 'dropped' (an image's tokens would be cut)."""
    return "fits" if n_tokens <= max_len else "truncated" if media_end <= max_len else "dropped"


# The index: one entry per row kept, built (and every row validated) once, then stored beside the
# data file under a name keyed by what it depends on, and re-read by every later run and rank (index.py).
INDEX_VERSION = 1  # bump when what an entry holds, or how rows are validated, changes
KINDS = ("text-only", "single image", "multi-image", "video")


def build_index(json_path, image_root, tok, num_query_tokens, max_len, max_frames, template, skip_bad):
    """Validate every row (structure, files exist, placeholder counts, a video's frames, fit in
    max_len) and return the index as numpy arrays: per row kept, its row number and byte span in
    the file, kind, task, media paths, predicted frames (-1: not a video) and token count after
    the template; the bad rows (with skip_bad) and the rows dropped as too long."""
    cols = {k: array.array("q") for k in ("row", "offset", "length", "n_frames", "n_tokens", "kind", "task", "media_end")}
    media, tasks, bad, too_long, index = bytearray(), {}, [], [], MediaIndex()
    for i, (row, offset, length) in enumerate(iter_rows(json_path, spans=True)):
        try:
            s = parse_row(row, image_root, index)
            # a video's packet count predicts its frames; __getitem__ re-checks the real count
            n_frames = min(max_frames, count_video_packets(s["media"][0])) if s["video"] else None
            if n_frames == 0:
                raise ValueError(f"video has no frames: {s['media'][0]}")
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{json_path} row {i}: {e}") from None
            bad.append((i, str(e)))
            continue
        ids, _, media_end = _encode(tok, s["turns"], num_query_tokens, n_frames, template)
        if fit(len(ids), media_end, max_len) == "dropped":
            too_long.append(i)
            continue
        media += "\0".join(s["media"]).encode()
        task = -1 if s["task"] is None else tasks.setdefault(s["task"], len(tasks))
        for k, v in zip(cols, (i, offset, length, -1 if n_frames is None else n_frames, len(ids),
                               KINDS.index(s["kind"]), task, len(media))):
            cols[k].append(v)
    return dict({k: np.array(v, np.int64) for k, v in cols.items()}, media=np.frombuffer(bytes(media), np.uint8),
                tasks=np.array(list(tasks), dtype=str), bad_row=np.array([r for r, _ in bad], np.int64),
                bad_why=np.array([w for _, w in bad], dtype=str), too_long=np.array(too_long, np.int64))


class _Listed(MediaIndex):
    """The media the index found when it validated the row: no directory listing again."""

    def __init__(self, media):
        super().__init__()
        self.media = media

    def exists(self, path):
        return True

    def find_video(self, stem):
        return self.media[0]


class VLDataset(torch.utils.data.Dataset):
    """Rows are validated (structure, files exist, placeholder counts, fit in max_len) when the
    index is built, the first time a data file is used with these settings; later runs read the
    cache file (see index.load_index). A row is read again from the file, parsed and tokenized in
    __getitem__, and its images and videos are loaded there. Item: dict(input_ids LongTensor[T],
    labels LongTensor[T], images FloatTensor[n,3,S,S], task str if the row has one).
    load_media=False (a pipeline's later stages, which only need tokens): no images are opened and
    items have no `images`; a video's tokens follow its predicted frame count. frames_must_match:
    a video that decodes to another number of frames than predicted is an error (so that all stages
    agree on its tokens). sample(k) or samples[k] is the parsed row (turns, media paths, task, ...)."""

    def __init__(self, json_path, image_root, tok, num_query_tokens, image_size, max_len,
                 train=False, skip_bad=False, max_frames=32, template="chatml", cache=True):
        self.json_path, self.tok, self.nq, self.image_size = str(json_path), tok, num_query_tokens, image_size
        self.max_len, self.train, self.max_frames, self.template = max_len, train, max_frames, template
        self.image_root, self.load_media, self.frames_must_match = image_root, True, False
        key = json.dumps(dict(version=INDEX_VERSION, data=file_digest(self.json_path),
                              tokenizer=digest(x for kv in sorted(tok.files().items()) for x in kv),
                              # the media paths stored are the rows' paths joined to image_root as given: a
                              # relative root's paths hold only from the directory they were built in
                              image_root=[image_root or "", "" if os.path.isabs(image_root or "") else os.getcwd()],
                              num_query=num_query_tokens,
                              max_len=max_len, max_frames=max_frames, template=template, skip_bad=skip_bad))
        build = lambda: build_index(self.json_path, image_root, tok, num_query_tokens, max_len, max_frames, template, skip_bad)
        self.index, self.index_path, self.index_built = load_index(self.json_path, build, key, cache)
        self.bad = list(zip(self.index["bad_row"].tolist(), self.index["bad_why"].tolist()))
        self.too_long = self.index["too_long"].tolist()
        if self.bad:
            i, why = self.bad[0]
            warnings.warn(f"{json_path}: skipped {len(self.bad)} malformed rows (first: row {i}: {why})")
        if self.too_long:
            warnings.warn(f"{json_path}: dropped {len(self.too_long)} rows whose images do not fit "
                          f"max_len={max_len} (first: row {self.too_long[0]})")

    def __len__(self):
        return len(self.index["row"])

    def media(self, k):
        x = self.index
        start = int(x["media_end"][k - 1]) if k else 0
        text = x["media"][start:int(x["media_end"][k])].tobytes().decode()
        return text.split("\0") if text else []

    def sample(self, k):
        """Row k (of the rows kept), read again from the file and parsed: dict(turns, media, video,
        kind, format, task, user_turns, row, n_frames (predicted; None if not a video))."""
        x, media = self.index, self.media(k)
        s = parse_row(read_row(self.json_path, int(x["offset"][k]), int(x["length"][k])), self.image_root, _Listed(media))
        n = int(x["n_frames"][k])
        return dict(s, media=media, row=int(x["row"][k]), n_frames=None if n < 0 else n)

    @property
    def samples(self):
        return _Samples(self)

    def rows_with_task(self, names):
        """Positions of the rows whose task is one of `names`."""
        codes = [i for i, t in enumerate(self.index["tasks"].tolist()) if t in names]
        return np.flatnonzero(np.isin(self.index["task"], codes)).tolist()

    def __getitem__(self, k):
        s = self.sample(k)
        where, frames, n_frames = f"{self.json_path} row {s['row']}", [], s["n_frames"]
        if self.load_media:
            try:
                frames = (load_video(s["media"][0], self.max_frames) if s["video"]
                          else [load_image(p) for p in s["media"]])
            except (OSError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
            if s["video"] and len(frames) != n_frames and self.frames_must_match:
                raise ValueError(f"{where}: the video decoded to {len(frames)} frames, its packets predicted "
                                 f"{n_frames}; a pipeline's later stages build its tokens from the prediction")
            n_frames = len(frames) if s["video"] else None
        ids, labels, media_end = _encode(self.tok, s["turns"], self.nq, n_frames, self.template)
        if len(ids) > self.max_len:
            if media_end > self.max_len:
                raise ValueError(f"{where}: the video decoded to {n_frames} frames, more than its "
                                 f"packets predicted, and no longer fits max_len={self.max_len}")
            ids, labels = ids[:self.max_len], labels[:self.max_len]
        item = dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
        if self.load_media:
            size = self.image_size
            images = [preprocess(f, size, self.train) for f in frames]
            item["images"] = torch.stack(images) if images else torch.zeros(0, 3, size, size)
        if s["task"] is not None:
            item["task"] = s["task"]
        return item


class _Samples(Sequence):
    """ds.samples: the parsed rows, each read when asked for (665k rows' text would cost GBs)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, k):
        return self.ds.sample(range(len(self.ds))[k])


def collate(samples, pad_id, fixed_len=None):
    """Right-pad a list of items into a batch: dynamic length (the longest sample) by default,
    or fixed_len for static shapes (the pipeline). Padding: pad_id, label IGNORE, attention 0.
    Images are concatenated sample by sample, each in placeholder order. `task` (a list) is
    passed through when the items have one."""
    lens = [len(s["input_ids"]) for s in samples]
    T = fixed_len or max(lens)
    if max(lens) > T:
        raise ValueError(f"a sample has {max(lens)} tokens, more than fixed_len={T}")
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, (s, n) in enumerate(zip(samples, lens)):
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], 1
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
    if "images" in samples[0]:  # not on a pipeline's later stages
        batch["images"] = torch.cat([s["images"] for s in samples])
    if any("task" in s for s in samples):
        batch["task"] = [s.get("task") for s in samples]
    return batch
