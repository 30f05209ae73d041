"""formats.py and `python datacheck.py`: each public layout, with rows shaped as in the published
files (written here, with their images and videos), parses into the right turns, media and kind;
bad rows give exact messages; the checker's summary has exact counts and agrees with VLDataset."""
import json
import os
import re
import subprocess
import sys
import zlib

import av
import numpy as np
import pytest
from PIL import Image

import data
import datacheck
import formats
from formats import IMAGE_PLACEHOLDER as PH
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = Tokenizer.toy(["what", "is", "this"])


def turns(*values, roles=("human", "gpt")):
    """A row's `conversations` as the published files write them: the values alternate between the
    two roles, the first one first (LLaVA's human/gpt, Qwen-VL's user/assistant)."""
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


QWENVL = ("user", "assistant")
# LLaVA-Pretrain blip_laion_cc_sbu_558k.json
PRETRAIN = {"id": "004539375", "image": "00453/004539375.jpg", "conversations": turns(
    "Give a brief description of the image.\n<image>", "the divine queen in her elaborate masks canvas print")}
# LLaVA-Instruct llava_instruct_150k.json (images at the top of COCO train2017)
INSTRUCT = {"id": "000000033471", "image": "000000033471.jpg", "conversations": turns(
    "<image>\nWhat are the colors of the bus in the image?", "The bus in the image is white and red.",
    "What feature can be seen on the back of the bus?", "The back of the bus features an advertisement.")}
# llava_v1_5_mix665k.json: a COCO row, a VG row with a box as text, a ShareGPT text-only row ("model"
# field, no image) opening with a gpt turn and ending with an unanswered human turn
MIX_COCO = {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
            "conversations": INSTRUCT["conversations"]}
MIX_VG = {"id": "1591", "image": "vg/VG_100K/1591.jpg", "conversations": turns(
    "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: a white cloud.",
    "[0.52, 0.05, 0.73, 0.18]")}
MIX_TEXT = {"id": "i6IyJda_0", "model": "", "conversations": turns(
    "Hello! How can I help?", "How to tell if a customer segment is well segmented? In 3 bullet points.",
    "1. Homogeneity\n2. Distinctiveness\n3. Stability", "Thank you", roles=("gpt", "human"))}
# Video-ChatGPT VideoInstruct100K.json, and its training format (the video named by a CLIP-feature .pkl)
VCG_RAW = {"video_id": "v_k_ZXmr8pmrs", "q": "What are the main activities that take place in the video?",
           "a": "The main activities are the preparation of camera equipment by a man."}
VCG_TRAIN = {"id": "v_k_ZXmr8pmrs", "video": "v_k_ZXmr8pmrs.pkl", "conversations": turns(
    "What are the main activities that take place in the video?\n<video>",
    "The main activities are the preparation of camera equipment by a man.")}
# MiniGPT4Qwen / MPP-Qwen-Next: single turn, multi-turn, video (videochatgpt_instruction_100k.json)
MPP_ONE = {"image": "000000215677.jpg", "instruction": "<Img><ImageHere></Img> What is in the picture?",
           "output": "A cat on a sofa."}
MPP_MULTI = {"image": "000000479443.jpg", "instruction": ["<Img><ImageHere></Img> What is this?", "Is it red?"],
             "output": ["A bus.", "Yes."]}
MPP_VIDEO = {"video": "v_k_ZXmr8pmrs.mkv", "instruction": "<Img><ImageHere></Img> Describe the video.",
             "output": "A man prepares a camera."}
# Qwen-VL finetune format (README), and MindFormers' conversion of LLaVA to it
QWENVL_TEXT = {"id": "identity_0", "conversations": turns("你好", "我是Qwen-VL,一个支持视觉输入的大模型。", roles=QWENVL)}
QWENVL_BOX = {"id": "identity_1", "conversations": turns(
    "Picture 1: <img>assets/demo.jpeg</img>\n图中的狗是什么品种？", "图中是一只拉布拉多犬。",
    "框出图中的格子衬衫", "<ref>格子衬衫</ref><box>(588,499),(725,789)</box>", roles=QWENVL)}
