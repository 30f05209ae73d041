"""
Train nanoMPP: the MiniGPT4Qwen / MPP-Qwen-Next recipe (and TinyGPT-V's) as one script.

With no arguments it trains the toy model (the real architecture at tiny sizes) from scratch on
the built-in synthetic dataset on the CPU, evaluates held-out exact-match accuracy per task and
writes a checkpoint to out/toy/ where `python chat.py` finds it.

    python train.py                                    # the toy: 2 processes x 16 rows, ~4.5 min on 2 cores
    python train.py --cpu_processes=1 --batch_size=32  # the same rows per step in 1 process
    python train.py --preset=toy-long                  # 10,000 steps
    python train.py --max_iters=2000 --batch_size=8    # any Config field as --key=value
    python train.py --resume                           # continue out/<preset>/ exactly
    python train.py --init=out/toy --freeze=sft --lora_r=8 --out_dir=out/lora  # LoRA (lora.py) on the LLM
    python train.py --preset=mpp-qwen7b-sft --plan --nproc=8 --device_memory=24GB  # memory per GPU (plan.py)
    torchrun --nproc_per_node=4 train.py               # data parallel, one node
    torchrun --nproc_per_node=4 train.py --num_stages=2    # 2 pipeline stages x 2 replicas
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 train.py --preset=mpp-qwen7b-sft

Loss normalisation: the step's loss is sum(per-token or per-sample losses) / count, where count is
the number of supervised tokens (or samples) of the whole step, all microbatches and all ranks,
computed before any forward. So accumulation, DDP and the pipeline give the single-batch gradients.

Checkpoints (ckpt.py): every save is a new out_dir/step-NNNNNN directory that out_dir/latest points
to once it is complete, so a crash at any instant leaves the previous step whole; --resume refuses
a step directory whose files belong to different steps.

At about 780 lines this is over twice nanoGPT's train.py because it is the one script for every
run: the toy's from-scratch init and curriculum, the public presets, DDP (plain `python` starts it
itself with --cpu_processes, runtime.launch), pipeline stages, LoRA, --plan, background batch
building, and saves that survive a crash. The held-out exact-match evaluation is evaluate.py's.
Read it top to bottom: config, model and data, checkpoints, the step, train().
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist

import ckpt
import lora
import plan
import runtime
from data import IMAGE_TOKEN, LLM_TEMPLATES, TEMPLATES, VLDataset, collate
from evaluate import accuracy_table, evaluate, plot_losses
from model import MMConfig, MultimodalLM, frozen_parts, supervised_count
from pipeline import PipelineRunner, make_groups
from qformer import QFormerConfig
from qwen import QwenConfig
from synthetic import chance_levels, make_synthetic
from tokenizer import Tokenizer
from vit import ViTConfig


@dataclass
class Config:
    preset: str = "toy"
    # data: 'synthetic' (built in) or a MiniGPT4Qwen / LLaVA JSON file with its image folder
    data: str = "synthetic"
    val_data: str = ""
    image_root: str = ""
    synthetic_root: str = "data/synthetic"
    n_train: int = 39600
    count_share: int = 4         # synthetic count rows per row of each other task: counting generalises
                                 # slowest (the toy memorises a few thousand count images within two
                                 # epochs: training loss near 0, held-out accuracy near 90%)
    n_val: int = 800
    augment: bool = False        # random crop + flip; off for the toy (a flip turns left into right)
    num_workers: int = 0         # processes that build the next steps' batches (0: the training process)
    max_len: int = 256
    max_frames: int = 2          # video frames the model sees (the synthetic videos have 4)
    # The warm-up draws from the rows of curriculum_tasks (rows' `task` field), the rest of the run
    # from every row plus the rows of oversample; a task named k times has its rows there k times.
    # Half the toy's warm-up is position rows: a toy that learns count and shape first can hold
    # position at chance for thousands of steps (README, "What changed and why")
    curriculum_tasks: str = "position,position,position,position,count,shape,shape,caption"
    curriculum_iters: int = 800  # steps of warm-up
    oversample: str = "compare,compare,position,shape"  # after the warm-up: compare 3x, position and shape 2x
    # model: 'toy' (built here) or an MM_PRESETS name; weights from convert.py output
    model: str = "toy"
    init: str = ""               # one of our multimodal checkpoints (e.g. a pretrain run's out_dir)
    init_vision: str = ""        # else: convert.py vision dirs (comma separated), LLM dir, llm_proj
    init_llm: str = ""
    init_proj: str = ""
    tokenizer: str = ""          # a saved Tokenizer dir; default: init's, or the toy's corpus words
    freeze: str = ""             # comma separated parts (vit,qformer,proj,llm) or 'pretrain'/'sft'
    lora_r: int = 0              # > 0: LoRA adapters of this rank on the LLM (lora.py), whose base stays frozen
    lora_alpha: float = 16.0     # the adapters' update is scaled by lora_alpha / lora_r
    lora_targets: str = "all"    # the blocks' Linears that get one: 'all' or names, e.g. q_proj,v_proj
    loss_norm: str = "sample"
    image_size: int = 36
    patch_size: int = 6          # the toy ViT's (a public ViT keeps its own): 6 x 6 patches + CLS = 37 tokens
    num_query: int = 16
    # optimisation: AdamW, linear warmup then cosine to min_lr
    batch_size: int = 16         # per rank and microbatch (the toy: 2 processes x 16 = 32 rows a step)
    grad_accum: int = 1
    max_iters: int = 3000
    lr: float = 1e-3
    min_lr: float = 1e-4
    vision_lr_scale: float = 1.0  # lr multiplier for vit + qformer
    warmup_iters: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"          # 'auto' (bf16 where supported, else fp32), 'bf16', 'fp32'
    frozen_dtype: str = "fp32"   # the frozen parts' weights: 'bf16' halves them (no master copy needed)
    grad_checkpointing: bool = False
    num_stages: int = 1          # > 1: pipeline parallel (torchrun, world size a multiple of it)
    schedule: str = "1f1b"
    timeout: float = 60.0        # seconds any collective may wait before the rank reports its peers as failed
    # bookkeeping
    out_dir: str = ""            # default out/<preset>
    eval_every: int = 0          # 0: evaluate once, at the end
    eval_samples: int = 800
    log_every: int = 10
    ckpt_every: int = 1000
    resume: bool = False
    seed: int = 0
    threads: int = 1             # torch CPU threads per process (0 = torch's default)
    cpu_processes: int = 2       # plain `python train.py` on a CPU runs as this many data-parallel
                                 # gloo processes, one per core: tiny matrices keep one thread busy,
                                 # not two, so a second core needs a second process. (On one core the
                                 # two share it: the same rows, the same run, only slower.)
                                 # (Not `nproc`: torchrun would take --nproc as its --nproc-per-node.)


# The public recipes (MPP-Qwen-Next's configs; docs/reference.md): the ViT, Q-Former and queries stay
# frozen; bf16; AdamW betas (0.9, 0.99), eps 1e-7, clip 1.0; paths are what convert.py was told to write.
# Frozen parts are kept in bf16 (frozen_dtype): they need no fp32 master copy, no gradient and no
# optimizer state. Batch sizes, stages and checkpointing are what `python train.py --preset=NAME
# --plan` says fits the seed's GPUs (24 GB each; README "Memory plan").
_BLIP2 = dict(init_vision="checkpoints/eva_vit_g,checkpoints/blip2", image_size=224, num_query=32, max_frames=32,
              augment=True, loss_norm="token", eps=1e-7, dtype="bf16", frozen_dtype="bf16", min_lr=0.0,
              image_root="data/images", eval_every=0, ckpt_every=200, threads=0, cpu_processes=1, curriculum_iters=0, oversample="",
              num_workers=4)
# MPP-Qwen-Next stage 1: only llm_proj learns, lr 1e-3, warmup 3%, max_txt_len 512, global batch 256
_PRETRAIN = dict(_BLIP2, freeze="pretrain", max_len=512, lr=1e-3, data="data/llava_pretrain.json")
# stage 2: llm_proj + the whole LLM from stage 1's output, lr 2e-5, warmup 10%, max_txt_len 1536, global batch 128
_SFT = dict(_BLIP2, freeze="sft", max_len=1536, lr=2e-5, grad_checkpointing=True, data="data/sft.json")
TRAIN_PRESETS = {
    "toy": dict(),
    "toy-long": dict(max_iters=10000, eval_every=2500, ckpt_every=2500),
    # MPP-Qwen-Next on 8x RTX 3090: pretrain PP2 x DP4 (--num_stages=2), 4 replicas x 4 x 16 = 256;
    # microbatch 4, not 8: the plan puts 8 x 512 at 27 GB on stage 0 (fp32 logits of 152k tokens)
    "mpp-qwen7b-pretrain": dict(_PRETRAIN, model="minigpt4qwen", init_llm="checkpoints/qwen7b-chat",
                                tokenizer="checkpoints/qwen7b-chat", num_stages=2, batch_size=4, grad_accum=16,
                                warmup_iters=60, max_iters=2000),
    # SFT PP8 x DP1 (--num_stages=8): 1 replica x 2 x 64 = 128 (the plan: microbatch 4 needs 24.6 GB)
    "mpp-qwen7b-sft": dict(_SFT, model="minigpt4qwen", init="out/mpp-qwen7b-pretrain", num_stages=8,
                           batch_size=2, grad_accum=64, warmup_iters=100, max_iters=1000),
    # MPP-Qwen14B: both stages on 6x RTX 4090; Qwen-14B-Chat's 40 blocks, llm_proj 768 -> 5120.
    # pretrain PP2 x DP3: 3 x 4 x 21 = 252 (256 is no multiple of 3), checkpointing to fit 24 GB.
    # SFT PP6 x DP1, 1 x 1 x 128: full fp32 AdamW over 14.2B parameters is 35 GB a stage, so the
    # plan says it does NOT fit 6x 24 GB (the seed's run cannot have been this; see README)
    "mpp-qwen14b-pretrain": dict(_PRETRAIN, model="mpp-qwen14b", init_llm="checkpoints/qwen14b-chat",
                                 tokenizer="checkpoints/qwen14b-chat", num_stages=2, batch_size=4, grad_accum=21,
                                 grad_checkpointing=True, warmup_iters=60, max_iters=2000),
    "mpp-qwen14b-sft": dict(_SFT, model="mpp-qwen14b", init="out/mpp-qwen14b-pretrain", num_stages=6,
                            batch_size=1, grad_accum=128, warmup_iters=100, max_iters=1000),
    # MiniGPT4Qwen (lavis/projects/deepspeed/train_zero0_3090x4.yaml): one stage on its 18.8k
    # instructions, only llm_proj learns; lr 1e-4 -> 1e-6, 500 warm-up steps, 10 epochs, wd 0.05,
    # max_txt_len 256 (image tokens included, as here), micro batch 2 x 16 accumulation x 4 GPUs = 128. Here on ONE 24 GB card:
    # 2 x 64 = the same 128 per step; 18.8k / 128 = 147 steps an epoch, 10 epochs.
    "minigpt4qwen": dict(_BLIP2, model="minigpt4qwen", init_llm="checkpoints/qwen7b-chat",
                         tokenizer="checkpoints/qwen7b-chat", freeze="pretrain", max_len=256,
                         batch_size=2, grad_accum=64, lr=1e-4, min_lr=1e-6, warmup_iters=500, max_iters=1470,
                         weight_decay=0.05, data="data/minigpt4qwen_instructions.json"),
    # MPP-Qwen-Next's stage 1 recipe on the small Qwen2.5-Instruct LLMs, one 24 GB GPU, 8 x 32 = 256
    # (our choice; microbatch 8: the fp32 logits over 152k tokens dominate these small models)
    "mpp-qwen2.5-0.5b-pretrain": dict(_PRETRAIN, model="mpp-qwen2.5-0.5b", init_llm="checkpoints/qwen2.5-0.5b",
                                      tokenizer="checkpoints/qwen2.5-0.5b", batch_size=8, grad_accum=32,
                                      warmup_iters=60, max_iters=2000),
    "mpp-qwen2.5-1.5b-pretrain": dict(_PRETRAIN, model="mpp-qwen2.5-1.5b", init_llm="checkpoints/qwen2.5-1.5b",
                                      tokenizer="checkpoints/qwen2.5-1.5b", batch_size=8, grad_accum=32,
                                      warmup_iters=60, max_iters=2000),
    # TinyGPT-V style: Phi-2 behind the two-Linear projection, projection trained first
    "tinygptv-phi2": dict(_BLIP2, model="tinygpt-v", init_llm="checkpoints/phi-2", tokenizer="checkpoints/phi-2",
                          freeze="pretrain", batch_size=8, grad_accum=4, lr=1e-3, min_lr=1e-5, warmup_iters=100,
                          max_iters=2000, data="data/llava_pretrain.json"),
    # MiniGPT-4 stage 2 (train_configs/minigpt4_stage2_finetune.yaml): only llm_proj learns, from the
    # stage-1 projection, on cc_sbu_align: lr 3e-5 -> 1e-5, 200 warm-up of 1000 steps, batch 12, wd 0.05
    "minigpt4-vicuna7b-finetune": dict(_BLIP2, model="minigpt4-vicuna7b", init_llm="checkpoints/vicuna-7b",
                                       tokenizer="checkpoints/vicuna-7b", init_proj="checkpoints/minigpt4-proj",
                                       freeze="pretrain", max_len=256, batch_size=12, lr=3e-5, min_lr=1e-5,
                                       warmup_iters=200, max_iters=1000, weight_decay=0.05, eps=1e-8, beta2=0.999,
                                       data="data/cc_sbu_align.json"),
}


FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ConfigError(ValueError):
    pass


def parse_value(key, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--{key}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{key}: expected {kind.__name__}, got {text!r}") from None


def parse_args(argv):
    """['--key=value', ...] -> Config: the preset's values, then the overrides, type-checked.
    A bare `--flag` sets a bool field to true."""
    defaults, names, pairs = Config(), [f.name for f in fields(Config)], []
    for arg in argv:
        key, eq, text = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
        if key not in names or not arg.startswith("--"):
            raise ConfigError(f"unknown config key {arg!r}; keys: {', '.join(names)}")
        if not eq and type(getattr(defaults, key)) is not bool:
            raise ConfigError(f"--{key} needs a value: --{key}=...")
        pairs.append((key, text if eq else "true"))
    preset = dict(pairs).get("preset", "toy")
    if preset not in TRAIN_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(TRAIN_PRESETS)}")
    cfg = Config(**TRAIN_PRESETS[preset], preset=preset)
    for key, text in pairs:
        setattr(cfg, key, parse_value(key, text, getattr(defaults, key)))
    if cfg.frozen_dtype not in FROZEN_DTYPES:
        raise ConfigError(f"--frozen_dtype={cfg.frozen_dtype!r}: expected one of {', '.join(FROZEN_DTYPES)}")
    if cfg.frozen_dtype != "fp32" and cfg.dtype != "bf16":
        raise ConfigError(f"--frozen_dtype={cfg.frozen_dtype} needs --dtype=bf16: the bf16 frozen parts and the "
                          f"fp32 trainable ones meet inside one autocast (got --dtype={cfg.dtype})")
    if cfg.num_stages < 1:
        raise ConfigError(f"--num_stages={cfg.num_stages}: expected 1 or more")
    cfg.out_dir = cfg.out_dir or os.path.join("out", preset)
    return cfg

# ----------------------------------------------------------------------------- model and data


def sincos_2d(grid, width):
    """Fixed 2D sin-cos position table [1, 1 + grid^2, width] (MAE); the CLS slot gets zeros.
    A from-scratch toy learns *where* things are far sooner from this than from random noise."""
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))
    table = [f(p.flatten()[:, None] * freqs) for p in (x, y) for f in (torch.sin, torch.cos)]
    return torch.cat((torch.zeros(1, width), torch.cat(table, 1)))[None]


def toy_config(cfg, tok):
    vit = ViTConfig(img_size=cfg.image_size, patch_size=cfg.patch_size, width=64, depth=2, n_head=4, mlp_dim=256)
    qformer = QFormerConfig(hidden=64, n_layer=2, n_head=4, ffn=256, num_query=cfg.num_query, encoder_width=64,
                            cross_every=1)
    llm = replace(QwenConfig.preset("tiny"), vocab_size=-(-tok.n_vocab // 64) * 64, n_layer=2, n_embd=64,
                  n_head=4, n_kv_head=4, intermediate_size=192, rope_theta=10000.0, max_seq_len=cfg.max_len)
    return MMConfig(vit=vit, qformer=qformer, llm=llm, loss_norm=cfg.loss_norm, image_token_id=tok.token_id(IMAGE_TOKEN))


@torch.no_grad()
def toy_init(model):
    """Re-initialise the from-scratch toy for tiny widths. BERT's and Qwen's std 0.02 suit widths
    of 768+; at width 64 every Linear shrinks its input ~8x, so the post-norm Q-Former's output
    barely depends on the image (its std over images is ~1e-3 of its std over queries) and vision
    learns nothing for hundreds of steps. LeCun-normal Linears (std fan_in^-0.5; embeddings and the
    tied head keep 0.02) keep the signal, distinct unit-scale queries attend to different places,
    and a fixed 2D sin-cos table tells the ViT where each patch is."""
    for m in [*model.vit.modules(), *model.qformer.modules(), *model.llm_proj.modules(), *model.llm.layers.modules()]:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    model.qformer.query_tokens.normal_()
    model.vit.pos_embed.copy_(sincos_2d(model.vit.config.grid, model.vit.config.width))


def build(cfg, words, lazy=False):
    """(model, tokenizer, state) from the config: the toy from scratch (state None), or converted
    checkpoints. lazy (a pipeline run): a model built from checkpoints stays on the meta device and
    `state` holds its memory-mapped tensors, for PipelineRunner to load only its stage's keys."""
    overrides = dict(loss_norm=cfg.loss_norm, **({"freeze": freeze_arg(cfg.freeze)} if cfg.freeze else {}))
    state = None
    if cfg.init:
        model = MultimodalLM.from_checkpoint(cfg.init, lazy=lazy, **overrides)
        tok = Tokenizer.load(cfg.tokenizer or cfg.init)
    elif cfg.model == "toy":
        tok = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else Tokenizer.toy(words + ["You", "helpful", "Img"])
        model = MultimodalLM(replace(toy_config(cfg, tok), **overrides))
        toy_init(model)
    else:
        tok = Tokenizer.load(cfg.tokenizer)
        preset = MMConfig.preset(cfg.model)
        check_parts(cfg, tok)
        model = MultimodalLM.from_parts(cfg.init_vision.split(","), cfg.init_llm, cfg.init_proj or None,
                                        image_size=cfg.image_size, llm_type=preset.llm_type, proj_type=preset.proj,
                                        proj_hidden=preset.proj_hidden, image_token_id=tok.token_id(IMAGE_TOKEN),
                                        lazy=lazy, **overrides)
    if isinstance(model, tuple):
        model, state = model
    model.cast_frozen(FROZEN_DTYPES[cfg.frozen_dtype])  # lazy: on meta; the stage's load casts to it
    if cfg.grad_checkpointing:
        model.vit.grad_checkpointing = model.llm.grad_checkpointing = True
    if cfg.lora_r:  # frozen before a pipeline slices the model: a frozen tied head shares no gradient
        model.llm.requires_grad_(False)
    return model, tok, state


