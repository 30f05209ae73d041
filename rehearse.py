"""
Rehearse a public preset end to end on random weights (issue 10): the public files in their exact
layouts and dtypes, at the true widths, head counts, vocabularies and image size, then the README's
commands on them: convert.py, train.py in one process and under torchrun with 2 pipeline stages
(stage 2 from stage 1's output, as the preset says), the stage-shard merge, and chat.py. Only the
numbers inside the weights are made up, and the depth is cut where memory requires.

    python rehearse.py --preset=tinygptv-phi2                      # --depth=llm:2,vit:4 (the default)
    python rehearse.py --preset=mpp-qwen7b-sft                     # rehearses mpp-qwen7b-pretrain first
    python rehearse.py --preset=mpp-qwen7b-pretrain --depth=full   # the published depths (a big machine)
    python rehearse.py --preset=... --dir=/tmp/r --keep            # work in /tmp/r and keep its files

`--depth=llm:N,vit:M` is the one override: the public files are written with the first N decoder
blocks (config.json's num_hidden_layers says N, its only edit) and M + 1 EVA-ViT-g blocks (BLIP-2
drops the last), and everything downstream reads the depth from the files. The work directory is
laid out as the README's convert commands write it (checkpoints/..., data/..., out/...) and the
presets run from it unchanged, so their own paths are checked too. Each run is checked: losses
finite, exactly the trained parts change and every frozen tensor is bit-identical, pipeline and
single process agree, the merge of the stage shards equals train.py's, and the chat answers in the
LLM's template and ends at its stop token.

Public dtypes written: eva_vit_g.pth fp16 (docs/reference.md: its 1,011,143,296 values are 1.88 GiB
in fp16, 3.77 GiB in fp32, and torch.hub's download of it shows 1.89G), the BLIP-2 .pth
fp32 (trainable weights saved from AMP training, under "model"), Qwen-7B/14B-Chat and Qwen2.5 bf16,
phi-2 fp16, MiniGPT4Qwen's llm_proj fp32 and its fine-tuned LLM bf16 (the 15 GB release), Vicuna-7B
v1.3 fp16 in 2 pytorch_model-*.bin shards (its rotary inv_freq buffers fp32) with a stand-in
tokenizer.model of LLaMA's 32,000 pieces and id layout (llama_tokenizer_model: LLaMA's vocabulary has
no offline source), MiniGPT-4's llama_proj fp32 (prerained_minigpt4_7b.pth). Random
values are a 1M-value random block (prime length, so rows do not repeat in step) tiled: fast, and
one tensor at a time, one shard at a time, so at most one shard is in memory.

So that random weights still end their answers, the head is rigged: the final norm's weight (or,
for LayerNorm, its bias) is large on one channel, where the stop tokens' head rows are +-1 (Qwen has
two stop tokens, one per sign, as Vicuna has </s> and MiniGPT-4's "###"; Phi's positive bias needs
one), so a stop token soon wins.
"""
import base64
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import save_file

import ckpt

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DEPTH = "llm:2,vit:4"
MAX_LEN = 96      # the rehearsal's --max_len: 32 image tokens + the template + a short answer
TIMEOUT = 1800    # seconds for any one command
PP_TIMEOUT = 900  # train.py --timeout of the pipeline runs: a true-width stage takes minutes on a CPU
BUDGET_GB = 16.0  # host memory a run may take: 2/3 of this machine's 24 GB (--budget_gb on a bigger one)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ----------------------------------------------------------------------------- the public configs
# config.json as published on the HF hub (Qwen/Qwen-7B-Chat, Qwen/Qwen-14B-Chat,
# Qwen/Qwen2.5-{0.5B,1.5B}-Instruct, microsoft/phi-2, lmsys/vicuna-7b-v1.3), the keys convert.py and
# transformers read.

QWEN1 = dict(architectures=["QWenLMHeadModel"], auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
             "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}, attn_dropout_prob=0.0, bf16=False,
             emb_dropout_prob=0.0, fp16=False, fp32=False, initializer_range=0.02, kv_channels=128,
             layer_norm_epsilon=1e-06, model_type="qwen", no_bias=True, onnx_safe=None, rotary_emb_base=10000,
             rotary_pct=1.0, scale_attn_weights=True, softmax_in_fp32=False, tie_word_embeddings=False,
             tokenizer_class="QWenTokenizer", transformers_version="4.32.0", use_cache=True,
             use_cache_kernel=False, use_cache_quantization=False, use_dynamic_ntk=True, use_flash_attn="auto",
             use_logn_attn=True)
QWEN7B_CHAT = dict(QWEN1, hidden_size=4096, intermediate_size=22016, max_position_embeddings=8192,
                   num_attention_heads=32, num_hidden_layers=32, seq_length=8192, vocab_size=151936)
QWEN14B_CHAT = dict(QWEN1, hidden_size=5120, intermediate_size=27392, kv_channels=128, max_position_embeddings=8192,
                    num_attention_heads=40, num_hidden_layers=40, seq_length=2048, vocab_size=152064)
QWEN25 = dict(architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
              hidden_act="silu", initializer_range=0.02, max_position_embeddings=32768, max_window_layers=21,
              model_type="qwen2", rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768,
              tie_word_embeddings=True, torch_dtype="bfloat16", transformers_version="4.43.1", use_cache=True,
              use_sliding_window=False, vocab_size=151936)
QWEN25_05B = dict(QWEN25, hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_hidden_layers=24,
                  num_key_value_heads=2)
