"""convert.py: bad public checkpoints are rejected with a message naming the file or keys (and
nothing is copied), loading adopts the memory-mapped file instead of copying it, and the CLI
converts an HF directory. Our own format is tested in test_ckpt.py."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt import CheckpointError, load_into
from conftest import hf_qwen2, prompts
from convert import (LLAMA_IGNORE, LLAMA_RULES, PHI_IGNORE, QWEN2_IGNORE, QWEN2_RULES, convert_qwen2, llm_from_hf,
                     phi_rules, read_state_dict, remap, tokenizer_from_hf)
from model import load_llm, save_llm
from qwen import Qwen, QwenConfig
from tokenizer import Tokenizer, _byte_to_unicode

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    ref = hf_qwen2(2, False)
    ref.save_pretrained(d)
    return d, ref


def edited(hf_dir, tmp_path, edit):
    """A copy of the HF checkpoint with its state dict passed through `edit`."""
    src, _ = hf_dir
    os.makedirs(tmp_path, exist_ok=True)
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    return str(tmp_path)


def test_missing_key(hf_dir, tmp_path):
    d = edited(hf_dir, tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"^missing keys: layers\.1\.mlp\.up_proj\.weight$"):
        llm_from_hf(d, "qwen2")


def test_unexpected_keys(hf_dir, tmp_path):
    d = edited(hf_dir, tmp_path, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"^unexpected keys: layers\.0\.mlp\.extra\.weight$"):
        llm_from_hf(d, "qwen2")
    d2 = edited(hf_dir, tmp_path / "b", lambda s: s.update({"vision.proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=re.escape("unexpected keys (no rename rule, not ignored): ['vision.proj.weight']")):
        llm_from_hf(d2, "qwen2")


def test_wrong_shape(hf_dir, tmp_path):
    d = edited(hf_dir, tmp_path, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=re.escape("shape mismatch: layers.0.self_attn.k_proj.weight (16, 64) vs model (32, 64)")):
        llm_from_hf(d, "qwen2")


def test_nothing_copied_on_error():
    torch.manual_seed(0)
    m = Qwen(QwenConfig.preset("tiny"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    bad["norm.weight"] = torch.zeros(3)  # one bad shape among otherwise loadable tensors
    with pytest.raises(CheckpointError, match=re.escape("shape mismatch: norm.weight (3,) vs model (64,)")):
        load_into(m, bad)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_remap_collision():
    rules = [(r"a\.(\d)", "x")]
    with pytest.raises(CheckpointError, match=re.escape("two source keys map to ['x']")):
        remap({"a.1": torch.zeros(1), "a.2": torch.zeros(1)}, rules)


def test_rotary_buffers_of_older_exports_are_dropped():
    """transformers < 4.31 saved each layer's rotary_emb.inv_freq (lmsys/vicuna-7b-v1.3's .bin shards
    hold them): ignored, not renamed by the tables' catch-all `model\\.(.*)` into an unexpected key."""
    src = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8), "model.embed_tokens.weight": torch.zeros(1)}
    for rules, ignore in ((QWEN2_RULES, QWEN2_IGNORE), (LLAMA_RULES, LLAMA_IGNORE), (phi_rules(4), PHI_IGNORE)):
        assert list(remap(src, rules, ignore)) == ["embed_tokens.weight"]


def test_truncated_and_corrupt_safetensors(hf_dir, tmp_path):
    src, _ = hf_dir
    data = (src / "model.safetensors").read_bytes()
    p = tmp_path / "model.safetensors"
    p.write_bytes(data[:-100])
    bad = rf"^{re.escape(str(p))}: truncated or corrupt safetensors file \(Error while deserializing header: "
    with pytest.raises(CheckpointError, match=bad + r"incomplete metadata, file not fully covered\)$"):
        read_state_dict(str(p))
    p.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=bad + r"invalid header length\)$"):
        read_state_dict(str(p))
    p.write_bytes(data[:8] + b"\xff" * 40 + data[48:])
    with pytest.raises(CheckpointError, match=bad + r"invalid UTF-8 in header"):
        read_state_dict(str(p))