QWENVL_TWO = {"id": "identity_2", "conversations": turns(
    "Picture 1: <img>assets/mm_tutorial/Chongqing.jpeg</img>\n"
    "Picture 2: <img>assets/mm_tutorial/Beijing.jpeg</img>\n图中都是哪",
    "第一张图片是重庆的城市天际线，第二张图片是北京的天际线。", roles=QWENVL)}
MINDFORMERS = {"id": "000000033471", "conversations": turns(
    "Picture 1: <img>train2014/COCO_train2014_000000033471.jpg</img>\n"
    "What are the colors of the bus in the image?",
    "The bus in the image is white and red.", roles=QWENVL)}

IMAGES = ["00453/004539375.jpg", "000000033471.jpg", "coco/train2017/000000033471.jpg", "vg/VG_100K/1591.jpg",
          "000000215677.jpg", "000000479443.jpg", "assets/demo.jpeg", "assets/mm_tutorial/Chongqing.jpeg",
          "assets/mm_tutorial/Beijing.jpeg", "train2014/COCO_train2014_000000033471.jpg", "image/2.jpg", "image/3.jpg"]


def write_video(path, n=6, size=16):
    with av.open(path, "w") as out:
        s = out.add_stream("ffv1", rate=10)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for v in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * v, np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


@pytest.fixture
def root(tmp_path):
    for k, rel in enumerate(IMAGES):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        Image.new("RGB", (20, 12), (20 * k, 100, 200)).save(tmp_path / rel, format="JPEG")
    write_video(str(tmp_path / "v_k_ZXmr8pmrs.mkv"))
    return tmp_path


def parsed(row, root):
    s = formats.parse_row(row, str(root))
    return s["turns"], [os.path.relpath(m, root) for m in s["media"]], s["kind"], s["format"]


def test_llava_rows(root):
    assert parsed(PRETRAIN, root) == ([("user", f"Give a brief description of the image.\n{PH}"),
                                       ("assistant", "the divine queen in her elaborate masks canvas print")],
                                      ["00453/004539375.jpg"], "single image", "llava")
    turns, media, _, _ = parsed(INSTRUCT, root)
    assert turns[0] == ("user", f"{PH}\nWhat are the colors of the bus in the image?") and len(turns) == 4
    assert [r for r, _ in turns] == ["user", "assistant"] * 2 and media == ["000000033471.jpg"]
    assert parsed(MIX_COCO, root)[1:3] == (["coco/train2017/000000033471.jpg"], "single image")
    assert parsed(MIX_VG, root)[0][1] == ("assistant", "[0.52, 0.05, 0.73, 0.18]")
    # text-only: kept; the leading gpt turn and the unanswered last human turn dropped, as LLaVA does
    assert parsed(MIX_TEXT, root) == ([("user", MIX_TEXT["conversations"][1]["value"]),
                                       ("assistant", "1. Homogeneity\n2. Distinctiveness\n3. Stability")],
                                      [], "text-only", "llava")


def test_videochatgpt_rows(root):
    want_media = ["v_k_ZXmr8pmrs.mkv"]  # found by its id among VIDEO_EXTS, for both layouts
    assert parsed(VCG_RAW, root) == ([("user", f"{PH} {VCG_RAW['q']}"), ("assistant", VCG_RAW["a"])],
                                     want_media, "video", "videochatgpt")
    assert parsed(VCG_TRAIN, root) == ([("user", f"{VCG_RAW['q']}\n{PH}"), ("assistant", VCG_RAW["a"])],
                                       want_media, "video", "llava")


def test_minigpt4qwen_rows(root):
    assert parsed(MPP_ONE, root) == ([("user", MPP_ONE["instruction"]), ("assistant", "A cat on a sofa.")],
                                     ["000000215677.jpg"], "single image", "minigpt4qwen")
    s = formats.parse_row(MPP_MULTI, str(root))
    assert s["turns"] == [("user", f"{PH} What is this?"), ("assistant", "A bus."), ("user", "Is it red?"),
                          ("assistant", "Yes.")] and s["user_turns"] == 2
    assert parsed(MPP_VIDEO, root)[1:] == (["v_k_ZXmr8pmrs.mkv"], "video", "minigpt4qwen")


