"""lora.py and LoRA runs of train.py: adapter gradients equal the explicit formula, a merge gives the
adapted model's logits, the toy learns a new task through its adapters, an adapter-only checkpoint is
small and resumes exactly (and refuses another base), and DDP / pipeline runs equal one process."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ckpt
import lora
import train
from conftest import interrupt_after
from evaluate import evaluate
from model import MMConfig, MultimodalLM
from phi import PhiConfig
from qformer import QFormerConfig
from qwen import QwenConfig
from tokenizer import Tokenizer
from vit import ViTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(llm="qwen", freeze=("vit", "qformer")):
    llm_cfg = (QwenConfig if llm == "qwen" else PhiConfig).preset("tiny")
    torch.manual_seed(0)
    return MultimodalLM(MMConfig(vit=ViTConfig.preset("tiny"), qformer=QFormerConfig.preset("tiny"), llm=llm_cfg,
                                 llm_type=llm, freeze=freeze, image_token_id=5))


def batch(n=2, T=16, q=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 512, (n, T), generator=g)
    ids[:, 1:1 + q] = 5  # one image per row
    labels = ids.clone()
    labels[:, :1 + q] = -100
    return dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                images=torch.randn(n, 3, 56, 56, generator=g))


@torch.no_grad()
def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("llm", ["qwen", "phi"])
def test_gradients_equal_the_explicit_formula(llm, one_thread):
    """y = W x + b + s B A x with s = alpha / r: for the output gradient G of each adapted Linear and
    its input x (rows: every token), dL/dB = s G^T (x A^T) and dL/dA = s (G B)^T x; W, b get none."""
    model = tiny(llm)
    n = lora.add_adapters(model, r=4, alpha=8, targets="all")
    assert n == len(model.llm.layers) * (7 if llm == "qwen" else 6)  # q k v o gate up down | q k v dense fc1 fc2
    randomize_adapters(model)  # B = 0 at init would make dL/dA zero
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            m.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, [args[0].detach()]))
            m.register_full_backward_hook(lambda m, gin, gout, name=name: seen[name].append(gout[0]))
    model(batch())[1].backward()
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            x, G = (t.reshape(-1, t.shape[-1]).double() for t in seen[name])
            A, B = m.lora_A.double(), m.lora_B.double()
            torch.testing.assert_close(m.lora_B.grad.double(), m.scale * G.T @ (x @ A.T), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(m.lora_A.grad.double(), m.scale * (G @ B).T @ x, rtol=1e-4, atol=1e-7)
            assert m.weight.grad is None and (m.bias is None or m.bias.grad is None), name
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == set(lora.trainable(model)) == {n for n, _ in model.named_parameters()
                                                    if n.endswith(("lora_A", "lora_B")) or n.startswith("llm_proj.")}


@pytest.mark.parametrize("llm", ["qwen", "phi"])
def test_a_fresh_adapter_changes_nothing_and_a_merge_keeps_the_logits(llm, one_thread):
    model, b = tiny(llm).eval(), batch()
    base_keys = set(model.state_dict())
    with torch.no_grad():
        want = model(b)[0]
        lora.add_adapters(model, r=4, alpha=16, targets="q_proj,v_proj,fc2" if llm == "phi" else "q_proj,v_proj,down_proj")
        assert torch.equal(model(b)[0], want)  # B = 0
        randomize_adapters(model)
        adapted = model(b)[0]
        assert (adapted - want).abs().max() > 1e-2  # the adapters matter
        lora.merge(model)
        torch.testing.assert_close(model(b)[0], adapted, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == base_keys and not any(isinstance(m, lora.LoRALinear) for m in model.modules())


def test_bad_targets_are_refused_naming_the_blocks_linears():
    with pytest.raises(ValueError, match=r"targets among the decoder blocks' Linears \['dense', 'fc1', 'fc2', 'k_proj', "
                                         r"'q_proj', 'v_proj'\] \(or 'all'\), got lora_r=4, lora_targets='q_proj,o_proj'"):
        lora.add_adapters(tiny("phi"), r=4, alpha=8, targets="q_proj,o_proj")  # Phi calls o_proj `dense`
    with pytest.raises(ValueError, match="LoRA needs lora_r >= 1"):
        lora.add_adapters(tiny(), r=0, alpha=8, targets="all")


def test_fingerprint_ignores_dtype_and_sees_a_changed_tensor():
    state = {k: v.clone() for k, v in ckpt.state_of(tiny()).items()}
    fp = lora.fingerprint(state)
    assert lora.fingerprint({k: v.to(torch.bfloat16).float() for k, v in state.items()}) == \
        lora.fingerprint({k: v.to(torch.bfloat16) for k, v in state.items()})
    assert lora.fingerprint(state) == fp
    state["llm.layers.1.mlp.up_proj.weight"] += 1e-3
    assert lora.fingerprint(state) != fp

# ----------------------------------------------------------------------------- LoRA runs of train.py


SHIFTED = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}


def run_args(trained, tmp_path, out, **kw):
    """A LoRA run on the `trained` toy (conftest: it answers colour questions, 16 px, 4 queries) that
    teaches it a new task: the colour questions of its own data with every answer shifted to the next
    colour (red -> green -> blue -> yellow -> red), so the base is wrong on every row. The sft preset
    (ViT and Q-Former frozen; llm_proj trains) and adapters of rank 8 on every Linear of the LLM."""
    from conftest import SYNTHETIC
    from synthetic import make_synthetic
    syn = make_synthetic(os.path.join(os.path.dirname(trained[0]), "data"), **SYNTHETIC)  # the fixture's, cached
    for split in ("train", "val"):
        with open(syn[split]) as f:
            rows = [dict(r, output=SHIFTED[r["output"]]) for r in json.load(f) if r["task"] == "colour"]
        with open(tmp_path / f"shifted_{split}.json", "w") as f:
            json.dump(rows, f)
    args = dict(data=tmp_path / "shifted_train.json", val_data=tmp_path / "shifted_val.json", image_root=syn["image_root"],
                out_dir=tmp_path / out, init=trained[0], lora_r=8, freeze="sft", image_size=16, num_query=4,
                max_len=64, batch_size=16, max_iters=6, warmup_iters=5, lr=3e-3, curriculum_iters=0, oversample="",
                eval_every=0, eval_samples=0, log_every=1, ckpt_every=0, threads=1)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def test_lora_teaches_the_frozen_toy_a_new_task(trained, tmp_path):
    """The base answers the true colour, so it scores 0 on the shifted answers; 60 LoRA steps
    (~15 s) take it far above chance (95% measured)."""
    cfg = train.parse_args(run_args(trained, tmp_path, "run", max_iters=60, eval_samples=100))
    base = MultimodalLM.from_checkpoint(trained[0])
    tok = Tokenizer.load(trained[0])
    _, val, chance = train.datasets(cfg, tok, base.config)
    _, before = evaluate(base, val, tok, cfg, train.nullcontext())
    assert before["colour"] <= 0.1
    _, acc = train.train(cfg)
    assert acc["colour"] >= chance["colour"] + 0.3, (acc, chance)


def test_adapter_checkpoint_is_small_resumes_exactly_and_refuses_another_base(trained, tmp_path, monkeypatch):
    base = str(tmp_path / "base")
    shutil.copytree(ckpt.resolve(trained[0]), base)
    args = lambda out: run_args(trained, tmp_path, out, init=base)  # noqa: E731
    full, _ = train.train(train.parse_args(args("full")))
    monkeypatch.setattr(train, "step_batches", interrupt_after(3))
    first, _ = train.train(train.parse_args(args("split")))
    monkeypatch.undo()
    assert [s for s, _ in first] == [1, 2, 3]
    step = ckpt.resolve(tmp_path / "split")
    assert "model.safetensors" not in os.listdir(step)
    size = lambda d, f: os.path.getsize(os.path.join(d, f))  # noqa: E731
    assert size(step, lora.ADAPTERS) < size(base, "model.safetensors") / 8
    assert size(step, "train_state.pt") < size(base, "model.safetensors") / 4  # AdamW moments of what trains
    rest, _ = train.train(train.parse_args(args("split") + ["--resume"]))
    assert first + rest == full  # bit-identical losses, steps 1..6

    model, tok = MultimodalLM.from_checkpoint(base), Tokenizer.load(base)  # the base changes under the run
    with torch.no_grad():
        model.llm.layers[0].mlp.up_proj.weight.mul_(1.01)
    model.save(base, extra=tok.files())
    with pytest.raises(ckpt.CheckpointError, match="the base weights built from the run's config are not the ones"):
        train.train(train.parse_args(args("split") + ["--resume", "--max_iters=8"]))


def test_merge_exports_the_adapted_model_for_chat(trained, tmp_path):
    import chat
    import convert
    train.train(train.parse_args(run_args(trained, tmp_path, "run", max_iters=4)))
    with pytest.raises(chat.ChatError, match=r"holds a LoRA run's adapters, not a whole model: merge them into their "
                                             r"base first \(python convert\.py lora "):
        chat.load(str(tmp_path / "run"))
    convert.convert_lora(str(tmp_path / "run"), str(tmp_path / "merged"))
    merged, tok, max_frames = chat.load(str(tmp_path / "merged"))
    adapted, _ = train.load_lora(str(tmp_path / "run"))
    assert any(isinstance(m, lora.LoRALinear) for m in adapted.modules())
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules()) and max_frames == 2
    base = MultimodalLM.from_checkpoint(trained[0]).eval()
    g, img = torch.Generator().manual_seed(3), base.config.image_token_id
    ids = torch.randint(0, tok.n_vocab, (2, 12), generator=g)
    ids[ids == img] = 0
    ids[:, 1:5] = img  # one image of 4 queries per row
    b = dict(input_ids=ids, attention_mask=torch.ones_like(ids), images=torch.randn(2, 3, 16, 16, generator=g))
    with torch.no_grad():
        want = adapted.eval()(b)[0]
        torch.testing.assert_close(merged(b)[0], want, rtol=0, atol=1e-5)
        assert (base(b)[0] - want).abs().max() > 1e-3  # four LoRA steps changed the model


def torchrun(args):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_ddp_and_pipeline_lora_runs_equal_one_process(trained, tmp_path):
    """torchrun, 2 gloo processes (collectives time out after 60 s, the runs after 300 s): DDP with 4
    rows per rank, and 2 pipeline stages (one decoder block and its adapters each) with 2 microbatches
    of 4, stopped after 2 steps and resumed from its stage shards, against one process with 8 rows per
    step: the same rows each step, so the same losses, gradient norms (the pipeline's over both stages),
    final adapters, and held-out loss (the pipeline evaluates the adapters it saved, rebuilt on the
    base by train.load_lora). The 4 steps are all warm-up, whose learning rates do not depend on
    max_iters, so a run of 2 continued to 4 is the run of 4."""
    args = lambda out, **kw: run_args(trained, tmp_path, out, max_iters=4, eval_samples=8, **kw)  # noqa: E731
    train.train(train.parse_args(args("one", batch_size=8)))
    pipeline = args("pipeline", batch_size=4, grad_accum=2, num_stages=2)
    for name, launch in {"ddp": args("ddp", batch_size=4), "pipeline": pipeline + ["--max_iters=2"],
                         "pipeline resumed": pipeline + ["--resume"]}.items():
        p = torchrun(launch)
        assert p.returncode == 0, (name, p.stderr[-3000:])
    step = ckpt.resolve(tmp_path / "pipeline")
    assert {"stage0-of-2.safetensors", "stage1-of-2.safetensors", lora.ADAPTERS} <= set(os.listdir(step))
    assert "model.safetensors" not in os.listdir(step)

    def read(name):
        with open(tmp_path / name / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        return ([r for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r],
                ckpt.read_file(os.path.join(ckpt.resolve(tmp_path / name), lora.ADAPTERS)))
    want, want_eval, want_adapters = read("one")
    assert [r["step"] for r in want] == [1, 2, 3, 4] and len(want_eval) == 1
    for name in ("ddp", "pipeline"):
        got, evals, adapters = read(name)
        assert [r["step"] for r in got] == [1, 2, 3, 4], name
        for key in ("loss", "grad_norm"):
            assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-5), (name, key)
        assert adapters.keys() == want_adapters.keys()
        for k, t in adapters.items():
            torch.testing.assert_close(t, want_adapters[k], rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
        assert evals[-1] == pytest.approx(want_eval[-1], rel=1e-5), name
