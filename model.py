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
"""
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from phi import Phi, PhiConfig
from qformer import QFormer, QFormerConfig
from qwen import Qwen, QwenConfig
from vit import EVAViT, ViTConfig

IGNORE = -100  # label of unsupervised positions (padding, prompts, image tokens)
LLMS = {"qwen": (QwenConfig, Qwen), "phi": (PhiConfig, Phi)}
PARTS = ("vit", "qformer", "proj", "llm")
# The frozen parts of the two public training stages (MPP-Qwen-Next); the queries and ln_vision
# belong to the Q-Former. The toy trains from scratch with nothing frozen.
FREEZE_PRESETS = {"pretrain": ("vit", "qformer", "llm"), "sft": ("vit", "qformer")}


# ----------------------------------------------------------------------------- loss

def supervised_count(batch, loss_norm="token"):
    """The loss denominator of `batch`: supervised tokens ('token') or samples with at least one
    supervised token ('sample'). Sum it over every microbatch and rank of a step, pass it as `count`."""
    sup = batch["labels"][:, 1:] != IGNORE  # the first label is never predicted
    return int(sup.sum()) if loss_norm == "token" else int(sup.any(1).sum())


def loss_sum(logits, labels, loss_norm="token"):
    """Summed loss of one (micro)batch; divided by the step's supervised_count it is the mean.
    labels are aligned with input_ids (not shifted): position t predicts labels[t + 1].
    'token': sum of the token cross-entropies (MiniGPT4Qwen). 'sample': sum over samples of each
    sample's mean token cross-entropy, so long answers do not outweigh short ones."""
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                         ignore_index=IGNORE, reduction="none").view(targets.shape)
    if loss_norm == "token":
        return ce.sum()
    return (ce.sum(1) / (targets != IGNORE).sum(1).clamp(min=1)).sum()


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


# ----------------------------------------------------------------------------- sampling

