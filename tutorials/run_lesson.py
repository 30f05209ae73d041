"""Run a lesson's code and check the outputs its text shows.

    python tutorials/run_lesson.py tutorials/01-tokens.md     # from the repository root
    python tutorials/run_lesson.py tutorials/*.md              # the whole course, in order

What runs, in the order the blocks appear:
  ```python             executed; all python blocks of one lesson share one namespace
  ```python file=NAME   not executed: written to NAME (a script a later shell block runs)
  ```bash run           executed with bash; a plain ```bash block is only shown;
                        ```bash run fails: the command must exit with an error
  ```output             what the block before it prints on stdout. Options: atol=X / rtol=X (every
                        number may differ by atol + rtol * |shown|). A line `...` stands for any
                        number of lines, and `{...}` inside a line for any text.
A lesson whose output differs from the text fails, showing both. --workdir runs the lesson in
another directory (the tests use a temporary one); the repository's modules stay importable.
"""
import argparse
import contextlib
import io
import os
import re
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


class LessonError(AssertionError):
    pass


def blocks(text):
    """[(kind, options, code, line)] of the fenced blocks; kind is the fence's first word."""
    out = []
    for m in FENCE.finditer(text):
        words = m.group(1).split()
        kind = words[0] if words else ""
        opts = dict(w.split("=", 1) if "=" in w else (w, True) for w in words[1:])
        out.append((kind, opts, m.group(2), text[:m.start()].count("\n") + 1))
    return out


def _line_matches(want, got, atol, rtol):
    parts = re.split(r"(\{\.\.\.\})", want)
    pattern, numbers = "", []
    for part in parts:
        if part == "{...}":
            pattern += ".*?"
            continue
        pos = 0
        for m in NUMBER.finditer(part):
            pattern += re.escape(part[pos:m.start()]) + f"({NUMBER.pattern})"
            numbers.append(m.group())
            pos = m.end()
        pattern += re.escape(part[pos:])
    m = re.fullmatch(pattern, got)
    if not m:
        return False
    for shown, printed in zip(numbers, m.groups()):
        if atol == rtol == 0:
            if shown != printed:
                return False
        elif abs(float(printed) - float(shown)) > atol + rtol * abs(float(shown)):
            return False
    return True


def output_matches(want, got, atol=0.0, rtol=0.0):
    """True if the printed text `got` is the shown text `want` (see the module docstring)."""
    want = [line.rstrip() for line in want.rstrip().splitlines()]
    got = [line.rstrip() for line in got.rstrip().splitlines()]

    def match(i, j):
        if i == len(want):
            return j == len(got)
        if want[i] == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        return j < len(got) and _line_matches(want[i], got[j], atol, rtol) and match(i + 1, j + 1)
    return match(0, 0)


def run_lesson(path, workdir=None, log=print, show=False):
    """Run every block of the lesson at `path`; raise LessonError at the first mismatch."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    name = os.path.basename(path)
    here = os.getcwd()
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        for f in os.listdir(ROOT):  # `python train.py` and friends work there too
            if f.endswith(".py") and not os.path.exists(os.path.join(workdir, f)):
                os.symlink(os.path.join(ROOT, f), os.path.join(workdir, f))
        os.chdir(workdir)
    sys.path.insert(0, ROOT)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           # a lesson's `python` is this interpreter (its venv), activated or not
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    namespace = {"__name__": "__lesson__"}
    last = None  # (where, stdout) of the last executed block
    t0 = time.time()
    try:
        for kind, opts, code, line in blocks(text):
            where = f"{name}:{line}"
            if kind == "python" and "file" in opts:
                os.makedirs(os.path.dirname(opts["file"]) or ".", exist_ok=True)
                with open(opts["file"], "w") as f:
                    f.write(code)
            elif kind == "python":
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    try:
                        exec(compile(code, where, "exec"), namespace)
                    except Exception as e:
                        raise LessonError(f"{where}: the block raised {type(e).__name__}: {e}\n"
                                          f"--- it had printed ---\n{buf.getvalue()}") from e
                last = (where, buf.getvalue())
            elif kind == "bash" and "run" in opts:
                p = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=env, timeout=600)
                if (p.returncode != 0) != ("fails" in opts):  # `bash run fails`: the text says it fails
                    raise LessonError(f"{where}: exit code {p.returncode}\n--- stdout ---\n{p.stdout}\n"
                                      f"--- stderr ---\n{p.stderr[-3000:]}")
                last = (where, p.stdout)
            elif kind == "output" and show:
                log(f"--- {last[0] if last else '?'} printed ---\n{last[1] if last else ''}", end="")
            elif kind == "output":
                if last is None:
                    raise LessonError(f"{where}: an output block with no executed block before it")
                atol, rtol = float(opts.get("atol", 0)), float(opts.get("rtol", 0))
                if not output_matches(code, last[1], atol, rtol):
                    raise LessonError(f"{last[0]}: the output differs from the text at {where}\n"
                                      f"--- the text shows ---\n{code}--- the code printed ---\n{last[1]}")
                last = None
    finally:
        os.chdir(here)
        sys.path.remove(ROOT)
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    log(f"{name}: ok in {time.time() - t0:.1f}s (peak RSS {peak / 1024:.0f} MB)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lessons", nargs="+")
    ap.add_argument("--workdir", help="run there instead of the current directory")
    ap.add_argument("--show", action="store_true", help="print what each block printed instead of checking it")
    args = ap.parse_args(argv)
    for path in args.lessons:
        try:
            run_lesson(os.path.abspath(path), args.workdir, show=args.show)
        except LessonError as e:
            print(f"FAILED {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
