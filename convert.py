"""
Public checkpoints in, our checkpoint out: the only file that knows the public layouts.

Reads HF checkpoint directories (single or sharded safetensors with the index json, or .bin
shards), LAVIS / MiniGPT4Qwen .pth files, renames keys through one readable table per model
family, checks every key and shape before copying anything, and writes our format (ckpt.py): a
directory with `model.safetensors` + `config.json` (+ the tokenizer beside an LLM).

    python convert.py qwen2        ~/hf/Qwen2.5-0.5B-Instruct out/qwen2.5-0.5b
    python convert.py qwen1        ~/hf/Qwen-7B-Chat out/qwen7b-chat
    python convert.py phi          ~/hf/phi-2 out/phi-2
    python convert.py llama        ~/hf/vicuna-7b out/vicuna-7b      # LLaMA / Vicuna, tokenizer.model
    python convert.py eva_vit_g    eva_vit_g.pth out/eva_vit_g
    python convert.py blip2_lavis  blip2_pretrained_flant5xxl.pth out/blip2
    python convert.py blip2_hf     ~/hf/blip2-opt-2.7b out/blip2-hf
    python convert.py minigpt4qwen model.pth out/mpp-stage1          # or unfreeze_llm_model.pth
    python convert.py minigpt4     pretrained_minigpt4.pth out/minigpt4-proj
    python convert.py stages       out/run/step-000200 out/run-merged  # pipeline shards -> one model
    python convert.py lora         out/lora-run out/lora-merged        # a LoRA run's adapters -> its base

Nothing in the project imports this file (bench.py and the tests do): training and chat read only
our format. It is longer than the other tools because it holds one rename table and one config
translation per public family (Qwen v1, Qwen2, LLaMA / Vicuna, Phi-2 / TinyGPT-V, EVA-ViT-g, two
BLIP-2 layouts, MiniGPT4Qwen, MiniGPT-4), each of which a reader can check against the published files line by line.
"""
import json
import os
import re
import sys
from dataclasses import asdict

import torch

import ckpt
import lora
import train
from ckpt import CheckpointError
from data import IMAGE_TOKEN
from model import LLMS, MultimodalLM, save_llm
from phi import PhiConfig
from qformer import QFormer, QFormerConfig
from qwen import QwenConfig
from tokenizer import SentencePieceTokenizer, Tokenizer
from vit import EVAViT, ViTConfig, interpolate_pos_embed

# ----------------------------------------------------------------------------- reading

def _hf_files(d):
    """The weight files of an HF checkpoint directory, with the key -> file map if sharded."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(d, index)):
            with open(os.path.join(d, index)) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not os.path.isfile(os.path.join(d, name))]
            if missing:  # checked before any shard is read: a partial download fails at once
                raise CheckpointError(f"{d}: {index} lists {len(files)} shards, {len(missing)} missing: {', '.join(missing)}")
            return files, weight_map
        if os.path.exists(os.path.join(d, single)):
            return [single], None
    raise CheckpointError(f"{d}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")


def read_state_dict(path):
    """All tensors of a checkpoint file or HF directory, memory-mapped where the format allows."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return ckpt.read_file(path)
    files, weight_map = _hf_files(path)
    state = {}
    for name in files:
        part = ckpt.read_file(os.path.join(path, name))
        dup = state.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{path}/{name}: keys also present in another shard: {sorted(dup)[:5]}")
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == name}
            if listed != part.keys():
                raise CheckpointError(f"{path}/{name}: shard does not match the index: missing "
                                      f"{sorted(listed - part.keys())[:5]}, unlisted {sorted(part.keys() - listed)[:5]}")
        state.update(part)
    return state


# ----------------------------------------------------------------------------- renaming and loading

def split(*targets, dim=0):
    """A remap rule target: cut a fused tensor into equal chunks along `dim`, one per target name."""
    def fn(match, t):
        return {match.expand(name): c for name, c in zip(targets, t.chunk(len(targets), dim))}
    return fn