def load_lora(d):
    """(model with its adapters, tokenizer) of a LoRA run's checkpoint: the base rebuilt as the run
    built it (from its train config: init, init_* paths or the toy's seed) and checked against the
    saved fingerprint, then the adapters and the other trained tensors loaded."""
    saved = ckpt.load_config(d)
    lora.check_base(d, saved)
    known = {f.name for f in fields(Config)}
    cfg = Config(**{k: v for k, v in saved["train"].items() if k in known})
    cfg.tokenizer = cfg.tokenizer or ckpt.resolve(d)  # a toy's vocabulary is saved beside the adapters
    torch.manual_seed(cfg.seed)  # a from-scratch base is its seed's
    model, tok, _ = build(cfg, [])
    lora.check_base(d, saved, lora.fingerprint(ckpt.state_of(model)))
    lora.add_adapters(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.seed, saved["lora"]["base"])
    lora.load_trainable(model, ckpt.read_file(os.path.join(ckpt.resolve(d), lora.ADAPTERS)))
    return model, tok


def check_parts(cfg, tok):
    """The converted parts fit together and fit the preset's stage, checked from their config.json
    before any weight is read: the tokenizer fits the LLM's embedding, and a stage-1 run (LLM frozen)
    is not handed a stage-2 checkpoint whose fine-tuned LLM would silently replace the base one."""
    llm = ckpt.load_config(cfg.init_llm)
    if tok.n_vocab > llm["vocab_size"]:
        raise ckpt.CheckpointError(f"--tokenizer={cfg.tokenizer} has {tok.n_vocab} tokens but the LLM --init_llm="
                                   f"{cfg.init_llm} has {llm['vocab_size']} embedding rows: a tokenizer of another model?")
    parts = ckpt.load_config(cfg.init_proj).get("parts", []) if cfg.init_proj else []
    freeze = freeze_arg(cfg.freeze) if cfg.freeze else MMConfig.preset(cfg.model).freeze
    if "llm" in parts and "llm" in frozen_parts(freeze):
        raise ckpt.CheckpointError(f"--init_proj={cfg.init_proj} is a stage-2 checkpoint (it holds a fine-tuned LLM, "
                                   f"llm.*) but --preset={cfg.preset} freezes the LLM (stage 1): give it a stage-1 "
                                   f"model.pth (llm_proj only), or --init it into a stage-2 preset")


