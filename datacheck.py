"""
`python datacheck.py FILE`: what a training file holds, told before a run finds out the hard way.

    python datacheck.py data/llava_pretrain.json --image_root data/images --preset mpp-qwen7b-pretrain
    python datacheck.py data/sft.json --preset mpp-qwen7b-sft --decode --sample 2000

Prints the rows read per format, the rows per kind (single image, multi-image, video, text-only;
multi-turn), the bad rows with their first reasons, the missing files, token lengths after the
preset's chat template (percentiles) and how many rows its max_len truncates or drops; with
--decode, the images and videos that fail to decode (all of them, or --sample N rows). The exit
status is 1 when any row is bad (VLDataset would refuse the file), 2 when the file cannot be read.

A module of its own, above train.py, because a preset (max_len, tokenizer, query tokens, frames,
template) belongs to train.py; data.py only forwards its `check` command here, so data stays below
train in the import graph. It keeps LLaVA's 665k rows fast: rows are streamed (formats.iter_rows),
file existence comes from one listing per directory (formats.MediaIndex), nothing is decoded unless
asked, a video counts as max_frames frames (the most the model sees) without being opened, and
tokenizing, most of the cost, covers 20,000 rows drawn with seed 0 unless --lengths all. Measured on
a 665k-row, 1.1 GB LLaVA-shaped file with Qwen's tokenizer: 30 s of CPU and 370 MB (57 s of wall
time on the shared 2-core machine); --lengths all, 107 s of CPU.
"""
import argparse
import math
import os
import random
import time
from collections import Counter

import train
from data import LLM_TEMPLATES, _encode, fit, load_image, load_video
from formats import MediaIndex, MissingMedia, iter_rows, parse_row
from model import MM_PRESETS
from tokenizer import Tokenizer

KINDS = ("single image", "multi-image", "video", "text-only")


def tokenizer_for(cfg, path=None):
    """(tokenizer, how it was chosen): --tokenizer, else the preset's if it is on disk, else the
    toy tokenizer (about one token per byte of text: lengths well above a real BPE's)."""
    if path:
        return Tokenizer.load(path), path
    path = cfg.tokenizer or cfg.init
    if path and os.path.exists(path):
        return Tokenizer.load(path), f"{path} (preset {cfg.preset})"
    why = f"{path} not found" if path else f"preset {cfg.preset} names none"
    return Tokenizer.toy([]), (f"TOY byte-level tokenizer ({why}): about one token per byte of text, "
                               "several times a real BPE's count")


def percentile(sorted_values, q):
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


class Reservoir:
    """A uniform sample of at most n items of a stream of unknown length (Algorithm R), seeded;
    n=None keeps everything."""

    def __init__(self, n, seed=0):
        self.n, self.items, self.seen, self.rng = n, [], 0, random.Random(seed)

    def add(self, item):
        if self.n is None or len(self.items) < self.n:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen + 1)
            if j < self.n:
                self.items[j] = item
        self.seen += 1


def _tally(r, s, sign):
    r["good"] += sign
    r["formats"][s["format"]] += sign
    r["kinds"][s["kind"]] += sign
    r["multi_turn"] += sign * (s["user_turns"] > 1)


def check(path, image_root, tok, num_query, max_frames, max_len, template, lengths=20000, decode=False,
          sample=None):
    """Read every row once (structure, placeholders, files), then tokenize `lengths` parsed rows
    drawn with seed 0 (None: all; tokenizing is most of the cost) and, with `decode`, decode
    `sample` rows with media (None: all). Returns the counts that report() prints."""
    r = dict(rows=0, formats=Counter(), kinds=Counter(), multi_turn=0, bad=[], missing=0, good=0, parsed=0,
             lengths=[], fit=Counter(), decoded=0, undecodable=0)
    index, to_encode, to_decode = MediaIndex(), Reservoir(lengths), Reservoir(sample)

    def measure(turns, video):  # a video as max_frames frames: the most the model sees
        ids, _, media_end = _encode(tok, turns, num_query, max_frames if video else None, template)
        r["lengths"].append(len(ids))
        r["fit"][fit(len(ids), media_end, max_len)] += 1

    for i, row in enumerate(iter_rows(path)):
        r["rows"] += 1
        try:
            s = parse_row(row, image_root, index)
        except ValueError as e:
            rid = row.get("id", row.get("video_id")) if isinstance(row, dict) else None
            r["bad"].append((i, rid, str(e)))
            r["missing"] += isinstance(e, MissingMedia)
            continue
        _tally(r, s, +1)
        if lengths is None:
            measure(s["turns"], s["video"])  # at once: keeping 665k rows' text would cost GBs
        else:
            to_encode.add((s["turns"], s["video"]))
        if decode and s["media"]:
            slim = {k: s[k] for k in ("media", "video", "kind", "format", "user_turns")}  # no text
            to_decode.add((i, row.get("id", row.get("video_id")), slim))
    r["parsed"] = r["good"]
    for turns, video in to_encode.items:
        measure(turns, video)
    for i, rid, s in to_decode.items:
        r["decoded"] += 1
        for m in s["media"]:
            try:
                load_video(m, max_frames) if s["video"] else load_image(m)
            except (OSError, ValueError) as e:  # Pillow's own OSErrors do not name the file
                r["undecodable"] += 1
                r["bad"].append((i, rid, f"cannot decode: {e}" if m in str(e) else f"cannot decode {m}: {e}"))
                _tally(r, s, -1)  # a bad row now
                break
    r["bad"].sort(key=lambda b: b[0])
    r["lengths"].sort()
    return r