def remap(src, rules, ignore=()):
    """Rename src keys with `rules` [(regex, target)], first full match wins; target is a
    replacement string (\\1 = group) or fn(match, tensor) -> {name: tensor}. A key matching an
    `ignore` regex is dropped, before any rule is tried (tables end in catch-alls such as
    `model\\.(.*)`); every other key must match a rule."""
    out, unknown = {}, []
    for key, t in src.items():
        if any(re.fullmatch(p, key) for p in ignore):
            continue
        for pattern, target in rules:
            m = re.fullmatch(pattern, key)
            if m:
                new = {m.expand(target): t} if isinstance(target, str) else target(m, t)
                clash = out.keys() & new.keys()
                if clash:
                    raise CheckpointError(f"two source keys map to {sorted(clash)}")
                out.update(new)
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys (no rename rule, not ignored): {sorted(unknown)[:10]}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return out


# --- llm ---
# Rename tables: (regex over the source key, our key or a split). One table per checkpoint family.

QWEN2_RULES = [(r"model\.(.*)", r"\1"), (r"lm_head\.weight", "lm_head.weight")]
QWEN2_IGNORE = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]  # older exports save it
# HF LLaMA / Vicuna: the same names (qwen.py follows them), without the q/k/v biases
LLAMA_RULES, LLAMA_IGNORE = QWEN2_RULES, QWEN2_IGNORE

_H = r"transformer\.h\.(\d+)\."
QWEN1_RULES = [
    (r"transformer\.wte\.weight", "embed_tokens.weight"),
    (_H + r"ln_1\.weight", r"layers.\1.input_layernorm.weight"),
    (_H + r"attn\.c_attn\.(weight|bias)",  # fused [q; k; v]
     split(r"layers.\1.self_attn.q_proj.\2", r"layers.\1.self_attn.k_proj.\2", r"layers.\1.self_attn.v_proj.\2")),
    (_H + r"attn\.c_proj\.weight", r"layers.\1.self_attn.o_proj.weight"),
    (_H + r"ln_2\.weight", r"layers.\1.post_attention_layernorm.weight"),
    (_H + r"mlp\.w1\.weight", r"layers.\1.mlp.up_proj.weight"),
    (_H + r"mlp\.w2\.weight", r"layers.\1.mlp.gate_proj.weight"),  # w2 is the silu-gated branch
    (_H + r"mlp\.c_proj\.weight", r"layers.\1.mlp.down_proj.weight"),
    (r"transformer\.ln_f\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
QWEN1_IGNORE = [r"transformer\.rotary_emb\.inv_freq"]


def split_per_head(n_head, *targets):
    """TinyGPT-V's query_key_value: rows laid out [head, (q|k|v), head_dim], not [q; k; v]."""
    def fn(match, t):
        t = t.view(n_head, len(targets), -1, *t.shape[1:])
        return {match.expand(name): t[:, i].reshape(-1, *t.shape[3:]) for i, name in enumerate(targets)}
    return fn


def phi_rules(n_head):
    return [
        (r"model\.final_layernorm\.(weight|bias)", r"norm.\1"),
        (r"model\.layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)",
         split_per_head(n_head, *(rf"layers.\1.self_attn.{p}_proj.\2" for p in "qkv"))),
        (r"model\.(.*)", r"\1"),
        (r"lm_head\.(weight|bias)", r"lm_head.\1"),
    ]


PHI_IGNORE = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]


def _rope_theta(hf, default):
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"rope scaling {kind!r} is not implemented")
    return float(hf.get("rope_theta") or rope.get("rope_theta") or default)


def qwen2_config(hf, version="qwen2"):
    return QwenConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                      n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
                      intermediate_size=hf["intermediate_size"], rope_theta=_rope_theta(hf, 10000.0),
                      max_seq_len=hf["max_position_embeddings"], tie_embeddings=hf.get("tie_word_embeddings", False),
                      version=version, rms_eps=hf.get("rms_norm_eps", 1e-6))