def test_qwenvl_rows(root):
    assert parsed(QWENVL_TEXT, root) == ([("user", "你好"), ("assistant", "我是Qwen-VL,一个支持视觉输入的大模型。")],
                                         [], "text-only", "qwen-vl")
    turns, media, kind, fmt = parsed(QWENVL_BOX, root)
    assert turns[0] == ("user", f"Picture 1: {PH}\n图中的狗是什么品种？") and media == ["assets/demo.jpeg"]
    assert turns[3] == ("assistant", "<ref>格子衬衫</ref><box>(588,499),(725,789)</box>")  # kept as text
    assert (kind, fmt) == ("single image", "qwen-vl")
    turns, media, kind, fmt = parsed(QWENVL_TWO, root)
    assert turns[0] == ("user", f"Picture 1: {PH}\nPicture 2: {PH}\n图中都是哪") and (kind, fmt) == ("multi-image", "qwen-vl")
    assert media == ["assets/mm_tutorial/Chongqing.jpeg", "assets/mm_tutorial/Beijing.jpeg"]
    assert parsed(MINDFORMERS, root)[1] == ["train2014/COCO_train2014_000000033471.jpg"]
    # LLaVA rows (human/gpt) keep an HTML-like <img>...</img> as text
    row = {"conversations": [{"from": "human", "value": "fix <img>x.png</img>"}, {"from": "gpt", "value": "ok"}]}
    assert parsed(row, root)[:3] == ([("user", "fix <img>x.png</img>"), ("assistant", "ok")], [], "text-only")


def test_minigpt4_cc_sbu_align(root):
    # filter_cap.json: an object, not a list; images are image/<image_id>.jpg (MiniGPT-4's vis_root)
    (root / "filter_cap.json").write_text(json.dumps({"annotations": [
        {"image_id": "2", "caption": "The image shows a man fishing on a lawn next to a river."},
        {"image_id": "3", "caption": "A red bus."}]}))
    rows = list(formats.iter_rows(root / "filter_cap.json"))
    assert [parsed(r, root / "image") for r in rows] == [
        ([("user", formats.ALIGN_PROMPTS[zlib.crc32(b"2") % 4]), ("assistant", rows[0]["caption"])],
         ["2.jpg"], "single image", "minigpt4"),
        ([("user", formats.ALIGN_PROMPTS[zlib.crc32(b"3") % 4]), ("assistant", "A red bus.")],
         ["3.jpg"], "single image", "minigpt4")]
    assert formats.ALIGN_PROMPTS[0] == "<Img><ImageHere></Img> Describe this image in detail."
    ds = data.VLDataset(str(root / "filter_cap.json"), str(root / "image"), TOK, 2, 8, 200)
    assert len(ds) == 2 and ds[1]["images"].shape == (1, 3, 8, 8)


BAD = [
    ({"image_id": 2, "caption": "a cat"}, "MiniGPT-4 rows need a string 'image_id' and a string 'caption'"),
    ({"id": "2", "text": "a cat"}, "unknown row layout with keys ['id', 'text'] (supported: LLaVA / Qwen-VL "
     "'conversations', MiniGPT4Qwen 'instruction' + 'output', Video-ChatGPT 'video_id' + 'q' + 'a', MiniGPT-4 'image_id' + 'caption')"),
    ({"video_id": "v_1", "q": "what?"}, "missing key 'a' (Video-ChatGPT rows need 'video_id', 'q' and 'a')"),
    ({"video_id": "v_none", "q": "q", "a": "a"}, "video file not found: {root}/v_none{{.mp4,.mkv,.webm,.avi,.mov,.m4v}}"),
    (dict(VCG_TRAIN, video="v_none.pkl"), "video file not found: {root}/v_none{{.mp4,.mkv,.webm,.avi,.mov,.m4v}}"),
    ({"conversations": [{"from": "user", "value": "Picture 1: <img>https://x.cn/demo.jpeg</img>\nq"},
                        {"from": "assistant", "value": "a"}]},
     "remote image 'https://x.cn/demo.jpeg': download it and give a path under image_root"),
    (dict(MINDFORMERS, image="000000033471.jpg"),
     "a Qwen-VL row names its images in <img>...</img>, not also in 'image'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
     "'from' mixes LLaVA's human/gpt with Qwen-VL's user/assistant"),
    ({"conversations": [{"from": "user", "value": "<img>assets/none.jpg</img> q"}, {"from": "assistant", "value": "a"}]},
     "image file not found: {root}/assets/none.jpg"),
    (dict(PRETRAIN, image="00453/missing.jpg"), "image file not found: {root}/00453/missing.jpg"),
    (dict(INSTRUCT, image=["000000033471.jpg", "000000215677.jpg"]), "1 image placeholders but 2 images"),
    ({"conversations": [{"from": "gpt", "value": "hello"}]}, "no assistant turn: nothing to learn from"),
]