def freeze_arg(text):
    return text if text in ("pretrain", "sft") else tuple(p for p in text.split(",") if p)


class Cached(torch.utils.data.Dataset):
    """Without augmentation an item never changes: decode each image/video once, keep it in memory."""

    def __init__(self, ds):
        self.ds, self.items = ds, {}

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i not in self.items:
            self.items[i] = self.ds[i]
        return self.items[i]


def datasets(cfg, tok=None, config=None, pixels=True):
    """The toy corpus' words (tok None), else (train, held-out or None, chance levels or None) for
    the model `config`: its num_query and its LLM family's chat template. pixels=False (a pipeline's
    later stages): items carry tokens only, no image or video is opened."""
    words, chance = [], None
    if cfg.data == "synthetic":
        d = make_synthetic(cfg.synthetic_root, cfg.seed, cfg.n_train, cfg.n_val, cfg.image_size,
                           count_share=cfg.count_share)
        train_json, val_json, root, words = d["train"], d["val"], d["image_root"], d["words"]
    else:
        train_json, val_json, root = cfg.data, cfg.val_data, cfg.image_root
    if tok is None:
        return words
    make = lambda path, train: VLDataset(path, root, tok, config.qformer.num_query, cfg.image_size, cfg.max_len,
                                         train=train, max_frames=cfg.max_frames, template=LLM_TEMPLATES[config.llm_type])
    train = make(train_json, cfg.augment)
    train.load_media, train.frames_must_match = pixels, cfg.num_stages > 1  # every stage: the same tokens
    val = Cached(make(val_json, False)) if val_json else None  # read by rank 0 (the first stage) only
    if val_json:
        with open(val_json) as f:
            rows = [r for r in json.load(f) if "task" in r]
        chance = chance_levels(rows) if rows else None
    return (train if cfg.augment else Cached(train)), val, chance