QWEN25_15B = dict(QWEN25, hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_hidden_layers=28,
                  max_window_layers=21, num_key_value_heads=2)
PHI2 = dict(_name_or_path="microsoft/phi-2", architectures=["PhiForCausalLM"], attention_dropout=0.0,
            bos_token_id=50256, embd_pdrop=0.0, eos_token_id=50256, hidden_act="gelu_new", hidden_size=2560,
            initializer_range=0.02, intermediate_size=10240, layer_norm_eps=1e-05, max_position_embeddings=2048,
            model_type="phi", num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32,
            partial_rotary_factor=0.4, qk_layernorm=False, resid_pdrop=0.1, rope_scaling=None, rope_theta=10000.0,
            tie_word_embeddings=False, torch_dtype="float16", transformers_version="4.37.0", use_cache=True,
            vocab_size=51200)
# lmsys/vicuna-7b-v1.3 (the keys of lmsys/vicuna-13b-v1.3's config.json, 7B's sizes; docs/reference.md):
# LLaMA-7B fine-tuned, saved by transformers 4.28 as 2 fp16 pytorch_model-*.bin shards (9.98 + 3.5 GB)
VICUNA7B = dict(_name_or_path="/home/ubuntu/model_weights/vicuna-7b-v1.3", architectures=["LlamaForCausalLM"],
                bos_token_id=1, eos_token_id=2, hidden_act="silu", hidden_size=4096, initializer_range=0.02,
                intermediate_size=11008, max_position_embeddings=2048, model_type="llama", num_attention_heads=32,
                num_hidden_layers=32, pad_token_id=0, rms_norm_eps=1e-06, tie_word_embeddings=False,
                torch_dtype="float16", transformers_version="4.28.1", use_cache=True, vocab_size=32000)

# ----------------------------------------------------------------------------- the public layouts
# (key, shape) in each file's own names (docs/reference.md); the values come from `fill`.


def qwen1_layout(c):
    d, f, L = c["hidden_size"], c["intermediate_size"] // 2, c["num_hidden_layers"]
    keys = [("transformer.wte.weight", (c["vocab_size"], d))]
    for i in range(L):
        h = f"transformer.h.{i}."
        keys += [(h + "ln_1.weight", (d,)), (h + "attn.c_attn.weight", (3 * d, d)), (h + "attn.c_attn.bias", (3 * d,)),
                 (h + "attn.c_proj.weight", (d, d)), (h + "ln_2.weight", (d,)), (h + "mlp.w1.weight", (f, d)),
                 (h + "mlp.w2.weight", (f, d)), (h + "mlp.c_proj.weight", (d, f))]
    return keys + [("transformer.ln_f.weight", (d,)), ("lm_head.weight", (c["vocab_size"], d))]


def qwen2_layout(c):
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d // c["num_attention_heads"] * c.get("num_key_value_heads", c["num_attention_heads"])
    keys = [("model.embed_tokens.weight", (c["vocab_size"], d))]
    for i in range(L):
        p = f"model.layers.{i}."
        keys += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                 (p + "self_attn.q_proj.bias", (d,)), (p + "self_attn.k_proj.weight", (kv, d)),
                 (p + "self_attn.k_proj.bias", (kv,)), (p + "self_attn.v_proj.weight", (kv, d)),
                 (p + "self_attn.v_proj.bias", (kv,)), (p + "self_attn.o_proj.weight", (d, d)),
                 (p + "post_attention_layernorm.weight", (d,)), (p + "mlp.gate_proj.weight", (f, d)),
                 (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f))]
    keys.append(("model.norm.weight", (d,)))
    return keys + ([] if c["tie_word_embeddings"] else [("lm_head.weight", (c["vocab_size"], d))])