def llama_config(hf):
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if (hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu"
            or head_dim * hf["num_attention_heads"] != hf["hidden_size"]):
        raise CheckpointError("LLaMA config: only silu, no attention/MLP biases and head_dim = hidden_size / "
                              "num_attention_heads are implemented")
    return qwen2_config(hf, version="llama")


def qwen1_config(hf):
    if hf.get("rotary_pct", 1.0) != 1.0 or not hf.get("use_dynamic_ntk", True) or not hf.get("use_logn_attn", True):
        raise CheckpointError("Qwen v1 config: only rotary_pct=1 with dynamic NTK and log-n attention is implemented")
    return QwenConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                      n_kv_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                      intermediate_size=hf["intermediate_size"] // 2,  # v1 states w1 + w2 together
                      rope_theta=float(hf.get("rotary_emb_base", 10000)), max_seq_len=hf["seq_length"],
                      tie_embeddings=False, version="qwen1", rms_eps=hf.get("layer_norm_epsilon", 1e-6))


def phi_config(hf):
    if hf.get("hidden_act", "gelu_new") != "gelu_new":
        raise CheckpointError(f"Phi config: hidden_act {hf['hidden_act']!r} is not implemented (gelu_new only)")
    rope = hf.get("rope_parameters") or {}
    return PhiConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                     n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
                     intermediate_size=hf["intermediate_size"], rope_theta=_rope_theta(hf, 10000.0),
                     partial_rotary_factor=hf.get("partial_rotary_factor") or rope.get("partial_rotary_factor", 0.5),
                     max_seq_len=hf["max_position_embeddings"], layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                     tinygptv=bool(hf.get("qk_layernorm", False)))


def check_config(src, config, state):
    """config.json against the (renamed) tensors: the depth, vocabulary and width it states must be
    the weights', so a config from another model or a partial checkpoint is named as such."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    emb = state.get("embed_tokens.weight")
    found = [("num_hidden_layers", config.n_layer, len(blocks), "decoder blocks"),
             ("vocab_size", config.vocab_size, emb.shape[0] if emb is not None else None, "embedding rows"),
             ("hidden_size", config.n_embd, emb.shape[1] if emb is not None else None, "embedding columns")]
    bad = [f"{name}={want} but the weights have {got} ({what})" for name, want, got, what in found
           if got is not None and got != want]
    if bad:
        raise CheckpointError(f"{os.path.join(src, 'config.json')} does not match the weights: {'; '.join(bad)}")


def llm_from_hf(src, kind, dtype=None):
    """(model, config) from an HF directory; kind 'qwen2' | 'qwen1' | 'llama' | 'phi'. dtype defaults
    to the checkpoint's (a different one is an explicit cast)."""
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    state = read_state_dict(src)
    config = {"qwen2": qwen2_config, "qwen1": qwen1_config, "llama": llama_config, "phi": phi_config}[kind](hf)
    if kind == "phi" and any(k.endswith("query_key_value.weight") for k in state):
        config.tinygptv = True
    rules, ignore = {"qwen2": (QWEN2_RULES, QWEN2_IGNORE), "qwen1": (QWEN1_RULES, QWEN1_IGNORE),
                     "llama": (LLAMA_RULES, LLAMA_IGNORE), "phi": (phi_rules(config.n_head), PHI_IGNORE)}[kind]
    state = remap(state, rules, ignore)
    check_config(src, config, state)
    dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    with torch.device("meta"):  # no storage: load_into adopts the checkpoint's tensors
        model = LLMS["phi" if kind == "phi" else "qwen"][1](config).to(dtype)
    return ckpt.load_into(model, state, cast=True), config