def deal(rows, n_ranks, per_rank):
    """Split a step's rows into n_ranks hands of per_rank: row i goes to rank i % n_ranks while
    that rank has room, the rest in order to the ranks with room. So a row mostly comes back to
    the rank that decoded it before, whose Cached copy still holds its pixels (an interleaved
    split sends it to either rank and the other one decodes it again)."""
    hands, rest = [[] for _ in range(n_ranks)], []
    for i in rows:
        (hands[i % n_ranks] if len(hands[i % n_ranks]) < per_rank else rest).append(i)
    for hand in hands:
        take = per_rank - len(hand)
        hand += rest[:take]
        del rest[:take]
    return hands


class StepBatches(torch.utils.data.Dataset):
    """Step number -> this rank's microbatches of that step. Each epoch is one seeded permutation
    of the pool (drawn once per epoch), so the data position is just the step number, and a step
    holds the rows a one-process run of the whole batch draws, dealt to the ranks (deal). The
    first curriculum_iters steps draw only from curriculum_tasks' rows (a warm-up on easy
    questions); after it, from every row plus the oversample tasks' rows once more.
    A map-style dataset, so that DataLoader workers can build the next steps while this one trains."""

    def __init__(self, cfg, ds, pad_id, dp_rank, dp_size):
        self.cfg, self.ds, self.pad_id, self.dp_rank, self.dp_size = cfg, ds, pad_id, dp_rank, dp_size
        rows = getattr(ds, "ds", ds)  # the VLDataset, also under Cached
        def pool(names):  # a task named k times has its rows in the pool k times
            return [i for name in names.split(",") if name for i in rows.rows_with_task([name])]
        self.easy, self.everything = pool(cfg.curriculum_tasks), list(range(len(ds))) + pool(cfg.oversample)
        if cfg.curriculum_iters > 0 and not self.easy:
            raise ValueError(f"no training row has a task in curriculum_tasks={cfg.curriculum_tasks!r} "
                             f"(rows name it in a 'task' field); set --curriculum_iters=0 for data without tasks")
        self.per_step = cfg.batch_size * cfg.grad_accum
        self.epoch = (None, None)  # ((warm-up?, epoch), its permutation)

    def __len__(self):
        return self.cfg.max_iters

    def rows(self, step):
        cfg, warm = self.cfg, step < self.cfg.curriculum_iters
        start, pool = (0, self.easy) if warm else (cfg.curriculum_iters, self.everything)
        n = self.per_step * self.dp_size  # the step's rows, all ranks
        per_epoch = len(pool) // n
        if per_epoch == 0:
            raise ValueError(f"{len(pool)} training samples are fewer than one step needs ({n})")
        epoch, k = divmod(step - start, per_epoch)
        if self.epoch[0] != (warm, epoch):
            g = torch.Generator().manual_seed(cfg.seed + epoch)  # DistributedSampler's permutation
            self.epoch = ((warm, epoch), [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()])
        return deal(self.epoch[1][k * n:(k + 1) * n], self.dp_size, self.per_step)[self.dp_rank]

    def __getitem__(self, step):
        idx, b = self.rows(step), self.cfg.batch_size
        fixed = self.cfg.max_len if self.cfg.num_stages > 1 else None  # the pipeline sends static shapes
        with torch.random.fork_rng(devices=[]):  # augmentation drawn from (seed, step, rank): the same in any worker
            torch.manual_seed(hash((self.cfg.seed, step, self.dp_rank)) % 2 ** 63)
            return [collate([self.ds[i] for i in idx[m:m + b]], self.pad_id, fixed) for m in range(0, len(idx), b)]