@pytest.mark.parametrize("row, message", BAD)
def test_bad_rows_give_exact_messages(root, row, message):
    with pytest.raises(ValueError) as e:
        formats.parse_row(row, str(root))
    assert str(e.value) == message.format(root=root)
    assert isinstance(e.value, formats.MissingMedia) == ("not found" in message)


@pytest.mark.parametrize("text, message", [
    ('{"data": [{"image_id": "2", "caption": "a cat"}]}',
     "expected a JSON list of rows, got an object (supported: LLaVA / Qwen-VL 'conversations', "
     "MiniGPT4Qwen 'instruction' + 'output', Video-ChatGPT 'video_id' + 'q' + 'a', MiniGPT-4 'image_id' + 'caption')"),
    ('[{"id": 1}, {"id": 2}', "invalid JSON (unterminated list at char 21)"),
    ('[{"id": 1} {"id": 2}]', "invalid JSON (expected ',' or ']' at char 11)"),
    ('[{"id": 1},, {"id": 2}]', "invalid JSON (Expecting value at char 11)"),
    ('[{"id": 1}] [', "invalid JSON (data after the list at char 12)"),
])
def test_unreadable_files(tmp_path, text, message):
    p = tmp_path / "rows.json"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        list(formats.iter_rows(p))
    assert str(e.value) == f"{p}: {message}"


@pytest.mark.parametrize("chunk", [1, 2, 5, 64, 1 << 20])
def test_streaming_reader_matches_json_load(tmp_path, chunk):
    rows = [PRETRAIN, MIX_TEXT, QWENVL_TWO, 12345678, "s", [], {}, {"e": "é" * 40}]
    for indent in (None, 4):
        p = tmp_path / "rows.json"
        p.write_text("\ufeff" + json.dumps(rows, indent=indent, ensure_ascii=False) + "\n")
        assert list(formats.iter_rows(p, chunk)) == rows
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n\n" for r in rows))
    assert list(formats.iter_rows(p)) == rows


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_row_spans_read_each_row_again_alone(tmp_path, chunk):
    """iter_rows(spans=True) gives each row's bytes (after a byte-order mark, across \\r\\n, in non-ASCII
    text, inside MiniGPT-4's object): read_row of a span is the row."""
    rows = [PRETRAIN, QWENVL_TWO, {"e": "é" * 40, "k": "\u4e2d\r\n"}, 7]
    texts = {"rows.json": "\ufeff" + json.dumps(rows, indent=4, ensure_ascii=False).replace("\n", "\r\n"),
             "rows.jsonl": "\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n\n" for r in rows),
             "cap.json": json.dumps({"info": {"a": [1]}, "annotations": rows, "z": "é"}, ensure_ascii=False)}
    for name, text in texts.items():
        p = tmp_path / name
        p.write_bytes(text.encode())
        got = list(formats.iter_rows(p, chunk, spans=True))
        assert [r for r, _, _ in got] == rows
        assert [formats.read_row(p, at, n) for _, at, n in got] == rows


def test_every_format_trains_through_vldataset(root):
    rows = [PRETRAIN, INSTRUCT, MIX_COCO, MIX_VG, MIX_TEXT, VCG_RAW, VCG_TRAIN, MPP_ONE, MPP_MULTI, MPP_VIDEO,
            QWENVL_TEXT, QWENVL_BOX, QWENVL_TWO, MINDFORMERS]
    (root / "all.json").write_text(json.dumps(rows, ensure_ascii=False))
    ds = data.VLDataset(str(root / "all.json"), str(root), TOK, 2, 8, 400, max_frames=3)
    assert len(ds) == len(rows)
    n_images = [1, 1, 1, 1, 0, 3, 3, 1, 1, 3, 0, 1, 2, 1]  # a video: 3 of its 6 frames
    for k, n in enumerate(n_images):
        item = ds[k]
        assert item["images"].shape == (n, 3, 8, 8) and (item["input_ids"] == TOK.token_id(data.IMAGE_TOKEN)).sum() == 2 * n