def tokenizer_from_hf(src, vocab_size):
    """The tokenizer of an HF LLM directory (Qwen v1's qwen.tiktoken, LLaMA's sentencepiece
    tokenizer.model, else HF byte-level BPE files), or None if it ships none. Only Qwen v1 has the
    image slot <|extra_0|>; for the others it takes the first free id, one of the spare embedding
    rows these checkpoints have (Qwen2: 151936 rows for 151665 tokens, Phi-2: 51200 for 50295), so
    MMConfig.image_token_id can name it. LLaMA / Vicuna-7B has none (32000 rows, 32000 pieces): there
    the image slot shares <unk>'s id 0, which byte-fallback encoding never produces (MiniGPT-4
    itself splices embeddings and needs no id)."""
    if os.path.exists(os.path.join(src, "qwen.tiktoken")):
        tok = Tokenizer.from_qwen_tiktoken(os.path.join(src, "qwen.tiktoken"))
    elif os.path.exists(os.path.join(src, "tokenizer.model")):  # LLaMA dirs may also hold a tokenizer.json
        tok = SentencePieceTokenizer.from_hf(src)
        if IMAGE_TOKEN not in tok.special_tokens:
            slot = tok.n_vocab if tok.n_vocab < vocab_size else tok.special_tokens["<unk>"]
            tok = SentencePieceTokenizer(tok.model_proto, {**tok.extra, IMAGE_TOKEN: slot})
    elif any(os.path.exists(os.path.join(src, f)) for f in ("tokenizer.json", "vocab.json")):
        tok = Tokenizer.from_hf(src)
    else:
        return None
    if IMAGE_TOKEN not in tok.special_tokens:
        tok = Tokenizer(tok._ranks, {**tok.special_tokens, IMAGE_TOKEN: tok.n_vocab}, tok.pattern,
                        tok.normalization, tok.added_tokens)
    if tok.n_vocab > vocab_size:
        raise CheckpointError(f"{src}: the tokenizer needs {tok.n_vocab} embedding rows, the model has {vocab_size}")
    return tok


def _convert_llm(src, dst, kind):
    model, config = llm_from_hf(src, kind)
    tok = tokenizer_from_hf(src, config.vocab_size)  # checked before anything is written
    if kind == "llama":  # a Qwen-class model: name the arch, so that from_parts picks MiniGPT-4's template
        ckpt.save(dst, ckpt.state_of(model), {"arch": "llama", **asdict(config)})
    else:
        save_llm(dst, model)
    if tok is not None:  # beside the weights, where train.py and chat.py look for it
        tok.save(dst)


def convert_qwen2(src, dst):
    _convert_llm(src, dst, "qwen2")


def convert_qwen1(src, dst):
    _convert_llm(src, dst, "qwen1")


def convert_llama(src, dst):
    _convert_llm(src, dst, "llama")


def convert_phi(src, dst):
    _convert_llm(src, dst, "phi")

# --- vision ---
# EVA-ViT-g (vit.py) and the BLIP-2 Q-Former (qformer.py). Our vision checkpoints hold `vit.*` and
# `qformer.*` keys, the attribute names of MultimodalLM, with config.json {"vit": .., "qformer": ..}.
#
#     python convert.py eva_vit_g   eva_vit_g.pth                   out/eva_vit_g
#     python convert.py blip2_lavis blip2_pretrained_flant5xxl.pth  out/blip2_qformer
#     python convert.py blip2_hf    ~/hf/blip2-opt-2.7b             out/blip2

# ours (vit.*) = LAVIS eva_vit_g.pth   HF Blip2VisionModel (under vision_model.)    {n} = block
VIT_TABLE = [
    ("cls_token",              "embeddings.class_embedding"),
    ("pos_embed",              "embeddings.position_embedding"),
    ("patch_embed.proj",       "embeddings.patch_embedding"),
    ("blocks.{n}.norm1",       "encoder.layers.{n}.layer_norm1"),
    ("blocks.{n}.attn.qkv",    "encoder.layers.{n}.self_attn.qkv"),  # weight only: bias below
    ("blocks.{n}.attn.q_bias", None),                                 # HF: qkv.bias, _hf_qkv_bias
    ("blocks.{n}.attn.v_bias", None),
    ("blocks.{n}.attn.proj",   "encoder.layers.{n}.self_attn.projection"),
    ("blocks.{n}.norm2",       "encoder.layers.{n}.layer_norm2"),
    ("blocks.{n}.mlp.fc1",     "encoder.layers.{n}.mlp.fc1"),
    ("blocks.{n}.mlp.fc2",     "encoder.layers.{n}.mlp.fc2"),
]

