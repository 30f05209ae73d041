"""chat.py: every REPL command, images/videos added at start-up and mid-conversation, each bad input
(one line, the session goes on, history kept), the context limit, Ctrl-C, start-up errors, and a
trained toy answering about held-out synthetic images, in the REPL (through stdin) and one-shot."""
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest

import chat
from conftest import random_toy
from chat import Chat
from synthetic import one_shape_image, write_video
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread: tiny models gain nothing from two, and on a shared machine two threads waiting
# for each other cost far more than they give.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs: images, a 2-frame video, and every kind of bad path."""
    import random
    import av
    d = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    one_shape_image(rng, 32, "circle", "red").save(d / "red.png")
    one_shape_image(rng, 32, "square", "blue").save(d / "blue.png")
    write_video(str(d / "move.mkv"), [one_shape_image(random.Random(1), 32, "circle", "green", 8 + 4 * t, 16)
                                      for t in range(4)])
    (d / "notes.png").write_text("not an image\n")
    (d / "trunc.png").write_bytes((d / "red.png").read_bytes()[:60])
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    (d / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
                                 + chunk(b"IEND", b""))
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("not a video\n")
    with av.open(str(d / "noframes.mkv"), "w") as out:  # a video stream without a single frame
        s = out.add_stream("ffv1", rate=4)
        s.width, s.height, s.pix_fmt = 32, 32, "bgr0"
        out.start_encoding()
    (d / "folder").mkdir()
    return d


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """An untrained toy (train.py's architecture and tokenizer) saved as a checkpoint."""
    return random_toy(tmp_path_factory.mktemp("toy"), tmp_path_factory.mktemp("syn"), max_len=96)


def session(ckpt, **kw):
    model, tok, max_frames = chat.load(ckpt)
    out = io.StringIO()
    c = Chat(model, tok, out=out, max_frames=max_frames, **kw)
    return c, out


def run(c, out, *lines):
    """Feed lines to the REPL logic; returns what they printed."""
    start = out.tell()
    for line in lines:
        assert c.handle(line)
    return out.getvalue()[start:]


# ----------------------------------------------------------------------------- commands

def test_commands(toy, files):
    c, out = session(toy)
    assert run(c, out, str(files / "red.png"), str(files / "move.mkv"), ":f") == (
        f"added image 1: {files / 'red.png'}\nadded video 2: {files / 'move.mkv'} (2 frames)\n2 input(s); ask a question\n")
    assert run(c, out, ":img") == (f"1: image {files / 'red.png'} (attached to the next question)\n"
                                   f"2: video {files / 'move.mkv'} (2 frames) (attached to the next question)\n")
    assert ":clear-history :clh" in run(c, out, ":h") and run(c, out, ":help") == chat.HELP + "\n"
    assert run(c, out, ":his") == "(no history)\n"
    run(c, out, ":conf max_new_tokens=3", "what colour is the shape?")
    assert c.turns[0] == ("user",
        "<Img><ImageHere></Img> <Img><ImageHere><ImageHere></Img> what colour is the shape?")
    assert c.turns[1][0] == "assistant" and len(c.turns) == 2
    assert [len(p) for p in c.images] == [1, 2]
    his = run(c, out, ":history")
    assert his.startswith("user: <Img><ImageHere></Img> <Img>") and "\nassistant: " in his
    assert run(c, out, ":img").count("attached") == 0
    # an input added mid-conversation goes with the next question only
    run(c, out, f":add {files / 'blue.png'}", "and now?")
    assert c.turns[2] == ("user", "<Img><ImageHere></Img> and now?") and [len(p) for p in c.images] == [1, 2, 1]
    assert len(c.turns) == 4
    assert run(c, out, ":clh") == "history cleared\n" and c.turns == [] and c.images == []
    assert run(c, out, ":img").count("attached to the next question") == 3  # they go with the next question again
    assert run(c, out, ":seed") == "seed 0\n" and run(c, out, ":seed 42") == "seed 42\n" and c.seed == 42
    assert run(c, out, ":seed x") == "error: :seed takes an integer, got 'x'\n"
    assert run(c, out, ":cl") == "\033[2J\033[H" and run(c, out, ":clear") == "\033[2J\033[H"
    assert run(c, out, ":frobnicate") == "unknown command :frobnicate; :h lists the commands\n"
    assert run(c, out, ":add") == "error: usage: :add PATH\n"
    assert run(c, out, "") == ""
    assert not c.handle(":q") and not c.handle(":quit") and not c.handle(":exit")


