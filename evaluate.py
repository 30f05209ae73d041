"""
Held-out evaluation of a run: the loss and greedy exact-match accuracy of the final answer per task
(what train.py reports at the end of a run and every eval_every steps), the table of it against the
tasks' chance levels (synthetic.chance_levels), and the loss curve PNG a run writes beside its
metrics.jsonl. Answers are cut, and generation stopped, by the model's chat template (data.TEMPLATES).
"""
import math
import os

import torch

from data import LLM_TEMPLATES, TEMPLATES, collate
from model import IGNORE, supervised_count


def answer_split(item, end_len):
    """(prompt ids, gold answer ids) of an item: the last assistant answer is the final run of
    supervised labels, i.e. the answer and its template's `end_len` closing tokens; the prompt
    is everything before it."""
    sup = (item["labels"] != IGNORE).tolist()
    end = len(sup) - sup[::-1].index(True)
    start = end
    while start > 0 and sup[start - 1]:
        start -= 1
    return item["input_ids"][:start], item["input_ids"][start:end - end_len].tolist()


@torch.no_grad()
def evaluate(model, ds, tok, cfg, ctx, batch_size=100):
    """Held-out loss and greedy exact-match accuracy of the final answer, per task; answers are
    cut and generation stopped by the model's chat template (data.TEMPLATES)."""
    model.eval()
    template = TEMPLATES[LLM_TEMPLATES[model.config.llm_type]]
    end_len = len(tok.encode(template["end"], allowed_special="all"))
    stop = [tok.token_id(t) for t in template["stops"]]
    pad = tok.token_id(template["pad"])
    hits, loss, count = {}, 0.0, 0
    for lo in range(0, min(len(ds), cfg.eval_samples), batch_size):
        items = [ds[i] for i in range(lo, min(lo + batch_size, len(ds), cfg.eval_samples))]
        batch = collate(items, pad)
        with ctx:
            loss += model(batch, count=1)[1].item()  # count=1: the summed loss
        count += supervised_count(batch, cfg.loss_norm)
        prompts, golds = zip(*(answer_split(item, end_len) for item in items))
        T = max(len(p) for p in prompts)
        ids = torch.full((len(items), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):  # left padding for batched generation
            ids[j, T - len(p):], mask[j, T - len(p):] = p, 1
        with ctx:
            out = model.generate(ids, batch["images"], mask, max_new_tokens=max(map(len, golds)) + 1, stop_ids=stop)
        for item, o, g in zip(items, out, golds):
            hits.setdefault(item.get("task", "all"), []).append(o == g)
    model.train()
    return loss / max(count, 1), {t: sum(h) / len(h) for t, h in sorted(hits.items())}


def accuracy_table(acc, chance):
    lines = [f"{'task':10s} {'exact match':>11s} {'chance':>7s}"]
    for task, a in acc.items():
        c = chance.get(task) if chance else None
        lines.append(f"{task:10s} {a:11.1%} {'' if c is None else format(c, '7.1%')}")
    return "\n".join(lines)


def plot_losses(path, train, val):
    """Loss curve PNG with Pillow, log scale: train loss (blue) and held-out loss (red dots)."""
    from PIL import Image, ImageDraw
    W, H, m = 640, 400, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [(s, l) for s, l in train + val if l > 0]
    if pts:
        x1 = max(s for s, _ in pts) or 1
        lo, hi = min(math.log10(l) for _, l in pts), max(math.log10(l) for _, l in pts)
        xy = lambda s, l: (m + s / x1 * (W - 2 * m), H - m - (math.log10(l) - lo) / (hi - lo or 1) * (H - 2 * m))
        d.line([xy(s, l) for s, l in train if l > 0], fill=(30, 80, 200), width=1)
        for x, y in (xy(s, l) for s, l in val if l > 0):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 40, 40))
        d.text((m, 8), f"loss, log scale {10 ** lo:.3g}..{10 ** hi:.3g}, steps 0..{x1}; blue train, red held-out", fill="black")
    d.line([(m, m), (m, H - m), (W - m, H - m)], fill="black")
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
