"""Shared test helpers: one way to randomise weights, the HF export of a tiny reference LLM and the
LLM parity suite. Test files import these from here, never from each other."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch


@torch.no_grad()
def randomize(module, seed):
    """Re-draw every parameter so that every path matters (HF initialises biases to 0, norms to 1
    and the BLIP-2 ViT with std 1e-10, which would hide bugs): matrices N(0, 1/fan_in), the vision
    embeddings (`*embedding*`) and query tokens 0.5 N(0, 1), norm weights 1 + 0.2 N(0, 1), other vectors 0.2 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.dim() >= 2 and ("embedding" in name or "query_tokens" in name):
            p.copy_(0.5 * r)
        elif p.dim() >= 2:
            p.copy_(r / math.sqrt(p[0].numel()))
        elif "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        else:
            p.copy_(0.2 * r)
    return module.eval()


V, PROMPT, NEW = 256, 24, 20


def save_bin_shards(model, d, n=2):
    """The HF .bin shard layout (transformers 5 only writes safetensors): pytorch_model-0000i-of-
    0000n.bin + pytorch_model.bin.index.json, tied lm_head left out as save_pretrained does."""
    os.makedirs(d, exist_ok=True)
    model.config.save_pretrained(d)
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    keys, weight_map = list(state), {}
    for i in range(n):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: state[k].clone() for k in keys[i::n]}
        torch.save(part, os.path.join(d, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def save_hf(model, d, fmt):
    if fmt == "safetensors":
        model.save_pretrained(d, max_shard_size="20KB")  # several shards + index json
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    else:
        save_bin_shards(model, d)


# The checkpoint layouts each decoder's parity test converts (test_qwen, test_llama): GQA and MHA,
# tied and untied embeddings, sharded safetensors and .bin shards
LAYOUTS = pytest.mark.parametrize("n_kv,tied,fmt", [(2, True, "safetensors"), (4, False, "safetensors"),
                                                   (2, False, "bin"), (4, True, "bin")],
                                  ids=["gqa-tied-st", "mha-untied-st", "gqa-untied-bin", "mha-tied-bin"])


def hf_qwen2(n_kv, tied, seed=0):
    import transformers
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return randomize(transformers.Qwen2ForCausalLM(cfg), seed)


def prompts(B=2, T=PROMPT, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def check_parity(ref, ours):
    """The LLM parity suite (test_qwen, test_phi): ref is the HF model, ours the converted one."""
    idx = prompts()
    with torch.no_grad():
        want = ref(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # 20 greedy tokens
    want_tokens = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=NEW, do_sample=False,
                               pad_token_id=0)[:, PROMPT:]
    assert torch.equal(torch.tensor(ours.generate(idx, max_new_tokens=NEW)), want_tokens)
    # KV cache: a prefill, single steps, then a chunk, against one forward without cache
    seq = torch.cat([idx, want_tokens], 1)
    cache = ours.new_cache(2, seq.shape[1])
    with torch.no_grad():
        full, _ = ours(seq)
        parts = [ours(seq[:, :10], cache=cache)[0]]
        parts += [ours(seq[:, t:t + 1], cache=cache)[0] for t in range(10, 30)]
        parts.append(ours(seq[:, 30:], cache=cache)[0])
    assert cache.len == seq.shape[1]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    # left-padded batch equals each prompt alone (logits at real positions, then greedy tokens)
    lens = [PROMPT, 15, 7]
    rows = [prompts(1, n, seed=10 + n)[0] for n in lens]
    batch = torch.zeros(3, PROMPT, dtype=torch.long)
    mask = torch.zeros(3, PROMPT, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, lens)):
        batch[i, PROMPT - n:], mask[i, PROMPT - n:] = r, 1
    with torch.no_grad():
        padded, _ = ours(batch, attention_mask=mask)
        gen = torch.tensor(ours.generate(batch, attention_mask=mask, max_new_tokens=12))
        for i, (r, n) in enumerate(zip(rows, lens)):
            alone, _ = ours(r[None])
            torch.testing.assert_close(padded[i, PROMPT - n:], alone[0], atol=1e-5, rtol=0)
            assert gen[i].tolist() == ours.generate(r[None], max_new_tokens=12)[0]
    # and HF agrees on the padded batch
    want_pad = ref.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, want_pad[:, PROMPT:])


# the toy as `python train.py` builds it, trained only on the synthetic colour questions (the task it
# learns first) at 16 px: 100% held-out colour accuracy after 100 steps, ~10 s on one core; shared by
# test_chat.py and test_serve.py (session scope: trained once per run)
SYNTHETIC = dict(n_train=800, n_val=160, image_size=16, count_share=1)
TRAIN_ARGS = ["--n_train=800", "--n_val=160", "--image_size=16", "--patch_size=4", "--count_share=1", "--num_query=4", "--max_len=64", "--max_iters=100",
              "--warmup_iters=20", "--curriculum_tasks=colour", "--curriculum_iters=1000000", "--eval_samples=8",
              "--threads=1", "--cpu_processes=1", "--batch_size=32"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(checkpoint dir, held-out colour rows [(absolute image path, colour)])."""
    from synthetic import make_synthetic
    d = tmp_path_factory.mktemp("trained")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "train.py", f"--synthetic_root={d / 'data'}", f"--out_dir={d / 'ckpt'}",
                        *TRAIN_ARGS], cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    syn = make_synthetic(str(d / "data"), **SYNTHETIC)  # the same parameters: train.py's cached copy
    with open(syn["val"]) as f:
        rows = [r for r in json.load(f) if r["task"] == "colour"]
    return str(d / "ckpt"), [(os.path.join(syn["image_root"], r["image"]), r["output"]) for r in rows]


@pytest.fixture
def one_thread():
    """Tiny tensors: on a busy machine every multi-threaded op waits for its second thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_toy(d, syn_root, max_len):
    """An untrained toy (train.py's architecture and tokenizer, 4 queries) saved as a checkpoint in d."""
    import train
    from model import MultimodalLM
    from synthetic import make_synthetic
    from tokenizer import Tokenizer
    syn = make_synthetic(str(syn_root), n_train=8, n_val=8)
    tok = Tokenizer.toy(syn["words"] + ["You", "helpful", "Img"])
    torch.manual_seed(0)
    model = MultimodalLM(train.toy_config(train.Config(max_len=max_len, num_query=4), tok)).eval()
    model.save(str(d), train={"max_frames": 2})
    tok.save(str(d))
    return str(d)


def blip2_batch(img, q, ignore=-100):
    """Two right-padded prompts for the BLIP-2 parity tests: the first with two images, the second
    with one; (ids, mask, pixels [3 images, 56 px], labels with image tokens and padding ignored)."""
    a = [5, 6] + [img] * q + [7, 8, 9] + [img] * q + [10, 11]
    b = [12] + [img] * q + [13, 14, 15]
    ids = torch.tensor([a, b + [0] * (len(a) - len(b))])
    mask = torch.tensor([[1] * len(a), [1] * len(b) + [0] * (len(a) - len(b))])
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    return ids, mask, pixels, ids.masked_fill((ids == img) | (mask == 0), ignore)


def interrupt_after(n):
    """Wrap step_batches: deliver a real SIGINT while the n-th step's batch is handed out, as a
    user pressing Ctrl-C in the middle of that step."""
    import signal
    import train
    original = train.step_batches

    def wrapped(*args):
        for k, micro in enumerate(original(*args), 1):
            if k == n:
                signal.raise_signal(signal.SIGINT)
            yield micro
    return wrapped