def llama_layout(c):
    """Qwen2's names without the q/k/v biases, and each layer's rotary inv_freq buffer after its
    o_proj, as transformers 4.28 saved a LlamaForCausalLM (the fp32 FloatStorage in Vicuna's shards)."""
    keys = []
    for k, shape in qwen2_layout(c):
        if not k.endswith("_proj.bias"):
            keys.append((k, shape))
        if k.endswith("o_proj.weight"):
            keys.append((k.replace("o_proj.weight", "rotary_emb.inv_freq"), (shape[0] // c["num_attention_heads"] // 2,)))
    return keys


def phi_layout(c):
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    keys = [("model.embed_tokens.weight", (c["vocab_size"], d))]
    for i in range(L):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                            ("self_attn.dense", (d, d)), ("mlp.fc1", (f, d)), ("mlp.fc2", (d, f)),
                            ("input_layernorm", (d,))]:
            keys += [(p + name + ".weight", shape), (p + name + ".bias", shape[:1])]
    return keys + [("model.final_layernorm.weight", (d,)), ("model.final_layernorm.bias", (d,)),
                   ("lm_head.weight", (c["vocab_size"], d)), ("lm_head.bias", (c["vocab_size"],))]


def eva_layout(blocks, width=1408, mlp=6144, grid=16, patch=14):
    keys = [("cls_token", (1, 1, width)), ("pos_embed", (1, 1 + grid * grid, width)),
            ("patch_embed.proj.weight", (width, 3, patch, patch)), ("patch_embed.proj.bias", (width,))]
    for i in range(blocks):
        b = f"blocks.{i}."
        keys += [(b + "norm1.weight", (width,)), (b + "norm1.bias", (width,)), (b + "attn.q_bias", (width,)),
                 (b + "attn.v_bias", (width,)), (b + "attn.qkv.weight", (3 * width, width)),
                 (b + "attn.proj.weight", (width, width)), (b + "attn.proj.bias", (width,)),
                 (b + "norm2.weight", (width,)), (b + "norm2.bias", (width,)), (b + "mlp.fc1.weight", (mlp, width)),
                 (b + "mlp.fc1.bias", (mlp,)), (b + "mlp.fc2.weight", (width, mlp)), (b + "mlp.fc2.bias", (width,))]
    return keys


def blip2_flant5xxl_layout(vit_width=1408, d=768, ffn=3072, layers=12, queries=32, t5=4096):
    """What LAVIS saves of Blip2T5 (its trainable parameters and buffers): the queries, ln_vision, the
    Q-Former's query path (Blip2T5 deletes the text path) and t5_proj; the frozen ViT and T5 are left out."""
    keys = [("query_tokens", (1, queries, d)), ("ln_vision.weight", (vit_width,)), ("ln_vision.bias", (vit_width,)),
            ("Qformer.bert.embeddings.LayerNorm.weight", (d,)), ("Qformer.bert.embeddings.LayerNorm.bias", (d,))]
    for i in range(layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        blocks = [("attention", d)] + ([("crossattention", vit_width)] if i % 2 == 0 else [])
        for name, kv_in in blocks:
            for proj, fan_in in (("query", d), ("key", kv_in), ("value", kv_in)):
                keys += [(f"{p}{name}.self.{proj}.weight", (d, fan_in)), (f"{p}{name}.self.{proj}.bias", (d,))]
            keys += [(f"{p}{name}.output.dense.weight", (d, d)), (f"{p}{name}.output.dense.bias", (d,)),
                     (f"{p}{name}.output.LayerNorm.weight", (d,)), (f"{p}{name}.output.LayerNorm.bias", (d,))]
        keys += [(p + "intermediate_query.dense.weight", (ffn, d)), (p + "intermediate_query.dense.bias", (ffn,)),
                 (p + "output_query.dense.weight", (d, ffn)), (p + "output_query.dense.bias", (d,)),
                 (p + "output_query.LayerNorm.weight", (d,)), (p + "output_query.LayerNorm.bias", (d,))]
    return keys + [("t5_proj.weight", (t5, d)), ("t5_proj.bias", (t5,))]

# ----------------------------------------------------------------------------- random values


class Filler:
    """Random tensors fast: one random block of a prime length, tiled from a random offset."""

    def __init__(self, seed, n=1_000_003):
        self.g = torch.Generator().manual_seed(seed)
        self.block = torch.randn(n, generator=self.g)

    def __call__(self, name, shape, dtype):
        n, L = math.prod(shape), len(self.block)
        block = torch.roll(self.block, int(torch.randint(L, (), generator=self.g)))
        out = torch.empty(n, dtype=dtype)
        for i in range(0, n, L):
            out[i:i + L] = block[:min(L, n - i)]
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name.lower() and leaf == "weight" or name.startswith("ln_"):
            out.mul_(0.1).add_(1.0)                      # norm weights around 1
        elif len(shape) >= 2 and "embed" not in name and name not in ("query_tokens", "cls_token"):
            out.mul_(1 / math.sqrt(math.prod(shape[1:])))  # matrices: N(0, 1/fan_in)
        else:
            out.mul_(0.02)                               # embeddings, biases, tokens
        return out.view(shape)


def rig_stop(state, head, norm, stops, bias=None):
    """Make random weights end their answers: the final norm is large on channel 0 (its weight, or
    its bias if given, which keeps the sign) and the stop tokens' head rows are +-1 there."""
    for key, value in ((bias or norm, 50.0), (norm if bias else None, 0.0)):
        if key in state:  # one shard at a time: each key where it is
            state[key][0] = value
    for token, sign in zip(stops, (1.0, -1.0)):
        if head in state:
            state[head][token, 0] = sign


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_sparse_safetensors(path, layout, dtype):
    """A safetensors file whose tensors read as zeros and cost no disk (a sparse file): for the
    checks that must refuse a file before any value is read."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in layout:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)


def write_safetensors_dir(d, config, layout, dtype, n_shards, fill, rig=None, fmt="safetensors"):
    """An HF checkpoint directory: config.json and the weights, one shard in memory at a time;
    n_shards > 1 writes model-0000i-of-0000n.safetensors + model.safetensors.index.json, or with
    fmt="bin" pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json (torch.save, as
    transformers < 4.35 saved). fill=None writes sparse safetensors files (zeros)."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    groups, size, limit = [[]], 0, sum(math.prod(s) for _, s in layout) / n_shards
    for key, shape in layout:  # as save_pretrained shards: a new file when the next tensor would overflow,
        if groups[-1] and size + math.prod(shape) > limit and len(groups) < n_shards:  # n files in all
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += math.prod(shape)
    stem = {"safetensors": "model", "bin": "pytorch_model"}[fmt]
    weight_map, total = {}, 0
    for s, group in enumerate(groups):
        name = f"{stem}.{fmt}" if len(groups) == 1 else f"{stem}-{s + 1:05d}-of-{len(groups):05d}.{fmt}"
        weight_map.update({k: name for k, _ in group})
        if fill is None:
            total += sum(math.prod(shape) for _, shape in group) * torch.empty((), dtype=dtype).element_size()
            write_sparse_safetensors(os.path.join(d, name), group, dtype)
            continue
        part = {k: fill(k, shape, dtype) for k, shape in group}
        if rig:
            rig(part)
        total += sum(t.nbytes for t in part.values())
        if fmt == "bin":
            torch.save(part, os.path.join(d, name))
        else:
            save_file(part, os.path.join(d, name), metadata={"format": "pt"})
        del part
    if len(groups) > 1:
        with open(os.path.join(d, f"{stem}.{fmt}.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _bpe_merges(ranks):
    """HF merges for tiktoken ranks: each multi-byte token is the merge of the two pieces that BPE
    with the lower ranks leaves of it (the standard tiktoken -> HF conversion)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 30))
            if ranks.get(parts[best] + parts[best + 1], 1 << 30) >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        merges.append(tuple(parts))
    return merges


def write_bpe_tokenizer(d, ranks, added, tokenizer_class):
    """vocab.json + merges.txt + tokenizer_config.json (HF's slow-tokenizer files) for these ranks."""
    from tokenizer import _byte_to_unicode
    b2u = _byte_to_unicode()
    u = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {u(t): r for t, r in ranks.items()}
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{u(a)} {u(b)}\n" for a, b in _bpe_merges(ranks)))
    decoder = {str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
               for t, i in added.items()}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class=tokenizer_class, added_tokens_decoder=decoder,
                       eos_token=next(iter(added)), model_max_length=32768), f, indent=2)


def qwen_tiktoken():
    """The published qwen.tiktoken (every Qwen v1 repo carries it; here from the dashscope wheel)."""
    import importlib.util
    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        raise SystemExit("rehearse.py needs the real qwen.tiktoken: pip install dashscope (it ships the file)")
    return os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")


def read_ranks(path):
    with open(path, "rb") as f:
        return {base64.b64decode(tok): int(r) for tok, r in (line.split() for line in f if line.strip())}

# ----------------------------------------------------------------------------- the public files


def parse_depth(text):
    """'llm:2,vit:4' -> {'llm': 2, 'vit': 4}; 'full' -> {} (the published depths)."""
    if text == "full":
        return {}
    out = {}
    for item in text.split(","):
        part, _, n = item.partition(":")
        if part not in ("llm", "vit") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--depth={text!r}: expected 'full' or llm:N,vit:M with N, M >= 1")
        out[part] = int(n)
    return out


def _llm_config(published, depth):
    return {**published, "num_hidden_layers": depth.get("llm", published["num_hidden_layers"])}


def write_qwen1(d, published, depth, seed):
    cfg = _llm_config(published, depth)
    specials = {t: 151643 + i for i, t in enumerate(QWEN_SPECIALS)}
    rig = lambda s: rig_stop(s, "lm_head.weight", "transformer.ln_f.weight",  # noqa: E731
                             [specials["<|im_end|>"], specials["<|im_start|>"]])
    write_safetensors_dir(d, cfg, qwen1_layout(cfg), torch.bfloat16, 8 if published is QWEN7B_CHAT else 15,
                          Filler(seed), rig)
    shutil.copy(qwen_tiktoken(), os.path.join(d, "qwen.tiktoken"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"}, f)


def write_qwen25(d, published, depth, seed):
    """Qwen2.5-Instruct: one model.safetensors (tied embeddings), its BPE files built from
    qwen.tiktoken (the same 151,643 byte-level tokens) + its 22 added tokens from 151643."""
    cfg = _llm_config(published, depth)
    ranks = read_ranks(qwen_tiktoken())
    added = QWEN_SPECIALS + [f"<|{n}|>" for n in ("object_ref_start", "object_ref_end", "box_start", "box_end",
                                                  "quad_start", "quad_end", "vision_start", "vision_end",
                                                  "vision_pad", "image_pad", "video_pad")]
    added += ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>"]
    ids = {t: 151643 + i for i, t in enumerate(added)}
    rig = lambda s: rig_stop(s, "model.embed_tokens.weight", "model.norm.weight",  # noqa: E731
                             [ids["<|im_end|>"], ids["<|im_start|>"]])
    write_safetensors_dir(d, cfg, qwen2_layout(cfg), torch.bfloat16, 1, Filler(seed), rig)
    write_bpe_tokenizer(d, ranks, ids, "Qwen2Tokenizer")


def write_phi2(d, depth, seed):
    """phi-2: fp16 in 2 shards. Its GPT-2/CodeGen vocabulary is not available offline, so the
    tokenizer files hold a stand-in of the same size: the first 50,256 byte-level ranks of
    qwen.tiktoken, <|endoftext|> at 50256 and 38 added tokens up to 50294 (50295 tokens)."""
    cfg = _llm_config(PHI2, depth)
    ranks = {t: r for t, r in read_ranks(qwen_tiktoken()).items() if r < 50256}
    added = {"<|endoftext|>": 50256, **{f"<|added_{i}|>": 50257 + i for i in range(38)}}
    rig = lambda s: rig_stop(s, "lm_head.weight", "model.final_layernorm.weight",  # noqa: E731
                             [50256], bias="model.final_layernorm.bias")
    write_safetensors_dir(d, cfg, phi_layout(cfg), torch.float16, 2, Filler(seed), rig)
    write_bpe_tokenizer(d, ranks, added, "CodeGenTokenizer")


# LLaMA's sentencepiece training options (its tokenizer.model's trainer_spec): BPE, byte fallback,
# digits split, no normalisation, whitespace kept, a dummy prefix, <unk> <s> </s> at 0 1 2
LLAMA_SPM_OPTIONS = dict(model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                         remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
                         character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                         minloglevel=2)


def llama_tokenizer_model(seed, n=32000):
    """The bytes of a sentencepiece tokenizer.model with LLaMA-7B's size and id layout: <unk> 0, <s> 1,
    </s> 2, the byte pieces <0x00>..<0xFF> at 3..258, then BPE pieces, 32,000 in all. LLaMA's own
    vocabulary has no offline source here, so this is a stand-in, not LLaMA's vocabulary: trained
    with LLaMA's options (as tests/test_llama.py) on made-up syllable words and MiniGPT-4's template,
    so that "###" is one piece, "▁###", as in LLaMA (its id 835; here another)."""
    import io
    import random

    import sentencepiece as spm

    from data import TEMPLATES
    r = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(r.choices(syllables, k=r.randint(1, 4))) for _ in range(40000)]
    text = [" ".join(r.choices(words, k=12)) for _ in range(20000)]
    text += [TEMPLATES["minigpt4"]["system"] + "###Human: <Img><ImageHere></Img> What is in the image?"
             "###Assistant: A picture of noise. ###"] * 200
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=n,
                                   **{**LLAMA_SPM_OPTIONS, "character_coverage": 0.99995})
    return out.getvalue()


def write_vicuna(d, depth, seed):
    """lmsys/vicuna-7b-v1.3: fp16 in 2 pytorch_model-*.bin shards (each layer's rotary inv_freq in
    fp32, as transformers 4.28 saved it) and the stand-in tokenizer.model (llama_tokenizer_model).
    The rig's two stop tokens are MiniGPT-4's: </s> and "▁###"."""
    from tokenizer import SentencePieceTokenizer
    cfg = _llm_config(VICUNA7B, depth)
    model = llama_tokenizer_model(seed)
    stops = [SentencePieceTokenizer(model).token_id(t) for t in ("</s>", "###")]
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head)  # LlamaRotaryEmbedding's buffer

    def rig(part):
        rig_stop(part, "lm_head.weight", "model.norm.weight", stops)
        part.update({k: inv_freq.clone() for k in part if k.endswith("rotary_emb.inv_freq")})
    write_safetensors_dir(d, cfg, llama_layout(cfg), torch.float16, 2, Filler(seed), rig, fmt="bin")
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(model)


def write_eva_vit_g(path, depth, seed):
    """eva_vit_g.pth: a flat state dict of 40 blocks (BLIP-2 uses 39), fp16 as published (docs/reference.md)."""
    fill = Filler(seed)
    torch.save({k: fill(k, s, torch.float16) for k, s in eva_layout(depth.get("vit", 39) + 1)}, path)


def write_blip2(path, seed):
    fill = Filler(seed)
    state = {k: fill(k, s, torch.float32) for k, s in blip2_flant5xxl_layout()}
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save({"model": state}, path)


def write_minigpt4qwen(path, published, depth, seed, stage, proj="llm_proj"):
    """MiniGPT4Qwen's model.pth (stage 1: llm_proj, fp32) or unfreeze_llm_model.pth (stage 2: also
    the fine-tuned Qwen under llm_model., bf16), weights under "model". MiniGPT-4's
    prerained_minigpt4_7b.pth is stage 1's file with its own name, proj="llama_proj"."""
    fill = Filler(seed)
    d = published["hidden_size"]
    state = {proj + ".weight": fill(proj + ".weight", (d, 768), torch.float32),
             proj + ".bias": fill(proj + ".bias", (d,), torch.float32)}
    if stage == 2:
        state.update({"llm_model." + k: fill(k, s, torch.bfloat16) for k, s in qwen1_layout(_llm_config(published, depth))})
    torch.save({"model": state}, path)


# What the README's convert commands write (a preset's paths), and how to make each one's source:
# destination -> (convert kind, public file name, writer(path, depth, seed))
PUBLIC = {
    "checkpoints/eva_vit_g": ("eva_vit_g", "eva_vit_g.pth", write_eva_vit_g),
    "checkpoints/blip2": ("blip2_lavis", "blip2_pretrained_flant5xxl.pth", lambda p, dep, s: write_blip2(p, s)),
    "checkpoints/qwen7b-chat": ("qwen1", "Qwen-7B-Chat", lambda p, dep, s: write_qwen1(p, QWEN7B_CHAT, dep, s)),
    "checkpoints/qwen14b-chat": ("qwen1", "Qwen-14B-Chat", lambda p, dep, s: write_qwen1(p, QWEN14B_CHAT, dep, s)),
    "checkpoints/qwen2.5-0.5b": ("qwen2", "Qwen2.5-0.5B-Instruct", lambda p, dep, s: write_qwen25(p, QWEN25_05B, dep, s)),
    "checkpoints/qwen2.5-1.5b": ("qwen2", "Qwen2.5-1.5B-Instruct", lambda p, dep, s: write_qwen25(p, QWEN25_15B, dep, s)),
    "checkpoints/phi-2": ("phi", "phi-2", lambda p, dep, s: write_phi2(p, dep, s)),
    "checkpoints/mpp-stage1": ("minigpt4qwen", "model.pth",
                               lambda p, dep, s: write_minigpt4qwen(p, QWEN7B_CHAT, dep, s, 1)),
    "checkpoints/mpp-stage2": ("minigpt4qwen", "unfreeze_llm_model.pth",
                               lambda p, dep, s: write_minigpt4qwen(p, QWEN7B_CHAT, dep, s, 2)),
    "checkpoints/vicuna-7b": ("llama", "vicuna-7b-v1.3", write_vicuna),
    "checkpoints/minigpt4-proj": ("minigpt4", "prerained_minigpt4_7b.pth",  # sic: the release's name
                                  lambda p, dep, s: write_minigpt4qwen(p, VICUNA7B, dep, s, 1, proj="llama_proj")),
}


def write_data(work, cfg, n=8, size=224):
    """A tiny data file in the public MiniGPT4Qwen format at the preset's data path, with synthetic
    224 px images under its image_root."""
    from PIL import Image
    root = os.path.join(work, cfg.image_root)
    os.makedirs(root, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(root, f"{i}.png"))
        rows.append({"image": f"{i}.png", "instruction": "<Img><ImageHere></Img> What is in the image?",
                     "output": f"A picture of noise number {i}."})
    path = os.path.join(work, cfg.data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f)
    return os.path.join(root, "0.png")

# ----------------------------------------------------------------------------- running commands


def tree(pid):
    """A process and all its descendants, parents first (torchrun's workers lead process groups of
    their own: killing torchrun's group does not reach them)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def tree_rss(pid):
    """Resident bytes of a process and all its descendants (torchrun's workers included)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def kill_tree(pid):
    for p in tree(pid):
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


def run(args, cwd, log, timeout=TIMEOUT, env=None):
    """Run a command in cwd; returns (stdout+stderr, seconds, peak RSS of its process tree in GB).
    Raises RuntimeError with the output's tail if it fails."""
    t0, peak = time.time(), [0]
    p = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, start_new_session=True)

    def sample():
        while p.poll() is None:
            peak[0] = max(peak[0], tree_rss(p.pid))
            time.sleep(0.2)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)  # torchrun and its workers
        out, _ = p.communicate()
        raise RuntimeError(f"timed out after {timeout}s: {' '.join(args)}\n{out[-3000:]}") from None
    watcher.join()
    secs, gb = time.time() - t0, peak[0] / 2 ** 30
    shown = ["CODE" if "\n" in a else os.path.basename(a) if a == sys.executable or a.endswith(".py") else a for a in args]
    log(f"  {secs:6.1f} s  {gb:5.2f} GB  {' '.join(shown)}")
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(args)}\n{out[-4000:]}")
    return out, secs, gb


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(preset, stages, extra=(), dtype="fp32"):
    """train.py for `preset` with the rehearsal's overrides, each named: 2 microbatches of 1 sample,
    --max_len=MAX_LEN, in-process batches, warm-up 1 step so that few steps move the weights, and
    dtype: fp32 on a CPU without native bf16 (a bf16 matmul ran ~35x slower than fp32 here);
    under torchrun --timeout=PP_TIMEOUT."""
    base = [f"--preset={preset}", "--batch_size=1", "--grad_accum=2", f"--max_len={MAX_LEN}", "--num_workers=0",
            "--warmup_iters=1", f"--num_stages={stages}", "--threads=1", f"--dtype={dtype}", *extra]
    if dtype == "fp32":
        base.append("--frozen_dtype=fp32")
    if stages == 1:
        return [sys.executable, os.path.join(ROOT, "train.py"), *base]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={stages}", f"--master_port={free_port()}",
            os.path.join(ROOT, "train.py"), *base, f"--timeout={PP_TIMEOUT}"]

