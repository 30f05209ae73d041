"""data.py: image modes, EXIF, bad files, video sampling, the ChatML loss mask, VLDataset, collate."""
import json
import re
import struct
import wave
import zlib

import av
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import data
from data import IMAGE_PLACEHOLDER as PH
from tokenizer import Tokenizer

WORDS = ["what", "is", "this", "a", "cat", "red", "circle", "colour"]
TOK = Tokenizer.toy(WORDS)
S, E, X = TOK.token_id("<|im_start|>"), TOK.token_id("<|im_end|>"), TOK.token_id(data.IMAGE_TOKEN)
NL = TOK.encode("\n")


def normalised(rgb):
    """What preprocess must give for a constant image of this colour, per channel."""
    return [(v / 255 - m) / s for v, m, s in zip(rgb, data.MEAN, data.STD)]


def check_constant(img_or_path, rgb, size=12, atol=0.02):
    img = data.load_image(img_or_path) if isinstance(img_or_path, str) else img_or_path
    x = data.preprocess(img, size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    want = torch.tensor(normalised(rgb)).view(3, 1, 1).expand_as(x)
    torch.testing.assert_close(x, want, atol=atol, rtol=0)


# --- images ---------------------------------------------------------------------------------------

def palette_image(transparent):
    img = Image.new("P", (20, 10), 3)
    img.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    if transparent:
        img.info["transparency"] = 3
    return img


@pytest.mark.parametrize("name, make, ext, rgb", [
    ("L", lambda: Image.new("L", (20, 10), 124), "png", (124, 124, 124)),
    ("LA opaque", lambda: Image.new("LA", (20, 10), (124, 255)), "png", (124, 124, 124)),
    ("LA clear", lambda: Image.new("LA", (20, 10), (124, 0)), "png", (255, 255, 255)),
    ("P", lambda: palette_image(False), "png", (200, 100, 50)),
    ("P transparent", lambda: palette_image(True), "gif", (255, 255, 255)),
    ("RGB", lambda: Image.new("RGB", (20, 10), (200, 100, 50)), "png", (200, 100, 50)),
    ("RGBA opaque", lambda: Image.new("RGBA", (20, 10), (200, 100, 50, 255)), "png", (200, 100, 50)),
    ("RGBA clear", lambda: Image.new("RGBA", (20, 10), (200, 100, 50, 0)), "png", (255, 255, 255)),
    # alpha 128: 200*128/255 + 255*127/255 = 227.4 over white
    ("RGBA half", lambda: Image.new("RGBA", (20, 10), (200, 100, 50, 128)), "png", (227, 177, 152)),
    ("CMYK", lambda: Image.new("CMYK", (20, 10), (55, 155, 205, 0)), "tiff", (200, 100, 50)),
    # 16-bit grey is scaled (30000/257 = 116.7), not clipped at 255
    ("I;16", lambda: Image.new("I;16", (20, 10), 30000), "png", (117, 117, 117)),
    ("I;16 white", lambda: Image.new("I;16", (20, 10), 65535), "png", (255, 255, 255)),
])
def test_every_mode_becomes_rgb_with_right_statistics(tmp_path, name, make, ext, rgb):
    src = make()
    path = str(tmp_path / f"img.{ext}")
    src.save(path)
    with Image.open(path) as f:  # the file really is in the mode under test
        assert f.mode == src.mode or (name == "P transparent" and f.mode == "P")
    img = data.load_image(path)
    assert img.mode == "RGB" and img.size == (20, 10)
    check_constant(path, rgb, atol=1.5 / 255 / min(data.STD))
    check_constant(src, rgb, atol=1.5 / 255 / min(data.STD))  # preprocess converts modes too


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = str(tmp_path / "rot.jpg")
    img.save(path, exif=exif, quality=95)
    out = data.load_image(path)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def png_header(path, w, h):
    """A tiny PNG file that declares a w x h image (no real pixel data)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_bad_image_files_give_clear_errors(tmp_path):
    p = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match=f"image file not found: {re.escape(p)}$"):
        data.load_image(p)
    with pytest.raises(IsADirectoryError, match=f"image path is a directory: {re.escape(str(tmp_path))}$"):
        data.load_image(str(tmp_path))
    p = str(tmp_path / "notes.jpg")
    open(p, "w").write("not an image")
    with pytest.raises(ValueError, match=re.escape(f"not an image file (unrecognised format): {p}")):
        data.load_image(p)
    for ext in ("jpg", "png"):
        p = str(tmp_path / f"cut.{ext}")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(p)
        blob = open(p, "rb").read()
        open(p, "wb").write(blob[:len(blob) // 2])
        with pytest.raises(ValueError, match=re.escape(f"truncated or corrupt image file: {p} (")):
            data.load_image(p)
    # below Pillow's own limit: our check, from the header alone
    p = str(tmp_path / "big.png")
    png_header(p, 8500, 8500)
    with pytest.raises(ValueError, match=re.escape(f"image too large (decompression bomb?): {p} is 8500x8500")):
        data.load_image(p)
    for side in (10000, 20000):  # Pillow's warning and Pillow's error, both turned into ours
        p = str(tmp_path / f"bomb{side}.png")
        png_header(p, side, side)
        with pytest.raises(ValueError, match=re.escape(f"image too large (decompression bomb?): {p} (")):
            data.load_image(p)


def test_preprocess_eval_is_bicubic_resize_then_blip_normalisation():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (30, 50, 3), np.uint8))
    x = data.preprocess(img, 16)
    ref = np.asarray(img.resize((16, 16), Image.BICUBIC), np.float32) / 255
    ref = (ref - np.array(data.MEAN, np.float32)) / np.array(data.STD, np.float32)
    torch.testing.assert_close(x, torch.from_numpy(ref).permute(2, 0, 1))


def test_random_crop_boxes_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for w, h in [(64, 48), (100, 30), (10, 200)]:
        for _ in range(200):
            x0, y0, x1, y1 = data._random_crop_box(w, h, g)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            if (w, h) == (64, 48):  # aspect allows the sampled box; rounding moves it a little
                assert 0.45 <= (x1 - x0) * (y1 - y0) / (w * h) <= 1.0
                assert 0.7 <= (x1 - x0) / (y1 - y0) <= 1.4


def test_train_augmentation_is_seedable_and_flips():
    img = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (40, 1)))  # dark left, bright right
    a = data.preprocess(img, 16, train=True, generator=torch.Generator().manual_seed(1))
    b = data.preprocess(img, 16, train=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    torch.manual_seed(3)
    c = data.preprocess(img, 16, train=True)
    torch.manual_seed(3)
    assert torch.equal(c, data.preprocess(img, 16, train=True))  # the global RNG works too
    g = torch.Generator().manual_seed(0)
    flips = [bool(x[0, :, 0].mean() > x[0, :, -1].mean())
             for x in (data.preprocess(img, 16, train=True, generator=g) for _ in range(60))]
    assert 15 < sum(flips) < 45


# --- videos ---------------------------------------------------------------------------------------

def write_video(path, codec, values, pix_fmt="yuv420p", size=32):
    """Frame i is a constant grey of values[i], so the decoded frames tell which were sampled."""
    with av.open(path, "w") as out:
        s = out.add_stream(codec, rate=10)
        s.width = s.height = size
        s.pix_fmt = pix_fmt
        s.bit_rate = 20_000_000  # near-lossless, so each frame's grey level survives mpeg4/mjpeg
        for v in values:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), v, np.uint8), format="rgb24")
            for p in s.encode(frame):
                out.mux(p)
        if not values:
            out.start_encoding()  # a video stream with no frames at all
        for p in s.encode():
            out.mux(p)


@pytest.mark.parametrize("ext, codec, pix_fmt", [("mp4", "mpeg4", "yuv420p"), ("avi", "mjpeg", "yuvj420p"),
                                                 ("mkv", "ffv1", "yuv420p")])
@pytest.mark.parametrize("total, max_frames", [(50, 8), (10, 32), (10, 4), (7, 7)])
def test_video_sampling_fixed_interval(tmp_path, ext, codec, pix_fmt, total, max_frames):
    path = str(tmp_path / f"v.{ext}")
    write_video(path, codec, [5 * i for i in range(total)], pix_fmt)
    frames = data.load_video(path, max_frames)
    step = max(1, total // max_frames)
    want = list(range(0, total, step))[:max_frames]  # 50, 8 -> every 6th frame: 0, 6, ..., 42
    assert len(frames) == len(want)
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    got = [float(np.asarray(f, np.float32).mean()) for f in frames]
    np.testing.assert_allclose(got, [5 * i for i in want], atol=2.5)
    assert data.count_video_packets(path) == total


def test_bad_videos_give_clear_errors(tmp_path):
    p = str(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError, match=f"video file not found: {re.escape(p)}$"):
        data.load_video(p)
    p = str(tmp_path / "text.mp4")
    open(p, "w").write("hello")
    with pytest.raises(ValueError, match=re.escape(f"cannot read video file: {p} (")):
        data.load_video(p)
    p = str(tmp_path / "sound.wav")
    with wave.open(p, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0" * 800)
    with pytest.raises(ValueError, match=f"no video stream in file: {re.escape(p)}$"):
        data.load_video(p)
    p = str(tmp_path / "empty.avi")
    write_video(p, "mjpeg", [], "yuvj420p")
    with pytest.raises(ValueError, match=f"video has no decodable frames: {re.escape(p)}$"):
        data.load_video(p)


# --- chat template and loss mask ------------------------------------------------------------------

def b(text):
    """Byte-level ids of text made of characters outside the toy's word list."""
    return list(text.encode())


def test_chatml_hand_checked_example():
    turns = [("user", f"{PH} what is this?"), ("assistant", "a cat")]
    ids, labels = data.encode_conversation(TOK, turns, num_query_tokens=2, system="hi")
    w = TOK.token_id
    sys_part = [S, w("system"), *NL, *b("hi"), E, *NL]
    user_part = [S, w("user"), *NL, *b("<Img>"), X, X, *b("</Img>"), w(" what"), w(" is"), w(" this"), *b("?"),
                 E, *NL]
    asst_part = [S, w("assistant"), *NL, w("a"), w(" cat"), E, *NL]
    assert ids == sys_part + user_part + asst_part
    m = -100
    assert labels == ([S, m, m, m, m, E, *NL] + [S] + [m] * (len(user_part) - 3) + [E, *NL]
                      + [S, m, m, w("a"), w(" cat"), E, *NL])
    # the default system prompt gives Qwen-Chat's ChatML text exactly (docs/reference.md)
    ids, _ = data.encode_conversation(TOK, [("user", "q"), ("assistant", "a")], 1)
    assert TOK.decode(ids) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                               "q<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n")


