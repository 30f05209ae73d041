"""
The built-in synthetic dataset: the default data nanoMPP trains on, with no download.

Coloured shapes drawn with Pillow on a plain background, saved as ordinary PNG files, plus short
videos of a moving shape written with PyAV, plus JSON in the MiniGPT4Qwen format (each row has a
`task` field), so the default run goes through the same loader (data.py) as real data. Tasks:

  caption   "describe the image."               -> "a red circle"
  colour    "what colour is the shape?"         -> "red"
  shape     "what shape is it?"                 -> "circle"
  count     "how many shapes are there?"        -> "three"
  position  "where is the shape?"               -> "left" | "right" | "top" | "bottom"
  multiturn two questions about one image; the last answer is scored
  compare   two images: "are they the same colour?" -> "yes" | "no"
  video     "which way does the shape move?"    -> "left" | "right" | "up" | "down"

The training split can hold more count rows than rows of each other task (count_share); the
held-out split has the same number of each. Answer sets are small and closed, so exact-match
accuracy is meaningful; `chance_levels(rows)` gives each task's chance level (accuracy of always
giving its most frequent answer).
Everything is a pure function of the parameters; the result is cached in a directory whose name
is built from them, so a second call returns at once.

    python synthetic.py [root]      # generate (or find) the default dataset and print its summary
"""
import fcntl
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
from collections import Counter

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ["circle", "square", "triangle"]
NUMBERS = ["one", "two", "three", "four"]
POSITIONS = ["left", "right", "top", "bottom"]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TASKS = ["caption", "colour", "shape", "count", "position", "multiturn", "compare", "video"]
IMG = "<Img><ImageHere></Img>"
QUESTIONS = {
    "caption": "describe the image.",
    "colour": "what colour is the shape?",
    "shape": "what shape is it?",
    "count": "how many shapes are there?",
    "position": "where is the shape?",
    "compare": "are the two shapes the same colour?",
    "video": "which way does the shape move?",
}
VERSION = 3  # bump when the generator changes, so stale caches are not reused


def draw_shape(draw, shape, colour, cx, cy, r):
    """Draw one filled shape of radius r centred at (cx, cy)."""
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def canvas(rng, size):
    from PIL import Image, ImageDraw
    grey = rng.randint(225, 255)  # a light background that differs a little between images
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    return img, ImageDraw.Draw(img)


def one_shape_image(rng, size, shape, colour, cx=None, cy=None):
    r = max(3, round(size * rng.uniform(0.14, 0.19)))
    if cx is None:  # anywhere, fully inside
        cx, cy = rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)
    img, draw = canvas(rng, size)
    draw_shape(draw, shape, colour, cx, cy, r)
    return img


def position_xy(rng, size, where):
    """Centre of a shape unambiguously in the left/right/top/bottom part of the image."""
    edge, mid = rng.uniform(0.2, 0.28) * size, rng.uniform(0.4, 0.6) * size
    x, y = {"left": (edge, mid), "right": (size - edge, mid), "top": (mid, edge), "bottom": (mid, size - edge)}[where]
    return round(x), round(y)