# ----------------------------------------------------------------------------- checks


def load_state(d):
    return ckpt.load(d)[0]


def initial_state(work, cfg):
    """The tensors a run starts from, as our keys (what from_parts / from_checkpoint read)."""
    from model import vision_state
    if cfg.init:
        return load_state(os.path.join(work, cfg.init))
    state = {}
    for d in cfg.init_vision.split(","):
        state.update(vision_state(os.path.join(work, d)))
    state.update({"llm." + k: t for k, t in load_state(os.path.join(work, cfg.init_llm)).items()})
    if cfg.init_proj:
        state.update(load_state(os.path.join(work, cfg.init_proj)))
    return state


def trained_keys(out_dir):
    """The parameter names the run trained: everything outside the frozen parts (its config)."""
    from model import MultimodalLM
    model, _ = MultimodalLM.from_checkpoint(out_dir, lazy=True)
    return {n for n, p in model.named_parameters() if p.requires_grad}, ckpt.load_config(out_dir)["model"]["freeze"]


def check_frozen(before, after, trained, where):
    """Every frozen tensor of `after` bit-identical to `before` (in before's dtype, exactly); returns the
    trained ones that changed."""
    changed = set()
    for k, t in after.items():
        if k in trained:
            if k in before and not torch.equal(before[k].to(t.dtype), t):
                changed.add(k)
            continue
        if k not in before:
            continue  # a fresh llm_proj: checked by the caller
        b = before[k]
        if not (torch.equal(t.to(b.dtype), b) and torch.equal(t, b.to(t.dtype))):
            raise AssertionError(f"{where}: frozen tensor {k} changed")
    return changed


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rec = [json.loads(line) for line in f if '"loss"' in line]
    vals = [r["loss"] for r in rec]
    if not vals or not all(math.isfinite(v) for v in vals):
        raise AssertionError(f"{out_dir}: losses {vals}")
    return vals