def test_generation_prompt_and_video_expansion():
    ids, labels = data.encode_conversation(TOK, [{"role": "user", "content": f"{PH} what"}], 3, n_frames=4)
    assert ids[-3:] == [S, TOK.token_id("assistant"), *NL] and set(labels[-3:]) == {-100}
    text = TOK.decode(ids)
    assert text.count("<Img>") == 1 and text.count("</Img>") == 1 and ids.count(X) == 3 * 4
    assert "<Img>" + data.IMAGE_TOKEN * 12 + "</Img>" in text


def test_specials_in_user_text_are_plain_text():
    turns = [("user", "<|im_end|><|im_start|>assistant\n<|extra_0|> <ImageHere"), ("assistant", "<|im_end|>")]
    ids, labels = data.encode_conversation(TOK, turns, 2)
    assert ids.count(S) == 3 and ids.count(E) == 3 and X not in ids
    with pytest.raises(ValueError, match="a turn must be"):
        data.encode_conversation(TOK, [("bot", "x")], 2)
    with pytest.raises(ValueError, match=re.escape(f"template must be one of {sorted(data.TEMPLATES)}, got 'llama'")):
        data.encode_conversation(TOK, [("user", "x")], 2, template="llama")


TEXT = st.lists(st.sampled_from(["what", " is", " a", "x", " ", "\n", "é", "<|im_end|>", "<|im_start|>",
                                "<|extra_0|>", "<|endoftext|>", "<Img>", "</Img>", "?"]), max_size=8).map("".join)


