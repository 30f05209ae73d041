"""
`python bench.py data`: data loading against the training step, the start-up on a large data file,
and video decoding. bench.py dispatches its `data` kind here; the other kinds are bench.py's.

    python bench.py data loader [steps] [shapes]        # samples/s with 0, 1, 2 DataLoader workers vs the step
    python bench.py data startup ROWS TOKENIZER [repeat] [dir]  # a mix665k-shaped file: index built, then read
    python bench.py data video [PATH]                   # load_video of a 10 s clip at 32 frames vs bare decode
"""
import sys
import time

import torch


def vm(field):
    """MB of a /proc/self/status field. VmHWM (peak RSS) starts afresh at exec, unlike ru_maxrss,
    which a child inherits from its parent."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def write_mix665k(path, root, n=665298, seed=0):
    """A file shaped like LLaVA's llava_v1_5_mix665k.json (row mix, turns and text lengths roughly the
    published ones; indented like it), with empty image files under root (50 per folder missing)."""
    import json
    import os
    import random
    rng = random.Random(seed)
    pools = {"coco/train2017": 118000, "gqa/images": 50000, "ocr_vqa/images": 40000, "vg/VG_100K": 40000,
             "textvqa/train_images": 20000}
    names = {}
    for d, k in pools.items():  # LLaVA's folder sizes, scaled down with n
        os.makedirs(os.path.join(root, d), exist_ok=True)
        names[d] = [f"{d}/{i:012d}.jpg" for i in range(max(100, k * n // 665298))]
        for p in names[d][:-50]:
            open(os.path.join(root, p), "w").close()
    words = "the a man woman dog cat red blue table street sign bus car is are on in with of and two three left right".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))
    rows = []
    for i in range(n):
        u = rng.random()
        if u < 0.06:  # ShareGPT text-only, long
            conv = []
            for _ in range(rng.randint(1, 4)):
                conv += [{"from": "human", "value": text(rng.randint(10, 80))}, {"from": "gpt", "value": text(rng.randint(50, 400))}]
            rows.append({"id": f"sg{i}_0", "model": "", "conversations": conv})
            continue
        d = "coco/train2017" if u < 0.6 else rng.choice(list(pools)[1:])
        conv = []
        for t in range(rng.randint(1, 5) if d == "coco/train2017" else rng.randint(1, 10)):
            q = text(rng.randint(5, 25))
            conv += [{"from": "human", "value": ("<image>\n" + q) if t == 0 else q},
                     {"from": "gpt", "value": text(rng.randint(1, 120 if d == "coco/train2017" else 6))}]
        rows.append({"id": f"{i:012d}", "image": rng.choice(names[d]), "conversations": conv})
    with open(path, "w") as f:
        json.dump(rows, f, indent=4)


def _load_tokenizer(path):
    from tokenizer import Tokenizer
    if not path:
        return Tokenizer.toy(["the", "a", "man", "dog", "cat"])
    return Tokenizer.from_qwen_tiktoken(path) if path.endswith(".tiktoken") else Tokenizer.load(path)


def _startup_child(json_path, root, tokenizer, cache):
    """Run in a fresh process: the seconds and peak RSS (MB) from nothing to a VLDataset of the file
    (tokenizer loaded, index built or read), at the MPP-Qwen-Next SFT settings (32 queries, 32 frames,
    max_len 512... as its preset), and one item read."""
    import json
    import warnings
    import data
    t0 = time.perf_counter()
    tok = _load_tokenizer(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rows whose files are missing, skipped
        ds = data.VLDataset(json_path, root, tok, 32, 224, 512, skip_bad=True, max_frames=32, cache=cache == "1")
    ds.load_media = False  # the generated images are empty files
    n = len(ds[len(ds) // 2]["input_ids"])
    print(json.dumps(dict(seconds=time.perf_counter() - t0, rss=vm("VmHWM"), built=ds.index_built, rows=len(ds), n=n)))


def _startup(json_path, root, tokenizer, repeat):
    import json
    import os
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    for what, cache in [("first start: every row validated and tokenized, index stored", "1")] + \
                       [("later start: the index read", "1")] * int(repeat):
        code = f"import bench_data; bench_data._startup_child({json_path!r}, {root!r}, {tokenizer!r}, {cache!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=here)
        r = json.loads(out.stdout.splitlines()[-1])
        print(f"  {what:62} {r['seconds']:6.1f} s  {r['rss']:6.0f} MB peak RSS  ({r['rows']} rows, built {r['built']})",
              flush=True)


def _write_clip(path, seconds=10, fps=25, size=(640, 360)):
    """A 640x360 x264 clip: a moving bar over a gradient with a little noise (every frame differs)."""
    import av
    import numpy as np
    rng = np.random.default_rng(0)
    w, h = size
    base = np.broadcast_to(np.linspace(0, 200, w, dtype=np.uint8)[None, :, None], (h, w, 3))
    with av.open(path, "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for t in range(seconds * fps):
            img = base + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
            img[100:200, (8 * t) % w:(8 * t) % w + 40] = (250, 30, 30)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def _data_files(d, shape):
    """({'image': json, 'video': json}, image_root, overrides) for the toy (synthetic images at the
    default toy's size, 4-frame videos) or the rehearsal shape (640x480 JPEGs seen at 224 px, 10 s 640x360 x264 clips at 32 frames)."""
    import json
    import os
    import numpy as np
    from PIL import Image
    from formats import IMAGE_PLACEHOLDER as PH
    if shape == "toy":
        from synthetic import make_synthetic
        from train import Config
        s = make_synthetic(os.path.join(d, "syn"), 0, 400, 0, Config.image_size)  # the default toy's images
        rows = json.load(open(s["train"]))
        split = {"image": [r for r in rows if "image" in r], "video": [r for r in rows if "video" in r]}
        root, over = s["image_root"], dict(max_frames=2, batch_size=32)
    else:
        root, rng = d, np.random.default_rng(0)
        for k in range(16):
            img = np.linspace(0, 255, 640, dtype=np.uint8)[None, :, None] + rng.integers(0, 30, (480, 640, 3), dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(d, f"i{k}.jpg"), quality=90)
        for k in range(2):
            _write_clip(os.path.join(d, f"v{k}.mp4"))
        split = {"image": [{"image": f"i{k % 16}.jpg", "instruction": f"{PH} what is this", "output": "a cat"} for k in range(64)],
                 "video": [{"video": f"v{k % 2}.mp4", "instruction": f"{PH} what happens", "output": "a bar moves"} for k in range(16)]}
        over = dict(image_size=224, max_frames=32, batch_size=4, max_len=1280, num_query=32)
    files = {}
    for kind, rows in split.items():
        files[kind] = os.path.join(d, f"{shape}-{kind}.json")
        with open(files[kind], "w") as f:
            json.dump(rows, f)
    return files, root, over


def _loader_rate(ds, batch, workers, n):
    """Samples/s of a DataLoader over ds (n batches after the first, which pays the workers' start)."""
    from functools import partial
    from data import collate
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=partial(collate, pad_id=0),
                                         sampler=torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch * (n + 1)))
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in it:
        pass
    return batch * n / (time.perf_counter() - t0)


