"""download.py against a local HTTP server (127.0.0.1, an ephemeral port) that can drop the
connection mid-file, ignore Range, corrupt a byte or refuse access: every file ends complete and
verified under its final name, or with a one-line error and nothing under that name."""
import errno
import hashlib
import os
import random
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import download
from download import ARTEFACTS, DownloadError, convert_command, fetch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOB = random.Random(0).randbytes(2_500_000)  # spans a few of the client's 1 MiB chunks
SHA = hashlib.sha256(BLOB).hexdigest()
FAST = dict(retries=2, backoff=0.01, timeout=5)  # small backoff, short socket timeouts: tests stay quick


class Handler(BaseHTTPRequestHandler):
    """Serves server.files; server.mode picks a misbehaviour; every request is logged."""
    timeout = 5  # socket timeout: a stuck client cannot hold the server thread

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, dict(self.headers)))
        if srv.mode in ("403", "500"):
            return self.send_error(int(srv.mode))
        body = srv.files.get(self.path)
        if body is None:
            return self.send_error(404)
        if srv.mode == "corrupt":
            body = body[:1000] + bytes([body[1000] ^ 1]) + body[1001:]
        rng = self.headers.get("Range")
        start = int(rng[len("bytes="):].rstrip("-")) if rng and srv.mode != "ignore_range" else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if srv.mode == "drop" and not srv.dropped:
            srv.dropped = True
            self.wfile.write(body[start:start + len(body) // 2])  # then the connection closes early
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.mode, srv.log, srv.dropped = {"/blob.bin": BLOB}, "normal", [], False
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    thread = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def test_download_verifies_sha256_and_sends_no_token_off_hf(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    table = {"blob": dict(convert=None, base=server.url + "/", files=[("blob.bin", len(BLOB), SHA)])}
    [path] = download.download("blob", tmp_path, table, **FAST)
    assert open(path, "rb").read() == BLOB and os.listdir(tmp_path) == ["blob.bin"]
    [(_, headers)] = server.log
    assert "Range" not in headers and "Authorization" not in headers


def test_resumes_with_range_after_a_dropped_connection(server, tmp_path):
    server.mode = "drop"
    path = str(tmp_path / "blob.bin")
    assert fetch(server.url + "/blob.bin", path, len(BLOB), SHA, **FAST)
    assert open(path, "rb").read() == BLOB
    first, second = server.log
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second[1]["Range"])[1])
    assert "Range" not in first[1] and 0 < resumed_at <= len(BLOB) // 2  # what was on disk when it dropped


def test_a_server_that_ignores_range_is_restarted_from_zero(server, tmp_path):
    server.mode = "ignore_range"
    path = str(tmp_path / "blob.bin")
    with open(path + ".part", "wb") as f:
        f.write(b"x" * 1000)  # a stale partial download: only a restart gives the right bytes
    assert fetch(server.url + "/blob.bin", path, len(BLOB), SHA, **FAST)
    assert open(path, "rb").read() == BLOB
    [(_, headers)] = server.log
    assert headers["Range"] == "bytes=1000-"


def test_a_corrupted_byte_fails_the_checksum_and_leaves_nothing(server, tmp_path):
    server.mode = "corrupt"
    path = str(tmp_path / "blob.bin")
    bad = hashlib.sha256(BLOB[:1000] + bytes([BLOB[1000] ^ 1]) + BLOB[1001:]).hexdigest()
    with pytest.raises(DownloadError) as e:
        fetch(server.url + "/blob.bin", path, len(BLOB), SHA, **FAST)
    assert str(e.value) == f"{path}: sha256 mismatch: expected {SHA}, got {bad}; removed the download"
    assert os.listdir(tmp_path) == []


def test_404_names_the_url_and_403_says_how_to_get_access(server, tmp_path):
    url = server.url + "/missing.bin"
    with pytest.raises(DownloadError, match=f"^{re.escape(url)}: HTTP 404, no such file$"):
        fetch(url, str(tmp_path / "missing.bin"), **FAST)
    server.mode = "403"
    with pytest.raises(DownloadError, match=r"HTTP 403, access denied.*accept its licence.*set HF_TOKEN"):
        fetch(server.url + "/blob.bin", str(tmp_path / "blob.bin"), **FAST)
    assert os.listdir(tmp_path) == []


def test_server_errors_are_retried_a_bounded_number_of_times(server, tmp_path):
    server.mode = "500"
    with pytest.raises(DownloadError, match="giving up after 2 retries"):
        fetch(server.url + "/blob.bin", str(tmp_path / "blob.bin"), **FAST)
    assert len(server.log) == 3


def test_an_already_complete_file_is_not_downloaded_again(server, tmp_path):
    path = str(tmp_path / "blob.bin")
    with open(path, "wb") as f:
        f.write(BLOB)
    assert not fetch(server.url + "/blob.bin", path, len(BLOB), SHA, **FAST)
    assert server.log == []


def test_a_full_disk_says_how_many_bytes_are_needed_and_resumes_later(server, tmp_path, monkeypatch):
    class FullDisk:
        """A file that takes 1.5 MB, then fails as a full disk does."""
        def __init__(self, *args):
            self.f = open(*args)

        def write(self, data):
            if self.f.tell() + len(data) > 1_500_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    path = str(tmp_path / "blob.bin")
    monkeypatch.setattr(download, "open", FullDisk, raising=False)  # the module's open shadows the builtin
    with pytest.raises(DownloadError) as e:
        fetch(server.url + "/blob.bin", path, len(BLOB), SHA, **FAST)
    kept = os.path.getsize(path + ".part")
    assert str(e.value) == (f"{path}.part: disk full, {len(BLOB) - kept} more bytes needed; "
                            "free some, run again to resume")
    assert not os.path.exists(path)
    monkeypatch.delattr(download, "open")
    assert fetch(server.url + "/blob.bin", path, len(BLOB), SHA, **FAST)
    assert open(path, "rb").read() == BLOB and server.log[-1][1]["Range"] == f"bytes={kept}-"


def test_hf_endpoint_and_hf_token_are_honoured(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    monkeypatch.setenv("HF_TOKEN", "secret")
    server.files["/org/tiny/resolve/abc123/config.json"] = b"{}"
    table = {"tiny": dict(convert="qwen2", repo="org/tiny", revision="abc123", files=[("config.json", 2, None)])}
    [path] = download.download("tiny", tmp_path, table, **FAST)
    assert open(path, "rb").read() == b"{}"
    [(url, headers)] = server.log
    assert url == "/org/tiny/resolve/abc123/config.json" and headers["Authorization"] == "Bearer secret"


def test_cli_failure_prints_one_error_line_and_exits_1(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_ENDPOINT=server.url, NO_PROXY="127.0.0.1")
    run = subprocess.run([sys.executable, "download.py", "qwen2.5-0.5b-instruct", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    rev = ARTEFACTS["qwen2.5-0.5b-instruct"]["revision"]
    assert run.returncode == 1
    assert run.stderr.splitlines()[-1] == (f"error: {server.url}/Qwen/Qwen2.5-0.5B-Instruct/resolve/{rev}/"
                                           "config.json: HTTP 404, no such file")
    assert os.listdir(tmp_path) == []
    run = subprocess.run([sys.executable, "download.py", "no-such-model", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.startswith("error: unknown name 'no-such-model'")


def test_convert_command_uses_the_file_for_one_file_entries_and_the_folder_otherwise():
    *_, kind, src, out = convert_command("eva_vit_g", "w/eva", "ckpt/eva")
    assert (kind, src, out) == ("eva_vit_g", os.path.join("w/eva", "eva_vit_g.pth"), "ckpt/eva")
    *_, kind, src, out = convert_command("qwen-7b-chat", "w/q", "ckpt/q")
    assert (kind, src, out) == ("qwen1", "w/q", "ckpt/q")
    with pytest.raises(DownloadError, match="is a zip, with no convert step"):
        convert_command("minigpt4qwen", "w/m", "ckpt/m")


def test_the_table_is_well_formed_and_names_real_convert_kinds():
    kinds = set(re.findall(r"^def convert_(\w+)\(", open(os.path.join(ROOT, "convert.py")).read(), re.M))
    for name, entry in ARTEFACTS.items():
        assert set(entry) in ({"convert", "base", "files"}, {"convert", "repo", "revision", "files"}), name
        assert entry["convert"] is None or entry["convert"] in kinds, name
        files = [f for f, _, _ in entry["files"]]
        assert len(set(files)) == len(files), name
        for _, size, sha in entry["files"]:
            assert size is None or (isinstance(size, int) and size > 0), name
            assert sha is None or re.fullmatch(r"[0-9a-f]{64}", sha), name