def step_batches(cfg, ds, pad_id, dp_rank, dp_size, step, pin_memory=False):
    """The microbatches of step, step+1, ..., max_iters - 1, built by cfg.num_workers background
    processes (0: here, in order)."""
    steps = StepBatches(cfg, ds, pad_id, dp_rank, dp_size)
    if cfg.num_workers == 0:
        return (steps[s] for s in range(step, len(steps)))
    return iter(torch.utils.data.DataLoader(steps, batch_size=None, sampler=range(step, len(steps)),
                                            num_workers=cfg.num_workers, pin_memory=pin_memory, prefetch_factor=2))


def lr_at(cfg, step):
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    t = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)

# ----------------------------------------------------------------------------- checkpoints


def _train_state(opt, step):
    return lambda path: torch.save({"step": step, **({"optimizer": opt.state_dict()} if opt else {})}, path)


def save(cfg, model, tok, opt, step, runner=None):
    """Save `step` as one unit (ckpt.py): every file goes into a staging directory, which becomes
    out_dir/step-NNNNNN, and only then does out_dir/latest move to it and the previous step go.
    Files: the weights in our format (chat.py loads out_dir), the tokenizer, config.json with this
    run's config and step, train_state.pt (optimizer + step, the data position). A pipeline run
    also has each stage's shard and optimizer (train_state<s>.pt); rank 0 merges the shards.
    A LoRA run saves only what it trains: adapters.safetensors instead of model.safetensors, and
    config.json's "lora" section with the base's fingerprint (`python convert.py lora` merges them)."""
    d = ckpt.step_dir(cfg.out_dir, step)
    rank0 = runner is None or dist.get_rank() == 0
    tmp = ckpt.begin(d) if rank0 else ckpt.staging(d)
    if runner is not None:
        dist.barrier()  # the staging directory exists
        if dist.get_rank(runner.dp_group) == 0:  # the first replica writes each stage
            shard = runner.shard_files(step, lora.trainable(runner.module) if cfg.lora_r else None)
            ckpt.write_files(tmp, {**shard, f"train_state{runner.stage}.pt": _train_state(opt, step)})
        dist.barrier()  # every shard is on disk
        if rank0:
            paths = [os.path.join(tmp, ckpt.stage_shard_name(s, cfg.num_stages)) for s in range(cfg.num_stages)]
            state, meta = ckpt.merge_stage_shards(paths)
            opt = None  # each stage's optimizer is in its own train_state<s>.pt
            if not cfg.lora_r:
                model = MultimodalLM.from_state(state, json.loads(meta["config"]))
    if rank0:
        run = {**asdict(cfg), "step": step}
        if cfg.lora_r:
            config = {"model": model.config.to_dict(), "train": run, "lora": model.lora}
            weights = {lora.ADAPTERS: ckpt.safetensors_writer(state if runner else lora.trainable(model)),
                       "config.json": json.dumps(config, indent=2) + "\n"}
        else:
            weights = model.files(train=run)
        files = {**weights, **tok.files(), "train_state.pt": _train_state(opt, step)}
        ckpt.write_files(tmp, files)
        ckpt.commit(tmp, d)
        ckpt.set_latest(cfg.out_dir, d)
    if runner is not None:
        dist.barrier()  # nobody reads the checkpoint before it is complete