# --- the checker ------------------------------------------------------------------------------------

def run_check(capsys, *argv):
    code = datacheck.main([str(a) for a in argv])
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\(\d+\.\d s\)", lines[-1])  # the time taken
    return code, lines[:-1]


def test_check_summary_counts(root, capsys):
    rows = [PRETRAIN, INSTRUCT, MIX_TEXT, VCG_RAW, MPP_MULTI, QWENVL_TEXT, QWENVL_TWO, MINDFORMERS]
    (root / "good.json").write_text(json.dumps(rows, ensure_ascii=False))
    # max_len 120 splits them: two fit, four are cut in an answer, two have an image past token 120
    toy = Tokenizer.toy([])  # the checker's fallback: the toy preset names no tokenizer
    lens = sorted(len(data.encode_conversation(toy, formats.parse_row(r, str(root))["turns"], 16,
                                               2 if "video_id" in r else None)[0]) for r in rows)
    code, out = run_check(capsys, root / "good.json", "--image_root", root, "--max_len", 120)
    assert code == 0
    assert out[:2] == ["preset toy: max_len 120, 16 query tokens per image, videos as 2 frames, chatml template; "
                       f"image_root {root}",
                       "tokenizer: TOY byte-level tokenizer (preset toy names none): about one token per byte of "
                       "text, several times a real BPE's count"]
    assert out[2:5] == [f"{root}/good.json: 8 rows read, 8 good (llava 3, minigpt4qwen 1, qwen-vl 3, videochatgpt 1)",
                        "kinds: single image 4, multi-image 1, video 1, text-only 2; multi-turn 2",
                        "bad rows: 0"]
    assert out[5] == (f"tokens after the chatml template (all 8 rows that parse): p50 {lens[3]}, p90 {lens[7]}, "
                      f"p99 {lens[7]}, max {lens[7]}")
    with pytest.warns(UserWarning, match="dropped 2 rows"):  # VLDataset's verdicts are the checker's
        ds = data.VLDataset(str(root / "good.json"), str(root), toy, 16, 8, 120, max_frames=2)
    truncated = sum(len(ds[k]["input_ids"]) == 120 for k in range(len(ds)))
    assert out[6] == ("max_len 120: 2 fit, 4 truncated (cut after their last image), 2 dropped (an image past "
                      "max_len)")
    assert (len(ds) - truncated, truncated, len(ds.too_long)) == (2, 4, 2)
    assert out[7:] == ["decoded: none (--decode opens the images and videos)"]