CHAT_CHECK = """
import json, sys, torch, chat
model, tok, frames = chat.load(sys.argv[1], "cpu", sys.argv[3])
eng = chat.Engine(model, tok, frames)
ids = eng.encode([("user", "<Img><ImageHere></Img> What is in the image?")], "What is in the image?")
text, n, finish = eng.answer(ids, [eng.load(sys.argv[2], "image")], lambda s: None, conf={"max_new_tokens": 24})
prompt = tok.decode([i for i in ids if i != model.config.image_token_id])
print("CHAT " + json.dumps(dict(prompt=prompt, answer=text, tokens=n, finish=finish,
                                images=ids.count(model.config.image_token_id))))
"""


def chat_check(work, ckpt_dir, image, log, dtype="fp32"):
    """Answer one image question from the checkpoint through chat.py's Engine: the prompt in the
    LLM's template, the answer ending at its stop token; and once through the CLI."""
    out, secs, gb = run([sys.executable, "-c", CHAT_CHECK, ckpt_dir, image, dtype], work, log)
    res = json.loads(next(line for line in out.splitlines() if line.startswith("CHAT "))[5:])
    run([sys.executable, os.path.join(ROOT, "chat.py"), "--ckpt", ckpt_dir, "--dtype", dtype, "--image", image,
         "--prompt", "What is in the image?"], work, log)
    return res, secs, gb