def resume(cfg, model, opt, runner=None):
    """Load out_dir's latest checkpoint into model (or this pipeline stage) and opt; returns its
    step. Refuses, naming them, files that belong to different steps. A LoRA run loads its trained
    tensors into the base it has built, after checking that base's fingerprint."""
    d = ckpt.resolve(cfg.out_dir)
    path = os.path.join(d, "train_state.pt" if runner is None else f"train_state{runner.stage}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: {path} not found (no checkpoint in {cfg.out_dir})")
    state, saved = torch.load(path, weights_only=True), ckpt.load_config(d)
    steps = {path: state["step"], os.path.join(d, "config.json"): saved["train"]["step"]}
    if cfg.lora_r:
        lora.check_base(d, saved, model.lora["base"])
    if runner is None and cfg.lora_r:
        lora.load_trainable(model, ckpt.read_file(os.path.join(d, lora.ADAPTERS)))
    elif runner is None:
        ckpt.load_into(model, ckpt.load(d)[0])
    else:
        shard = os.path.join(d, ckpt.stage_shard_name(runner.stage, runner.num_stages))
        steps[shard] = runner.load_shard(d, lora.load_trainable if cfg.lora_r else ckpt.load_into)
    if len(set(steps.values())) != 1:
        raise ckpt.CheckpointError(f"--resume: the files of {d} belong to different steps: "
                                   + ", ".join(f"{p} step {s}" for p, s in steps.items()))
    if opt is not None:
        opt.load_state_dict(state["optimizer"])
    return state["step"]

# ----------------------------------------------------------------------------- training


def step_count(micro, loss_norm, dp_group=None):
    """The step's loss denominator, known before any forward: supervised tokens (or samples) of
    all its microbatches on all data-parallel ranks."""
    count = torch.tensor(sum(supervised_count(mb, loss_norm) for mb in micro))
    if dp_group is not None:
        dist.all_reduce(count, group=dp_group)
    return max(int(count), 1)


def forward_backward(net, micro, count, ctx, device, dp_group=None):
    """Accumulate the gradients of one step (loss = sum / count over all microbatches and ranks);
    returns the step's loss. net is the model, or its DistributedDataParallel wrapper."""
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    loss = torch.zeros((), device=device)
    for i, mb in enumerate(micro):
        mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
        # DDP averages gradients over ranks, but each rank's loss is already divided by the global
        # count: scale by dp_size so the average is the sum. Sync only after the last microbatch.
        sync = net.no_sync() if dp_group is not None and i < len(micro) - 1 else nullcontext()
        with sync:
            with ctx:
                part = net(mb, count, full_logits=False)[1]  # the head only where a label is supervised
            (part * dp_size).backward()
        loss += part.detach().float()
    if dp_group is not None:
        dist.all_reduce(loss, group=dp_group)
    return loss.item()