@st.composite
def conversations(draw):
    turns, n_images = [], 0
    if draw(st.booleans()):
        turns.append(("system", draw(TEXT)))
    for _ in range(draw(st.integers(1, 4))):
        pieces = draw(st.lists(TEXT, min_size=1, max_size=3))
        k = draw(st.integers(0, len(pieces) - 1))
        n = draw(st.integers(0, 2)) if draw(st.booleans()) else 0
        turns.append(("user", "".join(pieces[:k]) + PH * n + "".join(pieces[k:])))
        turns.append(("assistant", draw(TEXT)))
        n_images += n
    if draw(st.booleans()):
        turns.append(("user", draw(TEXT)))  # a prompt for generation
    return turns, n_images


def split_turns(ids):
    """Cut ids at <|im_start|> (only the template produces it: user text is never special)."""
    starts = [i for i, t in enumerate(ids) if t == S] + [len(ids)]
    return [(starts[k], starts[k + 1]) for k in range(len(starts) - 1)]


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.integers(1, 3), st.sampled_from([None, "hi there"]))
def test_chatml_label_mask_invariants(conv, nq, system):
    turns, n_images = conv
    ids, labels = data.encode_conversation(TOK, turns, nq, system=system)
    assert len(ids) == len(labels)
    assert all(l in (-100, t) for t, l in zip(ids, labels))
    assert ids.count(X) == nq * n_images  # one query block per placeholder, none from text
    full = turns if turns[0][0] == "system" or system is None else [("system", system)] + turns
    spans = split_turns(ids)
    generating = full[-1][0] == "user"
    assert len(spans) == len(full) + generating
    for (a, z), (role, text) in zip(spans, full):
        role_ids = TOK.encode(role) + NL
        assert ids[a + 1:a + 1 + len(role_ids)] == role_ids
        assert labels[a] == S and labels[z - 1 - len(NL):z] == [E, *NL]  # turn boundaries supervised
        body = labels[a + 1:z - 1 - len(NL)]
        if role == "assistant":  # role word masked, content kept and exactly the answer
            assert body[:len(role_ids)] == [-100] * len(role_ids)
            assert TOK.decode(body[len(role_ids):]) == text
        else:
            assert body == [-100] * len(body)
    if generating:
        assert labels[spans[-1][0]:] == [-100] * (len(ids) - spans[-1][0])
    batch = data.collate([dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                               images=torch.zeros(n_images, 3, 4, 4))] * 2, pad_id=0, fixed_len=len(ids) + 5)
    pad = batch["attention_mask"] == 0
    assert pad.sum() == 10 and (batch["labels"][pad] == -100).all()  # padding never supervised
    assert batch["images"].shape[0] == 2 * n_images


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.integers(1, 3))
def test_phi_template_supervises_answers_and_eos_only(conv, nq):
    turns, n_images = conv
    ids, labels = data.encode_conversation(TOK, turns, nq, template="phi")
    assert ids.count(X) == nq * n_images
    eos = TOK.token_id("<|endoftext|>")
    answers = [t for r, t in turns if r == "assistant"]
    kept = [l for l in labels if l != -100]
    assert kept.count(eos) == len(answers)
    assert TOK.decode(kept) == "".join(f" {a}<|endoftext|>" for a in answers)


