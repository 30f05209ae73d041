"""
Chat with a nanoMPP model about images and videos: MiniGPT4Qwen's cli_demo, but it never crashes
on a typo. Multi-turn history in ChatML (Qwen) or TinyGPT-V's [INST] template (Phi), answers
streamed token by token, Ctrl-C stops an answer, Ctrl-D (or :q) leaves.

    python chat.py                                  # the checkpoint the default `python train.py` writes
    python chat.py --ckpt DIR --device cuda --dtype bf16
    python chat.py --plan --model tinygpt-v --dtype bf16 --device_memory 8GB   # memory needed (plan.py)
    python chat.py --dtype int8                     # the LLM's Linear weights in int8 (quant.py), the rest fp32
    python chat.py --image a.png --image b.png --prompt "are the two shapes the same colour?"
    echo "which way does the shape move?" | python chat.py --video v.mkv --prompt -

At start-up enter image or video paths one per line and `:f` to finish (none is fine); each input
becomes its own `<Img>...</Img>` in the first question, a video as one placeholder per frame.
`:h` lists the commands; `:add PATH` attaches another input to the next question.
The Engine below (template, stop tokens, context limit, media, the streamed answer) is also what
serve.py answers through.
"""
import argparse
import json
import os
import signal
import sys

import torch

import ckpt
import plan
import quant
from data import IMAGE_HERE, IMAGE_TOKEN, LLM_TEMPLATES, TEMPLATES, encode_conversation, load_image, load_video, preprocess
from formats import VIDEO_EXTS
from model import MMConfig, MultimodalLM
from tokenizer import StreamDecoder, Tokenizer

DEFAULT_CKPT = os.path.join("out", "toy")  # where the default `python train.py` writes
# --dtype -> the dtype the checkpoint is loaded in; int8 then quantises the LLM's Linears (quant.py)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


def parse_bool(s):
    if s.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError(s)
    return s.lower() in ("true", "1", "yes", "on")


