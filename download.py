"""
Fetch the public weights the presets need, verified, then optionally convert them.

    python download.py --list                                  # every name, its size and source
    python download.py qwen2.5-0.5b-instruct ~/hf/Qwen2.5-0.5B-Instruct
    python download.py qwen-7b-chat ~/hf/Qwen-7B-Chat --convert checkpoints/qwen7b-chat
    HF_ENDPOINT=https://hf-mirror.com python download.py phi-2 ~/hf/phi-2   # any HF mirror
    HF_TOKEN=hf_... python download.py ...                     # sent as a Bearer token to the HF endpoint

`--convert OUT` then runs `python convert.py KIND DIR OUT` (KIND from the table below; the file
itself instead of DIR when the entry is a single file). Plain `requests` rather than the HF client:
a streamed GET to `<file>.part` that resumes with `Range: bytes=N-` after a dropped connection is
all any of these hosts need (HF, Google Cloud Storage, GitHub releases, ModelScope), and each file
is checked against the publisher's size and sha256 before it is renamed into place, so a final
name only ever holds a complete, verified file.
"""
import argparse
import errno
import hashlib
import os
import subprocess
import sys
import time

import requests
from tqdm import tqdm

LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
COOBIW = "https://github.com/Coobiw/MiniGPT4Qwen/releases/download/"  # the repo is now Coobiw/MPP-LLaVA
QWEN_TIKTOKEN = ("qwen.tiktoken", 2561218, "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186")


def _shards(n, sizes=None, sha256s=None):
    """HF's `model-0000i-of-0000n.safetensors` names, with their sizes and sha256 where known."""
    sizes, sha256s = sizes or [None] * n, sha256s or [None] * n
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", sizes[i], sha256s[i]) for i in range(n)]


# Each file is (name, size in bytes, sha256). HF entries live at {HF_ENDPOINT}/{repo}/resolve/{revision}/{name},
# the others at {base}{name}. The sha256 is the publisher's (the `oid sha256:` of an HF LFS pointer); None means
# the publisher gives none (HF's small non-LFS files only have a git sha1): such a file is checked by size, and a
# file whose size is None too by the length the server announces. Revisions are pinned where the sizes were read
# from a known commit; "main" entries have no recorded sizes to go stale.
ARTEFACTS = {
    # Google Cloud Storage publishes MD5/CRC32C, not sha256; sizes not found: checked against Content-Length only.
    "eva_vit_g": dict(convert="eva_vit_g", base=LAVIS, files=[("eva_vit_g.pth", None, None)]),
    "blip2_pretrained_flant5xxl": dict(convert="blip2_lavis", base=LAVIS,
                                       files=[("blip2_pretrained_flant5xxl.pth", None, None)]),
    # Qwen v1: shard sizes and sha256 not found. qwen.tiktoken is the same file in every Qwen v1 repo (seen at
    # Qwen/Qwen-72B and in the dashscope wheel). 14B's 15 shards are the count of the Qwen-14B base repo.
    "qwen-7b-chat": dict(convert="qwen1", repo="Qwen/Qwen-7B-Chat", revision="main", files=[
        ("config.json", None, None), ("tokenizer_config.json", None, None), QWEN_TIKTOKEN,
        ("model.safetensors.index.json", None, None), *_shards(8)]),
    "qwen-14b-chat": dict(convert="qwen1", repo="Qwen/Qwen-14B-Chat", revision="main", files=[
        ("config.json", None, None), ("tokenizer_config.json", None, None), QWEN_TIKTOKEN,
        ("model.safetensors.index.json", None, None), *_shards(15)]),
    "qwen2.5-0.5b-instruct": dict(convert="qwen2", repo="Qwen/Qwen2.5-0.5B-Instruct",
                                  revision="7ae557604adf67be50417f59c2c2f167def9a775", files=[
        ("config.json", 659, None), ("tokenizer.json", 7031645, None), ("tokenizer_config.json", 7305, None),
        ("model.safetensors", 988097824, "fdf756fa7fcbe7404d5c60e26bff1a0c8b8aa1f72ced49e7dd0210fe288fb7fe")]),
    "qwen2.5-1.5b-instruct": dict(convert="qwen2", repo="Qwen/Qwen2.5-1.5B-Instruct",
                                  revision="989aa7980e4cf806f80c7fef2b1adb7bc71aa306", files=[
        ("config.json", 660, None), ("tokenizer.json", 7031645, None), ("tokenizer_config.json", 7305, None),
        ("model.safetensors", 3087467144, "dd924a11b4c220f385b51ffa522daea7c9f3d850e31b162bb5661df483c6d3ee")]),
    "qwen2.5-7b-instruct": dict(convert="qwen2", repo="Qwen/Qwen2.5-7B-Instruct",
                                revision="a09a35458c702b33eeacc393d103063234e8bc28", files=[
        ("config.json", 663, None), ("tokenizer.json", 7031645, None), ("tokenizer_config.json", 7305, None),
        ("model.safetensors.index.json", 27752, None), *_shards(4, [3945441440, 3864726352, 3864726424, 3556377672], [
            "a1333e6293854747c481288ea83b348226af178dd565c49b6f9495ba1966aba7",
            "f5d25a2772cb825164a2a2c0fb6d51a87e282abf21e4dd75bc5cfb3cd0ea6185",
            "8efdec4c1bc12317ae1a38dc42b595ce777738a64deea3fcb8a0a91381bcdfd5",
            "1a72d403cdf0c1ec3cb7f289f17b394a01e64394c2e9b3c0f94dbce3faf879bd"])]),
    # Phi-2: only the first shard's size and sha256 were found.
    "phi-2": dict(convert="phi", repo="microsoft/phi-2", revision="810d367871c1d460086d9f82db8696f2e0a0fcd0", files=[
        ("config.json", None, None), ("tokenizer.json", None, None), ("tokenizer_config.json", None, None),
        ("model.safetensors.index.json", None, None),
        *_shards(2, [4995584424, None], ["7fbcdefa72edf7527bf5da40535b57d9f5bd3d16829b94a9d25d2b457df62e84", None])]),
    # MiniGPT4Qwen / MPP-Qwen released checkpoints: GitHub release zips (sizes and layout unknown: unzip, then run
    # convert.py minigpt4qwen on the .pth inside), and MPP-Qwen-Next's stage-2 weights on ModelScope, whose file
    # name is taken from the upstream README's cli_demo command, not from a file listing.
    "minigpt4qwen": dict(convert=None, base=COOBIW + "instruction-data_and_checkpointv1.0/",
                         files=[("ckpt.zip", None, None)]),
    "minigpt4qwen-14b": dict(convert=None, base=COOBIW + "instruction-data_and_checkpointv1.0/",
                             files=[("pp_14b_ckpt-logs.zip", None, None)]),
    "mpp-qwen14b-pretrain": dict(convert=None, base=COOBIW + "MPP-Qwen14B_ckpt-and-data/",
                                 files=[("ckpt-and-data.zip", None, None)]),
    "mpp-qwen-next-pretrain": dict(convert=None, base=COOBIW + "MPP-Qwen-Next_ckpt-and-data/",
                                   files=[("ckpt-and-data.zip", None, None)]),
    "mpp-qwen-next-sft": dict(convert="minigpt4qwen", files=[("unfreeze_llm_model.pth", None, None)],
                              base="https://www.modelscope.cn/models/Coobiw/MPP-Qwen-Next/resolve/master/"),
}