class Interrupt:
    """First Ctrl-C: finish the current step, save, exit. Second: stop at once."""

    def __init__(self):
        self.hit = False
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def close(self):
        signal.signal(signal.SIGINT, self.previous)

    def handle(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True


def check_world(cfg, world):
    if world % cfg.num_stages:
        raise ConfigError(f"--num_stages={cfg.num_stages} needs torchrun with a multiple of {cfg.num_stages} "
                          f"processes, this run has {world}")


def setup(cfg):
    """(device, distributed, pp_group, dp_group) of this process: runtime.setup's device and
    default group, cut into pipeline and data-parallel groups when num_stages > 1."""
    check_world(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    device, distributed = runtime.setup(cfg.timeout)
    pp_group = dp_group = None
    if cfg.num_stages > 1:
        pp_group, dp_group = make_groups(cfg.num_stages, cfg.timeout)
    elif distributed:
        dp_group = dist.group.WORLD
    return device, distributed, pp_group, dp_group


def optimizer(cfg, module):
    """AdamW over the trainable parameters (None if there are none); vit + qformer get lr x vision_lr_scale."""
    vision = [p for n, p in module.named_parameters() if p.requires_grad and n.startswith(("vit.", "qformer."))]
    rest = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith(("vit.", "qformer."))]
    groups = [dict(params=vision, scale=cfg.vision_lr_scale), dict(params=rest, scale=1.0)]
    if not vision + rest:  # a pipeline stage with nothing to train (stage 1: only llm_proj, on stage 0)
        return None
    # fused: one kernel updates every tensor (on CPU 5x faster than the per-tensor loop; same update rule)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in vision + rest)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None)


class Log:
    """metrics.jsonl, the progress bar and the loss curve; everything is a no-op off rank 0."""

    def __init__(self, cfg, step, master):
        from tqdm import tqdm
        self.master, self.curve, self.val_curve = master, [], []
        self.file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if master else None
        self.bar = tqdm(total=cfg.max_iters, initial=step, disable=not master, dynamic_ncols=True)

    def write(self, record):
        if self.master:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self, out_dir):
        self.bar.close()
        if self.master:
            plot_losses(os.path.join(out_dir, "loss.png"), self.curve, self.val_curve)
            self.file.close()


def train(cfg):
    device, distributed, pp_group, dp_group = setup(cfg)
    rank = dist.get_rank() if distributed else 0
    dp_rank, dp_size = (dist.get_rank(dp_group), dist.get_world_size(dp_group)) if distributed else (0, 1)
    master = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()  # the one autocast

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, tok, state = build(cfg, datasets(cfg) if cfg.model == "toy" and not cfg.tokenizer else [], cfg.num_stages > 1)
    base = lora.fingerprint(ckpt.state_of(model) if state is None else state) if cfg.lora_r else ""
    if state is None:
        model.to(device)
    train_ds, val_ds, chance = datasets(cfg, tok, model.config, pixels=pp_group is None or dist.get_rank(pp_group) == 0)
    n_params, runner = sum(p.numel() for p in model.parameters()), None  # the whole model's, before slicing
    if cfg.num_stages > 1:  # slices the model in place: this rank keeps (and loads) its stage only
        runner = PipelineRunner(model, cfg.num_stages, cfg.schedule, pp_group, dp_group, device=device,
                                seq_len=cfg.max_len, timeout=cfg.timeout, state=state)
    module = model if runner is None else runner.module
    if cfg.lora_r:  # after slicing: each stage adds the adapters of its own blocks
        lora.add_adapters(module, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.seed, base)
    opt = optimizer(cfg, module)
    step = resume(cfg, model, opt, runner) if cfg.resume else 0
    net = model
    if distributed and runner is None:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model)

    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"{cfg.preset}: {n_params / 1e6:.2f}M parameters, {len(train_ds)} train / "
              f"{len(val_ds) if val_ds else 0} held-out samples, {dp_size} data-parallel x {cfg.num_stages} "
              f"stage(s), {'bf16' if bf16 else 'fp32'} on {device.type}, out_dir {cfg.out_dir}")
    log, stop, good_step, acc = Log(cfg, step, master), Interrupt(), step, {}
    pad = tok.token_id(TEMPLATES[LLM_TEMPLATES[model.config.llm_type]]["pad"])
    batches = step_batches(cfg, train_ds, pad, dp_rank, dp_size, step, device.type == "cuda")
    t0, c0, tokens = time.time(), time.process_time(), 0

    def run_eval():
        if not (master and val_ds and cfg.eval_samples) or (runner and good_step != step):
            return acc  # a pipeline run evaluates the merged checkpoint, so only right after a save
        eval_model = model
        if runner:  # the saved checkpoint; a LoRA run's is its adapters on the rebuilt base
            eval_model = (load_lora(cfg.out_dir)[0] if cfg.lora_r else MultimodalLM.from_checkpoint(cfg.out_dir)).to(device)
        val_loss, new = evaluate(eval_model, val_ds, tok, cfg, ctx)
        log.val_curve.append((step, val_loss))
        log.write(dict(step=step, val_loss=val_loss, accuracy=new))
        log.bar.write(f"step {step}: held-out loss {val_loss:.4f}, exact match " +
                      ", ".join(f"{t} {a:.0%}" for t, a in new.items()))
        return new

    stopping = False  # stop.hit, agreed by every rank
    try:
        while step < cfg.max_iters and not stopping:
            micro = next(batches)
            for g in opt.param_groups if opt else ():
                g["lr"] = lr_at(cfg, step) * g["scale"]
            count = step_count(micro, cfg.loss_norm, dp_group)
            if runner:
                with ctx:  # one autocast region for the step: bf16 weight copies made once, not per microbatch
                    loss = runner.step(micro, count)
                norm = runner.clip_grad_norm_(cfg.grad_clip)
            else:
                loss = forward_backward(net, micro, count, ctx, device, dp_group)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss}; stopping without saving. The last good "
                                         f"checkpoint in {cfg.out_dir} (step {good_step}) is intact.")
            if opt:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            stopping = stop.hit
            if distributed:  # a Ctrl-C lands mid-step at a different point on each rank: all stop after the same step
                hit = torch.tensor(float(stopping))
                dist.all_reduce(hit, op=dist.ReduceOp.MAX)
                stopping = bool(hit)
            tokens += sum(int(mb["attention_mask"].sum()) for mb in micro) * dp_size
            log.curve.append((step, loss))
            if step % cfg.log_every == 0 or step == cfg.max_iters:
                tps = tokens / (time.time() - t0)
                log.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
                log.write(dict(step=step, loss=loss, lr=lr_at(cfg, step - 1), grad_norm=float(norm) if norm is not None else None,
                               tokens_per_s=tps, time=time.time() - t0, cpu_time=time.process_time() - c0))
            log.bar.update(1)
            if stopping or step == cfg.max_iters or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                if master or runner:
                    save(cfg, model, tok, opt, step, runner)
                good_step = step
            if val_ds and (step == cfg.max_iters or (cfg.eval_every and step % cfg.eval_every == 0)):
                acc = run_eval()
    finally:
        stop.close()
        log.close(cfg.out_dir)
    if master:
        if stopping:
            print(f"interrupted: saved step {step} to {cfg.out_dir}; continue with --resume")
        if acc:
            print(f"held-out exact match after {step} steps ({time.time() - t0:.0f}s):\n" + accuracy_table(acc, chance))
        print(f"checkpoint: {cfg.out_dir}  (python chat.py --ckpt {cfg.out_dir})")
    if distributed:
        dist.destroy_process_group()
    return log.curve, acc