def apply_repetition_penalty(logits, seen, penalty):
    """HF's (CTRL's) rule: for every token already in the sequence (seen [B, V] bool), divide a
    positive logit by `penalty` and multiply a negative one; penalty > 1 discourages repeats."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k logits of each row [B, V], then the smallest set of most likely tokens whose
    probability reaches top_p (HF's top-k / top-p warpers); the rest become -inf."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the more likely tokens already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token per row from logits [B, V]: argmax when temperature == 0, else sample from the
    tempered distribution after filter_logits."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------- config and model

def frozen_parts(freeze):
    """A FREEZE_PRESETS name or an iterable of part names -> tuple of part names in PARTS order."""
    if isinstance(freeze, str):
        if freeze not in FREEZE_PRESETS:
            raise ValueError(f"unknown freeze preset {freeze!r}; choose from {sorted(FREEZE_PRESETS)}")
        freeze = FREEZE_PRESETS[freeze]
    unknown = set(freeze) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts to freeze {sorted(unknown)}; parts are {list(PARTS)}")
    return tuple(p for p in PARTS if p in set(freeze))


@dataclass
class MMConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: object = field(default_factory=QwenConfig)  # QwenConfig or PhiConfig, as llm_type says
    llm_type: str = "qwen"         # 'qwen' (v1 and v2 layouts) or 'phi'
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
    # Phi-2's tokenizer has no <|extra_0|>: 50295 is the first embedding row it leaves unused
    # (51200 rows); the tokenizer must give the image token that id
    "tinygpt-v": dict(vit="eva_vit_g", qformer="blip2", llm_type="phi", llm="tinygptv", proj="mlp2",
                      freeze="pretrain", image_token_id=50295),
}


class MultimodalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vit = EVAViT(config.vit)
        self.qformer = QFormer(config.qformer)
        d_q, d = config.qformer.hidden, config.llm.n_embd
        if config.proj == "linear":
            self.llm_proj = nn.Linear(d_q, d)
        else:
            self.llm_proj = nn.Sequential(nn.Linear(d_q, config.proj_hidden), nn.Linear(config.proj_hidden, d))
        self.llm = LLMS[config.llm_type][1](config.llm)
        self.set_frozen(config.freeze)

    def parts(self):
        return {"vit": self.vit, "qformer": self.qformer, "proj": self.llm_proj, "llm": self.llm}

    def set_frozen(self, parts):
        """requires_grad=False on exactly these parts (names or a FREEZE_PRESETS key), True elsewhere."""
        self.config.freeze = frozen_parts(parts)
        for name, module in self.parts().items():
            module.requires_grad_(name not in self.config.freeze)
        return self.train(self.training)

    def train(self, mode=True):
        # Frozen parts stay in eval mode (as BLIP-2 keeps its frozen ViT): any dropout or
        # train-only behaviour would only add noise to features nobody learns from.
        super().train(mode)
        for name in self.config.freeze:
            self.parts()[name].eval()
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

    def forward(self, batch, count=None):
        """batch from data.collate: input_ids, labels (aligned, not shifted), attention_mask,
        images. loss = loss_sum / count, count defaulting to this batch's supervised_count; pass
        the whole step's count (all microbatches and ranks) to get the full-batch gradients."""
        mask = batch.get("attention_mask")
        x = self.embed(batch["input_ids"], batch.get("images"))
        x = self.llm.forward_blocks(x, self.llm.layers, attention_mask=mask)
        logits = self.llm.head(x)
        if batch.get("labels") is None:
            return logits, None
        if count is None:
            count = supervised_count(batch, self.config.loss_norm)
        return logits, loss_sum(logits, batch["labels"], self.config.loss_norm) / max(count, 1)

    @torch.no_grad()
    def generate(self, input_ids, images=None, attention_mask=None, max_new_tokens=512, temperature=0.0,
                 top_k=None, top_p=None, repetition_penalty=1.0, stop_ids=(), stream=None, seed=None,
                 generator=None):
        """Continue every row of input_ids [B, T], LEFT-padded (attention_mask 0 on the left pads),
        using the LLM's pre-allocated KV cache. A row ends at its first stop token (not included
        in the output) or after max_new_tokens. `stream(tokens)` is called after each step that
        extended a row, with one entry per row: its new token id, or None if it has finished.
        `seed` makes sampling reproducible (or pass a torch.Generator). Returns B lists of new ids."""
        B, T = input_ids.shape
        dev = input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev, torch.long)
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("generate needs LEFT padding: attention_mask has a 0 after a 1")
        if seed is not None:
            generator = torch.Generator(dev).manual_seed(seed)
        x = self.embed(input_ids, images)
        cache = self.llm.new_cache(B, T + max_new_tokens, dtype=x.dtype, device=dev)
        # positions count real tokens only (the LLM's default), so left padding changes nothing;
        # only the last position's logits are needed
        logits = self.llm.head(self.llm.hidden(inputs_embeds=x, attention_mask=mask, cache=cache)[:, -1])
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=dev)
        rows, cols = mask.nonzero(as_tuple=True)
        seen[rows, input_ids[rows, cols]] = True  # the repetition penalty counts the prompt, not pads
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out = [[] for _ in range(B)]
        for step in range(max_new_tokens):
            logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            done = done | torch.isin(tok, stop)
            new = [None if d else t for t, d in zip(tok.tolist(), done.tolist())]
            for row, t in zip(out, new):
                if t is not None:
                    row.append(t)
            if stream is not None and any(t is not None for t in new):
                stream(new)
            if done.all() or step == max_new_tokens - 1:
                break
            seen[torch.arange(B, device=dev), tok] = True
            mask = torch.cat((mask, mask.new_ones(B, 1)), 1)
            logits = self.llm.head(self.llm.hidden(tok[:, None], attention_mask=mask, cache=cache)[:, -1])
        return out

    # ------------------------------------------------------------------------- our checkpoints

    def save(self, d, extra=None, **sections):
        """Our checkpoint: model.safetensors + config.json {"model": config, **sections}."""
        from convert import save_checkpoint
        save_checkpoint(d, self, {"model": self.config.to_dict(), **sections}, extra)

    @classmethod
    def from_checkpoint(cls, d, dtype=None, **overrides):
        """Build from a directory written by `save`; `overrides` replace config fields (e.g.
        freeze='sft'). Built on the meta device, so the weights are read (memory-mapped) once."""
        from convert import load_checkpoint, load_into
        state, cfg = load_checkpoint(d)
        if "model" not in cfg:
            raise ValueError(f"{d}/config.json has no 'model' section: not a nanoMPP multimodal checkpoint")
        with torch.device("meta"):  # no random init, no memory: load_into puts the real tensors in
            model = cls(MMConfig.from_dict({**cfg["model"], **overrides}))
        return load_into(model if dtype is None else model.to(dtype), state)

    @classmethod
    def from_parts(cls, vision, llm, proj=None, dtype=None, **overrides):
        """Assemble converted public pieces: `vision` = one or more convert.py vision directories
        (eva_vit_g, blip2_lavis, blip2_hf) that together hold vit.* and qformer.*; `llm` = a
        convert.py qwen1/qwen2/phi directory; `proj` = a MiniGPT4Qwen checkpoint (stage 1
        `model.pth`: llm_proj.*; stage 2 `unfreeze_llm_model.pth`: also the LLM), else llm_proj
        starts from random (pretraining).
        `overrides` set other MMConfig fields (image_token_id, freeze, proj='mlp2', ...)."""
        from convert import load_checkpoint, load_into, mpp_state
        state, sub = {}, {}
        for d in [vision] if isinstance(vision, (str, os.PathLike)) else vision:
            part, cfg = load_checkpoint(d)
            state.update(part)
            sub.update({k: c(**cfg[k]) for k, c in (("vit", ViTConfig), ("qformer", QFormerConfig)) if k in cfg})
        part, cfg = load_checkpoint(llm)
        state.update({"llm." + k: t for k, t in part.items()})
        arch = cfg.pop("arch")
        config = MMConfig(**sub, llm=LLMS[arch][0](**cfg), **{"llm_type": arch, **overrides})
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
        if proj is None:
            model.llm_proj.to_empty(device="cpu")
            for m in model.llm_proj.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()  # nn.Linear's own init, as LAVIS builds llm_proj
            state.update({"llm_proj." + k: t for k, t in model.llm_proj.state_dict().items()})
        else:  # stage 2's fine-tuned LLM, if present, replaces the base LLM's weights
            state.update(mpp_state(proj))
        return load_into(model, state)
