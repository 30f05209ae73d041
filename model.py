"""
The MiniGPT4Qwen / MPP-Qwen-Next multimodal model, and TinyGPT-V's Phi-2 variant.

    pixels -> EVA-ViT-g -> ln_vision -> Q-Former (32 learned queries) -> llm_proj -> LLM

BLIP-2's image encoder and Q-Former turn every image into num_query vectors; `llm_proj` maps them
to the LLM width and they overwrite, in order, the input embeddings of the image tokens in the
prompt (`<ImageHere>` expands to num_query copies of `<|extra_0|>`). Everything after that is the
plain LLM of qwen.py or phi.py. The projection is one Linear (MiniGPT4Qwen) or TinyGPT-V's two
Linears 768 -> 4096 -> d with no activation between them (proj='mlp2').

The pieces are callable separately, which is how pipeline.py slices the model: `embed` (first
stage: images + token embeddings), `llm.forward_blocks` (any stage), `llm.head` + `loss_sum` (last).
Generation is the LLM's own decode loop, fed the spliced embeddings. Our checkpoints (ckpt.py) are
read and written at the bottom of this file: whole models, bare LLMs, and models assembled from
the converted public parts (convert.py writes those; this file never reads a public layout).
"""
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn

import ckpt
from phi import Phi, PhiConfig
from qformer import QFormer, QFormerConfig
from qwen import IGNORE, Qwen, QwenConfig, loss_sum, supervised
from vit import EVAViT, ViTConfig, interpolate_pos_embed

# llm_type -> (config, model); 'llama' is qwen.py's third layout, its own type for its own chat template
LLMS = {"qwen": (QwenConfig, Qwen), "phi": (PhiConfig, Phi), "llama": (QwenConfig, Qwen)}
PARTS = ("vit", "qformer", "proj", "llm")
# The frozen parts of the two public training stages (MPP-Qwen-Next); the queries and ln_vision
# belong to the Q-Former. The toy trains from scratch with nothing frozen.
FREEZE_PRESETS = {"pretrain": ("vit", "qformer", "llm"), "sft": ("vit", "qformer")}


# ----------------------------------------------------------------------------- loss

def supervised_count(batch, loss_norm="token"):
    """The loss denominator of `batch`: supervised tokens ('token') or samples with at least one
    supervised token ('sample'). Sum it over every microbatch and rank of a step, pass it as `count`."""
    sup = supervised(batch["labels"])  # the first label is never predicted
    return int(sup.sum()) if loss_norm == "token" else int(sup.any(1).sum())


# ----------------------------------------------------------------------------- image splice

def splice_images(embeds, input_ids, features, image_token_id):
    """Overwrite the image-token embeddings with image features, in reading order: row by row,
    left to right, image after image. embeds [B, T, d], features [n, num_query, d] or None."""
    slots = input_ids == image_token_id
    n, q = (0, 0) if features is None else features.shape[:2]
    if int(slots.sum()) != n * q:
        have = f"{n} images x {q} queries = {n * q}" if features is not None else "no images"
        raise ValueError(f"{int(slots.sum())} image tokens (id {image_token_id}) in input_ids but {have}: "
                         f"every image needs one <ImageHere> expanded to num_query tokens")
    if n == 0:
        return embeds
    per_row = slots.sum(1)
    if (per_row % q).any():
        row = int((per_row % q).nonzero()[0])
        raise ValueError(f"row {row} has {int(per_row[row])} image tokens, not a multiple of {q}: "
                         f"an image placeholder was cut (truncation?)")
    return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))


# ----------------------------------------------------------------------------- config and model

def frozen_parts(freeze):
    """A FREEZE_PRESETS name or an iterable of part names -> tuple of part names in PARTS order, then
    any sub-modules named part.path (e.g. 'llm.embed_tokens': rehearse.py freezes Qwen-7B's embeddings
    and head to rehearse stage 2 in 11 GB) of parts not already frozen whole."""
    if isinstance(freeze, str):
        if freeze not in FREEZE_PRESETS:
            raise ValueError(f"unknown freeze preset {freeze!r}; choose from {sorted(FREEZE_PRESETS)}")
        freeze = FREEZE_PRESETS[freeze]
    unknown = {p for p in freeze if p.split(".")[0] not in PARTS}
    if unknown:
        raise ValueError(f"unknown parts to freeze {sorted(unknown)}; parts are {list(PARTS)} (or part.submodule)")
    whole = tuple(p for p in PARTS if p in set(freeze))
    return whole + tuple(sorted(p for p in set(freeze) if "." in p and p.split(".")[0] not in whole))


