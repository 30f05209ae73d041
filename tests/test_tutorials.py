"""The course in tutorials/ runs: every lesson's code blocks in order (one namespace per lesson, shell
blocks marked `bash run`), with the outputs its text shows, on the CPU; and every exercise check fails
on the student's stub and on a wrong answer, and passes on the reference solution."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")
LESSONS = sorted(f for f in os.listdir(TUTORIALS) if re.fullmatch(r"\d\d-[\w-]+\.md", f))
NEEDS = {"09-talking.md": "06-training.md"}  # lesson 9 talks to the model lesson 6 trains
sys.path.insert(0, TUTORIALS)
from run_lesson import blocks, output_matches  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("course")


def run(lesson, workdir):
    return subprocess.run([sys.executable, os.path.join(TUTORIALS, "run_lesson.py"), "--workdir", str(workdir),
                           os.path.join(TUTORIALS, lesson)], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_runs_and_prints_what_it_shows(lesson, workdir):
    if lesson in NEEDS and not (workdir / "out" / "lesson6").exists():
        assert run(NEEDS[lesson], workdir).returncode == 0
    p = run(lesson, workdir)
    assert p.returncode == 0, p.stderr[-6000:]
    print(p.stdout)  # "NN-name.md: ok in ...s (peak RSS ... MB)", shown with pytest -s


def test_ten_lessons_each_with_checked_exercises():
    assert len(LESSONS) == 10
    checks = open(os.path.join(TUTORIALS, "check.py")).read()
    for n, lesson in enumerate(LESSONS, 1):
        text = open(os.path.join(TUTORIALS, lesson)).read()
        assert f"-k lesson{n:02d}" in text and f"tutorials/answers/lesson{n}.py" in text, lesson
        assert len(re.findall(rf"^def test_lesson{n:02d}_", checks, re.M)) >= 2, lesson
        for folder in ("answers", "solutions"):
            assert os.path.exists(os.path.join(TUTORIALS, folder, f"lesson{n}.py")), (folder, n)
        kinds = [kind for kind, *_ in blocks(text)]
        assert "python" in kinds and "output" in kinds, lesson


def test_shown_output_is_compared():
    assert output_matches("loss 0.250\nshape (2, 3)", "loss 0.25\nshape (2, 3)\n", atol=0.01)
    assert not output_matches("loss 0.250", "loss 0.26", atol=0.001)
    assert not output_matches("shape (2, 3)", "shape (2, 4)")
    assert not output_matches("a\nb", "a")
    assert output_matches("first\n...\nlast", "first\nx\ny\nlast")
    assert output_matches("answer {...}!", "answer yellow!")
    assert not output_matches("rank 0 ok", "rank 0 ok\nrank 1 ok")


def check(answers, *args):
    p = subprocess.run([sys.executable, "-m", "pytest", "tutorials/check.py", "-rA", "-q", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NANOMPP_ANSWERS": str(answers)})
    return p.stdout


def results(out):
    return {name: status for status, name in re.findall(r"^(PASSED|FAILED) tutorials/check.py::(\w+)", out, re.M)}


def test_exercise_checks_fail_on_stubs_and_pass_on_solutions():
    stub = results(check(os.path.join(TUTORIALS, "answers")))
    solved = results(check(os.path.join(TUTORIALS, "solutions")))
    assert len(stub) == 20 and set(stub.values()) == {"FAILED"}, stub
    assert solved.keys() == stub.keys() and set(solved.values()) == {"PASSED"}, solved


WRONG = {  # a plausible mistake per exercise kind, and the hint the student gets
    "lesson7.py": ("BUBBLE_3_5 = 0.25\nMAKESPAN_3_5 = 21\nPEAK_1F1B_3_5 = [3, 2, 1]\nPEAK_GPIPE_3_5 = [5, 5, 5]\n"
                   "def one_f_one_b(p, r, m):\n"
                   "    return [('F', i) for i in range(m)] + [('B', i) for i in range(m)]\n",
                   ["BUBBLE_3_5: (p - 1) / (m + p - 1), to three decimals", "p=1, stage=0, m=2: got"]),
    "lesson5.py": ("STEP_LOSS = 2.0\nMEAN_OF_MEANS = 3.0\nfrom qwen import loss_sum\n"
                   "def step_loss(logits, labels):\n"
                   "    return sum(loss_sum(a, b) / (b != -100).sum() for a, b in zip(logits, labels)) / len(logits)\n",
                   ["Divide the summed loss by the step's count"]),
}


def test_a_wrong_answer_fails_with_a_hint(tmp_path):
    for name, (code, hints) in WRONG.items():
        (tmp_path / name).write_text(code)
    out = check(tmp_path, "-k", "lesson07 or lesson05")
    assert results(out) == {"test_lesson05_predict_losses": "PASSED", "test_lesson05_step_loss": "FAILED",
                            "test_lesson07_by_hand": "FAILED", "test_lesson07_one_f_one_b": "FAILED"}, out[-3000:]
    for _, hints in WRONG.values():
        for hint in hints:
            assert hint in out, (hint, out[-3000:])
