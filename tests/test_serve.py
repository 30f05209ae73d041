"""serve.py through real HTTP on 127.0.0.1: a trained toy answering held-out images as chat.py does
(one-shot, sampled, multi-turn, video frames), streaming equal to the whole answer, every bad input
with its status and exact message, the queue bound (503 + Retry-After), a disconnect freeing the
model, 32 concurrent clients, and the page driven by headless Chromium."""
import base64
import contextlib
import http.client
import http.server
import io
import json
import os
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
import torch

import chat
import serve
from conftest import random_toy
from synthetic import one_shape_image, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
QUESTION = "what colour is the shape?"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def server(ckpt, log, *flags):
    """`python serve.py` on a free port (default host): yields (port, process); its stderr goes to `log`."""
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "serve.py", "--ckpt", ckpt, "--port", "0", "--threads", "1", *flags],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 120)
        line = p.stdout.readline() if ready else ""
        m = re.fullmatch(r"serving \S+ on http://127\.0\.0\.1:(\d+)\n", line)
        assert m, f"no start-up line within 120 s: {line!r}; stderr: {open(log).read()[-2000:]}"
        yield int(m[1]), p
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def request(port, method, path, body=None, raw=None, headers=None, timeout=60):
    """(status, headers, parsed JSON or text) of one request."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        c.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        text = r.read().decode()
        is_json = r.getheader("Content-Type", "").startswith("application/json")
        return r.status, dict(r.getheaders()), json.loads(text) if is_json else text
    finally:
        c.close()


def ask(port, messages, timeout=60, **kw):
    return request(port, "POST", "/v1/chat/completions", {"messages": messages, **kw}, timeout=timeout)


def events(port, messages, **kw):
    """The parsed `data:` events of a streamed answer; the last must be [DONE]."""
    status, headers, text = ask(port, messages, stream=True, **kw)
    assert status == 200 and headers["Content-Type"] == "text/event-stream", text
    blocks = text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""] and all(b.startswith("data: ") for b in blocks[:-1])
    return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


def data_url(path_or_bytes, mime="image/png"):
    b = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return f"data:{mime};base64," + base64.b64encode(b).decode()


def png(img):
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def user(*parts):
    """A user message: str parts are text, bytes or paths (ending .png) are images."""
    content = []
    for p in parts:
        if isinstance(p, bytes) or p.endswith(".png"):
            content.append({"type": "image_url", "image_url": {"url": data_url(p)}})
        else:
            content.append({"type": "text", "text": p})
    return {"role": "user", "content": content}


def answer_of(reply):
    status, _, body = reply
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def api(trained, tmp_path_factory):
    """(port, process, log path, rows) of serve.py on the trained colour toy."""
    ckpt, rows = trained
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with server(ckpt, log, "--name", "colour-toy") as (port, p):
        yield port, p, log, rows


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A random toy with a 2048-token context: it talks until max_tokens, long enough to be cut off."""
    return random_toy(tmp_path_factory.mktemp("untrained"), tmp_path_factory.mktemp("syn"), max_len=2048)


# ----------------------------------------------------------------------------- answers

def test_endpoints(api):
    port = api[0]
    assert request(port, "GET", "/health")[2] == {"status": "ok", "model": "colour-toy", "generating": False, "queue": 8}
    assert request(port, "GET", "/v1/models")[2] == {
        "object": "list", "data": [{"id": "colour-toy", "object": "model", "created": 0, "owned_by": "nanoMPP"}]}
    status, headers, page = request(port, "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert page == open(os.path.join(ROOT, "serve.html")).read()
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)  # self-contained: nothing fetched from elsewhere
    status, _, body = request(port, "GET", "/v1/nope")
    assert (status, body) == (404, {"error": {"message": "no such endpoint: GET /v1/nope",
                                              "type": "invalid_request_error", "param": None, "code": None}})


