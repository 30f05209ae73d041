"""quant.py: weight-only int8. The per-channel round trip bound, torch's CPU kernel against the
dequantising fallback, logits against fp32 on a Qwen2.5-0.5B-shaped model (2 of its 24 layers, the
full 151936-row head) and on the trained toy, the toy's held-out accuracy, chat.py --dtype int8
answering as fp32 does, and the refusals."""
import io
import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import chat
import quant
from data import TEMPLATES, collate
import train
from conftest import TRAIN_ARGS, randomize
from evaluate import evaluate
from model import MultimodalLM
from phi import Phi, PhiConfig
from qwen import Qwen, QwenConfig, supervised

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # small models: a second thread only waits on a busy machine


def rows_of_every_scale(n=64, k=96):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 2, n)[:, None]
    w[0] = 0  # an all-zero row
    w[1, 5] = 1e3  # one outlier stretches its row's scale
    return w


def test_round_trip_within_half_a_step_per_channel():
    w = rows_of_every_scale()
    q, scale = quant.quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (64,)
    err = (w - quant.dequantize(q, scale)).abs()
    assert bool((err <= scale.float()[:, None] / 2 * (1 + 1e-6)).all())
    assert q[0].eq(0).all() and q.abs().amax(1)[1:].eq(127).all()  # every other row uses the full range
    assert q.min() >= -127  # symmetric: -128 is never used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_kernel_matches_the_fallback(dtype, m):
    """Both compute the same exact products (bf16 x times int8 times a bf16 scale fits fp32): on
    bf16 inputs they differ only by the summation order and the kernel's bf16 output rounding."""
    q, scale = quant.quantize_weight(rows_of_every_scale(k=128))
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(dtype)
    assert quant.kernel_ok(x, 128)
    got, want = quant.int8_mm(x, q, scale), quant.dequant_mm(x.float(), q, scale)
    assert got.dtype == dtype
    assert bool(((got.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-30).all())


def test_int8_linear_paths():
    """The module: the kernel path with its bias, the fallback when K is not a multiple of 16 (the
    kernel has no tail loop: K = 36 sums wrong in torch 2.13), and a misaligned view (which the
    kernel's aligned loads would fault on) copied first."""
    g = torch.Generator().manual_seed(0)
    for k in (64, 36):
        lin = torch.nn.Linear(k, 48)
        m = quant.Int8Linear(lin)
        x = torch.randn(2, 3, k, generator=g)
        want = F.linear(x, quant.dequantize(m.weight, m.scale), lin.bias)
        torch.testing.assert_close(m(x), want, rtol=2 ** -7, atol=1e-2 * want.abs().max().item())
        if k == 36:  # the fallback is the dequantised product itself
            assert quant.kernel_ok(x, k) is False and torch.equal(m(x), want)
    m = quant.Int8Linear(torch.nn.Linear(64, 48, bias=False))
    flat = torch.randn(3 * 64 + 1, generator=g).to(torch.bfloat16)
    view = flat[1:].view(3, 64)  # 2 bytes past an aligned address
    assert view.data_ptr() % 64 and torch.equal(m(view), m(view.clone()))


def closeness(got, want):
    """(max |diff| / std of the fp32 logits, fraction of positions with the same argmax)"""
    return ((got - want).abs().max() / want.std()).item(), (got.argmax(-1) == want.argmax(-1)).float().mean().item()


@torch.no_grad()
def test_qwen05b_shape_logits_close_to_fp32():
    """Measured: max |diff| 0.15 std (0.21 with all 24 layers), mean 0.02 std, 62/64 argmax equal."""
    c = replace(QwenConfig.preset("qwen2.5-0.5b"), n_layer=2)
    torch.manual_seed(0)
    llm = randomize(Qwen(c), 0)
    idx = torch.randint(0, c.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    want, _ = llm(idx)
    embed = llm.embed_tokens.weight
    quant.quantize(llm)
    assert isinstance(llm.lm_head, quant.Int8Linear) and llm.embed_tokens.weight is embed  # head int8, lookup float
    assert not any(isinstance(m, torch.nn.Linear) for m in llm.modules())
    got, _ = llm(idx)
    worst, agree = closeness(got, want)
    assert got.dtype == torch.float32 and worst < 0.25 and agree >= 0.9, (worst, agree)
    assert ((got - want).abs().mean() / want.std()).item() < 0.04


@torch.no_grad()
def test_phi_with_biases():
    llm = randomize(Phi(PhiConfig.preset("tiny")), 0)
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    want, _ = llm(idx)
    got, _ = quant.quantize(llm)(idx)
    worst, agree = closeness(got, want)
    assert worst < 0.1 and agree >= 0.9, (worst, agree)


def toy_cfg(ckpt):
    """The trained toy's training config, evaluating every held-out row (all tasks)."""
    return train.parse_args(TRAIN_ARGS + [f"--synthetic_root={os.path.join(os.path.dirname(ckpt), 'data')}",
                                          "--eval_samples=1000"])


def test_trained_toy_int8(trained):
    """Logits on held-out prompts close to fp32, and held-out accuracy (evaluate.evaluate, all 160 rows,
    every task) at most 1 point lower. Measured on 32 rows: max |diff| 0.12 std, 99.1% of the argmaxes
    that predict an answer token equal; accuracy and every task's accuracy unchanged."""
    ckpt, _ = trained
    cfg = toy_cfg(ckpt)
    results = {}
    for dtype in ("fp32", "int8"):
        model, tok, _ = chat.load(ckpt, dtype=dtype)
        val = train.datasets(cfg, tok, model.config)[1]
        batch = collate([val[i] for i in range(32)], tok.token_id(TEMPLATES["chatml"]["pad"]))
        with torch.no_grad():
            logits, _ = model(batch)
        _, acc = evaluate(model, val, tok, cfg, nullcontext())
        tasks = [val[i].get("task", "all") for i in range(len(val))]
        overall = sum(acc[t] * tasks.count(t) for t in acc) / len(tasks)
        answer = logits[:, :-1][supervised(batch["labels"])]  # the positions that predict an answer token
        results[dtype] = logits[batch["attention_mask"].bool()], answer, overall, acc
    (want, want_answer, acc32, per32), (got, got_answer, acc8, per8) = results["fp32"], results["int8"]
    worst, _ = closeness(got, want)
    assert worst < 0.15, worst
    assert ((got - want).abs().mean() / want.std()).item() < 0.02
    # argmax agreement where training made a choice: prompt positions were never supervised and
    # their top two logits can tie to within the int8 noise
    agree = closeness(got_answer, want_answer)[1]
    assert agree >= 0.98, agree
    assert per32["colour"] >= 0.8, per32  # the toy learnt its task: the comparison means something
    assert acc8 >= acc32 - 0.01 and per8["colour"] >= per32["colour"], (per32, per8)


def test_chat_int8_answers_as_fp32(trained):
    ckpt, rows = trained
    question = "what colour is the shape?"
    answers = {}
    for dtype in ("fp32", "int8"):
        model, tok, max_frames = chat.load(ckpt, dtype=dtype)
        answers[dtype] = []
        for path, _ in rows:
            c = chat.Chat(model, tok, out=io.StringIO(), max_frames=max_frames)
            assert c.handle(path) and c.handle(":f")
            answers[dtype].append(c.ask(question))
    assert answers["int8"] == answers["fp32"]
    assert sum(a == colour for a, (_, colour) in zip(answers["int8"], rows)) >= 18
    path, colour = rows[0]  # the command line, one-shot
    p = subprocess.run([sys.executable, "chat.py", "--ckpt", ckpt, "--dtype", "int8", "--image", path,
                        "--prompt", question], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout == answers["fp32"][0] + "\n", p.stderr


def test_refusals(trained):
    ckpt, _ = trained
    model, _, _ = chat.load(ckpt)
    with pytest.raises(TypeError, match=r"^int8 quantises the LLM \(a qwen.py / phi.py DecoderLM, e.g. model.llm\), "
                                        r"got MultimodalLM: the vision tower and llm_proj stay in float$"):
        quant.quantize(model)
    with pytest.raises(TypeError, match=r"got EVAViT: "):
        quant.quantize(model.vit)
    quant.quantize(model.llm)
    with pytest.raises(ValueError, match=r"^no nn.Linear left to quantise: the LLM is already int8$"):
        quant.quantize(model.llm)
    lazy, _ = MultimodalLM.from_checkpoint(ckpt, lazy=True)
    with pytest.raises(ValueError, match=r"^the LLM's weights are on the meta device: load the checkpoint first, "
                                         r"then quantise$"):
        quant.quantize(lazy.llm)