def _training_wait(cfg, model, ds, steps):
    """(seconds per step, fraction of it spent waiting for the next batch) of the training loop's
    own pieces: step_batches (cfg.num_workers), step_count, forward_backward, the optimizer."""
    from contextlib import nullcontext
    import train
    opt = train.optimizer(cfg, model)
    batches = train.step_batches(cfg, ds, 0, 0, 1, 0)
    next(batches)  # the workers' start-up is not a step
    wait = total = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        micro = next(batches)
        t1 = time.perf_counter()
        train.forward_backward(model, micro, train.step_count(micro, cfg.loss_norm), nullcontext(), torch.device("cpu"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        wait, total = wait + t1 - t0, total + time.perf_counter() - t0
    return total / steps, wait / total


def bench_data(what="loader", *args):
    """loader [steps] [shapes]: samples/s of image rows and video rows with 0, 1, 2 DataLoader workers,
    next to a training step's rate at the same batch, and the share of the step spent waiting for data.
    startup ROWS TOKENIZER [repeat] [dir]: start-up time and peak RSS on a mix665k-shaped file of ROWS rows
    (written once into dir, default /tmp/nanompp-mix-ROWS), with TOKENIZER (a qwen.tiktoken, a tokenizer dir, or '' for the toy).
    video [PATH]: load_video of a 10 s 640x360 x264 clip at 32 frames, and the bare decode of every frame."""
    import os
    import tempfile
    if what == "startup":
        rows, tokenizer, repeat, d = (list(args) + ["665298", "", "2", ""][len(args):])[:4]
        d = d or f"/tmp/nanompp-mix-{rows}"
        path = os.path.join(d, "mix665k.json")
        if not os.path.exists(path):
            write_mix665k(path + ".tmp", d, int(rows))
            os.replace(path + ".tmp", path)
        print(f"{path} ({os.path.getsize(path) / 2**20:.0f} MB, {rows} rows), tokenizer {tokenizer or 'toy'}:")
        return _startup(path, d, tokenizer, repeat)
    if what == "video":
        return _bench_video(*args)
    from dataclasses import replace
    import train
    steps, shapes = (list(args) + ["8", "toy,rehearsal"][len(args):])[:2]
    torch.set_num_threads(1)  # the training process; the workers are the other cores
    for shape in shapes.split(","):
        with tempfile.TemporaryDirectory() as d:
            files, root, over = _data_files(d, shape)
            for kind, path in files.items():
                cfg = train.parse_args([f"--{k}={v}" for k, v in dict(
                    data=path, image_root=root, curriculum_iters=0, oversample="", max_iters=10 ** 6, grad_accum=1,
                    augment=True, dtype="fp32", **over).items()])
                model, tok, _ = train.build(cfg, [])
                if shape == "rehearsal":  # EVA-ViT-g's 14 px patches (256 per 224 px image), toy widths and depth
                    from model import MultimodalLM
                    model = MultimodalLM(replace(model.config, vit=replace(model.config.vit, patch_size=14)))
                    train.toy_init(model)
                ds = train.datasets(cfg, tok, model.config)[0]
                b = cfg.batch_size
                rates = [_loader_rate(ds, b, w, max(2, int(steps) // 2)) for w in (0, 1, 2)]
                row = f"{shape:9} {kind:5} batch {b:2}: loader samples/s " + " / ".join(f"{r:6.1f}" for r in rates)
                per_step = {}
                for w in (0, 2):
                    per_step[w] = _training_wait(replace(cfg, num_workers=w), model, ds, int(steps))
                print(f"{row} (0/1/2 workers); training step {b / (per_step[0][0] * (1 - per_step[0][1])):6.1f} "
                      f"samples/s; waiting for data {per_step[0][1]:4.0%} of the step with 0 workers, "
                      f"{per_step[2][1]:4.0%} with 2", flush=True)


def _bench_video(path="", repeat="5"):
    """load_video (the kept frames, as RGB PIL images) against the floor: PyAV decoding every frame,
    threaded, with no conversion."""
    import os
    import statistics
    import tempfile
    import av
    from data import load_video
    with tempfile.TemporaryDirectory() as d:
        if not path:
            path = os.path.join(d, "clip.mp4")
            _write_clip(path)

        def bare():
            with av.open(path) as c:
                c.streams.video[0].thread_type = "AUTO"
                return sum(1 for _ in c.decode(video=0))
        for name, fn in [("load_video(path, 32)", lambda: load_video(path, 32)), ("bare decode, every frame", bare)]:
            fn()
            times, cpu = [], []
            for _ in range(int(repeat)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)  # all of the process' threads: steadier on a shared machine
            print(f"  {name:28} median {statistics.median(times) * 1e3:6.0f} ms wall (range {min(times) * 1e3:.0f}-"
                  f"{max(times) * 1e3:.0f}), {statistics.median(cpu) * 1e3:6.0f} ms CPU", flush=True)