def test_held_out_images_answered_as_chat_py_does(api):
    port, _, _, rows = api
    right = 0
    for path, colour in rows:
        status, _, body = ask(port, [user(path, QUESTION)], seed=3)
        assert status == 200 and body["object"] == "chat.completion" and body["model"] == "colour-toy"
        assert body["choices"][0]["finish_reason"] == "stop" and body["id"].startswith("chatcmpl-")
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] >= 1
        right += body["choices"][0]["message"]["content"] == colour
    assert right >= 18, f"{right}/20 held-out colour questions answered right"
    # the same answer as `chat.py --prompt`, one-shot, same seed
    path, colour = rows[0]
    one = subprocess.run([sys.executable, "chat.py", "--ckpt", api_ckpt(api), "--image", path, "--prompt", QUESTION,
                          "--seed", "3"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and one.stdout == answer_of(ask(port, [user(path, QUESTION)], seed=3)) + "\n"


def api_ckpt(api):
    """The checkpoint the api server runs (from its command line)."""
    args = api[1].args
    return args[args.index("--ckpt") + 1]


def test_sampling_multi_turn_and_video_match_the_repl(api, tmp_path):
    port, _, _, rows = api
    model, tok, max_frames = chat.load(api_ckpt(api))
    (a, _), (b, _) = rows[0], rows[1]
    # sampled: the REPL's :conf and :seed against temperature, top_p and seed
    c = chat.Chat(model, tok, out=io.StringIO(), seed=11, max_frames=max_frames)
    for line in (a, ":f", ":conf do_sample=true temperature=1.5 top_p=0.9 max_new_tokens=6"):
        c.handle(line)
    want = c.ask("describe the image.")
    got = answer_of(ask(port, [user(a, "describe the image.")], temperature=1.5, top_p=0.9, max_tokens=6, seed=11))
    assert got == want
    # two images in one question
    c = chat.Chat(model, tok, out=io.StringIO(), max_frames=max_frames)
    c.handle(a), c.handle(b), c.handle(":f")
    assert answer_of(ask(port, [user(a, b, QUESTION)])) == c.ask(QUESTION) is not None
    # a follow-up that sees the whole history (the toy's context of 64 holds one image and two questions)
    c = chat.Chat(model, tok, out=io.StringIO(), max_frames=max_frames)
    c.handle(a), c.handle(":f")
    first, second = c.ask(QUESTION), c.ask("and?")
    assert second is not None
    history = [user(a, QUESTION), {"role": "assistant", "content": first}]
    status, _, body = ask(port, history + [user("and?")])
    assert status == 200 and body["choices"][0]["message"]["content"] == second
    assert body["usage"]["prompt_tokens"] == len(c.encode(c.turns[:-1], "and?"))
    # a video as its frames: the REPL reads the file, the API gets the same frames as PNGs
    frames = [one_shape_image(random.Random(1), 16, "circle", "green", 4 + 2 * t, 8) for t in range(4)]
    write_video(str(tmp_path / "v.mkv"), frames)
    c = chat.Chat(model, tok, out=io.StringIO(), max_frames=max_frames)
    c.handle(str(tmp_path / "v.mkv")), c.handle(":f")
    want = c.ask(QUESTION)
    video = {"type": "video", "video": [data_url(png(f)) for f in frames]}
    status, _, body = ask(port, [{"role": "user", "content": [video, {"type": "text", "text": QUESTION}]}])
    assert status == 200 and body["choices"][0]["message"]["content"] == want
    assert c.turns[0][1] == "<Img><ImageHere><ImageHere></Img> " + QUESTION  # 2 frames of 4, as the toy trained
    assert body["usage"]["prompt_tokens"] == len(c.encode(c.turns[:1], QUESTION))
    # a stop string ends the answer before it
    full = answer_of(ask(port, [user(a, QUESTION)]))
    assert len(full) >= 3
    stopped = ask(port, [user(a, QUESTION)], stop=["zzz", full[1:3]])
    assert answer_of(stopped) == full[:1] and stopped[2]["choices"][0]["finish_reason"] == "stop"
    ev = events(port, [user(a, QUESTION)], stop=full[1:])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev) == full[:1]


def test_streamed_chunks_make_the_whole_answer(api):
    port, _, _, rows = api
    for path, _ in rows[:3]:
        for kw in ({}, {"temperature": 1.0, "max_tokens": 7, "seed": 5}):
            msgs = [user(path, QUESTION if not kw else "describe the image.")]
            whole = ask(port, msgs, **kw)[2]
            ev = events(port, msgs, stream_options={"include_usage": True}, **kw)
            assert ev[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            assert all(e["object"] == "chat.completion.chunk" and e["id"] == ev[0]["id"] for e in ev)
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-1])
            assert text == whole["choices"][0]["message"]["content"]
            assert ev[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": whole["choices"][0]["finish_reason"]}
            assert ev[-1]["choices"] == [] and ev[-1]["usage"] == whole["usage"]
    assert "usage" not in events(port, [user(rows[0][0], QUESTION)])[-1]


def test_stop_strings_spanning_tokens_are_held_back_then_cut(untrained):
    assert (chat.held_back("abc", ["cd"]), chat.held_back("abc", ["bcd", "x"]), chat.held_back("abc", [])) == (1, 2, 0)
    model, tok, max_frames = chat.load(untrained)
    eng = chat.Engine(model, tok, max_frames)
    ids = eng.encode([("user", "hi")], "hi")
    sampled = {"do_sample": True, "max_new_tokens": 12}
    pieces = []
    full, n, finish = eng.answer(ids, [], pieces.append, sampled, seed=4)
    assert (n, finish) == (12, "length") and "".join(pieces) == full
    pieces = [p for p in pieces if p]  # one per token
    stop = pieces[2][-1] + pieces[3][:2]  # ends one token, starts the next
    streamed = []
    cut, _, finish = eng.answer(ids, [], streamed.append, sampled, seed=4, stop=["never", stop])
    # what was streamed is the cut answer: the held-back end of the 3rd token never went out
    assert cut == full[:full.index(stop)] == "".join(streamed) and finish == "stop"


# ----------------------------------------------------------------------------- bad input

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_bad_inputs_get_4xx_with_the_reason_and_the_server_goes_on(api, tmp_path):
    port, _, _, rows = api
    img = open(rows[0][0], "rb").read()
    ok = [user(rows[0][0], QUESTION)]
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    image = lambda url: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    at = "messages[0].content[0]"
    cases = [  # (body, status, param, message)
        ([], 400, None, "the body must be a JSON object, got list"),
        ({"messages": ok, "foo": 1}, 400, "foo", "Unrecognized request argument supplied: foo"),
        ({"messages": ok, "model": "gpt-4o"}, 404, "model", "The model 'gpt-4o' does not exist; this server serves 'colour-toy'"),
        ({"messages": ok, "temperature": "hot"}, 400, "temperature",
         'temperature must be 0 (greedy) or a number in (0, 100], got "hot"'),
        ({"messages": ok, "top_p": 1.5}, 400, "top_p", "top_p must be a number in (0, 1], got 1.5"),
        ({"messages": ok, "max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer >= 1, got 0"),
        ({"messages": ok, "max_tokens": 2.5}, 400, "max_tokens", "max_tokens must be an integer >= 1, got 2.5"),
        ({"messages": ok, "max_tokens": True}, 400, "max_tokens", "max_tokens must be an integer >= 1, got true"),
        ({"messages": ok, "n": 2}, 400, "n", "n must be 1 (one answer per request), got 2"),
        ({"messages": ok, "seed": "x"}, 400, "seed", 'seed must be an integer, got "x"'),
        ({"messages": ok, "stream": "yes"}, 400, "stream", 'stream must be true or false, got "yes"'),
        ({"messages": ok, "stop": ["a", 3]}, 400, "stop",
         'stop must be a string or a list of at most 4 non-empty strings, got ["a", 3]'),
        ({"messages": ok, "stream_options": {"x": 1}}, 400, "stream_options",
         'stream_options must be {"include_usage": true or false}'),
        ({}, 400, "messages", "messages must be a non-empty list of {role, content} objects"),
        ({"messages": "hi"}, 400, "messages", "messages must be a non-empty list of {role, content} objects"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role",
         "messages[0].role must be 'system', 'user' or 'assistant', got \"tool\""),
        ({"messages": [{"role": "user"}]}, 400, "messages[0]", "messages[0] must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
         "messages[0].content must be a string or a list of parts"),
        ({"messages": ok + [{"role": "assistant", "content": "red"}]}, 400, "messages",
         "the last message must be the user's, got role 'assistant'"),
        ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}}]},
                       user("hi")]}, 400, at, f"{at} must be a text part (assistant messages hold text only)"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, at,
         f"{at} must be a text part, an image_url or a video (user messages hold text, images and videos)"),
        ({"messages": [user("<Img><ImageHere></Img> sneaky")]}, 400, at, f"{at}: <ImageHere> is reserved for images"),
        ({"messages": [user(*[img] * 9, QUESTION)]}, 400, "messages", "too many images: 9 in the conversation, at most 8"),
        ({"messages": image(data_url(b"not an image"))}, 400, at, f"{at}: not a PNG, JPEG or WebP image"),
        ({"messages": image("data:image/png;base64,@@@")}, 400, at, f"{at}: the data: URL is not valid base64"),
        ({"messages": image(data_url(bomb))}, 400, at, f"image too large (decompression bomb?): {at} is 9000x9000, "
                                                      "more than data.MAX_IMAGE_PIXELS=64000000 pixels"),
        ({"messages": image("https://example.com/cat.png")}, 400, at,
         f"{at}: http(s) image URLs are off; send a base64 data: URL (or start serve.py with --image-urls)"),
        ({"messages": image("/etc/passwd")}, 400, at, f"{at}: an image URL must be a base64 data: URL (data:image/png;base64,...)"),
        ({"messages": image("file:///etc/passwd")}, 400, at,
         f"{at}: an image URL must be a base64 data: URL (data:image/png;base64,...)"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "video": []}]}]}, 400, at,
         f'{at} must be {{"type": "video", "video": [frame URLs]}}'),
    ]
    for body, status, param, message in cases:
        got = request(port, "POST", "/v1/chat/completions", body)
        code = "model_not_found" if status == 404 else None
        assert got[0] == status and got[2] == {"error": {"message": message, "type": "invalid_request_error",
                                                         "param": param, "code": code}}, (body, got)
    status, _, body = request(port, "POST", "/v1/chat/completions", {"messages": image(data_url(img[:60]))})
    assert status == 400 and body["error"]["message"].startswith(f"truncated or corrupt image file: {at} (")
    status, _, body = ask(port, [user(rows[0][0], "the" + " the" * 100)])
    m = re.fullmatch(r"prompt too long: (\d+) tokens with the history and images, the context holds 64; "
                     r"(\d+) tokens of question fit now", body["error"]["message"])
    assert status == 400 and m and int(m[1]) > 64 and body["error"]["code"] == "context_length_exceeded", body
    fits = int(m[2])  # exactly what the message says fits, fits
    assert ask(port, [user(rows[0][0], "the" + " the" * fits)], max_tokens=1)[0] == 400
    assert ask(port, [user(rows[0][0], "the" + " the" * (fits - 1))], max_tokens=1)[0] == 200
    # below JSON: the body itself
    status, _, body = request(port, "POST", "/v1/chat/completions", raw=b"{not json")
    assert (status, body["error"]["message"]) == (
        400, "malformed JSON body: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")
    assert request(port, "POST", "/v1/completions", {})[2]["error"]["message"] == "no such endpoint: POST /v1/completions"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # refused from the header, nothing read
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        head = s.makefile("rb").read().decode()
    assert head.startswith("HTTP/1.0 413 ") and head.endswith(json.dumps({"error": {
        "message": "request body too large: 999999999 bytes, the limit is 20971520 (--max-body-mb)",
        "type": "invalid_request_error", "param": None, "code": None}}))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        head = s.makefile("rb").read().decode()
    assert head.startswith("HTTP/1.0 411 ") and "send the JSON body with a Content-Length header" in head
    assert answer_of(ask(port, ok)) == rows[0][1]  # and it still answers


