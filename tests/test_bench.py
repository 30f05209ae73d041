"""bench.py's rows are what they say: each pair builder gives both sides the row's dtype, and
check_dtypes refuses (naming the side and the dtype) a side built in another dtype or fed
activations of another dtype, at tiny sizes."""
import os
import re
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bench
from qformer import QFormerConfig
from vit import ViTConfig

DTYPES = [torch.float32, torch.bfloat16]
OTHER = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float32}


def name(dtype):
    return str(dtype).removeprefix("torch.")


def refused_params(dtype, side, **sides):
    """check_dtypes must fail on `side`'s parameters, before running anything."""
    other = name(OTHER[dtype])
    with pytest.raises(AssertionError, match=rf"^{side}: row dtype {name(dtype)}, but parameters in {other}: "):
        bench.check_dtypes(dtype, **sides)


def refused_activations(dtype, side, where, **sides):
    msg = f"{side}: row dtype {name(dtype)}, but activations entering {where} in {name(OTHER[dtype])}"
    with pytest.raises(AssertionError, match=f"^{re.escape(msg)}$"):
        bench.check_dtypes(dtype, **sides)


def cast_output(module, dtype):
    """A forward hook that hands the next module activations in `dtype` (a mislabelled row)."""
    return module.register_forward_hook(lambda mod, args, out: out.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_decode_pair(dtype):
    ref, ours = bench._decode_pair("tiny", dtype)
    idx = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    sides = dict(ours=(ours, ours.layers[0], lambda: ours.generate(idx, max_new_tokens=2)),
                 hf=(ref, ref.model.layers[0], lambda: ref.generate(idx, attention_mask=torch.ones_like(idx),
                                                                   max_new_tokens=2, do_sample=False, pad_token_id=0)))
    out = bench.check_dtypes(dtype, **sides)
    assert out["ours"][0] == out["hf"][0, 8:].tolist()
    for side, embed in (("ours", ours.embed_tokens), ("hf", ref.model.embed_tokens)):
        handle = cast_output(embed, OTHER[dtype])
        refused_activations(dtype, side, "layers.0" if side == "ours" else "model.layers.0", **{side: sides[side]})
        handle.remove()
    ref.to(OTHER[dtype])
    refused_params(dtype, "hf", **sides)
    ours.to(OTHER[dtype])
    refused_params(dtype, "ours", **sides)


@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_load_pair(dtype, tmp_path):
    ref, _ = bench._decode_pair("tiny", dtype)
    src, dst = str(tmp_path / "hf"), str(tmp_path / "ours")
    ref.save_pretrained(src)
    bench._load_side("convert", src, dst, dtype)
    sides = {side: (bench._load_side(side, src, dst, dtype), None, None) for side in ("ours", "hf")}
    bench.check_dtypes(dtype, **sides)
    refused_params(dtype, "hf", **{**sides, "hf": (bench._load_side("hf", src, dst, OTHER[dtype]), None, None)})


@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_vision_pair(dtype):
    ours, hf = bench._vision_pair(ViTConfig.preset("tiny"), QFormerConfig.preset("tiny"), dtype)
    x = torch.randn(1, 3, 56, 56).to(dtype)
    sides = dict(ours=(ours, ours.vit.blocks[0], lambda: ours.qformer(ours.vit(x))),
                 hf=(hf, hf.vision_model.encoder.layers[0], lambda: hf.get_qformer_features(x)))
    with torch.inference_mode():
        out = bench.check_dtypes(dtype, **sides)
    torch.testing.assert_close(out["ours"], out["hf"])
    handle = cast_output(hf.vision_model.embeddings, OTHER[dtype])
    refused_activations(dtype, "hf", "vision_model.encoder.layers.0", **sides)
    handle.remove()
    ours.vit.to(OTHER[dtype])
    refused_params(dtype, "ours", **sides)


@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_chat_pair(dtype):
    ours, hf = bench._chat_pair("toy", dtype)
    ids = bench._chat_prompt(ours.config)
    pixels = torch.randn(1, 3, ours.config.vit.img_size, ours.config.vit.img_size).to(dtype)
    sides = dict(ours=(ours, ours.llm.layers[0], lambda: ours.generate(ids, pixels, max_new_tokens=2)),
                 hf=(hf, hf.language_model.model.layers[0],
                     lambda: hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=2, do_sample=False, pad_token_id=0)))
    with torch.inference_mode():
        out = bench.check_dtypes(dtype, **sides)
    assert out["ours"][0] == out["hf"][0, -2:].tolist()
    # the embeddings our MultimodalLM.embed returns, in the other dtype
    embed = ours.embed
    ours.embed = lambda *args: embed(*args).to(OTHER[dtype])
    refused_activations(dtype, "ours", "llm.layers.0", **sides)
    ours.embed = embed
    hf.language_model.to(OTHER[dtype])  # the LLM only: the vision side stays in the row's dtype
    refused_params(dtype, "hf", **sides)