# ours (qformer.layers.{n}.)  LAVIS (Qformer.bert.encoder.layer.{n}.)  HF (qformer.encoder.layer.{n}.)
QFORMER_LAYER_TABLE = [
    ("self_attn.query",  "attention.self.query",                "attention.attention.query"),
    ("self_attn.key",    "attention.self.key",                  "attention.attention.key"),
    ("self_attn.value",  "attention.self.value",                "attention.attention.value"),
    ("self_attn.dense",  "attention.output.dense",              "attention.output.dense"),
    ("self_attn.norm",   "attention.output.LayerNorm",          "attention.output.LayerNorm"),
    ("cross_attn.query", "crossattention.self.query",           "crossattention.attention.query"),
    ("cross_attn.key",   "crossattention.self.key",             "crossattention.attention.key"),
    ("cross_attn.value", "crossattention.self.value",           "crossattention.attention.value"),
    ("cross_attn.dense", "crossattention.output.dense",         "crossattention.output.dense"),
    ("cross_attn.norm",  "crossattention.output.LayerNorm",     "crossattention.output.LayerNorm"),
    ("mlp.fc1",          "intermediate_query.dense",            "intermediate_query.dense"),
    ("mlp.fc2",          "output_query.dense",                  "output_query.dense"),
    ("mlp.norm",         "output_query.LayerNorm",              "output_query.LayerNorm"),
]
QFORMER_TABLE = [("norm", "embeddings.LayerNorm", "layernorm")] + [  # + the per-layer rows, prefixed
    tuple(prefix + name for prefix, name in zip(("layers.{n}.", "encoder.layer.{n}.", "encoder.layer.{n}."), row))
    for row in QFORMER_LAYER_TABLE]

# Keys of BLIP-2 checkpoints that the query path never reads (BERT text path, LM projections,
# stage-1 contrastive/matching heads); anything else unknown is an error.
BLIP2_LAVIS_UNUSED = [
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",  # text FFN
    r"Qformer\.cls\..*",                                              # MLM head
    r"(t5_proj|opt_proj|llm_proj|vision_proj|text_proj|itm_head)\..*", r"temp",
]
BLIP2_HF_UNUSED = [
    r"(language_projection|language_model)\..*",
    r"qformer\.embeddings\..*", r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*",
    r"(vision_projection|text_projection|itm_head)\..*",
]


def _table_rules(table, src_col, src_prefix, dst_prefix):
    """Regex rules from one column of a rename table: whole parameters, or modules' weight/bias."""
    rules = []
    for row in table:
        if row[src_col] is None:
            continue
        pattern = re.escape(src_prefix + row[src_col]).replace(r"\{n\}", r"(?P<n>\d+)")
        target = dst_prefix + row[0].replace("{n}", r"\g<n>")
        rules.append((pattern + r"(?P<leaf>\.weight|\.bias|)", target + r"\g<leaf>"))
    return rules


def _hf_qkv_bias(match, t):
    # HF fuses cat(q_bias, k_bias, v_bias). EVA has no key bias: its slot is zeros in converted
    # checkpoints, and is dropped even if not, because softmax ignores the constant q.k_bias shift.
    q, _, v = t.chunk(3)
    n = match.group("n")
    return {f"vit.blocks.{n}.attn.q_bias": q, f"vit.blocks.{n}.attn.v_bias": v}


def _drop_last_block(src, prefix, depth):
    # BLIP-2 runs blocks 0..depth-1 of the depth+1 in eva_vit_g.pth and uses that output ("the
    # second-last layer"): the last block is dropped here by name, never by a non-strict load.
    return {k: v for k, v in src.items() if not k.startswith(f"{prefix}blocks.{depth}.")}