def test_check_bad_rows_exit_nonzero_with_reasons(root, capsys):
    (root / "00453/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [PRETRAIN, {"id": "x1", "text": "a cat"}, dict(PRETRAIN, id="x2", image="00453/gone.jpg"),
            dict(PRETRAIN, id="x3", image="00453/broken.jpg"), VCG_RAW, "not a row"]
    (root / "bad.json").write_text(json.dumps(rows))
    code, out = run_check(capsys, root / "bad.json", "--image_root", root, "--decode", "--show", 3)
    assert code == 1
    unknown = ("  row 1 (id 'x1'): unknown row layout with keys ['id', 'text'] (supported: LLaVA / Qwen-VL "
               "'conversations', MiniGPT4Qwen 'instruction' + 'output', Video-ChatGPT 'video_id' + 'q' + 'a', MiniGPT-4 'image_id' + 'caption')")
    gone = f"  row 2 (id 'x2'): image file not found: {root}/00453/gone.jpg"
    broken = f"  row 3 (id 'x3'): cannot decode {root}/00453/broken.jpg: "  # then Pillow's words
    assert out[2:7] == [f"{root}/bad.json: 6 rows read, 2 good (llava 1, videochatgpt 1)",
                        "kinds: single image 1, multi-image 0, video 1, text-only 0; multi-turn 0",
                        "bad rows: 4 (missing files 1, failed to decode 1)", unknown, gone]
    assert out[7].startswith(broken) and out[8] == "  ... and 1 more"
    assert out[9] == "tokens after the chatml template (all 3 rows that parse): p50 152, p90 205, p99 205, max 205"
    assert out[-1] == "decoded: 3 rows, 1 failed"
    code, out = run_check(capsys, root / "bad.json", "--image_root", root)  # nothing decoded: row 3 passes
    assert code == 1 and out[2:8] == [f"{root}/bad.json: 6 rows read, 3 good (llava 2, videochatgpt 1)",
                                      "kinds: single image 2, multi-image 0, video 1, text-only 0; multi-turn 0",
                                      "bad rows: 3 (missing files 1, failed to decode 0)", unknown, gone,
                                      "  row 5: a row must be a JSON object, got str"]
    assert out[-1] == "decoded: none (--decode opens the images and videos)"
    code, out = run_check(capsys, root / "bad.json", "--image_root", root, "--decode", "--sample", "2")
    assert out[4] == "bad rows: 3 (missing files 1, failed to decode 0)"  # seed 0 draws rows 0 and 4
    assert out[-1] == "decoded: 2 rows, 0 failed"
    code, out = run_check(capsys, root / "bad.json", "--image_root", root, "--lengths", "2")
    assert out[8:10] == ["tokens after the chatml template (2 of 3 rows that parse, drawn with seed 0): p50 152, "
                         "p90 205, p99 205, max 205",
                         "max_len 256: 2 fit, 0 truncated (cut after their last image), 0 dropped (an image past "
                         "max_len) of those 2 rows (--lengths all: every row)"]
    with pytest.raises(SystemExit):
        datacheck.main([str(root / "bad.json"), "--sample", "3"])  # --sample without --decode
    assert "--sample N needs --decode" in capsys.readouterr().err


def test_check_command_line(root):
    (root / "one.json").write_text(json.dumps([PRETRAIN, dict(PRETRAIN, image="nope.jpg")]))
    cmd = [sys.executable, os.path.join(ROOT, "datacheck.py"), str(root / "one.json"), "--image_root", str(root),
           "--preset", "mpp-qwen7b-pretrain"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert p.returncode == 1, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == ("preset mpp-qwen7b-pretrain: max_len 512, 32 query tokens per image, videos as 32 frames, "
                        f"chatml template; image_root {root}")
    assert lines[1].startswith("tokenizer: TOY byte-level tokenizer (checkpoints/qwen7b-chat not found)")
    assert f"  row 1 (id '004539375'): image file not found: {root}/nope.jpg" in lines
    (root / "dict.json").write_text('{"data": []}')
    p = subprocess.run(cmd[:2] + [str(root / "dict.json")], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert p.returncode == 2 and p.stdout.splitlines()[-1].startswith(f"error: {root}/dict.json: expected a JSON list")


def test_check_uses_the_presets_tokenizer_when_it_is_on_disk(root, capsys, monkeypatch):
    (root / "one.json").write_text(json.dumps([PRETRAIN]))
    monkeypatch.chdir(root)  # the preset's paths are relative: checkpoints/qwen7b-chat
    TOK.save(root / "checkpoints" / "qwen7b-chat")
    code, out = run_check(capsys, "one.json", "--image_root", ".", "--preset", "mpp-qwen7b-pretrain")
    assert code == 0 and out[1] == "tokenizer: checkpoints/qwen7b-chat (preset mpp-qwen7b-pretrain)"
    ids = data.encode_conversation(TOK, formats.parse_row(PRETRAIN, ".")["turns"], 32)[0]
    assert out[5] == f"tokens after the chatml template (all 1 rows that parse): p50 {len(ids)}, p90 {len(ids)}, " \
                     f"p99 {len(ids)}, max {len(ids)}"
    TOK.save(root / "other")
    code, out = run_check(capsys, "one.json", "--image_root", ".", "--tokenizer", "other")
    assert out[1] == "tokenizer: other"
    assert datacheck.main(["one.json", "--tokenizer", "missing"]) == 2
    assert capsys.readouterr().out.startswith("error: tokenizer: ")