def test_bench_rows_run_checked(capsys):
    """The bench functions themselves at tiny sizes (bf16: the rows once mislabelled) pass the check."""
    bench.bench_decode(new_tokens="2", repeat="1", presets="tiny", dtypes="bfloat16")
    bench.bench_chat(new_tokens="2", repeat="1", models="toy", dtypes="bfloat16")
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("tiny", "toy"))]
    assert [row[:2] + row[-1:] for row in rows] == [["tiny", "bfloat16", "True"], ["toy", "bfloat16", "True"]]


def test_decode_int8_row(capsys):
    """The int8 row: ours int8 (every Linear swapped) vs transformers fp32 and ours fp32, checked as fp32
    activations, with its int8 floor; `same tokens` counts the common prefix with transformers."""
    bench.bench_decode(new_tokens="2", repeat="1", presets="tiny", dtypes="int8")
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("tiny")]
    assert len(rows) == 1 and rows[0][:2] == ["tiny", "int8"] and rows[0][9] in ("0/2", "1/2", "2/2")
    assert rows[0][10:12] == ["ours", "int8/fp32"] and rows[0][12].endswith("x"), rows


def _pipeline_cases(rank):
    for dtype in DTYPES:
        _, _, sides = bench._pipeline_pair(rank, dtype, m=2, b=1, T=16, n_layer=2, width=64)
        bench.check_dtypes(dtype, **sides)  # one 1F1B step of each side
        sides["torch"][0].to(OTHER[dtype])  # the one module both sides share
        refused_params(dtype, "torch", torch=sides["torch"])


def _entry(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    _pipeline_cases(rank)
    dist.destroy_process_group()


def test_pipeline_pair():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_entry, args=(port,), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the pipeline pair did not finish in 120 s")


def test_bench_data_rows_run(capsys, tmp_path):
    """bench.py data at its smallest: the toy's loader rows, a start-up on a 300-row mix665k-shaped file
    (built, then read from the index), the video rows."""
    bench.bench_data("loader", "2", "toy")
    bench.bench_data("startup", "300", "", "1", str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    loader = [line for line in out if line.startswith("toy")]
    assert [line.split()[1] for line in loader] == ["image", "video"] and all("waiting for data" in line for line in loader)
    starts = [line for line in out if "peak RSS" in line]
    assert len(starts) == 2 and "built True" in starts[0] and "built False" in starts[1]
    assert len({re.search(r"\((\d+) rows", line)[1] for line in starts}) == 1  # the same rows both times


@pytest.mark.parametrize("loss_norm", ["token", "sample"])
def test_supervised_only_head_gives_the_same_loss_and_gradients(loss_norm):
    """full_logits=False (the head at supervised positions only, what bench.py train times) is the
    same objective as the full logits, for both loss normalisations."""
    ours, _ = bench._chat_pair("toy", torch.float32)
    ours.config.loss_norm = loss_norm
    ids, labels, pixels = bench._train_batch(ours.config, 2, 48)
    labels[1, -4:] = -100  # rows with different numbers of supervised tokens
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), images=pixels, labels=labels)
    ours.set_frozen("sft").train()
    got = {}
    for full in (True, False):
        logits, loss = ours(batch, full_logits=full)
        assert (logits is None) != full
        loss.backward()
        got[full] = loss.detach(), {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
        ours.zero_grad(set_to_none=True)
    torch.testing.assert_close(got[False][0], got[True][0])
    assert got[False][1].keys() == got[True][1].keys() and "llm_proj.weight" in got[True][1]
    for n, g in got[True][1].items():
        torch.testing.assert_close(got[False][1][n], g, msg=n)


def test_bench_train_checks_loss_and_gradients(capsys):
    """bench.py train at tiny sizes: both sides' loss and gradients are compared (and must agree)
    before the timed steps, and every stage x dtype row prints its ratio."""
    bench.bench_train(repeat="1", batch="2", seq_len="48", stage1_layers="2", stage2_layers="2", model="toy")
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("toy")]
    assert [row[1:3] + row[3:-6] for row in rows] == [["1", "2", "float32"], ["1", "2", "bf16", "autocast"],
                                                       ["2", "2", "float32"], ["2", "2", "bf16", "autocast"]]
    for row in rows:
        assert row[-4].endswith("x") and row[-3].endswith("x")  # wall and CPU ratios
        assert float(row[-2]) <= (1e-5 if row[3] == "float32" else 2e-2)  # loss, relative
        assert float(row[-1]) <= (1e-3 if row[3] == "float32" else 0.2)  # gradients, relative


def test_bench_train_refuses_different_computations(monkeypatch):
    """A reference side that computes something else (its image features doubled) fails the check
    before anything is timed, naming the row."""
    pair = bench._chat_pair

    def doubled(*args, **kw):
        ours, hf = pair(*args, **kw)
        hf.language_projection.register_forward_hook(lambda mod, args, out: 2 * out)
        return ours, hf
    monkeypatch.setattr(bench, "_chat_pair", doubled)
    with pytest.raises(AssertionError, match=r"^stage 1 float32: the sides compute different things: loss differs by "):
        bench.bench_train(repeat="1", batch="2", seq_len="48", stage1_layers="2", stage2_layers="2",
                          dtypes="float32", model="toy")