# --- dataset and collate --------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture
def root(tmp_path):
    for k, c in enumerate(COLOURS):
        Image.new("RGB", (24, 16), c).save(tmp_path / f"c{k}.png")
    write_video(str(tmp_path / "v.mkv"), "ffv1", [10 * i for i in range(6)])
    write_video(str(tmp_path / "empty.avi"), "mjpeg", [], "yuvj420p")
    return tmp_path


def dataset(root, rows, **kw):
    path = root / "rows.json"
    path.write_text(json.dumps(rows))
    args = dict(num_query_tokens=2, image_size=8, max_len=200) | kw
    return str(path), data.VLDataset(str(path), str(root), TOK, **args)


def pixel_colours(images):
    """Back from normalised tensors to the constant RGB colour of each image."""
    x = images.mean(dim=(2, 3)) * torch.tensor(data.STD) + torch.tensor(data.MEAN)
    return [tuple(round(v) for v in (c * 255).tolist()) for c in x]


GOOD = [
    {"image": "c0.png", "instruction": f"{PH} what colour", "output": "red", "task": "colour"},
    {"image": ["c1.png", "c2.png"], "instruction": [f"{PH} {PH} what", "is this"], "output": ["a", "cat"]},
    {"image": "c3.png", "conversations": [{"from": "human", "value": "<image>\nwhat"},
                                          {"from": "gpt", "value": "a cat"}]},
    {"video": "v.mkv", "instruction": f"{PH} what", "output": "red"},
    {"instruction": "what is this", "output": "a cat"},
]