# A dropped or stalled connection, or a server error: worth another try (a 4xx answer is not).
RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.HTTPError, requests.exceptions.ChunkedEncodingError)


class DownloadError(RuntimeError):
    """A download that cannot finish; the message says which file or URL and why."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _total(r, have):
    """The whole file's length: from Content-Range (206, 416) or Content-Length (200), else None."""
    whole = r.headers.get("Content-Range", "").rpartition("/")[2]
    if whole.isdigit():
        return int(whole)
    length = r.headers.get("Content-Length")
    return (have if r.status_code == 206 else 0) + int(length) if length and length.isdigit() else None


def fetch(url, path, size=None, sha256=None, headers=None, retries=5, backoff=2.0, timeout=60, session=None):
    """Download url to path via path + '.part', resuming; returns False if path was already complete."""
    if os.path.exists(path) and (size is None or os.path.getsize(path) == size) and (
            sha256 is None or _sha256(path) == sha256):
        return False  # a final name is only ever written after verification, so size-less files count too
    part, http, failures = path + ".part", session or requests, 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if size is not None and have > size:
            os.remove(part)  # longer than the file can be: not a prefix of it
            continue
        if size is not None and have == size:
            total = size  # all there already; verified below
            break
        # identity: the bytes on disk must be the file's bytes, not a compressed transfer of them
        req = {**(headers or {}), "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with http.get(url, headers=req, stream=True, timeout=timeout) as r:
                if r.status_code in (401, 403):
                    raise DownloadError(f"{url}: HTTP {r.status_code}, access denied. If this is a gated Hugging Face "
                                        "repo, accept its licence on the model page and set HF_TOKEN")
                if r.status_code == 404:
                    raise DownloadError(f"{url}: HTTP 404, no such file")
                total = _total(r, have)
                if r.status_code == 416 and have:  # nothing after byte `have`: the .part is complete
                    break
                if 400 <= r.status_code < 500 and r.status_code != 429:
                    raise DownloadError(f"{url}: HTTP {r.status_code}")
                r.raise_for_status()  # 5xx and 429 raise HTTPError, retried below
                if size is not None and total is not None and total != size:
                    raise DownloadError(f"{url}: the server has {total} bytes, the table says {size}")
                if r.status_code == 200:
                    have = 0  # the server ignored Range and sends the whole file: start again
                try:
                    with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B",
                                                                       unit_scale=True, disable=None,
                                                                       desc=os.path.basename(path)) as bar:
                        for chunk in r.iter_content(1 << 20):
                            f.write(chunk)
                            bar.update(len(chunk))
                        f.flush()
                        os.fsync(f.fileno())  # on disk before the rename makes it the final file
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    need = f"{total - os.path.getsize(part)} more bytes" if total else "more space"
                    raise DownloadError(f"{part}: disk full, {need} needed; free some, run again to resume") from None
            got = os.path.getsize(part)
            if total is None or got >= total:
                break
            raise requests.ConnectionError(f"connection closed at byte {got} of {total}")
        except RETRYABLE as e:
            # a retry that made progress resets the count: a flaky link may take many resumes for 15 GB
            failures = 1 if os.path.exists(part) and os.path.getsize(part) > have else failures + 1
            if failures > retries:
                raise DownloadError(f"{url}: giving up after {retries} retries: {e}") from None
            time.sleep(backoff * 2 ** (failures - 1))
    got = os.path.getsize(part)
    expect = size if size is not None else total
    if expect is not None and got != expect:
        os.remove(part)
        raise DownloadError(f"{path}: size mismatch: expected {expect} bytes, got {got}; removed the download")
    if sha256 is not None:
        digest = _sha256(part)
        if digest != sha256:
            os.remove(part)
            raise DownloadError(f"{path}: sha256 mismatch: expected {sha256}, got {digest}; removed the download")
    os.replace(part, path)
    return True


