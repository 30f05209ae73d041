"""The data set's index (data.build_index, its cache file index.load_index) and the pipeline's
token-only stages: a cache hit gives the items of a fresh build; a changed data file, tokenizer or
template builds anew; one built from a relative image root is not reused from elsewhere; a damaged
cache file is rebuilt, never used; two processes starting together share one build; a pipeline's
later stage opens no image or video and the run's losses equal those of a run where every stage
loads pixels (torchrun, 2 gloo processes)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

import data
from formats import IMAGE_PLACEHOLDER as PH
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = Tokenizer.toy(["what", "is", "this"])
ROWS = [
    {"image": "c0.png", "instruction": f"{PH} what colour", "output": "red", "task": "colour"},
    {"image": ["c1.png", "c0.png"], "instruction": [f"{PH} {PH} what", "is this"], "output": ["a", "cat"]},
    {"image": "c1.png", "conversations": [{"from": "human", "value": "<image>\nwhat é"}, {"from": "gpt", "value": "a ü"}]},
    {"video": "v.mkv", "instruction": f"{PH} what", "output": "up", "task": "video"},
    {"instruction": "what is this", "output": "a cat"},
    {"image": "nope.png", "instruction": f"{PH} q", "output": "a"},  # bad: skipped with skip_bad
]


@pytest.fixture
def root(tmp_path):
    from test_formats import write_video
    for k in range(2):
        Image.new("RGB", (24, 16), (200 * k, 50, 90)).save(tmp_path / f"c{k}.png")
    write_video(str(tmp_path / "v.mkv"), n=6)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS, indent=2, ensure_ascii=False))
    return tmp_path


def make(root, tok=TOK, **kw):
    args = dict(num_query_tokens=2, image_size=8, max_len=200, max_frames=4, skip_bad=True) | kw
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = data.VLDataset(str(root / "rows.json"), str(root), tok, **args)
    return ds, [str(x.message) for x in w]


def items(ds):
    return [{k: v.tolist() if torch.is_tensor(v) else v for k, v in ds[k].items()} for k in range(len(ds))]


def test_a_cache_hit_gives_the_items_of_a_fresh_build(root):
    fresh, msgs = make(root, cache=False)
    built, msgs_built = make(root)
    hit, msgs_hit = make(root)
    assert (fresh.index_built, built.index_built, hit.index_built) == (True, True, False)
    assert hit.index_path == built.index_path and os.path.exists(hit.index_path)
    assert msgs == msgs_built == msgs_hit == [f"{root / 'rows.json'}: skipped 1 malformed rows (first: row 5: "
                                              f"image file not found: {root}/nope.png)"]
    assert hit.bad == fresh.bad and len(hit) == 5
    assert items(hit) == items(built) == items(fresh)
    assert [s["row"] for s in hit.samples] == [0, 1, 2, 3, 4] and hit.samples[3]["n_frames"] == 4
    assert hit.sample(2)["turns"] == fresh.sample(2)["turns"] and hit.rows_with_task(["video", "x"]) == [3]


def test_a_changed_file_tokenizer_or_template_builds_anew(root):
    first, _ = make(root)
    assert first.index_built and not make(root)[0].index_built
    assert make(root, tok=Tokenizer.toy(["what", "cat"]))[0].index_built
    assert make(root, template="phi")[0].index_built
    assert make(root, max_len=150)[0].index_built and make(root, num_query_tokens=3)[0].index_built
    # same size, same modification time, other text: the key is the content, not the file's stat
    p, st = root / "rows.json", os.stat(root / "rows.json")
    p.write_text(p.read_text().replace("what colour", "what colouR"))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_size == st.st_size
    changed, _ = make(root)
    assert changed.index_built and changed.sample(0)["turns"][0][1].endswith("colouR")


def test_a_relative_root_built_elsewhere_is_not_reused(root, tmp_path, monkeypatch):
    """The index keeps the media paths as the rows resolved them: one built from a relative image
    root is not used by a run elsewhere given the same root as an absolute path."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(root.parent)
    relative = data.VLDataset(str(root / "rows.json"), root.name, TOK, 2, 8, 200, max_frames=4, skip_bad=True)
    want = items(relative)
    monkeypatch.chdir(tmp_path / "elsewhere")
    absolute, _ = make(root)
    assert relative.index_built and absolute.index_built
    assert items(absolute) == want


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_a_damaged_cache_file_is_rebuilt_never_used(root, damage):
    good, _ = make(root)
    path, blob = good.index_path, open(good.index_path, "rb").read()
    damaged = {"truncate": blob[:len(blob) // 2], "flip": blob[:200] + bytes([blob[200] ^ 1]) + blob[201:],
               "garbage": b"not an index", "empty": b""}[damage]
    with open(path, "wb") as f:
        f.write(damaged)
    again, msgs = make(root)
    assert again.index_built and any(m.startswith(f"index cache {path} is ") and m.endswith("; rebuilding it") for m in msgs)
    assert items(again) == items(good) and not make(root)[0].index_built  # the rebuilt file is whole


SCRIPT = """
import json, sys
import data
from tokenizer import Tokenizer
ds = data.VLDataset(sys.argv[1], sys.argv[2], Tokenizer.toy(["what", "is", "this"]), 2, 8, 200, skip_bad=True, max_frames=4)
print(json.dumps(dict(built=ds.index_built, index={k: v.tolist() for k, v in ds.index.items()},
                      ids=[ds[k]["input_ids"].tolist() for k in range(len(ds))])))
"""


def test_two_processes_starting_together_get_one_index(root):
    run = lambda: subprocess.Popen([sys.executable, "-c", SCRIPT, str(root / "rows.json"), str(root)], cwd=ROOT,
                                   stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    procs = [run(), run()]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o["built"] for o in outs) == [False, True]  # one built it, the other waited and read it
    assert outs[0]["index"] == outs[1]["index"] and outs[0]["ids"] == outs[1]["ids"]


def test_tokens_only_items_open_no_media(root, monkeypatch):
    ds, _ = make(root)
    want = items(ds)
    ds.load_media = False
    for name in ("load_image", "load_video", "count_video_packets"):
        monkeypatch.setattr(data, name, lambda *a: pytest.fail("opened a media file"))
    got = items(ds)
    assert got == [{k: v for k, v in it.items() if k != "images"} for it in want]
    batch = data.collate([ds[k] for k in range(len(ds))], 0, 200)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "task"}