def vision_state(src, kind, vit_config=None):
    """Rename a public vision checkpoint to our `vit.*` / `qformer.*` keys.

    kind: 'eva_vit_g' (LAVIS flat file), 'blip2_lavis' (LAVIS BLIP-2: Q-Former, ln_vision, queries,
    and the ViT if present), 'blip2_hf' (HF Blip2Model / Blip2ForConditionalGeneration). The ViT
    keeps vit_config.depth blocks (default: the eva_vit_g preset, 39) and its pos_embed is resized
    to vit_config.img_size. Raises CheckpointError on any key neither renamed nor listed as unused.
    """
    vit_config = vit_config or ViTConfig.preset("eva_vit_g")
    prefix = {"eva_vit_g": "", "blip2_lavis": "visual_encoder."}.get(kind)
    blocks = {int(m.group(1)) for m in (re.match(re.escape(prefix or "") + r"blocks\.(\d+)\.", k) for k in src) if m}
    # eva_vit_g.pth holds all 40 blocks (BLIP-2 runs 39 and drops the last); a BLIP-2 .pth holds the 39 it runs.
    # Fewer blocks than that is a partial file (extra ones are unexpected keys, reported below).
    stored = vit_config.depth + (kind == "eva_vit_g")
    if prefix is not None and blocks and not set(range(stored)) <= blocks:
        raise CheckpointError(f"ViT blocks {min(blocks)}..{max(blocks)} ({len(blocks)}) in the file, expected "
                              f"0..{stored - 1} (BLIP-2 runs {vit_config.depth}{' and drops the last' if kind == 'eva_vit_g' else ''}): "
                              f"a partial file, or one with fewer blocks (convert it with "
                              f"--vit_depth={len(blocks) - (kind == 'eva_vit_g')})")
    if kind == "eva_vit_g":
        out = remap(_drop_last_block(src, "", vit_config.depth), _table_rules(VIT_TABLE, 0, "", "vit."))
    elif kind == "blip2_lavis":
        rules = (_table_rules(VIT_TABLE, 0, "visual_encoder.", "vit.")
                 + _table_rules(QFORMER_TABLE, 1, "Qformer.bert.", "qformer.")
                 + [(r"query_tokens|ln_vision\.(weight|bias)", r"qformer.\g<0>")])
        out = remap(_drop_last_block(src, "visual_encoder.", vit_config.depth), rules, BLIP2_LAVIS_UNUSED)
    elif kind == "blip2_hf":
        rules = ([(r"vision_model\.encoder\.layers\.(?P<n>\d+)\.self_attn\.qkv\.bias", _hf_qkv_bias)]
                 + _table_rules(VIT_TABLE, 1, "vision_model.", "vit.")
                 + _table_rules(QFORMER_TABLE, 2, "qformer.", "qformer.")
                 + [(r"vision_model\.post_layernorm\.(weight|bias)", r"qformer.ln_vision.\1"),
                    (r"query_tokens", "qformer.query_tokens")])
        out = remap(src, rules, BLIP2_HF_UNUSED)
    else:
        raise ValueError(f"unknown vision checkpoint kind {kind!r}")
    if "vit.pos_embed" in out:
        out["vit.pos_embed"] = interpolate_pos_embed(out["vit.pos_embed"], vit_config.grid)
    return out


def _vision_module(vit_config, qformer_config):
    """A meta-device container named like MultimodalLM (`vit`, `qformer`) to check and save weights."""
    module = torch.nn.Module()
    with torch.device("meta"):
        if vit_config:
            module.vit = EVAViT(vit_config)
        if qformer_config:
            module.qformer = QFormer(qformer_config)
    return module


def _save_vision(dst, state, vit_config, qformer_config):
    module = _vision_module(vit_config, qformer_config)
    dtypes = {t.dtype for t in state.values()}
    module.to(dtypes.pop() if len(dtypes) == 1 else torch.float32)  # an all-fp16 file stays fp16
    ckpt.load_into(module, state, cast=True)  # an upsized fp16 pos_embed is fp32: back to the file's dtype
    ckpt.save(dst, ckpt.state_of(module), {name: asdict(c) for name, c in (("vit", vit_config), ("qformer", qformer_config)) if c})
    print(f"{len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.1f}M parameters")