@dataclass
class MMConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: object = field(default_factory=QwenConfig)  # QwenConfig or PhiConfig, as llm_type says
    llm_type: str = "qwen"         # 'qwen' (v1 and v2 layouts), 'phi' or 'llama' (a qwen.py layout)
    proj: str = "linear"           # 'linear' (MiniGPT4Qwen) or 'mlp2' (TinyGPT-V: two Linears)
    proj_hidden: int = 4096        # middle width of 'mlp2' (TinyGPT-V keeps LLaMA's 4096)
    freeze: tuple = ()             # part names (PARTS) or a FREEZE_PRESETS name
    loss_norm: str = "token"       # 'token' (MiniGPT4Qwen) or 'sample'
    image_token_id: int = 151646   # <|extra_0|> in Qwen's vocabulary; a toy tokenizer has its own

    def __post_init__(self):
        self.freeze = frozen_parts(self.freeze)
        checks = [(self.llm_type in LLMS, f"llm_type {self.llm_type!r} not in {sorted(LLMS)}"),
                  (isinstance(self.llm, LLMS.get(self.llm_type, (object,))[0]),
                   f"llm config is a {type(self.llm).__name__}, llm_type is {self.llm_type!r}"),
                  (self.proj in ("linear", "mlp2"), f"proj {self.proj!r} not in ['linear', 'mlp2']"),
                  (self.loss_norm in ("token", "sample"), f"loss_norm {self.loss_norm!r} not in ['token', 'sample']"),
                  (0 <= self.image_token_id < getattr(self.llm, "vocab_size", 0),
                   f"image_token_id {self.image_token_id} outside the LLM vocabulary: use the tokenizer's "
                   f"id of <|extra_0|>"),
                  (self.qformer.encoder_width == self.vit.width,
                   f"qformer.encoder_width {self.qformer.encoder_width} != vit.width {self.vit.width}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"MMConfig: {msg}")

    def to_dict(self):
        return {**asdict(self), "freeze": list(self.freeze)}

    @staticmethod
    def from_dict(d):
        unknown = set(d) - {f.name for f in fields(MMConfig)}
        if unknown:
            raise ValueError(f"MMConfig: unknown keys {sorted(unknown)}")
        llm_type = d.get("llm_type", "qwen")
        sub = dict(vit=ViTConfig(**d.get("vit", {})), qformer=QFormerConfig(**d.get("qformer", {})),
                   llm=LLMS[llm_type][0](**d.get("llm", {})) if llm_type in LLMS else None)
        return MMConfig(**{**d, **sub})

    @staticmethod
    def preset(name, **overrides):
        if name not in MM_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(MM_PRESETS)}")
        p = {**MM_PRESETS[name], **overrides}
        llm_cls = LLMS[p.get("llm_type", "qwen")][0]
        return MMConfig(**{**p, "vit": ViTConfig.preset(p["vit"]), "qformer": QFormerConfig.preset(p["qformer"]),
                           "llm": llm_cls.preset(p["llm"])})


# The public models (the toy's config lives in train.py: its vocabulary comes from its tokenizer)
MM_PRESETS = {
    "minigpt4qwen": dict(vit="eva_vit_g", qformer="blip2", llm="qwen7b_chat", freeze="pretrain"),
    "mpp-qwen14b": dict(vit="eva_vit_g", qformer="blip2", llm="qwen14b_chat", freeze="pretrain"),
    # Qwen2.5-Instruct has no <|extra_0|>: 151665 is the first of its spare embedding rows (151936
    # rows, 151665 tokens), the id convert.tokenizer_from_hf gives the image token
    "mpp-qwen2.5-0.5b": dict(vit="eva_vit_g", qformer="blip2", llm="qwen2.5-0.5b", freeze="pretrain",
                             image_token_id=151665),
    "mpp-qwen2.5-1.5b": dict(vit="eva_vit_g", qformer="blip2", llm="qwen2.5-1.5b", freeze="pretrain",
                             image_token_id=151665),
    # Phi-2's tokenizer has no <|extra_0|>: 50295 is the first embedding row it leaves unused
    # (51200 rows); the tokenizer must give the image token that id
    "tinygpt-v": dict(vit="eva_vit_g", qformer="blip2", llm_type="phi", llm="tinygptv", proj="mlp2",
                      freeze="pretrain", image_token_id=50295),
    # MiniGPT-4 (Vicuna v0 7B): llm_proj 768 -> 4096; Vicuna has no spare embedding row, so the image
    # slot shares <unk>'s id 0, which byte-fallback text never produces (convert.tokenizer_from_hf)
    "minigpt4-vicuna7b": dict(vit="eva_vit_g", qformer="blip2", llm_type="llama", llm="vicuna-7b",
                              freeze="pretrain", image_token_id=0),
}


class MultimodalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vit = EVAViT(config.vit)
        self.qformer = QFormer(config.qformer)
        self.llm_proj = self.proj_module(config)
        self.llm = LLMS[config.llm_type][1](config.llm)
        self.set_frozen(config.freeze)

    def parts(self):
        return {"vit": self.vit, "qformer": self.qformer, "proj": self.llm_proj, "llm": self.llm}

    def part(self, name):
        """A part ('llm') or a sub-module of one ('llm.embed_tokens')."""
        head, _, rest = name.partition(".")
        return self.parts()[head].get_submodule(rest) if rest else self.parts()[head]

    def set_frozen(self, parts):
        """requires_grad=False on exactly these parts (names or a FREEZE_PRESETS key), True elsewhere."""
        self.config.freeze = frozen_parts(parts)
        for name, module in self.parts().items():
            module.requires_grad_(name not in self.config.freeze)
        for name in self.config.freeze:
            self.part(name).requires_grad_(False)
        return self.train(self.training)

    def cast_frozen(self, dtype):
        """The frozen parts in `dtype` (e.g. bf16): they get no gradient and no optimizer state, so
        they need no fp32 master copy. On the meta device this sets the dtype a later load casts to."""
        for name in self.config.freeze:
            self.part(name).to(dtype)
        return self

    def train(self, mode=True):
        # Frozen parts stay in eval mode (as BLIP-2 keeps its frozen ViT): any dropout or
        # train-only behaviour would only add noise to features nobody learns from.
        super().train(mode)
        for name in self.config.freeze:
            self.part(name).eval()
        return self

    def encode_images(self, pixels):
        """pixels [n, 3, H, W] -> features [n, num_query, llm width].

        Video frames come here as ordinary images, in order: each frame gets its own num_query
        vectors and nothing marks time (MiniGPT4Qwen's choice). A user could add a learned
        per-frame embedding to each frame's features here, or pool features across frames to
        spend fewer LLM tokens on long videos."""
        x, grad, trainable = pixels, torch.is_grad_enabled(), False
        for module in (self.vit, self.qformer, self.llm_proj):
            # no autograd graph through a frozen prefix of the chain: nothing upstream learns
            trainable = trainable or any(p.requires_grad for p in module.parameters())
            with torch.set_grad_enabled(grad and trainable):
                x = module(x)
        return x

    def embed(self, input_ids, images=None):
        """input_ids [B, T] + images [n, 3, H, W] in sample-then-placeholder order -> [B, T, d]."""
        x = self.llm.embed_tokens(input_ids)
        has_images = images is not None and len(images) > 0
        features = self.encode_images(images) if has_images else None
        return splice_images(x, input_ids, features, self.config.image_token_id)

    def forward(self, batch, count=None, full_logits=True):
        """batch from data.collate: input_ids, labels (aligned, not shifted), attention_mask,
        images. loss = loss_sum / count, count defaulting to this batch's supervised_count; pass
        the whole step's count (all microbatches and ranks) to get the full-batch gradients.
        full_logits=False (training): the head runs only at the positions that predict a
        supervised label, which saves most of the lm_head and cross-entropy work; logits is None."""
        mask, labels = batch.get("attention_mask"), batch.get("labels")
        x = self.embed(batch["input_ids"], batch.get("images"))
        x = self.llm.forward_blocks(x, self.llm.layers, attention_mask=mask)
        if labels is None:
            return self.llm.head(x), None
        if count is None:
            count = supervised_count(batch, self.config.loss_norm)
        logits = self.llm.head(x if full_logits else x[:, :-1][supervised(labels)])  # [B, T, V] or [N, V]
        return logits if full_logits else None, loss_sum(logits, labels, self.config.loss_norm) / max(count, 1)


    def generate(self, input_ids, images=None, attention_mask=None, **kw):
        """Answer prompts about images: the spliced embeddings go through the LLM's one decode
        loop (qwen.DecoderLM.generate: LEFT padding, sampling options, stop ids, streaming)."""
        return self.llm.generate(input_ids, self.embed(input_ids, images), attention_mask, **kw)

    # ------------------------------------------------------------------------- our checkpoints

    def files(self, **sections):
        """model.safetensors + config.json {"model": config, **sections}, for ckpt.write_dir."""
        return ckpt.files(ckpt.state_of(self), {"model": self.config.to_dict(), **sections})

    def save(self, d, extra=None, **sections):
        ckpt.write_dir(d, {**self.files(**sections), **(extra or {})})

    @classmethod
    def from_state(cls, state, config, dtype=torch.float32, lazy=False):
        """Build from a state dict and a config dict (MMConfig.to_dict) on the meta device, so the
        (memory-mapped) weights are adopted, not copied; every key and shape checked. The model is
        in `dtype` whatever the file holds: fp32 master weights for training, bf16 to chat.
        lazy=True returns (the model still on the meta device, state): a pipeline stage slices it
        and loads only its own keys, so no other stage's tensor is ever read or cast."""
        with torch.device("meta"):  # no random init, no memory: load_into puts the real tensors in
            model = cls(MMConfig.from_dict(config)).to(dtype)
        return (model, state) if lazy else ckpt.load_into(model, state, cast=True)

    @classmethod
    def from_checkpoint(cls, d, dtype=torch.float32, lazy=False, **overrides):
        """From a directory written by `save` (or a training run's, following `latest`); `overrides`
        replace config fields (e.g. freeze='sft')."""
        state, cfg = ckpt.load(d)
        if "model" not in cfg:
            raise ckpt.CheckpointError(f"{d}/config.json has no 'model' section: not a nanoMPP multimodal checkpoint")
        return cls.from_state(state, {**cfg["model"], **overrides}, dtype, lazy)

    @classmethod
    def from_parts(cls, vision, llm, proj=None, dtype=torch.float32, image_size=None, lazy=False, proj_type=None,
                   **overrides):
        """Assemble converted public pieces (convert.py output): `vision` = one or more vision
        directories (eva_vit_g, blip2_lavis, blip2_hf) that together hold vit.* and qformer.*;
        `llm` = a qwen1/qwen2/phi directory; `proj` = a converted MiniGPT4Qwen checkpoint (stage 1:
        llm_proj.*; stage 2: also the fine-tuned LLM as llm.*, which replaces the base LLM), else
        llm_proj starts from nn.Linear's own init, as LAVIS builds it for pretraining. `image_size`
        rebuilds the ViT for another input size than it was converted at (pos_embed resized).
        `proj_type` is MMConfig.proj ('linear' or 'mlp2'; `proj` names the checkpoint), `overrides`
        set other MMConfig fields (image_token_id, freeze, ...)."""
        if proj_type is not None:
            overrides["proj"] = proj_type
        state, sub = {}, {}
        for d in [vision] if isinstance(vision, (str, os.PathLike)) else vision:
            cfg = ckpt.load_config(d)
            if "vit" in cfg:
                sub["vit"] = ViTConfig(**{**cfg["vit"], **({"img_size": image_size} if image_size else {})})
            if "qformer" in cfg:
                sub["qformer"] = QFormerConfig(**cfg["qformer"])
            state.update(vision_state(d, sub["vit"].grid if "vit" in cfg else None))
        part, cfg = ckpt.load(llm)
        state.update({"llm." + k: t for k, t in part.items()})
        arch = cfg.pop("arch")
        config = MMConfig(**sub, llm=LLMS[arch][0](**cfg), **{"llm_type": arch, **overrides})
        if proj is not None:
            part, _ = ckpt.load(proj)
            stray = [k for k in part if not k.startswith(("llm_proj.", "llm."))]
            if stray:
                raise ckpt.CheckpointError(f"{proj}: not a projection checkpoint, unexpected keys: {ckpt.few(stray)}")
            state.update(part)
        else:
            with torch.device("cpu"):
                fresh = cls.proj_module(config)
            state.update({"llm_proj." + k: t for k, t in fresh.state_dict().items()})
        return cls.from_state(state, config.to_dict(), dtype, lazy)

    @staticmethod
    def proj_module(config):
        d_q, d = config.qformer.hidden, config.llm.n_embd
        if config.proj == "linear":
            return nn.Linear(d_q, d)
        return nn.Sequential(nn.Linear(d_q, config.proj_hidden), nn.Linear(config.proj_hidden, d))


def vision_state(d, grid=None):
    """The vit.* / qformer.* tensors of a converted vision directory, with vit.pos_embed resized to
    a grid x grid patch grid (LAVIS's bicubic rule) when the model's image size is another."""
    state, _ = ckpt.load(d)
    stray = [k for k in state if k.split(".")[0] not in ("vit", "qformer")]
    if stray:
        raise ckpt.CheckpointError(f"{d}: not a vision checkpoint, unexpected keys: {ckpt.few(stray)}")
    if grid is not None and "vit.pos_embed" in state:
        state["vit.pos_embed"] = interpolate_pos_embed(state["vit.pos_embed"], grid)
    return state


def save_llm(d, llm):
    """A bare LLM as our checkpoint: config.json is {"arch": 'qwen' | 'phi', **its config}."""
    arch = "llama" if getattr(llm.config, "version", None) == "llama" else "phi" if isinstance(llm, Phi) else "qwen"
    ckpt.save(d, ckpt.state_of(llm), {"arch": arch, **asdict(llm.config)})


def load_llm(d, dtype=None):
    """A bare LLM from our checkpoint directory, memory-mapped; dtype defaults to the stored one."""
    state, cfg = ckpt.load(d)
    config_cls, llm_cls = LLMS[cfg.pop("arch")]
    dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    with torch.device("meta"):
        llm = llm_cls(config_cls(**cfg)).to(dtype)
    return ckpt.load_into(llm, state, cast=True)