def test_frames_must_match_refuses_a_video_that_decodes_to_other_frames(root, monkeypatch):
    ds, _ = make(root)
    ds.frames_must_match = True
    monkeypatch.setattr(data, "load_video", lambda path, n: [Image.new("RGB", (8, 8))] * 3)  # 3, not the 4 predicted
    with pytest.raises(ValueError, match=rf"row 3: the video decoded to 3 frames, its packets predicted 4; "):
        ds[3]
    ds.frames_must_match = False
    assert ds[3]["images"].shape[0] == 3


# --- a pipeline's later stages load no pixels -----------------------------------------------------

COUNT = """
import builtins, json, os, sys
import av
import train
# Record every image or video file this process opens (Pillow opens through builtins.open, PyAV
# through av.open); with ALL_PIXELS, every stage loads pixels (the reference run).
opened, exts = [], (".png", ".jpg", ".mkv", ".mp4")
def counting(fn):
    def wrapped(path, *a, **kw):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(exts):
            opened.append(os.fspath(path))
        return fn(path, *a, **kw)
    return wrapped
builtins.open, av.open = counting(builtins.open), counting(av.open)
if os.environ.get("ALL_PIXELS"):
    datasets = train.datasets
    train.datasets = lambda cfg, tok=None, config=None, pixels=True: datasets(cfg, tok, config)
code = train.main(sys.argv[1:])
cfg = train.parse_args(sys.argv[1:])
with open(os.path.join(cfg.out_dir, f"opened{os.environ['RANK']}.json"), "w") as f:
    json.dump(opened, f)
sys.exit(code)
"""


def test_a_pipelines_later_stage_loads_no_pixels_and_the_losses_are_the_same(tmp_path):
    from test_train import crash_run, free_port, losses, tiny_args
    import train
    args = lambda out: tiny_args(tmp_path, out, max_iters=3, num_stages=2, max_len=128, batch_size=4, grad_accum=2,
                                 n_train=64, curriculum_iters=0, augment=True)
    cfg = train.parse_args(args("prep"))
    torch.manual_seed(0)
    model, tok, _ = train.build(cfg, train.datasets(cfg))
    train_ds = train.datasets(cfg, tok, model.config)[0]  # built here: the runs below read the cache
    script = tmp_path / "count.py"
    script.write_text(COUNT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    run = lambda out, env: subprocess.run([*launch, str(free_port()), str(script), *args(out)], cwd=ROOT, timeout=300,
                                          capture_output=True, text=True,
                                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **env})
    for out, env in (("split", {}), ("all", {"ALL_PIXELS": "1"})):
        r = run(out, env)
        assert r.returncode == 0, r.stderr[-3000:]
    opened = {out: [json.load(open(tmp_path / out / f"opened{k}.json")) for k in range(2)] for out in ("split", "all")}
    assert opened["split"][1] == [] and opened["split"][0] and opened["all"][1]
    assert any(p.endswith(".mkv") for p in opened["split"][0])  # videos too: the run's rows include them
    assert len(losses(tmp_path / "split")) == 3 and losses(tmp_path / "split") == losses(tmp_path / "all")
    assert train_ds.index_path