def _hf_vision_configs(src):
    """ViTConfig, QFormerConfig from an HF Blip2 config.json (HF's defaults are BLIP-2's, as ours)."""
    path = os.path.join(src, "config.json")
    cfg = {}
    if os.path.isdir(src) and os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
    v, q = cfg.get("vision_config", {}), cfg.get("qformer_config", {})
    for name, sub in (("vision_config", v), ("qformer_config", q)):
        if sub.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{path}: {name}.hidden_act {sub['hidden_act']!r}, expected exact 'gelu'")
    vit = ViTConfig.preset("eva_vit_g", **{ours: v[hf] for ours, hf in (
        ("img_size", "image_size"), ("patch_size", "patch_size"), ("width", "hidden_size"),
        ("depth", "num_hidden_layers"), ("n_head", "num_attention_heads"), ("mlp_dim", "intermediate_size")) if hf in v})
    qformer = QFormerConfig.preset("blip2", encoder_width=vit.width, **{ours: src_cfg[hf] for ours, hf, src_cfg in (
        ("hidden", "hidden_size", q), ("n_layer", "num_hidden_layers", q), ("n_head", "num_attention_heads", q),
        ("ffn", "intermediate_size", q), ("cross_every", "cross_attention_frequency", q),
        ("num_query", "num_query_tokens", cfg)) if hf in src_cfg})
    return vit, qformer


def convert_eva_vit_g(src, dst, vit_config=None):
    """LAVIS eva_vit_g.pth -> our checkpoint with `vit.*` (default config: the eva_vit_g preset)."""
    vit_config = vit_config or ViTConfig.preset("eva_vit_g")
    _save_vision(dst, vision_state(read_state_dict(src), "eva_vit_g", vit_config), vit_config, None)


def convert_blip2_lavis(src, dst, vit_config=None, qformer_config=None):
    """LAVIS BLIP-2 .pth -> `qformer.*` (+ `vit.*` if the file holds the ViT); default presets."""
    vit_config = vit_config or ViTConfig.preset("eva_vit_g")
    state = vision_state(read_state_dict(src), "blip2_lavis", vit_config)
    has_vit = any(k.startswith("vit.") for k in state)
    _save_vision(dst, state, vit_config if has_vit else None, qformer_config or QFormerConfig.preset("blip2"))


def convert_blip2_hf(src, dst):
    """HF Blip2 checkpoint directory (or weights file, then default shapes) -> `vit.*` + `qformer.*`."""
    vit_config, qformer_config = _hf_vision_configs(src)
    _save_vision(dst, vision_state(read_state_dict(src), "blip2_hf", vit_config), vit_config, qformer_config)


# --- multimodal ---
# MiniGPT4Qwen's own training checkpoints, and our pipeline's stage shards merged into one model.

def mpp_state(path):
    """A MiniGPT4Qwen / MPP-Qwen-Next checkpoint as our keys: stage 1 (`model.pth`) holds llm_proj.*,
    stage 2 (`unfreeze_llm_model.pth`) also the LLM under llm_model.* (Qwen v1 `transformer.*` or
    Qwen2 `model.*` names). Every key is consumed: upstream's own converter loads with
    strict=False and so silently drops the fine-tuned LLM."""
    src = read_state_dict(path)
    llm = {k[len("llm_model."):]: t for k, t in src.items() if k.startswith("llm_model.")}
    out = remap({k: t for k, t in src.items() if not k.startswith("llm_model.")}, [(r"llm_proj\.(.*)", r"llm_proj.\1")])
    if llm:
        v1 = any(k.startswith("transformer.") for k in llm)
        rules, ignore = (QWEN1_RULES, QWEN1_IGNORE) if v1 else (QWEN2_RULES, QWEN2_IGNORE)
        out.update({"llm." + k: t for k, t in remap(llm, rules, ignore).items()})
    return out