def count_image(rng, size, n):
    """n shapes (random shape and colour) on a grid of non-overlapping cells."""
    img, draw = canvas(rng, size)
    cell = size // 3
    for k in rng.sample(range(9), n):
        r = max(2, round(cell * rng.uniform(0.3, 0.4)))
        cx = (k % 3) * cell + cell // 2 + rng.randint(-1, 1)
        cy = (k // 3) * cell + cell // 2 + rng.randint(-1, 1)
        draw_shape(draw, rng.choice(SHAPES), rng.choice(list(COLOURS)), cx, cy, r)
    return img


def write_video(path, frames, fps=4):
    """Lossless FFV1 in Matroska, so colours survive exactly at tiny sizes. Pillow writes the
    pixels straight in the encoder's bgr0 layout and one encoder thread suffices: at 32 x 32 a
    swscale conversion and a thread pool per frame cost more than the encoding."""
    import av
    with av.open(path, "w") as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt, stream.thread_count = "bgr0", 1
        for f in frames:
            frame = av.VideoFrame(f.width, f.height, "bgr0")
            frame.planes[0].update(f.convert("RGBX").tobytes("raw", "BGRX"))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _count(rng, ctx):
    n = rng.randint(1, len(NUMBERS))
    return count_image(rng, ctx["size"], n), f"{IMG} {QUESTIONS['count']}", NUMBERS[n - 1]


def _position(rng, ctx):
    where = rng.choice(POSITIONS)
    img = one_shape_image(rng, ctx["size"], ctx["shape"], ctx["colour"], *position_xy(rng, ctx["size"], where))
    return img, f"{IMG} {QUESTIONS['position']}", where


def _one_shape(task):
    def make(rng, ctx):
        colour, shape = ctx["colour"], ctx["shape"]
        img = one_shape_image(rng, ctx["size"], shape, colour)
        return img, f"{IMG} {QUESTIONS[task]}", {"caption": f"a {colour} {shape}", "colour": colour, "shape": shape}[task]
    return make


def _multiturn(rng, ctx):
    """Two questions about one image; the last answer is scored."""
    size, colour, shape = ctx["size"], ctx["colour"], ctx["shape"]
    where = rng.choice(POSITIONS)
    img = one_shape_image(rng, size, shape, colour, *position_xy(rng, size, where))
    asked = rng.sample(["colour", "shape", "position"], 2)
    facts = {"colour": colour, "shape": shape, "position": where}
    return img, [f"{IMG} {QUESTIONS[asked[0]]}", QUESTIONS[asked[1]]], [facts[asked[0]], facts[asked[1]]]


def _compare(rng, ctx):
    """Two images written here: is the second shape the same colour as the first?"""
    colour, same = ctx["colour"], rng.random() < 0.5
    other = colour if same else rng.choice([c for c in COLOURS if c != colour])
    for k, c in enumerate((colour, other)):
        one_shape_image(rng, ctx["size"], rng.choice(SHAPES), c).save(os.path.join(ctx["root"], f"{ctx['name']}_{k}.png"))
    ctx["image"] = [f"{ctx['name']}_0.png", f"{ctx['name']}_1.png"]
    return None, f"{IMG} {IMG} {QUESTIONS['compare']}", "yes" if same else "no"


def _video(rng, ctx):
    """A shape moving in one direction over n_frames frames, written here as a lossless video."""
    size, n_frames = ctx["size"], ctx["n_frames"]
    answer = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[answer]
    step = size * 0.4 / max(1, n_frames - 1)  # travels 40% of the image, never leaves it
    start = [size * (0.5 - 0.2 * d + rng.uniform(-0.08, 0.08)) for d in (dx, dy)]
    frame_seed = rng.random()  # same background and size in every frame
    frames = [one_shape_image(random.Random(frame_seed), size, ctx["shape"], ctx["colour"],
                              round(start[0] + dx * step * t), round(start[1] + dy * step * t))
              for t in range(n_frames)]
    write_video(os.path.join(ctx["root"], f"{ctx['name']}.mkv"), frames)
    ctx["video"] = f"{ctx['name']}.mkv"
    return None, f"{IMG} {QUESTIONS['video']}", answer


# task -> fn(rng, ctx) -> (image or None, instruction, output); compare and video write their own files
MAKERS = {"caption": _one_shape("caption"), "colour": _one_shape("colour"), "shape": _one_shape("shape"),
          "count": _count, "position": _position, "multiturn": _multiturn, "compare": _compare, "video": _video}


def make_row(rng, task, i, root, size, n_frames):
    """One JSON row of the given task; its images/video are written under root."""
    name = f"{task}_{i:05d}"
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    ctx = dict(name=name, root=root, size=size, n_frames=n_frames, colour=colour, shape=shape)
    img, instruction, output = MAKERS[task](rng, ctx)
    row = {"task": task}
    if img is not None:
        img.save(os.path.join(root, f"{name}.png"))
        row["image"] = f"{name}.png"
    row.update({k: ctx[k] for k in ("image", "video") if k in ctx})
    row["instruction"], row["output"] = instruction, output
    return row


def _make_row(job):
    """make_row with an rng seeded by the row's own key: rows come out the same in any process."""
    key, *args = job
    return make_row(random.Random(key), *args)


def final_answer(row):
    out = row["output"]
    return out[-1] if isinstance(out, list) else out


def chance_levels(rows):
    """Per task: the accuracy of always giving that task's most frequent (final) answer."""
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], Counter())[final_answer(row)] += 1
    return {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_task.items()}