def test_start_up_error(tmp_path, capsys):
    assert serve.main(["--ckpt", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'none'}\n"


# ----------------------------------------------------------------------------- the queue

def test_full_queue_503_disconnect_image_urls_and_images_in_two_turns(untrained, tmp_path):
    log = tmp_path / "stderr.log"
    pic = png(one_shape_image(random.Random(0), 32, "circle", "red"))
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "red.png").write_bytes(pic)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        with server(untrained, log, "--queue", "1", "--image-urls") as (port, p):
            # one long streamed answer holds the only slot
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            body = json.dumps({"messages": [user("hi")], "stream": True, "max_tokens": 1900}).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            seen = b""
            while seen.count(b'"content": "') < 2:  # the role chunk, then the first piece of the answer
                got = s.recv(4096)
                assert got, seen
                seen += got
            status, headers, err = ask(port, [user("hi")], max_tokens=1)
            assert (status, headers["Retry-After"], err["error"]) == (503, "1", {
                "message": "the server is busy: all 1 places in its queue are taken; retry shortly",
                "type": "server_error", "param": None, "code": "overloaded"})
            s.close()  # the client goes away mid-stream
            deadline = time.time() + 30
            while request(port, "GET", "/health")[2]["generating"] and time.time() < deadline:
                time.sleep(0.05)
            status, _, body = ask(port, [user("hi")], max_tokens=3)
            assert status == 200 and body["usage"]["completion_tokens"] == 3
            cancelled = re.findall(r"answered: \d+ prompt \+ (\d+) completion tokens, cancelled", log.read_text())
            assert len(cancelled) == 1 and int(cancelled[0]) < 1900, log.read_text()
            # --image-urls: an http URL gives the same answer as the same bytes inline
            url = f"http://127.0.0.1:{images.server_address[1]}/red.png"
            by_url = ask(port, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], max_tokens=5)
            inline = ask(port, [user(pic)], max_tokens=5)
            assert answer_of(by_url) == answer_of(inline) and by_url[2]["usage"] == inline[2]["usage"]
            status, _, err = ask(port, [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": url.replace("red.png", "none.png")}}]}])
            assert status == 400 and err["error"]["message"] == (
                f"messages[0].content[0]: cannot fetch {url.replace('red.png', 'none.png')}: HTTP Error 404: File not found")
            # images in two turns, sampled: the REPL's conversation (the trained toy's 64 tokens cannot hold it)
            model, tok, max_frames = chat.load(untrained)
            red, blue = tmp_path / "www" / "red.png", tmp_path / "blue.png"
            blue.write_bytes(png(one_shape_image(random.Random(1), 32, "square", "blue")))
            c = chat.Chat(model, tok, out=io.StringIO(), seed=9, max_frames=max_frames)
            for line in (str(red), ":f", ":conf do_sample=true max_new_tokens=5"):
                c.handle(line)
            first = c.ask("what is it?")
            c.handle(f":add {blue}")
            second = c.ask("and this one?")
            assert answer_of(ask(port, [user(str(red), "what is it?")], temperature=1.0, max_tokens=5, seed=9)) == first
            history = [user(str(red), "what is it?"), {"role": "assistant", "content": first}]
            status, _, body = ask(port, history + [user(str(blue), "and this one?")], temperature=1.0, max_tokens=5, seed=9)
            assert answer_of((status, _, body)) == second and body["usage"]["prompt_tokens"] == len(
                c.encode(c.turns[:3], "and this one?"))
    finally:
        images.shutdown()
        images.server_close()


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1]) * 1024