def report(r, path, max_len, template, show=10):
    """The summary, as lines of text."""
    formats = ", ".join(f"{k} {n}" for k, n in sorted(r["formats"].items()) if n)
    out = [f"{path}: {r['rows']} rows read, {r['good']} good" + (f" ({formats})" if formats else "")]
    out.append("kinds: " + ", ".join(f"{k} {r['kinds'][k]}" for k in KINDS) + f"; multi-turn {r['multi_turn']}")
    out.append(f"bad rows: {len(r['bad'])}" + (f" (missing files {r['missing']}, failed to decode "
                                                f"{r['undecodable']})" if r["bad"] else ""))
    for i, rid, why in r["bad"][:show]:
        out.append(f"  row {i}" + (f" (id {rid!r})" if rid is not None else "") + f": {why}")
    if len(r["bad"]) > show:
        out.append(f"  ... and {len(r['bad']) - show} more")
    v, f = r["lengths"], r["fit"]
    if v:
        which = (f"all {len(v)} rows that parse" if len(v) == r["parsed"]
                 else f"{len(v)} of {r['parsed']} rows that parse, drawn with seed 0")
        out.append(f"tokens after the {template} template ({which}): p50 {percentile(v, 50)}, "
                   f"p90 {percentile(v, 90)}, p99 {percentile(v, 99)}, max {v[-1]}")
        out.append(f"max_len {max_len}: {f['fits']} fit, {f['truncated']} truncated (cut after their last image), "
                   f"{f['dropped']} dropped (an image past max_len)"
                   + ("" if len(v) == r["parsed"] else f" of those {len(v)} rows (--lengths all: every row)"))
    out.append(f"decoded: {r['decoded']} rows, {r['undecodable']} failed" if r["decoded"]
               else "decoded: none (--decode opens the images and videos)")
    return out


def _count(text):
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python datacheck.py", description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("--image_root", help="the folder the rows' paths are relative to (default: the preset's)")
    p.add_argument("--preset", default="toy", help="a train.py preset: max_len, tokenizer, query tokens, frames")
    p.add_argument("--tokenizer", help="a saved tokenizer directory (default: the preset's, if on disk)")
    p.add_argument("--max_len", type=int, help="override the preset's max_len")
    p.add_argument("--lengths", type=_count, default=20000, metavar="N|all",
                   help="tokenize N of the rows that parse, drawn with seed 0, or all (default 20000)")
    p.add_argument("--decode", action="store_true", help="decode the rows' images and videos")
    p.add_argument("--sample", type=int, help="with --decode: this many rows with media, drawn with seed 0")
    p.add_argument("--show", type=int, default=10, help="bad rows listed (default 10)")
    args = p.parse_args(argv)
    if args.sample is not None and (args.sample < 1 or not args.decode):
        p.error("--sample N needs --decode and N >= 1")
    try:
        cfg = train.parse_args([f"--preset={args.preset}"])
    except train.ConfigError as e:
        p.error(str(e))
    image_root = cfg.image_root if args.image_root is None else args.image_root
    max_len = args.max_len or cfg.max_len
    template = LLM_TEMPLATES[MM_PRESETS.get(cfg.model, {}).get("llm_type", "qwen")]
    try:
        tok, how = tokenizer_for(cfg, args.tokenizer)
    except (OSError, ValueError) as e:
        print(f"error: tokenizer: {e}")
        return 2
    print(f"preset {cfg.preset}: max_len {max_len}, {cfg.num_query} query tokens per image, videos as "
          f"{cfg.max_frames} frames, {template} template; image_root {image_root or '.'}")
    print(f"tokenizer: {how}")
    t0 = time.perf_counter()
    try:
        r = check(args.file, image_root, tok, cfg.num_query, cfg.max_frames, max_len, template,
                  args.lengths, args.decode, args.sample)
    except (OSError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print("\n".join(report(r, args.file, max_len, template, args.show)))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 1 if r["bad"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
