"""
Serve a nanoMPP model over HTTP: OpenAI's chat-completions API (text, images, videos as frames,
streaming) and a one-page web chat (serve.html) at `/`.

    python serve.py                                   # out/toy on http://127.0.0.1:8000
    python serve.py --ckpt DIR --dtype bf16 --host 0.0.0.0 --port 8080 --queue 16
    curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},
      {"type": "text", "text": "what colour is the shape?"}]}], "stream": true}'

POST /v1/chat/completions, GET /v1/models, GET /health, GET / (the page). Prompt building, template,
stop tokens, the context limit, image checks and generation are chat.py's Engine, so the server and
the REPL answer a question the same way. Where we differ from OpenAI: no `temperature` (or 0) is
greedy, as chat.py; images are data: URLs (PNG, JPEG, WebP) unless --image-urls allows http(s); a
video is {"type": "video", "video": [frame URLs]} (Qwen-VL's frame list), sampled to the model's
frame count as chat.py samples a file; `top_k` and `repetition_penalty` are accepted as in :conf.

The standard library's ThreadingHTTPServer, not a framework: the model answers one request at a
time anyway, so a thread per connection queueing on one lock is all the concurrency there is, and
each limit (body size, queue bound, socket timeouts) is a line here rather than a dependency's setting.
"""
import argparse
import base64
import binascii
import io
import json
import os
import re
import select
import socket
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import chat
from chat import CONF, ChatError, Engine, placeholder
from data import IMAGE_HERE, load_image, video_frame_indices

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
FIELDS = ("model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
          "stream", "stream_options", "n", "top_k", "repetition_penalty")
OPTIONS = {"top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty",
           "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}  # request field -> CONF key
DATA_URL = re.compile(r"data:([\w/.+-]*)((?:;[\w=.+-]+)*);base64,(.*)", re.S)


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=()):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def check(ok, message, param):
    if not ok:
        raise APIError(400, message, param)


def number(body, key, ok, wording, integer=False):
    v = body[key]
    good = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
    check(good and ok(v), f"{key} must be {wording}, got {json.dumps(v)}", key)
    return v