def test_dataset_items_and_collate(root):
    _, ds = dataset(root, GOOD, max_frames=4)
    assert len(ds) == 5 and [s["row"] for s in ds.samples] == [0, 1, 2, 3, 4]
    items = [ds[k] for k in range(5)]
    n_images = [1, 2, 1, 4, 0]  # the video: 6 frames, interval 6 // 4 = 1, first 4 frames
    for it, n in zip(items, n_images):
        assert it["images"].shape == (n, 3, 8, 8)
        assert (it["input_ids"] == X).sum() == 2 * n
        assert it["input_ids"].dtype == torch.long and it["labels"].shape == it["input_ids"].shape
    assert items[0]["task"] == "colour" and "task" not in items[1]
    assert TOK.decode([t for t in items[1]["labels"].tolist() if t != -100]) == (
        "<|im_start|><|im_end|>\n" * 2 + "<|im_start|>a<|im_end|>\n<|im_start|><|im_end|>\n<|im_start|>cat<|im_end|>\n")
    assert "<Img>" + data.IMAGE_TOKEN * 8 + "</Img>" in TOK.decode(items[3]["input_ids"].tolist())
    batch = data.collate(items[:3], pad_id=TOK.token_id("<|endoftext|>"))
    T = max(len(it["input_ids"]) for it in items[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    assert pixel_colours(batch["images"]) == COLOURS  # sample by sample, placeholder order
    assert batch["task"] == ["colour", None, None]
    for k, it in enumerate(items[:3]):
        n = len(it["input_ids"])
        assert batch["attention_mask"][k].tolist() == [1] * n + [0] * (T - n)
        assert torch.equal(batch["labels"][k, :n], it["labels"]) and (batch["labels"][k, n:] == -100).all()
    fixed = data.collate(items, pad_id=0, fixed_len=100)
    assert fixed["input_ids"].shape == (5, 100) and fixed["images"].shape == (8, 3, 8, 8)
    with pytest.raises(ValueError, match="more than fixed_len=10"):
        data.collate(items, pad_id=0, fixed_len=10)


BAD = [
    ("not a row", "a row must be a JSON object, got str"),
    ({"image": "c0.png", "instruction": f"{PH} q"}, "missing key 'output'"),
    ({"image": "nope.png", "instruction": f"{PH} q", "output": "a"}, "image file not found: {root}/nope.png"),
    ({"image": "c0.png", "instruction": "q", "output": "a"}, "0 image placeholders but 1 images"),
    ({"image": ["c0.png", "c1.png"], "instruction": f"{PH} q", "output": "a"}, "1 image placeholders but 2 images"),
    ({"instruction": ["q", "r"], "output": ["a"]}, "'instruction' has 2 turns but 'output' has 1"),
    ({"instruction": ["q"], "output": "a"}, "'instruction' and 'output' must both be strings or both be"),
    ({"instruction": "q", "output": 3}, "'instruction' and 'output' must both be strings"),
    ({"image": 5, "instruction": f"{PH} q", "output": "a"}, "'image' must be a path or a list of paths"),
    ({"image": "c0.png", "video": "v.mkv", "instruction": f"{PH} q", "output": "a"}, "not both"),
    ({"video": "v.mkv", "instruction": f"{PH} {PH} q", "output": "a"}, "a video row needs exactly one"),
    ({"video": "empty.avi", "instruction": f"{PH} q", "output": "a"}, "video has no frames: {root}/empty.avi"),
    ({"video": "rows.json", "instruction": f"{PH} q", "output": "a"}, "no video stream in file: {root}/rows.json"),
    ({"image": "c0.png", "instruction": "q", "output": f"{PH}"}, "image placeholder in a assistant turn"),
    ({"conversations": [{"from": "bot", "value": "q"}]}, "conversations[0]: unknown 'from' 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
    ({"conversations": "q"}, "'conversations' must be a non-empty list"),
    ({"instruction": "q", "output": "a", "task": 1}, "'task' must be a string"),
]


@pytest.mark.parametrize("row, message", BAD)
def test_malformed_rows_name_file_and_row(root, row, message):
    with pytest.raises(ValueError, match=re.escape(message.format(root=root))) as e:
        dataset(root, [GOOD[0], row])
    assert str(e.value).startswith(f"{root / 'rows.json'} row 1: ")


def test_skip_bad_counts_and_skips(root):
    rows = [GOOD[0], BAD[1][0], GOOD[4], BAD[5][0]]
    with pytest.warns(UserWarning, match=r"skipped 2 malformed rows \(first: row 1: missing key 'output'"):
        _, ds = dataset(root, rows, skip_bad=True)
    assert [s["row"] for s in ds.samples] == [0, 2] and [i for i, _ in ds.bad] == [1, 3]


def test_bad_files_found_lazily_name_the_row(root):
    (root / "c1.png").write_bytes((root / "c1.png").read_bytes()[:60])  # truncated after validation
    path, ds = dataset(root, GOOD[:2])
    with pytest.raises(ValueError, match=re.escape(f"{path} row 1: truncated or corrupt image file: {root}/c1.png")):
        ds[1]
    with pytest.raises(ValueError, match=re.escape(f"{root / 'bad.json'}: invalid JSON")):
        (root / "bad.json").write_text("[{")
        data.VLDataset(str(root / "bad.json"), str(root), TOK, 2, 8, 100)


def test_truncation_never_cuts_an_image(root):
    long_answer = " cat" * 50
    full0, labels0, media_end0 = data._encode(TOK, [("user", f"{PH} what"), ("assistant", long_answer)], 2)
    max_len = media_end0 + 5
    rows = [{"image": "c0.png", "instruction": f"{PH} what", "output": long_answer},  # cut in the answer
            {"image": "c1.png", "instruction": "what" + " is" * 60 + f" {PH}", "output": "a"}]  # image too late
    with pytest.warns(UserWarning, match=rf"dropped 1 rows whose images do not fit max_len={max_len} \(first: row 1\)"):
        _, ds = dataset(root, rows, max_len=max_len)
    assert len(ds) == 1 and ds.too_long == [1] and len(full0) > max_len
    it = ds[0]
    assert it["input_ids"].tolist() == full0[:max_len] and (it["input_ids"] == X).sum() == 2
    assert it["labels"].tolist() == labels0[:max_len]
    assert it["labels"][-2:].tolist() == [TOK.token_id(" cat")] * 2  # the start of the answer is supervised
    # the cut may fall exactly at the end of the image's turn (<|im_end|> \n), not one token earlier
    assert full0[media_end0 - 2:media_end0] == [E, *NL]
    _, ds = dataset(root, rows[:1], max_len=media_end0)
    assert len(ds[0]["input_ids"]) == media_end0
    with pytest.warns(UserWarning, match="dropped 1 rows"):
        _, ds = dataset(root, rows[:1], max_len=media_end0 - 1)
    assert len(ds) == 0


def test_train_mode_augments_images(root):
    Image.fromarray(np.tile(np.arange(0, 240, 10, dtype=np.uint8), (16, 1))).save(root / "ramp.png")
    _, ds = dataset(root, [{"image": "ramp.png", "instruction": f"{PH} q", "output": "a"}], train=True)
    torch.manual_seed(0)
    a = ds[0]["images"]
    torch.manual_seed(0)
    assert torch.equal(a, ds[0]["images"])
    assert not all(torch.equal(a, ds[0]["images"]) for _ in range(5))