def test_32_clients_x_4_requests(api):
    port, p, _, rows = api
    images = [path for path, _ in rows[:8]]
    want = {path: answer_of(ask(port, [user(path, QUESTION)])) for path in images}
    before = rss(p.pid)
    results, lock = [], threading.Lock()

    def client(k):
        for i in range(4):
            path = images[(k + i) % len(images)]
            stream = (k + i) % 2 == 1
            try:
                status, headers, body = ask(port, [user(path, QUESTION)], stream=stream)
            except OSError as e:  # lost: the assertions below name it
                status, headers, body = repr(e), {}, None
            if status != 200:
                got = (status, headers.get("Retry-After"))
            elif stream:  # the text of the content deltas
                got = (200, "".join(json.loads(b[6:])["choices"][0]["delta"].get("content", "")
                                    for b in body.split("\n\n")[:-3]))
                assert body.endswith("data: [DONE]\n\n")
            else:
                got = (200, body["choices"][0]["message"]["content"])
            with lock:
                results.append((path, got))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(32)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1, 300 - (time.time() - start)))
    assert not any(t.is_alive() for t in threads), "clients still waiting after 300 s"
    assert len(results) == 128
    answered = [(path, text) for path, (status, text) in results if status == 200]
    refused = [r for r in results if r[1][0] != 200]
    assert all(status == 503 and retry == "1" for _, (status, retry) in refused), refused[:3]
    assert answered and all(text == want[path] for path, text in answered)  # each its own image's answer
    after = rss(p.pid)
    print(f"32 x 4 requests: {len(answered)} answered, {len(refused)} refused (503), {time.time() - start:.1f} s, "
          f"server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MB")
    assert after - before < 64 * 2**20, f"server RSS grew {(after - before) / 2**20:.0f} MB"
    assert request(port, "GET", "/health")[2]["generating"] is False