def test_conf(toy):
    c, out = session(toy)
    default = "temperature=1.0 top_k=0 top_p=1.0 repetition_penalty=1.0 max_new_tokens=512 do_sample=False\n"
    assert run(c, out, ":conf") == default
    assert run(c, out, ":conf temperature=0.7 top_k=5 top_p=0.9 repetition_penalty=1.2 max_new_tokens=7 do_sample=yes") \
        == "temperature=0.7 top_k=5 top_p=0.9 repetition_penalty=1.2 max_new_tokens=7 do_sample=True\n"
    bad = {"top_p=1.5": "top_p must be a number in (0, 1], got '1.5'",
           "top_p=0": "top_p must be a number in (0, 1], got '0'",
           "temperature=0": "temperature must be a number in (0, 100], got '0'",
           "temperature=hot": "temperature must be a number in (0, 100], got 'hot'",
           "top_k=-1": "top_k must be an integer >= 0 (0 = off), got '-1'",
           "top_k=2.5": "top_k must be an integer >= 0 (0 = off), got '2.5'",
           "max_new_tokens=0": "max_new_tokens must be an integer >= 1, got '0'",
           "repetition_penalty=-1": "repetition_penalty must be a number in (0, 10], got '-1'",
           "do_sample=maybe": "do_sample must be true or false, got 'maybe'",
           "top_k": "top_k must be an integer >= 0 (0 = off), got ''",
           "max_new_tokens=5 top_p=7": "top_p must be a number in (0, 1], got '7'",  # all or nothing
           "beam_size=4": "unknown :conf key 'beam_size'; keys: temperature, top_k, top_p, repetition_penalty, "
                          "max_new_tokens, do_sample"}
    for arg, msg in bad.items():
        assert run(c, out, f":conf {arg}") == f"error: {msg}\n"
    assert c.conf["max_new_tokens"] == 7
    assert run(c, out, ":reset-conf") == default


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_keep_the_session(toy, files):
    c, out = session(toy)
    run(c, out, str(files / "red.png"), ":f", ":conf max_new_tokens=4", "what colour is the shape?")
    turns, images = list(c.turns), list(c.images)
    expected = {
        "nope.png": "image file not found: {}",
        "folder": "image path is a directory: {}",
        "notes.png": "not an image file (unrecognised format): {}",
        "trunc.png": "truncated or corrupt image file: {} (",
        "huge.png": "image too large (decompression bomb?): {} is 9000x9000, more than data.MAX_IMAGE_PIXELS",
        "empty.mp4": "cannot read video file: {} (",
        "text.mp4": "cannot read video file: {} (",
        "noframes.mkv": "cannot read video file: {} (",
        "gone.mkv": "video file not found: {}",
    }
    for name, msg in expected.items():
        printed = run(c, out, f":add {files / name}")
        assert printed.startswith("error: " + msg.format(files / name)) and printed.count("\n") == 1, printed
    printed = run(c, out, "<Img><ImageHere></Img> sneaky")
    assert printed == "error: <ImageHere> is reserved for images; attach one with :add PATH\n"
    assert c.turns == turns and c.images == images and c.pending == []
    run(c, out, "what shape is it?")  # the session goes on with its history
    assert c.turns[:len(turns)] == turns and c.turns[-2] == ("user", "what shape is it?") and len(c.turns) == 4


def test_prompt_longer_than_the_context(toy, files):
    c, out = session(toy)  # context 96 tokens; 1 image = 4 tokens; " the" is one token
    run(c, out, str(files / "red.png"), ":f")
    printed = run(c, out, "the" + " the" * 300)
    m = re.fullmatch(r"error: prompt too long: (\d+) tokens with the history and images, the context holds 96; "
                     r"(\d+) tokens of question fit now\n", printed)
    assert m and int(m[1]) > 96, printed
    assert c.turns == [] and c.pending == [0]
    fits = int(m[2])
    assert run(c, out, "the" + " the" * fits).startswith("error: prompt too long")
    run(c, out, ":conf max_new_tokens=2")
    run(c, out, "the" + " the" * (fits - 1))  # exactly what the message said fits
    assert len(c.turns) == 2 and c.turns[-1][0] == "assistant"
    printed = run(c, out, "the" + " the" * fits)
    assert printed.endswith("tokens of question fit now (:clh clears the history)\n")