def test_truncated_bin(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(1000)}, p)
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(p))}: truncated or corrupt torch checkpoint"):
        read_state_dict(str(p))


class Payload:
    """Unpickling this would run os.makedirs(path): code execution hidden in a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_bin_with_pickled_code_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, p)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(p))}: refusing to unpickle: the file holds Python "
                                              r"objects other than tensors \(weights_only=True\)"):
        read_state_dict(str(p))
    assert not os.path.exists(marker)


def test_shards_checked_against_index(tmp_path):
    ref = hf_qwen2(2, True)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    part = load_file(shard)
    dropped = sorted(part)[0]
    part.pop(dropped)
    save_file(part, shard)
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard.name)}: shard does not match the index: "
                                              rf"missing \['{re.escape(dropped)}'\]"):
        read_state_dict(str(tmp_path))
    shard.unlink()  # a missing shard is named before any other shard is read
    n = len(list(tmp_path.glob("model-*.safetensors"))) + 1
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path))}: model\.safetensors\.index\.json lists {n} "
                                              rf"shards, 1 missing: {re.escape(shard.name)}$"):
        read_state_dict(str(tmp_path))


def test_pth_nested_under_model(tmp_path):
    torch.save({"model": {"llm_proj.weight": torch.ones(2, 3)}, "epoch": 3}, tmp_path / "model.pth")
    assert list(read_state_dict(str(tmp_path / "model.pth"))) == ["llm_proj.weight"]


def test_load_adopts_the_memory_map(hf_dir, tmp_path):
    """Parameters of a model loaded from our checkpoint live in the file mapping (no copy)."""
    m, config = llm_from_hf(str(hf_dir[0]), "qwen2")
    save_llm(str(tmp_path), m)
    loaded = load_llm(str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    with open("/proc/self/maps") as f:  # address ranges where the file is mapped
        maps = [[int(a, 16) for a in line.split()[0].split("-")] for line in f if line.rstrip().endswith(path)]
    assert maps, "model.safetensors is not memory-mapped"
    for name, p in loaded.named_parameters():
        assert any(lo <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= hi for lo, hi in maps), name


def test_cli(hf_dir, tmp_path):
    src, ref = hf_dir
    r = subprocess.run([sys.executable, "convert.py", "qwen2", str(src), str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = load_llm(str(tmp_path / "out"))
    idx = prompts()
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(idx)[0], ref(idx).logits, atol=1e-4, rtol=0)
    r = subprocess.run([sys.executable, "convert.py", "nope", "a", "b"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "usage: python convert.py {qwen2|qwen1|llama|phi|eva_vit_g|blip2_lavis|blip2_hf|minigpt4qwen|minigpt4|stages|lora} SRC DST" in r.stderr


def test_tokenizer_travels_with_the_llm_and_gets_an_image_slot(tmp_path):
    """An HF BPE tokenizer has no <|extra_0|>: conversion gives it the first spare embedding row,
    writes it beside the weights, and refuses a tokenizer larger than the embedding."""
    b2u = _byte_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab[b2u[ord(" ")] + "t"] = 256
    d = tmp_path / "tok"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + b2u[ord(" ")] + " t\n")
    tok = tokenizer_from_hf(str(d), vocab_size=300)
    assert tok.token_id("<|extra_0|>") == 257 and tok.encode(" t<|extra_0|>") == [256, 257]
    with pytest.raises(CheckpointError, match=r"the tokenizer needs 258 embedding rows, the model has 257"):
        tokenizer_from_hf(str(d), vocab_size=257)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(  # an HF LLM directory with its tokenizer
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    hf.save_pretrained(tmp_path / "hf")
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "hf" / f).write_text((d / f).read_text())
    convert_qwen2(str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert Tokenizer.load(str(tmp_path / "ours")).encode(" t<|extra_0|>") == [256, 257]
