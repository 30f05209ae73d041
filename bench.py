"""
Benchmarks: nanoMPP side by side with the HF `transformers` reference, in one run, with ratios.

    python bench.py decode     # greedy decode tokens/s: qwen.py vs transformers generate
    python bench.py vision     # ViT + Q-Former forward time
    python bench.py pipeline   # our GPipe/1F1B vs torch.distributed.pipelining
    python bench.py chat       # time to first token and tokens/s for image chat

Timings are medians over repeats after warm-up; ratio > 1.0 means nanoMPP is faster.
"""
import sys
import time
import statistics

import torch


def timeit(fn, repeat=5, warmup=1):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- decode ---

# --- vision ---

def _vision_pair(vit_cfg, qformer_cfg):
    """Our vit+qformer and an HF Blip2Model (tiny OPT text side, unused) holding the same weights."""
    from transformers import Blip2Config, Blip2Model, OPTConfig
    import convert
    from vit import EVAViT
    from qformer import QFormer
    hf = Blip2Model(Blip2Config(
        vision_config=dict(hidden_size=vit_cfg.width, intermediate_size=vit_cfg.mlp_dim, num_hidden_layers=vit_cfg.depth,
                           num_attention_heads=vit_cfg.n_head, image_size=vit_cfg.img_size, patch_size=vit_cfg.patch_size),
        qformer_config=dict(hidden_size=qformer_cfg.hidden, num_hidden_layers=qformer_cfg.n_layer,
                            num_attention_heads=qformer_cfg.n_head, intermediate_size=qformer_cfg.ffn,
                            cross_attention_frequency=qformer_cfg.cross_every),
        text_config=OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                              word_embed_proj_dim=16).to_dict(),
        num_query_tokens=qformer_cfg.num_query)).eval()
    with torch.no_grad():  # HF initialises its ViT with std 1e-10: give both sides ordinary weights
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    hf.vision_model.post_layernorm.eps = 1e-5  # as LAVIS's ln_vision (HF reuses the ViT's 1e-6)
    ours = torch.nn.Module()
    ours.vit, ours.qformer = EVAViT(vit_cfg), QFormer(qformer_cfg)
    convert.load_into(ours, convert.vision_state(hf.state_dict(), "blip2_hf", vit_cfg))
    return ours.eval(), hf


def bench_vision(which="all"):
    """ViT + Q-Former forward at 224 px: ours vs transformers Blip2Model.get_qformer_features.
    `python bench.py vision [mid|eva]`: mid = a ViT-B sized EVA (fits 2 cores), eva = real eva_vit_g."""
    from vit import ViTConfig
    from qformer import QFormerConfig
    torch.set_num_threads(2)
    setups = {"mid": (ViTConfig.preset("eva_vit_g", width=768, depth=12, n_head=12, mlp_dim=3072),
                      QFormerConfig.preset("blip2", encoder_width=768), (1, 8)),
              "eva": (ViTConfig.preset("eva_vit_g"), QFormerConfig.preset("blip2"), (1,))}
    print(f"{'config':8} {'dtype':9} {'batch':>5} {'ours ms':>9} {'hf ms':>9} {'ratio':>6}  (ratio = hf / ours)")
    for name, (vit_cfg, qformer_cfg, batches) in setups.items():
        if which not in ("all", name):
            continue
        ours, hf = _vision_pair(vit_cfg, qformer_cfg)
        for dtype in (torch.float32, torch.bfloat16):
            ours.to(dtype), hf.to(dtype)
            for b in batches:
                x = torch.randn(b, 3, 224, 224, dtype=dtype)
                with torch.inference_mode():
                    diff = (ours.qformer(ours.vit(x)).float() - hf.get_qformer_features(x).float()).abs().max().item()
                    # alternate the two so that load from other processes hits both alike
                    t_ours, t_hf = [], []
                    for _ in range(2 if name == "eva" else 3):
                        t_ours.append(timeit(lambda: ours.qformer(ours.vit(x)), repeat=1, warmup=0))
                        t_hf.append(timeit(lambda: hf.get_qformer_features(x), repeat=1, warmup=0))
                    t_ours, t_hf = statistics.median(t_ours), statistics.median(t_hf)
                print(f"{name:8} {str(dtype)[6:]:9} {b:5d} {t_ours * 1e3:9.1f} {t_hf * 1e3:9.1f} {t_hf / t_ours:6.2f}"
                      f"  max|diff| {diff:.1e}", flush=True)
        del ours, hf

# --- pipeline ---

# --- chat ---


if __name__ == "__main__":
    benches = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_")}
    if len(sys.argv) < 2 or sys.argv[1] not in benches:
        sys.exit(f"usage: python bench.py {{{'|'.join(benches) or 'decode|vision|pipeline|chat'}}} [args]")
    torch.manual_seed(0)
    benches[sys.argv[1]](*sys.argv[2:])