def test_ctrl_c_stops_the_answer_not_the_repl(toy):
    c, _ = session(toy)

    class Interrupting(io.StringIO):  # the user presses Ctrl-C once the answer has started
        def write(self, s):
            if s and not c.stop and self.tell() == 0:
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(s)

    c.out = Interrupting()
    before = signal.getsignal(signal.SIGINT)
    answer = c.ask("describe the image.")
    assert c.out.getvalue().endswith(" [stopped]\n")
    assert 1 <= len(c.tok.encode(answer)) < 20  # the random toy would run to max_new_tokens=512
    assert signal.getsignal(signal.SIGINT) is before
    assert c.turns[-1] == ("assistant", answer)  # what was said stays in the history
    c.out = io.StringIO()
    run(c, c.out, ":f", ":conf max_new_tokens=3", "and now?")
    assert "[stopped]" not in c.out.getvalue() and len(c.turns) == 4


def test_answer_ends_at_a_stop_token(toy):
    c, out = session(toy)
    c.stop_ids = list(range(c.model.config.llm.vocab_size))  # whatever comes first is a stop token
    run(c, out, ":f")
    assert run(c, out, "hello?") == "\n" and c.turns == [("user", "hello?"), ("assistant", "")]


def test_default_checkpoint_is_where_train_py_writes():
    assert chat.DEFAULT_CKPT == train.parse_args([]).out_dir