def parse(body, model_name, max_images, max_frames):
    """A request body -> dict(turns, question, media, conf, stop, seed, stream, usage): checked, nothing
    decoded yet. media: [(param, [image URLs])], one entry per placeholder, in order."""
    check(isinstance(body, dict), f"the body must be a JSON object, got {type(body).__name__}", None)
    for key in body:
        check(key in FIELDS, f"Unrecognized request argument supplied: {key}", key)
    if body.get("model") not in (None, model_name):
        raise APIError(404, f"The model {body['model']!r} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    conf = {}
    if body.get("temperature") is not None:
        t = number(body, "temperature", lambda v: v == 0 or CONF["temperature"][2](v),
                   "0 (greedy) or " + CONF["temperature"][3])
        conf.update(do_sample=t > 0, temperature=t or 1.0)
    for key, name in OPTIONS.items():
        if body.get(key) is not None:
            _, kind, ok, wording = CONF[name]
            conf[name] = number(body, key, ok, wording, integer=kind is int)
    for key, ok, wording in (("n", lambda v: v == 1, "1 (one answer per request)"), ("seed", lambda v: True, "an integer")):
        if body.get(key) is not None:
            number(body, key, ok, wording, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    check(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop),
          f"stop must be a string or a list of at most 4 non-empty strings, got {json.dumps(body.get('stop'))}", "stop")
    check(isinstance(body.get("stream", False), bool), f"stream must be true or false, got {json.dumps(body.get('stream'))}", "stream")
    opts = body.get("stream_options") or {}
    check(isinstance(opts, dict) and set(opts) <= {"include_usage"} and isinstance(opts.get("include_usage", False), bool),
          'stream_options must be {"include_usage": true or false}', "stream_options")
    messages = body.get("messages")
    check(isinstance(messages, list) and messages, "messages must be a non-empty list of {role, content} objects", "messages")
    turns, media = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        check(isinstance(m, dict) and set(m) <= {"role", "content", "name"} and "content" in m,
              f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m["content"]
        check(role in ("system", "user", "assistant"), f"{where}.role must be 'system', 'user' or 'assistant', "
              f"got {json.dumps(role)}", f"{where}.role")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        check(isinstance(parts, list), f"{where}.content must be a string or a list of parts", f"{where}.content")
        pieces, texts = [], []
        for j, p in enumerate(parts):
            at = f"{where}.content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                check(IMAGE_HERE not in p["text"], f"{at}: {IMAGE_HERE} is reserved for images", at)
                pieces.append(p["text"])
                texts.append(p["text"])
                continue
            check(kind in ("image_url", "video") and role == "user", f"{at} must be a text part{', an image_url or a video' if role == 'user' else ''}"
                  f" ({role} messages hold {'text, images and videos' if role == 'user' else 'text only'})", at)
            if kind == "image_url":
                url = p.get("image_url", {}).get("url") if isinstance(p.get("image_url"), dict) else None
                check(isinstance(url, str), f'{at} must be {{"type": "image_url", "image_url": {{"url": "data:..."}}}}', at)
                urls = [url]
            else:
                urls = p.get("video")
                check(isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls),
                      f'{at} must be {{"type": "video", "video": [frame URLs]}}', at)
                urls = [urls[k] for k in video_frame_indices(len(urls), max_frames)]
            media.append((at, urls))
            pieces.append(placeholder(len(urls)))
        turns.append((role, " ".join(pieces)))
    check(turns[-1][0] == "user", f"the last message must be the user's, got role {turns[-1][0]!r}", "messages")
    check(len(media) <= max_images, f"too many images: {len(media)} in the conversation, at most {max_images}", "messages")
    return dict(turns=turns, question=" ".join(texts), media=media, conf=conf, stop=stop, seed=body.get("seed"),
                stream=body.get("stream", False), usage=opts.get("include_usage", False))


def decode(url, at, fetch, limit):
    """One image URL -> RGB PIL image: a base64 data: URL, or http(s) if the server allows it (never a
    file path), then data.load_image's checks (pixel count, decompression bomb, corrupt data)."""
    m = DATA_URL.fullmatch(url)
    check(m or url.startswith(("http://", "https://")),
          f"{at}: an image URL must be a base64 data: URL (data:image/png;base64,...)", at)
    check(m or fetch, f"{at}: http(s) image URLs are off; send a base64 data: URL (or start serve.py with --image-urls)", at)
    try:
        if m:
            data = base64.b64decode(m[3], validate=True)
        else:
            with urllib.request.urlopen(url, timeout=10) as r:
                data = r.read(limit + 1)
    except binascii.Error:
        raise APIError(400, f"{at}: the data: URL is not valid base64", at) from None
    except (OSError, ValueError) as e:
        raise APIError(400, f"{at}: cannot fetch {url}: {e}", at) from None
    check(len(data) <= limit, f"{at}: the image at {url} is larger than {limit} bytes", at)
    fmt = data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    check(fmt, f"{at}: not a PNG, JPEG or WebP image", at)
    try:
        return load_image(io.BytesIO(data), name=at)
    except ValueError as e:
        raise APIError(400, str(e), at) from None


class Server(ThreadingHTTPServer):
    daemon_threads = True     # a stuck client never blocks shutdown
    request_queue_size = 128  # the listen backlog (socketserver's 5 resets a burst of clients)

    def __init__(self, addr, engine, name, queue=8, max_body=20 << 20, max_images=8, image_urls=False, verbose=True):
        super().__init__(addr, Handler)
        self.engine, self.name, self.queue, self.max_body = engine, name, queue, max_body
        self.max_images, self.image_urls, self.verbose = max_images, image_urls, verbose
        self.lock = threading.Lock()                    # one generation at a time
        self.slots = threading.BoundedSemaphore(queue)  # running + waiting requests
        with open(PAGE, "rb") as f:
            self.page = f.read()


class Handler(BaseHTTPRequestHandler):
    server_version = "nanoMPP"
    timeout = 30  # seconds a client may stall mid-request or mid-stream before it is dropped

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def reply(self, status, body, ctype="application/json", headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in [("Content-Type", ctype), ("Content-Length", str(len(data))), *headers]:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        srv, path = self.server, self.path.split("?")[0]
        if path == "/":
            return self.reply(200, srv.page, "text/html; charset=utf-8")
        if path == "/health":
            return self.reply(200, {"status": "ok", "model": srv.name, "generating": srv.lock.locked(), "queue": srv.queue})
        if path == "/v1/models":
            return self.reply(200, {"object": "list", "data": [{"id": srv.name, "object": "model", "created": 0,
                                                                 "owned_by": "nanoMPP"}]})
        self.reply(404, APIError(404, f"no such endpoint: GET {path}").body())

    def do_POST(self):
        try:
            if self.path != "/v1/chat/completions":
                raise APIError(404, f"no such endpoint: POST {self.path}")
            self.complete(self.read_json())
        except APIError as e:
            self.reply(e.status, e.body(), headers=e.headers)
        except OSError:  # the client went away or stalled
            self.close_connection = True

    def read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            raise APIError(411, "send the JSON body with a Content-Length header (chunked bodies are not accepted)")
        n, limit = self.headers["Content-Length"], self.server.max_body
        if not n.isdigit():
            raise APIError(400, f"Content-Length must be a number of bytes, got {n!r}")
        if int(n) > limit:  # refused from the header alone: the body is never read
            raise APIError(413, f"request body too large: {n} bytes, the limit is {limit} (--max-body-mb)")
        try:
            return json.loads(self.rfile.read(int(n)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None

    def gone(self):
        """True once the client has closed its end: asked before each token, so it frees the model."""
        try:
            return bool(select.select([self.connection], [], [], 0)[0]) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def complete(self, body):
        srv = self.server
        req = parse(body, srv.name, srv.max_images, srv.engine.max_frames)
        if not srv.slots.acquire(blocking=False):
            raise APIError(503, f"the server is busy: all {srv.queue} places in its queue are taken; retry shortly",
                           code="overloaded", kind="server_error", headers=[("Retry-After", "1")])
        with srv.lock:  # the place is given back before the lock, so "not generating" means one is free
            try:
                send = self.generate(srv, req)
            finally:
                srv.slots.release()
        send()  # the end of the answer goes out once its place is free: a client may ask again at once

    def generate(self, srv, req):
        """Answer (streaming the text if asked); returns what sends the rest of the reply."""
        eng, limit = srv.engine, srv.max_body  # decoded under the model's lock: one request's images in memory at a time
        images = [eng.pixels([decode(url, at, srv.image_urls, limit) for url in urls]) for at, urls in req["media"]]
        try:
            ids = eng.encode(req["turns"], req["question"])
        except ChatError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        head = lambda kind: {"id": cid, "object": kind, "created": created, "model": srv.name}
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        lost = []  # set when a write to the client fails

        def event(obj):
            try:
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.flush()
            except OSError:
                lost.append(True)

        def chunk(delta, finish=None):
            event({**head("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        if req["stream"]:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
            chunk({"role": "assistant", "content": ""})
        write = (lambda s: s and chunk({"content": s})) if req["stream"] else (lambda s: None)
        try:
            with torch.inference_mode():
                text, n, finish = eng.answer(ids, images, write, req["conf"], req["seed"], req["stop"],
                                             stopped=lambda: bool(lost) or self.gone())
        except RuntimeError as e:
            err = APIError(500, f"generation failed: {e}".splitlines()[0], kind="server_error")
            return lambda: event(err.body()) if req["stream"] else self.reply(500, err.body())
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        self.log_message("answered: %d prompt + %d completion tokens, %s", len(ids), n, finish)
        if finish == "cancelled":
            return lambda: None
        if not req["stream"]:
            return lambda: self.reply(200, {**head("chat.completion"), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}], "usage": usage})

        def end():
            chunk({}, finish)
            if req["usage"]:
                event({**head("chat.completion.chunk"), "choices": [], "usage": usage})
            if not lost:
                self.wfile.write(b"data: [DONE]\n\n")
        return end


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=chat.DEFAULT_CKPT, help=f"checkpoint directory (default {chat.DEFAULT_CKPT})")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"])
    ap.add_argument("--dtype", default="fp32", choices=list(chat.DTYPES))
    ap.add_argument("--name", help="the model id in the API (default: the checkpoint directory's name)")
    ap.add_argument("--queue", type=int, default=8, help="requests running or waiting; more are refused with 503")
    ap.add_argument("--max-body-mb", type=float, default=20)
    ap.add_argument("--max-images", type=int, default=8, help="images and videos per conversation")
    ap.add_argument("--image-urls", action="store_true", help="also fetch http(s) image URLs (off: data: URLs only)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--quiet", action="store_true", help="no request log on stderr")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, max_frames = chat.load(args.ckpt, args.device, args.dtype)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = args.name or os.path.basename(os.path.normpath(args.ckpt))
    srv = Server((args.host, args.port), Engine(model, tok, max_frames), name, args.queue,
                 int(args.max_body_mb * (1 << 20)), args.max_images, args.image_urls, not args.quiet)
    print(f"serving {name} on http://{srv.server_address[0]}:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