def convert_minigpt4qwen(src, dst):
    """A MiniGPT4Qwen / MPP-Qwen-Next stage checkpoint -> our keys, for train.py --init_proj and
    MultimodalLM.from_parts(proj=...)."""
    state = mpp_state(src)
    parts = sorted({k.split(".")[0] for k in state})
    ckpt.save(dst, state, {"minigpt4qwen": os.path.basename(os.fspath(src)), "parts": parts})
    print(f"{len(state)} tensors ({', '.join(parts)})")


def convert_minigpt4(src, dst):
    """MiniGPT-4's pretrained_minigpt4.pth (its only trained part, `llama_proj` 768 -> 4096, under
    "model") -> llm_proj.*, for MultimodalLM.from_parts(proj=...) and train.py --init_proj; any
    other key is refused."""
    state = remap(read_state_dict(src), [(r"llama_proj\.(weight|bias)", r"llm_proj.\1")])
    ckpt.save(dst, state, {"minigpt4": os.path.basename(os.fspath(src)), "parts": ["llm_proj"]})
    print(f"{len(state)} tensors (llm_proj)")


def convert_stages(src, dst):
    """Merge the stage shards of a pipeline save (a directory of stage<s>-of-<p>.safetensors, as
    train.py --num_stages writes into each step directory) into one checkpoint that chat.py and
    single-process training load. The model config travels in every shard's metadata; the
    tokenizer is taken from beside the shards if it is there."""
    src = ckpt.resolve(src)
    paths = sorted(os.path.join(src, f) for f in os.listdir(src) if re.fullmatch(r"stage\d+-of-\d+\.safetensors", f))
    if not paths:
        raise CheckpointError(f"{src}: no stage<s>-of-<p>.safetensors shards")
    state, meta = ckpt.merge_stage_shards(paths)
    if "config" not in meta:
        raise CheckpointError(f"{paths[0]}: no model config in the shard's metadata")
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    model = MultimodalLM.from_state(state, json.loads(meta["config"]), dtype)
    has_tok = any(os.path.exists(os.path.join(src, f)) for f in ("tokenizer.tiktoken", "tokenizer.model"))
    extra = Tokenizer.load(src).files() if has_tok else {}
    model.save(dst, extra=extra)


def convert_lora(src, dst):
    """Merge a LoRA run's adapter-only checkpoint into its base: the base is rebuilt from the run's
    train config and checked against the saved fingerprint (train.load_lora), each adapter is folded
    into its weight (W += alpha/r * B A), and the result is one ordinary checkpoint, with the
    tokenizer, that chat.py and further training load."""
    model, tok = train.load_lora(src)
    lora.merge(model).save(dst, extra=tok.files(), train=ckpt.load_config(src)["train"])


def main(argv):
    """python convert.py KIND SRC DST [--vit_depth=N]; every convert_<kind>(src, dst) above is a kind.
    --vit_depth converts an EVA-ViT-g file with N + 1 blocks (a rehearsal's, rehearse.py --depth)."""
    kinds = {name[len("convert_"):]: fn for name, fn in globals().items() if name.startswith("convert_")}
    depth = [a for a in argv if a.startswith("--vit_depth=")]
    args = [a for a in argv if a not in depth]
    if len(args) != 3 or args[0] not in kinds or (depth and (args[0] not in ("eva_vit_g", "blip2_lavis")
                                                             or not depth[-1].split("=")[1].isdigit())):
        sys.exit(f"usage: python convert.py {{{'|'.join(kinds)}}} SRC DST  (eva_vit_g, blip2_lavis: [--vit_depth=N])")
    kind, src, dst = args
    kw = {"vit_config": ViTConfig.preset("eva_vit_g", depth=int(depth[-1].split("=")[1]))} if depth else {}
    try:
        kinds[kind](src, dst, **kw)
    except CheckpointError as e:
        sys.exit(f"error: {src}: {e}" if src not in str(e) else f"error: {e}")
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1:])