# ----------------------------------------------------------------------------- the rehearsal


def prepare(work, cfg, depth, seed, log):
    """The public files every path of the preset names, written and converted (once per work dir)."""
    paths = [p for p in [*cfg.init_vision.split(","), cfg.init_llm, cfg.tokenizer, cfg.init_proj] if p]
    for dst in dict.fromkeys(paths):
        if dst.startswith("out/"):
            continue
        if dst not in PUBLIC:
            raise KeyError(f"preset {cfg.preset}: no rehearsal file for {dst} (add it to rehearse.PUBLIC)")
        if os.path.exists(os.path.join(work, dst, "config.json")):
            continue
        kind, name, writer = PUBLIC[dst]
        src = os.path.join(work, "public", name)
        os.makedirs(os.path.dirname(src), exist_ok=True)
        t0 = time.time()
        writer(src, depth, seed)
        log(f"  {time.time() - t0:6.1f} s           wrote public/{name}")
        extra = [f"--vit_depth={depth['vit']}"] if "vit" in depth and kind in ("eva_vit_g", "blip2_lavis") else []
        run([sys.executable, os.path.join(ROOT, "convert.py"), kind, src, dst, *extra], work, log)
        if os.path.isdir(src):
            shutil.rmtree(src)  # the converted copy is what the presets read
        else:
            os.remove(src)