# ----------------------------------------------------------------------------- a real browser

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def test_the_page_in_headless_chromium(api, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("Chromium not found: apt-get update && apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    port, _, _, rows = api
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=900,700",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        driver.set_page_load_timeout(60)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "colour-toy")
        answers = lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done .text")]

        def say(text, image=None):
            n = len(driver.find_elements(By.CSS_SELECTOR, ".msg.done"))
            if image:
                driver.find_element(By.ID, "file").send_keys(image)
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending img")) == 1)
            driver.find_element(By.ID, "q").send_keys(text)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.done")) == n + 1)

        (a, colour_a), (b, colour_b) = rows[0], rows[1]
        say(QUESTION, a)
        assert answers() == [colour_a]
        shot = os.environ.get("SERVE_SCREENSHOT", str(tmp_path / "serve.png"))
        assert driver.save_screenshot(shot) and open(shot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        say("and?")  # the page keeps the conversation: the same answer as the API given the history
        follow_up = answer_of(ask(port, [user(a, QUESTION), {"role": "assistant", "content": colour_a}, user("and?")]))
        assert answers() == [colour_a, follow_up]
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 1
        driver.find_element(By.ID, "clear").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
        assert driver.execute_script("return conversation.length") == 0
        say(QUESTION, b)
        assert answers() == [colour_b]
        # a refused question shows the server's message
        say("the" + " the" * 100)
        assert driver.find_element(By.CSS_SELECTOR, ".msg.error").text.startswith("error: prompt too long: ")
        assert driver.execute_script("return conversation.length") == 2  # the refused question is not kept
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