def test_start_up_errors(toy, tmp_path, capsys):
    def fails(*argv):
        assert chat.main(list(argv)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err
    assert fails("--ckpt", str(tmp_path / "none")) == f"error: checkpoint not found: {tmp_path / 'none'}\n"
    (tmp_path / "notes.txt").write_text("hello")
    assert fails("--ckpt", str(tmp_path / "notes.txt")).startswith(
        f"error: not a nanoMPP checkpoint: {tmp_path / 'notes.txt'} (expected a directory with config.json")
    assert fails("--ckpt", str(tmp_path)).endswith(
        "; missing config.json, model.safetensors, tokenizer_config.json)\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(toy):
        (bad / name).write_bytes((open(os.path.join(toy, name), "rb")).read())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["llm"]["n_layer"] = 3  # the config says 3 layers, the weights hold 2
    (bad / "config.json").write_text(json.dumps(cfg))
    assert fails("--ckpt", str(bad)) == f"error: cannot load checkpoint {bad}: missing keys: " + ", ".join(
        f"llm.layers.2.{k}" for k in sorted(["input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
                                              "mlp.up_proj.weight", "post_attention_layernorm.weight",
                                              "self_attn.k_proj.bias", "self_attn.k_proj.weight",
                                              "self_attn.o_proj.weight", "self_attn.q_proj.bias",
                                              "self_attn.q_proj.weight"])) + " and 2 more\n"
    (bad / "config.json").write_text("{not json")
    assert fails("--ckpt", str(bad)).startswith(f"error: cannot load checkpoint {bad}: ")
    (bad / "model.safetensors").write_bytes(b"garbage, not safetensors")
    assert fails("--ckpt", str(bad)).startswith(f"error: cannot load checkpoint {bad}: ")
    assert fails("--ckpt", toy, "--image", str(tmp_path / "x.png"), "--prompt", "hi") == \
        f"error: image file not found: {tmp_path / 'x.png'}\n"


# ----------------------------------------------------------------------------- the real REPL, through stdin

def chat_process(*args, stdin=""):
    env = {**os.environ, **ONE_THREAD, "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), *args], input=stdin, capture_output=True,
                       text=True, encoding="utf-8", timeout=120, cwd=ROOT, env=env)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_repl_through_stdin_and_one_shot_give_the_same_answer(toy, files):
    question = "what colour is the shape?"
    lines = [str(files / "red.png"), str(files / "nope.png"), str(files / "move.mkv"), ":f", question, ":his"]
    p = chat_process("--ckpt", toy, stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    head = (f"enter image or video paths, one per line, :f to finish (:h for help)\n"
            f"path> added image 1: {files / 'red.png'}\npath> error: image file not found: {files / 'nope.png'}\n"
            f"path> added video 2: {files / 'move.mkv'} (2 frames)\npath> 2 input(s); ask a question\nuser> ")
    assert p.stdout.startswith(head), p.stdout
    answer, _, rest = p.stdout[len(head):].partition("\nuser> ")
    assert len(answer) > 0 and rest == (f"user: <Img><ImageHere></Img> <Img><ImageHere><ImageHere></Img> {question}\n"
                                        f"assistant: {answer}\nuser> \n")  # end of input leaves
    piped = chat_process("--ckpt", toy, "--image", str(files / "red.png"), "--video", str(files / "move.mkv"),
                         "--prompt", "-", stdin=question + "\n")
    assert piped.returncode == 0 and piped.stdout == answer + "\n"
    assert piped.stderr == f"added image 1: {files / 'red.png'}\nadded video 2: {files / 'move.mkv'} (2 frames)\n"


def test_terminal_ctrl_c_at_the_prompt_and_ctrl_d(toy):
    """In a real (pseudo-)terminal: Ctrl-C at the prompt does not leave, Ctrl-D does, exit code 0."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: chat.py with the pty as its controlling terminal
        os.chdir(ROOT)
        # Ctrl-C's default, whatever this runner inherited (a shell's background job ignores SIGINT,
        # and an ignored SIGINT stays ignored across exec: Python would not install its handler)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(sys.executable, [sys.executable, "chat.py", "--ckpt", toy], {**os.environ, **ONE_THREAD})
    seen = b""

    def expect(text, timeout=120):  # generous: start-up on a busy machine
        nonlocal seen
        deadline = time.time() + timeout
        while text.encode() not in seen:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
            assert ready, f"no {text!r} within {timeout}s; the terminal shows {seen!r}"
            seen += os.read(fd, 4096)
        seen = seen[seen.index(text.encode()) + len(text):]

    try:
        expect("path> ")
        os.write(fd, b":f\n")
        expect("user> ")
        # Ctrl-C. Python prints the prompt, then blocks in read(): a SIGINT that lands between the two
        # is only seen at the next key (a user would press again), so press again, at most 3 times.
        for attempt in range(3):
            os.write(fd, b"\x03")
            try:
                expect("(Ctrl-D or :q leaves)\r\nuser> ", timeout=20)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        os.write(fd, b":seed 7\n")
        expect("seed 7\r\nuser> ")
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def test_trained_toy_answers_about_held_out_images(trained):
    ckpt, rows = trained
    question = "what colour is the shape?"
    assert len(rows) == 20 and len({colour for _, colour in rows}) == 4
    model, tok, max_frames = chat.load(ckpt)
    right = 0
    for path, colour in rows:  # a fresh session per image, as a user would start one
        c = Chat(model, tok, out=io.StringIO(), max_frames=max_frames)
        assert c.handle(path) and c.handle(":f")
        right += c.ask(question) == colour
    assert right >= 18, f"{right}/20 held-out colour questions answered right"  # chance is at most 40%
    model, tok, max_frames = chat.load(ckpt, dtype="bf16")
    right_bf16 = 0
    for path, colour in rows:
        c = Chat(model, tok, out=io.StringIO(), max_frames=max_frames)
        assert c.handle(path) and c.handle(":f")
        right_bf16 += c.ask(question) == colour
    # bf16 rounds the logits: a row near the decision boundary may flip (a CPU with avx512_bf16: fp32 18, bf16 17)
    assert right_bf16 >= right - 1, f"bf16: {right_bf16}/20, fp32: {right}/20"
    # the real REPL through stdin, then a second question in the same conversation, and one-shot mode
    path, colour = rows[0]
    p = chat_process("--ckpt", ckpt, stdin=f"{path}\n:f\n{question}\n:clh\n{question}\n")
    assert p.returncode == 0 and p.stdout.endswith(
        f"path> 1 input(s); ask a question\nuser> {colour}\nuser> history cleared\nuser> {colour}\nuser> \n"), p.stdout
    one = chat_process("--ckpt", ckpt, "--image", path, "--prompt", question)
    assert one.returncode == 0 and one.stdout == colour + "\n"