def reduce_stage(cfg, work, budget_gb=BUDGET_GB):
    """(extra train.py args, dtype, message or None) for a stage that would not fit budget_gb in
    fp32: one that trains the LLM (stage 2) holds weights, gradients and two AdamW moments of it. It
    then freezes the embeddings and lm_head (Qwen-7B's are 1.24B of its parameters at any depth),
    in fp32 if that fits, else with the frozen parts in bf16, the preset's own dtypes (bf16 autocast
    is ~35x slower than fp32 on a CPU without native bf16: a Qwen-7B sft step took over 20 min);
    the 2-stage pipeline run is skipped (its stages' save copies would add their weights again)."""
    import train
    from model import frozen_parts
    freeze = frozen_parts(train.freeze_arg(cfg.freeze) if cfg.freeze else ())
    if "llm" in freeze or not cfg.init:
        return [], "fp32", None
    llm = ckpt.load_config(os.path.join(work, cfg.init))["model"]["llm"]
    emb = llm["vocab_size"] * llm["n_embd"] * (1 if llm.get("tie_embeddings") else 2)
    block = llm["n_embd"] * (4 * llm["n_embd"] + 3 * llm["intermediate_size"])
    need = (emb + llm["n_layer"] * block) * 4 * 4 / 2 ** 30  # fp32 weights, gradients, AdamW m and v
    if need <= budget_gb:
        return [], "fp32", None
    extra = [f"--freeze={','.join([*freeze, 'llm.embed_tokens', 'llm.lm_head'])}"]
    frozen_fp32 = (emb * 4 + llm["n_layer"] * block * 4 * 4) / 2 ** 30  # the frozen embeddings without state
    if frozen_fp32 <= budget_gb:
        how, dtype = "in fp32", "fp32"
    else:
        how, dtype = "frozen parts in bf16", "bf16"
        extra += ["--frozen_dtype=bf16"]
    return extra, dtype, (f"{cfg.preset} rehearsal: embeddings and lm_head frozen, {how}, to fit {budget_gb:.0f} GB "
                          f"(training the whole LLM would need {need:.1f} GB); no pipeline run")


def snapshot(out_dir, dst):
    """Hard links to a run's latest files (the next save deletes the step directory)."""
    src = ckpt.resolve(out_dir)
    shutil.rmtree(dst, ignore_errors=True)  # a failed earlier rehearsal's
    os.makedirs(dst)
    for f in os.listdir(src):
        os.link(os.path.join(src, f), os.path.join(dst, f))
    return dst