def plan_config(cfg):
    """The MMConfig a run of cfg would build, without weights: the toy's, an existing --init
    checkpoint's config.json, else the public model preset at the run's image size and queries."""
    freeze = {"freeze": freeze_arg(cfg.freeze)} if cfg.freeze else {}
    if cfg.model == "toy" and not cfg.init:
        return build(cfg, [] if cfg.tokenizer else datasets(cfg))[0].config
    if cfg.init and os.path.exists(cfg.init):
        return MMConfig.from_dict({**ckpt.load_config(ckpt.resolve(cfg.init))["model"], **freeze})
    config = MMConfig.preset(cfg.model, **freeze)
    return replace(config, vit=replace(config.vit, img_size=cfg.image_size),
                   qformer=replace(config.qformer, num_query=cfg.num_query))


def print_plan(cfg, nproc, device_memory):
    """train.py --plan: the memory per rank of this run (plan.py), no weights needed."""
    nproc = nproc or cfg.num_stages
    bf16 = cfg.dtype != "fp32"  # 'auto' is bf16 on the GPUs the plan is for
    stages = plan.plan_training(plan_config(cfg), cfg.batch_size, cfg.max_len, cfg.grad_accum, cfg.num_stages, nproc,
                                cfg.schedule, cfg.grad_checkpointing, FROZEN_DTYPES[cfg.frozen_dtype], bf16)
    print(f"{cfg.preset}: {cfg.num_stages} stage(s) x {nproc // cfg.num_stages} replica(s) = {nproc} GPUs; microbatch "
          f"{cfg.batch_size} x {cfg.max_len} tokens, {cfg.grad_accum} per step ({cfg.schedule if cfg.num_stages > 1 else 'accumulated'}); "
          f"{'autocast bf16' if bf16 else 'fp32'}, frozen parts in {cfg.frozen_dtype}, gradient checkpointing "
          f"{'on' if cfg.grad_checkpointing else 'off'}")
    print(plan.format_training(stages, device_memory))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    planning = "--plan" in argv  # --plan [--nproc=N] [--device_memory=24GB]: print the memory plan, no training
    extra = {a.partition("=")[0]: a.partition("=")[2] for a in argv if a.startswith(("--nproc=", "--device_memory="))}
    try:  # every refusal of the command line: one line, exit 2, nothing started
        if extra and not planning:
            raise ConfigError(f"{', '.join(extra)}: only with --plan")
        cfg = parse_args([a for a in argv if a != "--plan" and a.partition("=")[0] not in extra])
        nproc = parse_value("nproc", extra["--nproc"], 0) if "--nproc" in extra else 0
        memory = plan.parse_size(extra["--device_memory"]) if "--device_memory" in extra else None
        if planning:
            print_plan(cfg, nproc, memory)
            return 0
        launch = cfg.cpu_processes > 1 and "WORLD_SIZE" not in os.environ and runtime.pick_device().type == "cpu"
        check_world(cfg, cfg.cpu_processes if launch else int(os.environ.get("WORLD_SIZE", 1)))  # once, not per worker
    except ValueError as e:  # ConfigError, a bad --device_memory, or a plan that cannot be made
        print(f"error: {e}", file=sys.stderr)
        return 2
    if launch:
        datasets(cfg)  # the synthetic data is made once, here, before the workers look for it
        return runtime.launch(os.path.abspath(__file__), argv, cfg.cpu_processes)
    try:
        train(cfg)
    except (FloatingPointError, ckpt.CheckpointError) as e:  # bad checkpoints: refused before out_dir is touched
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