# :conf keys: default, parser, valid range and its wording. Greedy by default, as MiniGPT4Qwen.
CONF = {
    "temperature": (1.0, float, lambda v: 0 < v <= 100, "a number in (0, 100]"),
    "top_k": (0, int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (1.0, float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "repetition_penalty": (1.0, float, lambda v: 0 < v <= 10, "a number in (0, 10]"),
    "max_new_tokens": (512, int, lambda v: v >= 1, "an integer >= 1"),
    "do_sample": (False, parse_bool, lambda v: True, "true or false"),
}
HELP = """commands:
  :help :h               this help
  :exit :quit :q         leave (Ctrl-D too)
  :clear :cl             clear the screen
  :clear-history :clh    forget the conversation (the inputs are attached again to the next question)
  :history :his          show the conversation
  :img                   list the images and videos
  :add PATH              attach an image or video to the next question
  :seed [N]              show or set the sampling seed
  :conf [k=v ...]        show or set temperature, top_k, top_p, repetition_penalty, max_new_tokens, do_sample
  :reset-conf            back to the default generation settings
Ctrl-C stops an answer."""


class ChatError(Exception):
    """Bad input that ends a one-shot run or a start-up with exit code 1 (message only)."""


def load(path, device="cpu", dtype="fp32"):
    """(model, tokenizer, max_frames) from one of our checkpoint directories (or its
    model.safetensors); max_frames: the video frames the model was trained with (train.py saves it)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ChatError("--device cuda: CUDA is not available")
    if device == "npu":
        try:
            import torch_npu  # noqa: F401  registers the 'npu' device with torch
        except ImportError:
            raise ChatError("--device npu needs the torch_npu package") from None
    if not os.path.exists(path):
        hint = " (run `python train.py` first)" if path == DEFAULT_CKPT else ""
        raise ChatError(f"checkpoint not found: {path}{hint}")
    d = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        d = ckpt.resolve(d)  # a training run's directory: its latest complete step
    except ckpt.CheckpointError as e:
        raise ChatError(str(e)) from None
    if os.path.isfile(os.path.join(d, "adapters.safetensors")) and not os.path.isfile(os.path.join(d, "model.safetensors")):
        raise ChatError(f"{path} holds a LoRA run's adapters, not a whole model: merge them into their base "
                        f"first (python convert.py lora {path} OUT_DIR), then chat with OUT_DIR")
    files = [f for f in ("config.json", "model.safetensors", "tokenizer_config.json")
             if not os.path.isfile(os.path.join(d, f))]
    if files or not (os.path.isdir(path) or os.path.basename(path) == "model.safetensors"):
        raise ChatError(f"not a nanoMPP checkpoint: {path} (expected a directory with config.json, "
                        f"model.safetensors and tokenizer files{'; missing ' + ', '.join(files) if files else ''})")
    try:
        model = MultimodalLM.from_checkpoint(d, dtype=DTYPES[dtype])
        if dtype == "int8":
            quant.quantize(model.llm)
        tok = Tokenizer.load(d)
        with open(os.path.join(d, "config.json")) as f:
            max_frames = json.load(f).get("train", {}).get("max_frames", 32)
        if tok.token_id(IMAGE_TOKEN) != model.config.image_token_id or tok.n_vocab > model.config.llm.vocab_size:
            raise ValueError(f"the tokenizer does not match the model (image token {tok.token_id(IMAGE_TOKEN)} vs "
                             f"{model.config.image_token_id}, vocabulary {tok.n_vocab} vs {model.config.llm.vocab_size})")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ChatError(f"cannot load checkpoint {d}: {e}") from None
    return model.to(device).eval(), tok, max_frames


class _Stop(Exception):
    pass


def placeholder(n_frames):
    """The text that stands for one input in a user turn: an image (1 frame) or a video's frames."""
    return "<Img>" + IMAGE_HERE * n_frames + "</Img>"


def held_back(text, stops):
    """How many characters at the end of `text` could start one of the stop strings: not sent yet."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


class Engine:
    """A loaded model and what any conversation with it needs: its chat template, stop tokens and
    context limit, media loading, and the one path from a prompt and pixels to a streamed answer.
    The REPL (Chat, below) and serve.py both answer through it."""

    def __init__(self, model, tok, max_frames=32):
        self.model, self.tok, self.max_frames = model, tok, max_frames
        cfg = model.config
        self.template = LLM_TEMPLATES[cfg.llm_type]
        # embedding rows past the tokenizer (padding to a round size) decode to nothing: stop there
        self.stop_ids = ([tok.token_id(s) for s in TEMPLATES[self.template]["stops"]]
                         + list(range(tok.n_vocab, cfg.llm.vocab_size)))
        self.size, self.nq, self.context = cfg.vit.img_size, cfg.qformer.num_query, cfg.llm.max_seq_len

    def pixels(self, frames):
        """PIL images (an image, or a video's frames) -> [n, 3, S, S] as the model sees them."""
        return torch.stack([preprocess(f, self.size) for f in frames])

    def load(self, path, kind):
        """An image or video file -> pixels; ValueError or OSError naming the file."""
        return self.pixels(load_video(path, self.max_frames) if kind == "video" else [load_image(path)])

    def encode(self, turns, question):
        """The prompt ids for `turns` (the last one the user's, `question` its text without the
        placeholders); ChatError if it leaves no room for an answer."""
        if IMAGE_HERE in question:
            raise ChatError(f"{IMAGE_HERE} is reserved for images")
        ids, _ = encode_conversation(self.tok, turns, self.nq, template=self.template)
        room = self.context - len(ids)
        if room < 1:  # keep one position for the answer's first token
            fits = max(0, len(self.tok.encode(question, allowed_special="none")) + room - 1)
            raise ChatError(f"prompt too long: {len(ids)} tokens with the history and images, the context "
                            f"holds {self.context}; {fits} tokens of question fit now")
        return ids

    def answer(self, ids, images, write, conf=None, seed=0, stop=(), stopped=lambda: False):
        """Answer the prompt `ids` whose placeholders hold `images` (pixels, in order), streaming the
        text to write(str) as it decodes. Ends at a stop token, at the first of the `stop` strings
        (left out), after max_new_tokens or at the end of the context, or when stopped() turns true
        (asked before each token). Returns (answer, tokens generated, "stop" | "length" | "cancelled");
        RuntimeError if generation fails (e.g. out of memory)."""
        c = {**{k: v[0] for k, v in CONF.items()}, **(conf or {})}
        p = next(self.model.parameters())
        pixels = torch.cat(images).to(p.device, p.dtype) if images else None
        dec, got, st = StreamDecoder(self.tok), [], {"text": "", "sent": 0, "finish": None, "cut": False}

        def send(upto):
            write(st["text"][st["sent"]:upto])
            st["sent"] = upto

        def cut():  # True if a stop string has appeared: the answer ends before it
            hits = [i for i in (st["text"].find(s) for s in stop) if i >= 0]
            if hits:
                st["text"], st["finish"], st["cut"] = st["text"][:min(hits)], "stop", True
            return bool(hits)

        def stream(new_tokens):
            if stopped():
                st["finish"] = "cancelled"
                raise _Stop
            if new_tokens[0] is None:  # the stop token: not part of the answer
                return
            got.append(new_tokens[0])
            st["text"] += dec.push(new_tokens[0])
            if cut():
                raise _Stop
            send(len(st["text"]) - held_back(st["text"], stop))

        limit = min(c["max_new_tokens"], self.context - len(ids))
        try:
            self.model.generate(torch.tensor([ids], device=p.device), pixels, max_new_tokens=limit,
                                temperature=c["temperature"] if c["do_sample"] else 0.0, top_k=c["top_k"] or None,
                                top_p=c["top_p"], repetition_penalty=c["repetition_penalty"],
                                stop_ids=self.stop_ids, stream=stream, seed=seed)
        except _Stop:
            pass
        st["finish"] = st["finish"] or ("length" if len(got) == limit else "stop")  # else a stop token came
        if not st["cut"]:
            st["text"] += dec.flush()
            cut()
        send(len(st["text"]))
        return (st["text"] if stop else self.tok.decode(got)), len(got), st["finish"]


class Chat(Engine):
    """The REPL's state and logic, driven one line at a time by `handle(line)` (False = leave).
    Answers and listings go to `out`, one-line complaints about bad input to `err`."""

    def __init__(self, model, tok, out=sys.stdout, err=None, seed=0, max_frames=32):
        super().__init__(model, tok, max_frames)
        self.out, self.err, self.seed = out, err or out, seed
        self.conf = {k: v[0] for k, v in CONF.items()}
        self.media = []    # (path, kind, pixels [n, 3, S, S]) of every input, in order
        self.pending = []  # indices into media not yet attached to a question
        self.turns, self.images = [], []  # history [(role, text)] and its placeholders' pixels
        self.starting, self.stop = True, False

    def say(self, msg, to=None):
        print(msg, file=to or self.err, flush=True)

    def add(self, path, kind=None):
        """Load an image or video (by extension unless `kind` says) for the next question; True if done."""
        path = os.path.expanduser(path.strip().strip("'\""))
        kind = kind or ("video" if path.lower().endswith(VIDEO_EXTS) else "image")
        try:
            pixels = self.load(path, kind)
        except (OSError, ValueError) as e:
            return self.say(f"error: {e}")  # None: refused
        self.pending.append(len(self.media))
        self.media.append((path, kind, pixels))
        self.say(f"added {kind} {len(self.media)}: {path}" + (f" ({len(pixels)} frames)" if kind == "video" else ""))
        return True

    def ask(self, text):
        """Answer `text` (streamed to out); returns the answer, or None if the question was refused."""
        if IMAGE_HERE in text:
            return self.say(f"error: {IMAGE_HERE} is reserved for images; attach one with :add PATH")
        new = [self.media[i][2] for i in self.pending]
        turns = self.turns + [("user", " ".join([placeholder(len(p)) for p in new] + [text]))]
        try:
            ids = self.encode(turns, text)
        except ChatError as e:
            return self.say(f"error: {e}" + (" (:clh clears the history)" if self.turns else ""))

        def write(s):
            self.out.write(s)
            self.out.flush()

        # Ctrl-C only raises a flag, seen at the next token: the REPL and the model stay intact
        self.stop, handler = False, lambda *_: setattr(self, "stop", True)
        old = signal.signal(signal.SIGINT, handler)
        try:
            answer, _, finish = self.answer(ids, self.images + new, write, self.conf, self.seed,
                                            stopped=lambda: self.stop)
        except RuntimeError as e:  # e.g. out of memory on the device: report it, keep the session
            self.say(f"error: generation failed: {e}".splitlines()[0])
            return None
        finally:
            signal.signal(signal.SIGINT, old)
        self.out.write((" [stopped]" if finish == "cancelled" else "") + "\n")
        self.turns, self.images, self.pending = turns + [("assistant", answer)], self.images + new, []
        return answer

    def set_conf(self, arg):
        if not arg:
            return self.say(" ".join(f"{k}={v}" for k, v in self.conf.items()), self.out)
        new = {}
        for pair in arg.split():
            key, eq, value = pair.partition("=")
            if key not in CONF:
                return self.say(f"error: unknown :conf key {key!r}; keys: {', '.join(CONF)}")
            _, parse, ok, wording = CONF[key]
            try:
                new[key] = parse(value)
            except ValueError:
                new[key] = None
            if not eq or new[key] is None or not ok(new[key]):
                return self.say(f"error: {key} must be {wording}, got {value!r}")
        self.conf.update(new)  # all or nothing
        self.say(" ".join(f"{k}={v}" for k, v in self.conf.items()), self.out)

    def finish_inputs(self, _):
        self.starting = False
        self.say(f"{len(self.media)} input(s); ask a question", self.out)

    def clear_history(self, _):
        self.turns, self.images, self.pending = [], [], list(range(len(self.media)))
        self.say("history cleared", self.out)

    def show_history(self, _):
        for role, text in self.turns:
            self.say(f"{role}: {text}", self.out)
        if not self.turns:
            self.say("(no history)", self.out)

    def list_media(self, _):
        for i, (path, kind, px) in enumerate(self.media):
            waiting = " (attached to the next question)" if i in self.pending else ""
            self.say(f"{i + 1}: {kind} {path}" + (f" ({len(px)} frames)" if kind == "video" else "") + waiting, self.out)
        if not self.media:
            self.say("(no images)", self.out)

    def set_seed(self, arg):
        if arg and not arg.lstrip("-").isdigit():
            return self.say(f"error: :seed takes an integer, got {arg!r}")
        self.seed = int(arg) if arg else self.seed
        self.say(f"seed {self.seed}", self.out)

    def reset_conf(self, _):
        self.conf = {k: v[0] for k, v in CONF.items()}
        self.set_conf("")

    def command(self, cmd, arg):
        commands = {
            ("help", "h"): lambda _: self.say(HELP, self.out), ("f",): self.finish_inputs,
            ("clear", "cl"): lambda _: self.out.write("\033[2J\033[H"), ("clear-history", "clh"): self.clear_history,
            ("history", "his"): self.show_history, ("img",): self.list_media,
            ("add",): lambda a: self.add(a) if a else self.say("error: usage: :add PATH"),
            ("seed",): self.set_seed, ("conf",): self.set_conf, ("reset-conf",): self.reset_conf,
        }
        for names, fn in commands.items():
            if cmd in names:
                return fn(arg)
        self.say(f"unknown command :{cmd}; :h lists the commands")

    def handle(self, line):
        line = line.strip()
        if line.startswith(":"):
            cmd, _, arg = line[1:].partition(" ")
            if cmd in ("exit", "quit", "q"):
                return False
            self.command(cmd, arg.strip())
        elif line:
            self.add(line) if self.starting else self.ask(line)
        return True

    def run(self, read=input):
        self.say("enter image or video paths, one per line, :f to finish (:h for help)" if self.starting
                 else f"{len(self.media)} input(s); ask a question (:h for help)", self.out)
        while True:
            try:
                if not self.handle(read("path> " if self.starting else "user> ")):
                    return
            except EOFError:  # Ctrl-D
                return self.say("", self.out)
            except KeyboardInterrupt:  # Ctrl-C at the prompt
                self.say("\n(Ctrl-D or :q leaves)", self.out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint directory (default {DEFAULT_CKPT})")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--image", dest="media", action="append", default=[], type=lambda p: (p, "image"), help="repeatable")
    ap.add_argument("--video", dest="media", action="append", type=lambda p: (p, "video"), help="repeatable")
    ap.add_argument("--prompt", help="ask this one question, print the answer and exit; '-' reads stdin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan", action="store_true", help="print the memory this chat needs (no weights read) and exit")
    ap.add_argument("--model", help="with --plan: a model preset (model.MM_PRESETS) instead of --ckpt")
    ap.add_argument("--context", type=int, help="with --plan: KV-cache positions (default the LLM's max_seq_len)")
    ap.add_argument("--device_memory", help="with --plan: e.g. 8GB; says whether the plan fits")
    args = ap.parse_args(argv)
    if args.plan:
        try:
            if args.dtype == "int8":
                raise ValueError("--plan covers fp32, bf16 and fp16 weights; int8 (quant.py) is not planned yet")
            if args.model:
                config = MMConfig.preset(args.model)
            else:
                config = MMConfig.from_dict(ckpt.load_config(ckpt.resolve(args.ckpt))["model"])
            memory = plan.parse_size(args.device_memory) if args.device_memory else None
            print(plan.format_chat(plan.plan_chat(config, DTYPES[args.dtype], args.context), memory))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        model, tok, max_frames = load(args.ckpt, args.device, args.dtype)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    one_shot = args.prompt is not None
    chat = Chat(model, tok, err=sys.stderr if one_shot else sys.stdout, seed=args.seed, max_frames=max_frames)
    for path, kind in args.media:
        if not chat.add(path, kind) and one_shot:
            return 1
    if not one_shot:
        chat.starting = not args.media
        return chat.run() or 0
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return 0 if chat.ask(prompt.strip()) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
