"""convert.py: bad checkpoints are rejected with a message naming the file or keys (and nothing is
copied), our safetensors reader/writer agrees with the `safetensors` library, loading adopts the
memory-mapped file instead of copying it, and the CLI converts an HF directory."""
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import (CheckpointError, llm_from_hf, load_checkpoint, load_into, load_llm, read_state_dict, remap,
                     save_checkpoint)
from qwen import Qwen, QwenConfig

transformers = pytest.importorskip("transformers")
from test_qwen import hf_qwen2, prompts  # noqa: E402

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


def test_truncated_and_corrupt_safetensors(hf_dir, tmp_path):
    src, _ = hf_dir
    data = (src / "model.safetensors").read_bytes()
    p = tmp_path / "model.safetensors"
    p.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(p))}: truncated: tensors need {len(data)} bytes, "
                                              rf"file has {len(data) - 100}$"):
        read_state_dict(str(p))
    p.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(p))}: truncated or not a safetensors file"):
        read_state_dict(str(p))
    p.write_bytes(data[:8] + b"\xff" * 40 + data[48:])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(p))}: corrupt safetensors header"):
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
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(shard))}: no such checkpoint file"):
        read_state_dict(str(tmp_path))


def test_our_format_matches_safetensors_library(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(5), "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.0)}
    save_file(tensors, tmp_path / "lib.safetensors")
    got = read_state_dict(str(tmp_path / "lib.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items())
    m = torch.nn.ModuleDict({"a": torch.nn.Embedding(10, 4), "b": torch.nn.Linear(4, 10)})
    m["b"].weight = m["a"].weight  # tied: stored once
    save_checkpoint(str(tmp_path / "ck"), m, {"x": 1}, extra={"notes.txt": "hi", "blob.bin": b"\x00\x01"})
    assert sorted(os.listdir(tmp_path / "ck")) == ["blob.bin", "config.json", "model.safetensors", "notes.txt"]
    lib = load_file(tmp_path / "ck" / "model.safetensors")
    assert sorted(lib) == ["a.weight", "b.bias"] and torch.equal(lib["a.weight"], m["a"].weight)
    state, cfg = load_checkpoint(str(tmp_path / "ck"))
    assert cfg == {"x": 1} and torch.equal(state["b.bias"], m["b"].bias)


def test_pth_nested_under_model(tmp_path):
    torch.save({"model": {"llm_proj.weight": torch.ones(2, 3)}, "epoch": 3}, tmp_path / "model.pth")
    assert list(read_state_dict(str(tmp_path / "model.pth"))) == ["llm_proj.weight"]


def test_load_adopts_the_memory_map(hf_dir, tmp_path):
    """Parameters of a model loaded from our checkpoint live in the file mapping (no copy)."""
    m, config = llm_from_hf(str(hf_dir[0]), "qwen2")
    from convert import save_llm
    save_llm(str(tmp_path), m, config)
    loaded, _ = load_llm(str(tmp_path))
    size = os.path.getsize(tmp_path / "model.safetensors")
    storages = {p.untyped_storage().data_ptr() for p in loaded.parameters()}
    assert len(storages) == 1 and loaded.embed_tokens.weight.untyped_storage().nbytes() == size


def test_cli(hf_dir, tmp_path):
    src, ref = hf_dir
    r = subprocess.run([sys.executable, "convert.py", "qwen2", str(src), str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m, _ = load_llm(str(tmp_path / "out"))
    idx = prompts()
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(idx)[0], ref(idx).logits, atol=1e-4, rtol=0)
    r = subprocess.run([sys.executable, "convert.py", "llama", "a", "b"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "usage: python convert.py {" in r.stderr and "qwen2|qwen1|phi" in r.stderr


def test_tokenizer_travels_with_the_llm_and_gets_an_image_slot(tmp_path):
    """An HF BPE tokenizer has no <|extra_0|>: conversion gives it the first spare embedding row,
    writes it beside the weights, and refuses a tokenizer larger than the embedding."""
    import json
    from convert import convert_qwen2, tokenizer_from_hf
    from tokenizer import Tokenizer, _byte_to_unicode
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