def urls(entry, endpoint=None):
    """(file name, url, size, sha256) for every file of a table entry."""
    if "repo" in entry:
        endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        base = f"{endpoint}/{entry['repo']}/resolve/{entry['revision']}/"
    else:
        base = entry["base"]
    return [(name, base + name, size, sha) for name, size, sha in entry["files"]]


def download(name, folder, table=ARTEFACTS, endpoint=None, **fetch_args):
    """Fetch every file of table[name] into folder; returns their paths."""
    if name not in table:
        raise DownloadError(f"unknown name {name!r}; python download.py --list shows them")
    entry = table[name]
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token and "repo" in entry else {}  # only HF gets the token
    os.makedirs(folder, exist_ok=True)
    paths = []
    with requests.Session() as session:
        for file, url, size, sha in urls(entry, endpoint):
            paths.append(os.path.join(folder, file))
            if not fetch(url, paths[-1], size, sha, headers, session=session, **fetch_args):
                print(f"{paths[-1]}: already complete")
    return paths


def convert_command(name, folder, out, table=ARTEFACTS):
    """`python convert.py KIND SRC OUT`: SRC is the folder, or the file itself for one-file entries."""
    if name not in table:
        raise DownloadError(f"unknown name {name!r}; python download.py --list shows them")
    entry = table[name]
    if entry["convert"] is None:
        raise DownloadError(f"{name} is a zip, with no convert step: unzip it, then run convert.py minigpt4qwen "
                            "on the .pth checkpoint inside")
    src = os.path.join(folder, entry["files"][0][0]) if len(entry["files"]) == 1 else folder
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert.py"),
            entry["convert"], src, out]


def main(argv=None, table=ARTEFACTS):
    p = argparse.ArgumentParser(description="Download public weights (see the module docstring).")
    p.add_argument("name", nargs="?")
    p.add_argument("dir", nargs="?")
    p.add_argument("--convert", metavar="OUT", help="then run convert.py on the download, writing OUT")
    p.add_argument("--list", action="store_true", help="list the names")
    args = p.parse_args(argv)
    if args.list:
        for name, entry in table.items():
            known = [size for _, size, _ in entry["files"] if size is not None]
            gb, partial = sum(known) / 1e9, len(known) < len(entry["files"])  # "+": some sizes unknown
            size = "?" if gb < 0.01 else f"{gb:.2f} GB" + "+" * partial
            print(f"{name:28} {entry['convert'] or '-':12} {size:>9}  {entry.get('repo') or entry['base']}")
        return
    if not (args.name and args.dir):
        p.error("give NAME and DIR, or --list")
    try:
        cmd = convert_command(args.name, args.dir, args.convert, table) if args.convert else None  # refuse early
        download(args.name, args.dir, table)
        if cmd and subprocess.run(cmd).returncode:
            raise DownloadError(f"{' '.join(cmd[1:])} failed")
    except DownloadError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