def corpus_words(rows):
    """Every word (letters only: punctuation stays byte-level) of the instructions and answers."""
    words = set()
    for row in rows:
        for field in ("instruction", "output"):
            texts = row[field] if isinstance(row[field], list) else [row[field]]
            for text in texts:
                words.update(re.findall(r"[a-z]+", text.replace(IMG, " ").lower()))
    return sorted(words)


def make_synthetic(root="data/synthetic", seed=0, n_train=7000, n_val=800, image_size=32, n_frames=4, count_share=1):
    """Generate (or find cached) the dataset; returns dict(train, val, image_root, words, chance).
    The training rows cycle through the tasks and then count_share - 1 more count rows."""
    key = f"v{VERSION}_seed{seed}_train{n_train}_val{n_val}_img{image_size}_frames{n_frames}_count{count_share}"
    out = os.path.join(root, key)
    meta_path = os.path.join(out, "meta.json")
    if not os.path.exists(meta_path):  # (a cached copy needs no lock: it may sit in a read-only folder)
        os.makedirs(root, exist_ok=True)
        with open(f"{out}.lock", "w") as lock:
            # The first process to miss draws the data; the others (the ranks of one machine) wait for
            # it, then read its copy (every rank drawing it at once would multiply the work by the ranks).
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if not os.path.exists(meta_path):
                _draw(out, seed, n_train, n_val, image_size, n_frames, count_share)
    with open(meta_path) as f:
        meta = json.load(f)
    return dict(train=os.path.join(out, "train.json"), val=os.path.join(out, "val.json"), image_root=out,
                words=meta["words"], chance=meta["chance"])


def _draw(out, seed, n_train, n_val, image_size, n_frames, count_share):
    """Write the dataset to the directory `out`, atomically: a half-written one is never seen."""
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    splits, train_cycle = {}, TASKS + ["count"] * (count_share - 1)
    with multiprocessing.Pool(min(os.cpu_count() or 1, 8)) as pool:  # rows in parallel, one per core
        for split, n, cycle in (("train", n_train, train_cycle), ("val", n_val, TASKS)):
            # Tasks take turns in the cycle's order; each row's own rng makes its content.
            os.makedirs(os.path.join(tmp, split))
            jobs = [(f"{seed}/{split}/{i}", cycle[i % len(cycle)], i, os.path.join(tmp, split), image_size, n_frames)
                    for i in range(n)]
            rows = pool.map(_make_row, jobs, chunksize=64)
            for row in rows:
                for k in ("image", "video"):
                    if k in row:  # paths relative to the dataset's root
                        row[k] = [f"{split}/{p}" for p in row[k]] if isinstance(row[k], list) else f"{split}/{row[k]}"
            with open(os.path.join(tmp, f"{split}.json"), "w") as f:
                json.dump(rows, f, indent=0)
            splits[split] = rows
    meta = dict(words=corpus_words(splits["train"] + splits["val"]), chance=chance_levels(splits["val"]),
                seed=seed, n_train=n_train, n_val=n_val, image_size=image_size, n_frames=n_frames,
                count_share=count_share)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.replace(tmp, out)  # atomic: a half-written dataset is never seen as cached
    except OSError:  # another machine sharing the folder finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import time
    t0 = time.time()
    d = make_synthetic(*sys.argv[1:2])
    print(f"dataset at {d['image_root']} ({time.time() - t0:.1f}s), {len(d['words'])} words")
    for task, c in d["chance"].items():
        print(f"  {task:10s} chance {c:.0%}")