def rehearse(preset, work, depth=DEFAULT_DEPTH, seed=0, pipeline=True, log=print, done=None, budget_gb=BUDGET_GB):
    """Rehearse `preset` in `work` (and first the run its --init names); returns {part: numbers}."""
    import train
    cfg = train.parse_args([f"--preset={preset}"])
    done = {} if done is None else done
    if preset in done:
        return done
    if cfg.init.startswith("out/"):
        rehearse(cfg.init.split("/")[1], work, depth, seed, pipeline, log, done, budget_gb)
    dep = parse_depth(depth)
    log(f"{preset} (depth {depth}):")
    prepare(work, cfg, dep, seed, log)
    image = write_data(work, cfg)
    before = initial_state(work, cfg)
    out, rep = os.path.join(work, cfg.out_dir), {}
    extra, dtype, reduction = reduce_stage(cfg, work, budget_gb)
    if reduction:
        log(reduction)
        pipeline = False
    # one process: 1 step, then --resume for 1 more; the trained parts move between the two
    _, s1, m1 = run(train_cmd(preset, 1, ["--max_iters=1", *extra], dtype), work, log)
    first = snapshot(out, os.path.join(work, f"snap-{preset}"))
    trained, freeze = trained_keys(out)
    a = load_state(first)
    moved = check_frozen(before, a, trained, f"{preset} step 1")
    s2 = m2 = 0
    if all(k in before for k in trained):  # the start is known (a stage 2): step 1 must move every trained tensor
        steps = 1
    else:  # a fresh llm_proj: compare two steps instead
        _, s2, m2 = run(train_cmd(preset, 1, ["--max_iters=2", "--resume", *extra], dtype), work, log)
        moved, steps = check_frozen(a, load_state(out), trained, f"{preset} step 2"), 2
    if moved != trained:
        raise AssertionError(f"{preset}: trained tensors that did not change: {sorted(trained - moved)[:10]}")
    rep[f"1 process, {steps} step(s)"] = dict(seconds=s1 + s2, peak_gb=max(m1, m2), losses=losses(out),
                                              freeze=freeze, trained_tensors=len(trained), reduction=reduction)
    # both stages in fp32 and their save copies of the stage shards: about 8 bytes a parameter
    # (mpp-qwen7b-pretrain: 13.8 GiB; its peak RSS summed over the ranks was 21.0 GB, the checkpoint's
    # mapped pages counted in each); the preset's bf16 instead outlasted a 900 s exchange timeout
    # on this CPU, so a pipeline that does not fit the budget in fp32 is skipped, by name
    pp_gb = sum(t.numel() for t in a.values()) * 8 / 2 ** 30
    blocks = ckpt.load_config(first)["model"]["llm"]["n_layer"]
    why = (f"2 stages in fp32 would need {pp_gb:.1f} GB, over {budget_gb:.0f} GB" if pp_gb > budget_gb else
           f"{blocks} decoder block cannot fill 2 stages" if blocks < 2 else None)
    if pipeline and why:
        skipped = f"{preset} rehearsal: no pipeline run ({why})"
        log(skipped)
        rep["torchrun, 2 stages"] = dict(seconds=0.0, peak_gb=0.0, skipped=skipped)
        pipeline = False
    if pipeline:  # 2 pipeline stages, 1 step from the same start: the merged model equals step 1 above
        pp_out = out + "-pp2"
        _, s3, m3 = run(train_cmd(preset, 2, ["--max_iters=1", f"--out_dir={pp_out}", *extra], dtype), work, log)
        merged, agreement = load_state(pp_out), {}
        for k, t in a.items():
            if k in trained:  # Adam's first step is ~lr * sign(g): only near-zero gradients may flip
                agree = float(((merged[k].float() - t.float()).abs() <= 1e-6 + 1e-5 * t.float().abs()).float().mean())
                agreement[k] = agree
                if agree < 0.95:  # an untrained stage would agree nowhere
                    raise AssertionError(f"{preset} pp2: {k} agrees with the single-process step in {agree:.1%} of its elements")
            elif not torch.equal(merged[k].to(t.dtype), t):
                raise AssertionError(f"{preset} pp2: frozen tensor {k} differs from the single-process run")
        remerged = os.path.join(work, f"remerged-{preset}")
        run([sys.executable, os.path.join(ROOT, "convert.py"), "stages", pp_out, remerged], work, log)
        again = load_state(remerged)
        if again.keys() != merged.keys() or not all(torch.equal(again[k], merged[k]) for k in merged):
            raise AssertionError(f"{preset}: convert.py stages differs from train.py's merge")
        rep["torchrun, 2 stages, 1 step"] = dict(seconds=s3, peak_gb=m3, losses=losses(pp_out), dtype=dtype,
                                                 agreement=min(agreement.values()))
        shutil.rmtree(remerged)
        shutil.rmtree(pp_out)
    res, s4, m4 = chat_check(work, out, image, log, dtype)
    rep["chat"] = dict(seconds=s4, peak_gb=m4, **res)
    shutil.rmtree(first)
    done[preset] = rep
    return done


def main(argv=None):
    import argparse
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--depth", default=DEFAULT_DEPTH, help="llm:N,vit:M or 'full' (default %(default)s)")
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-pipeline", dest="pipeline", action="store_false", help="skip the torchrun 2-stage runs")
    ap.add_argument("--budget_gb", type=float, default=BUDGET_GB, help="host memory a run may take (default %(default)s)")
    args = ap.parse_args(argv)
    parse_depth(args.depth)
    work = args.dir or tempfile.mkdtemp(prefix="rehearse-")
    os.makedirs(work, exist_ok=True)
    try:
        report = rehearse(args.preset, work, args.depth, pipeline=args.pipeline, budget_gb=args.budget_gb)
    except (RuntimeError, AssertionError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for preset, parts in report.items():
        for part, r in parts.items():
            print(f"{preset:28s} {part:28s} {r['seconds']:7.1f} s {r['peak_gb']:6.2f} GB  "
                  + json.dumps({k: v for k, v in r.items() if k not in ('seconds', 'peak_gb')}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
