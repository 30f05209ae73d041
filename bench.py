"""
Benchmarks: nanoMPP side by side with the HF `transformers` reference, in one run, with ratios.

    python bench.py decode     # greedy decode tokens/s: qwen.py (fp32, bf16, int8 weights) vs transformers generate
    python bench.py load       # peak RSS while converting and loading 0.5B
    python bench.py vision     # ViT + Q-Former forward time
    python bench.py pipeline   # our GPipe/1F1B vs torch.distributed.pipelining
    python bench.py chat       # time to first token and tokens/s for image chat
    python bench.py data       # data loading (0, 1, 2 workers) against the training step; start-up; video decode
    python bench.py train      # training step tokens/s, stages 1 and 2: ours vs transformers Blip2

Timings are medians over repeats after warm-up; ratio > 1.0 means nanoMPP is faster. Both sides of
a row are built in the row's dtype, and check_dtypes asserts it (parameters, and the activations
entering the LLM during the warm-up) before anything is timed. The `data` kind is bench_data.py's.
"""
import sys
import time
import statistics

import torch

from bench_data import bench_data, vm  # noqa: F401  (bench_data: the `data` kind, dispatched below)
from ckpt import few


def check_dtypes(dtype, params=None, **sides):
    """Refuse to time a mislabelled row (a bf16 chat row once timed our model in fp32). Each side
    is name=(model, entry, run): every floating-point parameter of `model` must be `dtype` (or
    `params`: fp32 master weights under bf16 autocast), and, when `entry` is given, the activations
    entering it (the LLM's first block) during run(), the side's warm-up, must be `dtype`. All
    parameters are checked before anything runs. Returns {name: run()}."""
    want = str(params or dtype).removeprefix("torch.")
    for side, (model, _, _) in sides.items():
        bad = {}
        for n, p in model.named_parameters():
            if p.is_floating_point() and p.dtype != (params or dtype):
                bad.setdefault(str(p.dtype).removeprefix("torch."), []).append(n)
        if bad:
            raise AssertionError(f"{side}: row dtype {want}, but parameters in " +
                                 "; ".join(f"{d}: {few(names)}" for d, names in bad.items()))
    out, want = {}, str(dtype).removeprefix("torch.")
    for side, (model, entry, run) in sides.items():
        where, seen = next((n for n, m in model.named_modules() if m is entry), type(entry).__name__), []

        def hook(module, args, kwargs, side=side, where=where, seen=seen):
            x = args[0] if args else kwargs["hidden_states"]
            seen.append(x.dtype)
            if x.dtype != dtype:  # raise here: the block itself may fail on the mixed dtypes
                raise AssertionError(f"{side}: row dtype {want}, but activations entering {where} in "
                                     f"{str(x.dtype).removeprefix('torch.')}")
        handle = entry.register_forward_pre_hook(hook, with_kwargs=True) if entry is not None else None
        try:
            out[side] = run() if run is not None else None
        finally:
            if handle is not None:
                handle.remove()
        if entry is not None and not seen:
            raise AssertionError(f"{side}: no activations entered {where} during the warm-up")
    return out


def hf_qwen2_config(c):
    """transformers' Qwen2Config for one of our QwenConfigs (the reference side of a comparison)."""
    import transformers
    return transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta, rms_norm_eps=c.rms_eps,
        tie_word_embeddings=c.tie_embeddings)


# --- decode ---

def _decode_pair(preset, dtype):
    """Random weights shared by transformers' Qwen2ForCausalLM and our Qwen (no copy: our model
    adopts the reference's tensors)."""
    import transformers
    from qwen import QwenConfig
    c = QwenConfig.preset(preset)
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(hf_qwen2_config(c)).to(dtype).eval()
    return ref, _adopt(ref, c, dtype)


def _adopt(ref, c, dtype):
    """Our Qwen (config c) holding the reference's tensors themselves."""
    from ckpt import load_into
    from convert import QWEN2_IGNORE, QWEN2_RULES, remap
    from qwen import Qwen
    with torch.device("meta"):
        ours = Qwen(c).to(dtype)
    return load_into(ours, remap(ref.state_dict(), QWEN2_RULES, QWEN2_IGNORE)).eval()


def _floor(model, prompt_len, new_tokens):
    """The decode's matrix products with no model code: the prompt through every weight once,
    then one matrix-vector product per weight per new token. Float weights go through F.linear,
    int8 ones (quant.Int8Linear) through the kernel they run on CPU, on bf16 inputs."""
    import quant
    mats = [(torch.nn.functional.linear, m.weight, m.bias, m.weight.dtype)
            for m in model.modules() if isinstance(m, torch.nn.Linear)]
    mats += [(torch.ops.aten._weight_int8pack_mm, m.weight, m.scale, torch.bfloat16)
             for m in model.modules() if isinstance(m, quant.Int8Linear)]
    xs = {(w.shape[1], dt): torch.randn(prompt_len, w.shape[1], dtype=dt) for _, w, _, dt in mats}
    vs = {k: x[:1].clone() for k, x in xs.items()}

    def run():
        for f, w, b, dt in mats:
            f(xs[w.shape[1], dt], w, b)
        for _ in range(new_tokens):
            for f, w, b, dt in mats:
                f(vs[w.shape[1], dt], w, b)
    return run


def bench_decode(new_tokens="128", repeat="3", presets="tiny,qwen2.5-0.5b", dtypes="float32,bfloat16,int8",
                 threads="2"):
    """Greedy decode tokens/s, ours vs transformers generate vs the floor; 2 threads, 64-token
    prompt. Runs alternate ours/hf/floor; medians of `repeat`. Wall-clock tokens/s, and the ratios
    also by process CPU time, which other jobs on a shared machine disturb less. An int8 row is ours
    with int8 weights (quant.py) against transformers in fp32 (it has no weight-only int8 CPU path
    without extra packages such as bitsandbytes or torchao) and against ours in fp32, on the same
    weights; its floor is the int8 kernel's mat-vecs; `same tokens` is how many of the first greedy
    tokens match transformers fp32 (int8 rounding may flip a near tie on random weights)."""
    import quant
    torch.set_num_threads(int(threads))
    n, repeat, prompt_len = int(new_tokens), int(repeat), 64
    print(f"greedy decode, batch 1, prompt {prompt_len}, {n} new tokens, {torch.get_num_threads()} threads, "
          f"median of {repeat}; tokens/s = new tokens / generate time (prefill included); int8: hf is fp32")
    print(f"{'model':14} {'dtype':9} {'ours':>8} {'hf':>8} {'floor':>8} {'ours/hf':>8} {'ours/floor':>10} "
          f"{'cpu: ours/hf':>13} {'ours/floor':>10}  same tokens")
    for preset in presets.split(","):
        for dtype in dtypes.split(","):
            int8 = dtype == "int8"
            dt = torch.float32 if int8 else getattr(torch, dtype)
            ref, ours = _decode_pair(preset, dt)
            fp32 = ours
            if int8:  # a second Qwen on the same tensors, its Linears then swapped for int8 copies
                ours = quant.quantize(_adopt(ref, ours.config, dt))
            idx = torch.randint(0, ours.config.vocab_size, (1, prompt_len))
            ones = torch.ones_like(idx)
            fns = {
                "ours": lambda: torch.tensor(ours.generate(idx, max_new_tokens=n)),
                "hf": lambda: ref.generate(idx, attention_mask=ones, max_new_tokens=n, do_sample=False,
                                           pad_token_id=0)[:, prompt_len:],
                "floor": _floor(ours, prompt_len, n),
                **({"fp32": lambda: torch.tensor(fp32.generate(idx, max_new_tokens=n))} if int8 else {}),
            }
            wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
            with torch.no_grad():
                out = check_dtypes(dt, ours=(ours, ours.layers[0], fns["ours"]),  # also the warm-up
                                   hf=(ref, ref.model.layers[0], fns["hf"]),
                                   **({"fp32": (fp32, fp32.layers[0], fns["fp32"])} if int8 else {}))
                same = torch.equal(out["ours"], out["hf"])
                if int8:
                    agree = (out["ours"] == out["hf"]).int().cumprod(1).sum().item()  # the common prefix
                    same = f"{agree}/{n}"
                fns["floor"]()
                for _ in range(repeat):
                    for k, fn in fns.items():
                        t, c = time.perf_counter(), time.process_time()
                        fn()
                        wall[k].append(time.perf_counter() - t)
                        cpu[k].append(time.process_time() - c)
            w = {k: n / statistics.median(v) for k, v in wall.items()}
            c = {k: n / statistics.median(v) for k, v in cpu.items()}
            vs32 = f"  ours int8/fp32 {w['ours'] / w['fp32']:.2f}x (cpu {c['ours'] / c['fp32']:.2f}x)" if int8 else ""
            print(f"{preset:14} {dtype:9} {w['ours']:8.1f} {w['hf']:8.1f} {w['floor']:8.1f} "
                  f"{w['ours'] / w['hf']:7.2f}x {w['ours'] / w['floor']:9.0%} "
                  f"{c['ours'] / c['hf']:12.2f}x {c['ours'] / c['floor']:9.0%}  {same}{vs32}", flush=True)
            del ref, ours, fp32, fns


def _load_side(mode, src, dst, dtype):
    """One loading job: 'convert' (HF dir -> our checkpoint; None), 'ours' or 'hf' (the model)."""
    import convert
    import transformers
    from model import load_llm
    if mode == "convert":
        return convert.convert_qwen2(src, dst)
    if mode == "ours":
        return load_llm(dst)  # in the dtype the file holds: the row's, if convert kept it
    return transformers.Qwen2ForCausalLM.from_pretrained(src, dtype=dtype)


def _peak_rss_child(mode, src, dst, dtype):
    """Run in a fresh process: peak RSS (MB) above the post-import RSS for one loading job."""
    import convert  # noqa: F401  (imported before the baseline RSS is read)
    import model  # noqa: F401
    import transformers  # noqa: F401
    dtype = getattr(torch, dtype)
    base = vm("VmRSS")
    with torch.no_grad():
        llm = _load_side(mode, src, dst, dtype)
        if llm is not None:
            check_dtypes(dtype, **{mode: (llm, None, None)})
            sum(float(p.float().sum()) for p in llm.parameters())  # touch every weight
    print(vm("VmHWM") - base)


def bench_load(preset="qwen2.5-0.5b", dtype="bfloat16"):
    """Peak resident memory while converting / loading, against the size of the weights."""
    import os
    import subprocess
    import tempfile
    ref, _ = _decode_pair(preset, getattr(torch, dtype))
    size = sum(p.numel() * p.element_size() for p in ref.parameters()) / 2**20
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "hf"), os.path.join(d, "ours")
        ref.save_pretrained(src)
        del ref
        print(f"{preset} {dtype}: weights {size:.0f} MB; peak RSS above the RSS after imports:")
        for mode, what in [("convert", "python convert.py qwen2 (HF dir -> ours)"),
                           ("ours", "model.load_llm + touch every weight"),
                           ("hf", "transformers from_pretrained + touch every weight")]:
            code = f"import bench; bench._peak_rss_child({mode!r}, {src!r}, {dst!r}, {dtype!r})"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
            mb = float(out.stdout.split()[-1])
            print(f"  {what:52} {mb:7.0f} MB = {mb / size:.2f}x weights", flush=True)

# --- vision ---

def _vision_pair(vit_cfg, qformer_cfg, dtype):
    """Our vit+qformer and an HF Blip2Model (tiny OPT text side, unused) holding the same random
    weights in `dtype` (ours adopts the reference's tensors)."""
    from transformers import Blip2Config, Blip2Model, OPTConfig
    import ckpt
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
    hf = hf.to(dtype)
    with torch.device("meta"):
        ours = torch.nn.Module()
        ours.vit, ours.qformer = EVAViT(vit_cfg), QFormer(qformer_cfg)
        ours = ours.to(dtype)
    state = convert.vision_state(hf.state_dict(), "blip2_hf", vit_cfg)
    state["vit.pos_embed"] = state["vit.pos_embed"].to(dtype)  # the resize computes in fp32
    return ckpt.load_into(ours, state).eval(), hf


def bench_vision(which="all"):
    """ViT + Q-Former forward at 224 px: ours vs transformers Blip2Model.get_qformer_features.
    `python bench.py vision [mid|eva]`: mid = a ViT-B sized EVA (fits 2 cores), eva = real eva_vit_g."""
    from vit import ViTConfig
    from qformer import QFormerConfig
    torch.set_num_threads(2)
    setups = {"mid": (ViTConfig.preset("eva_vit_g", width=768, depth=12, n_head=12, mlp_dim=3072),
                      QFormerConfig.preset("blip2", encoder_width=768), (1, 8)),
              "eva": (ViTConfig.preset("eva_vit_g"), QFormerConfig.preset("blip2"), (1,))}
    print("wall and CPU (process) time per forward in ms; ratio = hf / ours, > 1 means ours is faster")
    print(f"{'config':6} {'dtype':9} {'batch':>5} {'ours':>9} {'hf':>9} {'ratio':>6} {'ours cpu':>9} {'hf cpu':>9} {'ratio':>6}")
    for name, (vit_cfg, qformer_cfg, batches) in setups.items():
        if which not in ("all", name):
            continue
        for dtype in (torch.float32, torch.bfloat16):
            ours, hf = _vision_pair(vit_cfg, qformer_cfg, dtype)
            for b in batches:
                x = torch.randn(b, 3, 224, 224, dtype=dtype)
                fns = {"ours": lambda: ours.qformer(ours.vit(x)), "hf": lambda: hf.get_qformer_features(x)}
                with torch.inference_mode():
                    out = check_dtypes(dtype, ours=(ours, ours.vit.blocks[0], fns["ours"]),  # also the warm-up
                                       hf=(hf, hf.vision_model.encoder.layers[0], fns["hf"]))
                    diff = (out["ours"].float() - out["hf"].float()).abs().max().item()
                    # Alternate the two so that load from other processes hits both alike; also take
                    # CPU time, which a busy shared machine distorts less than wall time.
                    t = {"ours": [], "hf": []}
                    for _ in range(1 if name == "eva" else 3):
                        for side, fn in fns.items():
                            w0, c0 = time.perf_counter(), time.process_time()
                            fn()
                            t[side].append((time.perf_counter() - w0, time.process_time() - c0))
                (wo, co), (wh, ch) = [[statistics.median(v) for v in zip(*t[side])] for side in ("ours", "hf")]
                print(f"{name:6} {str(dtype)[6:]:9} {b:5d} {wo * 1e3:9.0f} {wh * 1e3:9.0f} {wh / wo:6.2f}"
                      f" {co * 1e3:9.0f} {ch * 1e3:9.0f} {ch / co:6.2f}  max|diff| {diff:.1e}", flush=True)
            del ours, hf

# --- pipeline ---

def _pipeline_pair(rank, dtype, m, b=2, T=128, n_layer=8, width=256):
    """Stage `rank` of 2 (the gloo process group is up): one MultimodalLM stage in `dtype` (tiny
    vision, n_layer Qwen blocks), run by our PipelineRunner and by torch.distributed.pipelining's
    1F1B/GPipe, on m microbatches of b x T tokens. -> (our runner, run(impl), check_dtypes sides)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from model import MMConfig, MultimodalLM, loss_sum, supervised_count
    from pipeline import PipelineRunner, make_groups
    from qformer import QFormerConfig
    from qwen import QwenConfig
    from vit import ViTConfig
    # each implementation on its own group: gloo matches messages per pair and group in order
    (ours_pp, dp), torch_pp = make_groups(2, 120), {s: make_groups(2, 120)[0] for s in ("1f1b", "gpipe")}
    torch.manual_seed(0)
    llm = QwenConfig(vocab_size=2048, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=width,
                     intermediate_size=width * 11 // 4, tie_embeddings=False)  # torch's stages would not sum tied gradients
    cfg = MMConfig(vit=ViTConfig.preset("tiny"), qformer=QFormerConfig.preset("tiny"), llm=llm, freeze="sft",
                   image_token_id=5)
    runner = PipelineRunner(MultimodalLM(cfg).to(dtype), 2, "1f1b", ours_pp, dp, timeout=120)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, 2048, (m * b, T), generator=g)
    ids[:, 1:9] = 5  # one image (8 query tokens) per sequence
    images = torch.randn(m * b, 3, 56, 56, generator=g).to(dtype)
    labels = ids.masked_fill(torch.rand(m * b, T, generator=g) < 0.5, -100)
    count = supervised_count(dict(labels=labels))
    mbs = [dict(input_ids=ids[j * b:(j + 1) * b], images=images[j * b:(j + 1) * b], labels=labels[j * b:(j + 1) * b])
           for j in range(m)]

    class Positional(torch.nn.Module):  # torch moves positional tensors only; same module, same stage_forward
        def __init__(self):
            super().__init__()
            self.module = runner.module

        def forward(self, *args):
            return runner.stage_forward(None, dict(input_ids=args[0], images=args[1])) if rank == 0 else \
                runner.stage_forward(args[0], {})
    wrapped = Positional()
    scheds = {s: cls(PipelineStage(wrapped, rank, 2, torch.device("cpu"), group=torch_pp[s]), m, scale_grads=False,
                     loss_fn=lambda logits, target: loss_sum(logits, target) / count)
              for s, cls in (("1f1b", Schedule1F1B), ("gpipe", ScheduleGPipe))}

    def run(impl):
        who, schedule = impl.split()
        if who == "ours":
            runner.schedule = schedule
            runner.step(mbs, count)
        elif rank == 0:
            scheds[schedule].step(ids, images)
        else:
            scheds[schedule].step(target=labels, losses=[])

    first = next(iter(runner.module.llm.layers.values()))  # this stage's first block
    sides = dict(ours=(runner.module, first, lambda: run("ours 1f1b")),
                 torch=(wrapped, first, lambda: run("torch 1f1b")))
    return runner, run, sides


def _pipeline_worker(rank, port, steps, warmup, m):
    """One of 2 gloo processes: our 1F1B/GPipe and torch.distributed.pipelining's on the same stages."""
    import os
    import torch.distributed as dist
    from datetime import timedelta
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    b, T, dtype = 2, 128, torch.float32
    runner, run, sides = _pipeline_pair(rank, dtype, m, b, T)
    params = [p for p in runner.module.parameters() if p.requires_grad]

    def clear():
        for p in params:
            p.grad = None
    check_dtypes(dtype, **sides)  # also the warm-up
    clear()
    impls = ["ours 1f1b", "torch 1f1b", "ours gpipe", "torch gpipe"]
    worst = torch.zeros(2, dtype=torch.float64)
    for j, schedule in enumerate(("1f1b", "gpipe")):  # equal gradients first
        grads = []
        for who in ("ours", "torch"):
            run(f"{who} {schedule}")
            grads.append([p.grad.clone() for p in params])
            clear()
        worst[j] = max(((a - c).abs().max() / c.abs().max()).item() for a, c in zip(*grads))
    times = {impl: [] for impl in impls}
    stats = {impl: [] for impl in impls if impl.startswith("ours")}
    for step in range(warmup + steps):
        for impl in impls if step % 2 else impls[::-1]:  # alternate the order A/B
            dist.barrier()
            t0 = time.perf_counter()
            run(impl)
            dt = time.perf_counter() - t0
            dist.barrier()
            clear()
            if step >= warmup:
                times[impl].append(dt)
                if impl in stats:
                    stats[impl].append(dict(runner.stats))
    # step time = slowest rank; bubble = mean idle fraction; saved bytes = peak per rank
    t = torch.tensor([times[i] for i in impls], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    info = torch.zeros(2, 2, 2, dtype=torch.float64)  # [schedule, rank, (bubble, saved bytes)]
    for k, impl in enumerate(("ours 1f1b", "ours gpipe")):
        info[k, rank] = torch.tensor([statistics.median(s["bubble"] for s in stats[impl]),
                                      stats[impl][-1]["peak_saved_bytes"]])
    dist.all_reduce(info)
    if rank == 0:
        med = {impl: statistics.median(t[k].tolist()) for k, impl in enumerate(impls)}
        p = 2
        print(f"pipeline: p=2 stages on 2 gloo processes, 1 thread each; MultimodalLM (tiny vision, 8 Qwen blocks "
              f"of width 256) in {str(dtype)[6:]}, m={m} microbatches of {b} x {T} tokens; median of {steps} steps "
              f"after {warmup} warm-up, step time = slowest rank")
        print(f"gradients ours vs torch: max |diff| / max |grad| = {worst[0]:.1e} (1F1B), {worst[1]:.1e} (GPipe)")
        print(f"{'schedule':9} {'ours ms':>8} {'torch ms':>9} {'ratio':>6}  {'bubble measured (r0, r1)':>25}  (p-1)/(m+p-1)")
        for k, s in enumerate(("1f1b", "gpipe")):
            o, tt = med[f"ours {s}"], med[f"torch {s}"]
            print(f"{s:9} {o * 1e3:8.1f} {tt * 1e3:9.1f} {tt / o:6.2f}  {info[k, 0, 0]:12.3f} {info[k, 1, 0]:6.3f}"
                  f"        {(p - 1) / (m + p - 1):.3f}")
        g_mb, f_mb = info[1, :, 1] / 2**20, info[0, :, 1] / 2**20
        print(f"saved activations, peak per rank: GPipe {g_mb[0]:.1f} / {g_mb[1]:.1f} MB, 1F1B {f_mb[0]:.1f} / "
              f"{f_mb[1]:.1f} MB; 1F1B/GPipe rank 0 = {f_mb[0] / g_mb[0]:.3f} (goal <= p/m = {p / m:.3f})")
        print("ratio = torch / ours (> 1.0: ours faster). Shared 2-core machine: timings are noisy, memory is exact.")
    dist.destroy_process_group()


def bench_pipeline(steps="12", warmup="2", m="8"):
    """`python bench.py pipeline [steps] [warmup] [m]`: ours vs torch.distributed.pipelining, 2 processes."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_pipeline_worker, args=(port, int(steps), int(warmup), int(m)), nprocs=2, start_method="spawn")


# --- chat ---

def _chat_pair(name, dtype, n_layer=None):
    """Our MultimodalLM and transformers' Blip2ForConditionalGeneration (Qwen2 text model) holding
    the same random weights (ours adopts the reference's tensors). 'toy': train.py's toy shapes;
    'qwen2.5-0.5b': that LLM (n_layer blocks, default all) behind the tiny ViT and a 32-query tiny
    Q-Former."""
    import transformers
    from ckpt import load_into
    from convert import QWEN2_IGNORE, QWEN2_RULES, remap, vision_state
    from model import MMConfig, MultimodalLM
    from qformer import QFormerConfig
    from qwen import QwenConfig
    from vit import ViTConfig
    if name == "toy":
        import train
        from tokenizer import Tokenizer
        cfg = train.toy_config(train.Config(), Tokenizer.toy("what colour is the shape".split()))
    else:
        cfg = MMConfig(vit=ViTConfig.preset("tiny"), qformer=QFormerConfig.preset("tiny", num_query=32),
                       llm=QwenConfig.preset(name))
    if n_layer:
        cfg.llm.n_layer = int(n_layer)
    v, q, c = cfg.vit, cfg.qformer, cfg.llm
    text = hf_qwen2_config(c)
    torch.manual_seed(0)
    hf = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                           num_attention_heads=v.n_head, image_size=v.img_size, patch_size=v.patch_size),
        qformer_config=dict(hidden_size=q.hidden, num_hidden_layers=q.n_layer, num_attention_heads=q.n_head,
                            intermediate_size=q.ffn, cross_attention_frequency=q.cross_every),
        text_config=text.to_dict(), num_query_tokens=q.num_query, image_token_index=cfg.image_token_id))
    with torch.no_grad():  # HF initialises its ViT with std 1e-10: give the vision side ordinary weights
        for n, p in hf.named_parameters():
            if p.dim() >= 2 and not n.startswith("language_model."):
                p.normal_(0, 0.02)
    hf = hf.to(dtype).eval()
    src = hf.state_dict()
    state = vision_state(src, "blip2_hf", v)
    lm = {k[len("language_model."):]: t for k, t in src.items() if k.startswith("language_model.")}
    state.update({"llm." + k: t for k, t in remap(lm, QWEN2_RULES, QWEN2_IGNORE).items()})
    state.update({"llm_proj." + k: src["language_projection." + k] for k in ("weight", "bias")})
    with torch.device("meta"):
        ours = MultimodalLM(cfg).to(dtype)  # in the row's dtype: load_into refuses a silent cast
    state["vit.pos_embed"] = state["vit.pos_embed"].to(dtype)  # the resize computes in fp32
    ours = load_into(ours, state).eval()
    ours.qformer.ln_vision.eps = hf.config.vision_config.layer_norm_eps  # HF reuses the ViT's eps
    return ours, hf


def _chat_prompt(cfg, question_len=30):
    """ChatML skeleton around one image placeholder and a question of question_len random tokens."""
    g = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # byte tokens: never special
    start, end = cfg.image_token_id - 2, cfg.image_token_id - 1  # <|im_start|>, <|im_end|> in Qwen's order
    ids = ([start] + words(6) + [end, start] + words(2) + [cfg.image_token_id] * cfg.qformer.num_query
           + words(question_len) + [end, start] + words(2))
    return torch.tensor([ids])


def bench_chat(new_tokens="32", repeat="5", models="toy,qwen2.5-0.5b", dtypes="float32,bfloat16", threads="2"):
    """One image + a 30-token question, greedy: time to first token (vision + prefill + first
    token) and decode tokens/s after it, ours (chat.py's path: MultimodalLM.generate with a
    stream callback) vs Blip2ForConditionalGeneration.generate with a streamer. Medians of
    `repeat` alternating runs after a warm-up, by wall clock and by process CPU time (which other
    jobs on a shared machine disturb less); ratios > 1 mean ours is faster."""
    torch.set_num_threads(int(threads))
    n, repeat = int(new_tokens), int(repeat)
    clock = lambda: (time.perf_counter(), time.process_time())
    print(f"one image + 30-token question, batch 1, {n} new tokens, {torch.get_num_threads()} threads, median of "
          f"{repeat}; ratio = hf time / ours\n{'model':13} {'dtype':9} {'ttft ms ours':>12} {'hf':>7} {'ratio':>6} "
          f"{'cpu ratio':>9} {'tok/s ours':>10} {'hf':>7} {'ratio':>6} {'cpu ratio':>9}  same tokens")
    for name in models.split(","):
        for dtype in dtypes.split(","):
            dt = getattr(torch, dtype)
            ours, hf = _chat_pair(name, dt)
            cfg = ours.config
            ids = _chat_prompt(cfg)
            pixels = torch.randn(1, 3, cfg.vit.img_size, cfg.vit.img_size).to(dt)

            class Streamer:  # records when each token arrives (HF calls put() with the prompt first)
                def __init__(self):
                    self.times, self.toks = [], []

                def put(self, value):
                    if value.numel() == 1:
                        self.times.append(clock())
                        self.toks.append(int(value))

                def end(self):
                    pass

            def run_ours():
                s, t0 = Streamer(), clock()
                ours.generate(ids, pixels, max_new_tokens=n, stream=lambda new: s.put(torch.tensor(new[0])))
                return t0, s

            def run_hf():
                s, t0 = Streamer(), clock()
                hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, streamer=s)
                return t0, s

            runs = {"ours": run_ours, "hf": run_hf}
            ttft, step = {k: ([], []) for k in runs}, {k: ([], []) for k in runs}  # (wall, cpu) seconds
            with torch.inference_mode():
                warm = check_dtypes(dt, ours=(ours, ours.llm.layers[0], run_ours),  # also the warm-up
                                    hf=(hf, hf.language_model.model.layers[0], run_hf))
                toks = {k: s.toks for k, (_, s) in warm.items()}
                for _ in range(repeat):
                    for k, fn in runs.items():
                        t0, s = fn()
                        for c in (0, 1):
                            ttft[k][c].append(s.times[0][c] - t0[c])
                            step[k][c].append((s.times[-1][c] - s.times[0][c]) / (len(s.times) - 1))
            t = {k: [statistics.median(x) for x in v] for k, v in ttft.items()}
            d = {k: [statistics.median(x) for x in v] for k, v in step.items()}
            print(f"{name:13} {dtype:9} {t['ours'][0] * 1e3:12.1f} {t['hf'][0] * 1e3:7.1f} {t['hf'][0] / t['ours'][0]:5.2f}x "
                  f"{t['hf'][1] / t['ours'][1]:8.2f}x {1 / d['ours'][0]:10.1f} {1 / d['hf'][0]:7.1f} "
                  f"{d['hf'][0] / d['ours'][0]:5.2f}x {d['hf'][1] / d['ours'][1]:8.2f}x  {toks['ours'] == toks['hf']}",
                  flush=True)
            del ours, hf


def bench_serve(new_tokens="32", repeat="20", clients="4", threads="1"):
    """serve.py over loopback HTTP vs the same Engine called in-process, on a random toy (one 32 px
    image + a question, greedy, `new_tokens` long): time to first token (streamed)
    and requests/s (sequential, then `clients` at once), medians of `repeat`; ratio = in-process
    time / HTTP time (1.0x: HTTP costs nothing)."""
    import base64
    import http.client
    import io
    import json
    import os
    import random
    import shutil
    import subprocess
    import tempfile
    import threading
    import chat
    import train
    from model import MultimodalLM
    from synthetic import one_shape_image
    from tokenizer import Tokenizer
    torch.set_num_threads(int(threads))
    n, repeat, clients = int(new_tokens), int(repeat), int(clients)
    d = tempfile.mkdtemp()
    tok = Tokenizer.toy(["what", "colour", "is", "the", "shape", "red", "blue", "You", "helpful", "Img"])
    model = MultimodalLM(train.toy_config(train.Config(max_len=512), tok)).eval()
    model.save(d, train={"max_frames": 2})
    tok.save(d)
    png = io.BytesIO()
    img = one_shape_image(random.Random(0), 32, "circle", "red")
    img.save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    question = "what colour is the shape?"
    conf = {"max_new_tokens": n}  # greedy: the random toy repeats itself to the end
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": question}]}],
            "max_tokens": n}
    # in-process: the Engine serve.py answers through, same settings
    eng = chat.Engine(*chat.load(d))
    turns = [("user", chat.placeholder(1) + " " + question)]

    def local():
        t0, first = time.perf_counter(), []
        with torch.inference_mode():
            ids = eng.encode(turns, question)
            _, k, _ = eng.answer(ids, [eng.pixels([img])], lambda s: first or first.append(time.perf_counter()),
                                 conf, seed=0)
        return first[0] - t0, time.perf_counter() - t0, k

    p = subprocess.Popen([sys.executable, "serve.py", "--ckpt", d, "--port", "0", "--threads", threads, "--quiet"],
                         stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    try:
        port = int(p.stdout.readline().rsplit(":", 1)[1])

        def remote(stream=True):
            t0, first = time.perf_counter(), None
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}))
            r = c.getresponse()
            if stream:
                while line := r.readline():
                    if first is None and line.startswith(b'data: {') and b'"content": "' in line and b'"role"' not in line:
                        first = time.perf_counter()
            data = r.read() if not stream else b""
            c.close()
            k = json.loads(data)["usage"]["completion_tokens"] if data else n
            return (first or time.perf_counter()) - t0, time.perf_counter() - t0, k

        def many(fn):  # `clients` threads, each running fn `repeat // clients` times: requests/s
            t0 = time.perf_counter()
            ts = [threading.Thread(target=lambda: [fn() for _ in range(max(1, repeat // clients))]) for _ in range(clients)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return clients * max(1, repeat // clients) / (time.perf_counter() - t0)

        lock = threading.Lock()  # in-process "clients" queue on one lock, as the server's do
        runs = {"in-process": lambda stream=True: local(), "HTTP": remote}
        for fn in runs.values():
            fn(), fn()  # warm-up
        ttft = {k: [] for k in runs}
        total = {k: [] for k in runs}
        for _ in range(repeat):
            for k, fn in runs.items():
                a, b, _ = fn()
                ttft[k].append(a)
                total[k].append(b)
        tokens = local()[2], remote(stream=False)[2]

        def locked():
            with lock:
                local()
        rps = {"in-process": many(locked), "HTTP": many(lambda: remote(stream=False))}
    finally:
        p.terminate()
        p.wait(timeout=10)
    med = {k: (statistics.median(ttft[k]), statistics.median(total[k])) for k in runs}
    print(f"toy (random weights), one 32 px image + question, {tokens[0]} / {tokens[1]} new tokens (in-process / HTTP), "
          f"{threads} thread(s), median of {repeat}; ratio = in-process / HTTP")
    print(f"{'':26} {'in-process':>10} {'HTTP':>8} {'ratio':>6}")
    print(f"{'time to first token ms':26} {med['in-process'][0] * 1e3:10.1f} {med['HTTP'][0] * 1e3:8.1f} "
          f"{med['in-process'][0] / med['HTTP'][0]:5.2f}x")
    print(f"{'whole answer ms':26} {med['in-process'][1] * 1e3:10.1f} {med['HTTP'][1] * 1e3:8.1f} "
          f"{med['in-process'][1] / med['HTTP'][1]:5.2f}x")
    print(f"{f'requests/s, {clients} clients':26} {rps['in-process']:10.1f} {rps['HTTP']:8.1f} "
          f"{rps['HTTP'] / rps['in-process']:5.2f}x")
    shutil.rmtree(d, ignore_errors=True)


# --- train ---

STAGES = {1: "pretrain", 2: "sft"}  # train.py's freeze presets: stage 1 trains llm_proj only, stage 2 also the LLM


def _train_batch(cfg, batch, seq_len):
    """`batch` rows of seq_len tokens: _chat_prompt (one image) followed by an answer of random byte
    tokens; only the answer is supervised, as data.py labels a reply. -> input_ids, labels, pixels."""
    prompt = _chat_prompt(cfg, question_len=8)[0]
    g = torch.Generator().manual_seed(1)
    if seq_len <= len(prompt) + 1:
        raise ValueError(f"seq_len {seq_len} leaves no answer after the {len(prompt)}-token prompt")
    answer = torch.randint(0, 256, (batch, seq_len - len(prompt)), generator=g)
    ids = torch.cat((prompt.expand(batch, -1), answer), 1)
    labels = ids.clone()
    labels[:, :len(prompt)] = -100  # qwen.IGNORE, HF's ignore_index
    pixels = torch.randn(batch, 3, cfg.vit.img_size, cfg.vit.img_size, generator=g)
    return ids, labels, pixels


def _train_sides(ours, hf, stage, batch, autocast):
    """Each side frozen for `stage` and trained by train.py's step: the loss under the one autocast,
    backward, gradient clipping, train.py's AdamW (its optimizer(), over that side's trainable
    parameters), zero_grad. -> {side: (model, loss(), step(opt), new_opt())}."""
    import train
    from contextlib import nullcontext
    cfg = train.Config(lr=1e-5)  # small steps: the two sides share (and both update) one set of weights
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else nullcontext
    ids, labels, pixels = batch
    mask = torch.ones_like(ids)
    ours.set_frozen(STAGES[stage]).train()
    trained = [hf.language_projection] + ([hf.language_model] if stage == 2 else [])
    hf.requires_grad_(False).eval()  # vision_model (with ln_vision), qformer, query_tokens [, LLM]
    for m in trained:
        m.requires_grad_(True).train()  # the frozen parts stay in eval mode, as ours do
    batch = dict(input_ids=ids, attention_mask=mask, images=pixels, labels=labels)
    losses = {"ours": lambda: ours(batch, full_logits=False)[1],  # the head at supervised positions only
              "hf": lambda: hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).loss}
    sides = {}
    for side, model in (("ours", ours), ("hf", hf)):
        def step(opt, model=model, loss=losses[side]):
            with ctx():
                value = loss()
            value.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def forward_backward(loss=losses[side]):
            with ctx():
                value = loss()
            value.backward()
            return value
        sides[side] = (model, forward_backward, step, lambda model=model: train.optimizer(cfg, model))
    return sides


def _train_parity(sides):
    """One forward + backward on each side, before any step: (|loss diff| / |loss|, worst over the
    trainable tensors of max |grad diff| / max |grad|). The sides share their weights' storage,
    which pairs the tensors."""
    loss, grads = {}, {}
    for side, (model, forward_backward, _, _) in sides.items():
        loss[side] = forward_backward().item()
        grads[side] = {p.data_ptr(): p.grad for p in model.parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)  # the next side's backward must not add to these
    if grads["ours"].keys() != grads["hf"].keys():
        raise AssertionError(f"the sides train different tensors: {len(grads['ours'])} ours, {len(grads['hf'])} hf")
    worst = max(float((g - grads["hf"][k]).abs().max() / grads["hf"][k].abs().max().clamp(min=1e-30))
                for k, g in grads["ours"].items())
    return abs(loss["ours"] - loss["hf"]) / abs(loss["hf"]), worst


def bench_train(repeat="3", batch="2", seq_len="96", stage1_layers="4", stage2_layers="4", dtypes="float32,bfloat16",
                threads="2", model="qwen2.5-0.5b", stages="1,2"):
    """Training step tokens/s (forward + backward + clip + AdamW step), ours (MultimodalLM) vs
    transformers' Blip2ForConditionalGeneration (Qwen2 text model) on the same weights and batch,
    for stage 1 (only llm_proj trains) and stage 2 (llm_proj + LLM), in fp32 and under bf16
    autocast (fp32 master weights). A `model`-shaped LLM (Qwen2.5-0.5B: width 896, 151936-token
    tied vocabulary) behind the tiny ViT and a 32-query Q-Former, with 4 of its 24 blocks by
    default (fp32 AdamW over all 24 needs 8 GB per side in stage 2; stage 1 at full depth:
    `python bench.py train 3 2 96 24`). Both sides' loss and
    gradients are compared before timing. Each repeat runs each side (alternating) with a fresh
    optimizer: one untimed step (AdamW allocates its state) then a timed one; medians of `repeat`,
    by wall clock and by process CPU time; ratio = hf time / ours (> 1: ours faster)."""
    torch.set_num_threads(int(threads))
    repeat, b, T = int(repeat), int(batch), int(seq_len)
    print(f"training step (forward + backward + clip + AdamW), batch {b} x {T} tokens, {torch.get_num_threads()} "
          f"threads, median of {repeat}; tok/s = batch tokens / step time; ratio = hf time / ours\n"
          f"{'model':13} {'stage':5} {'layers':>6} {'dtype':15} {'tok/s ours':>10} {'hf':>7} {'ratio':>6} "
          f"{'cpu ratio':>9}  {'loss diff':>9} {'grad diff':>9}")
    tolerance = {"float32": (1e-5, 1e-3), "bfloat16": (2e-2, 0.2)}  # (loss, gradients), relative
    for stage, layers in [(s, (stage1_layers, stage2_layers)[s - 1]) for s in map(int, stages.split(","))]:
        ours, hf = _chat_pair(model, torch.float32, n_layer=layers)
        data = _train_batch(ours.config, b, T)
        for dtype in dtypes.split(","):
            dt = getattr(torch, dtype)
            sides = _train_sides(ours, hf, stage, data, autocast=dt != torch.float32)
            loss_diff, grad_diff = _train_parity(sides)
            if loss_diff > tolerance[dtype][0] or grad_diff > tolerance[dtype][1]:
                raise AssertionError(f"stage {stage} {dtype}: the sides compute different things: loss differs by "
                                     f"{loss_diff:.1e}, gradients by {grad_diff:.1e} (relative)")
            times = {side: [] for side in sides}

            def run(side):
                _, _, step, new_opt = sides[side]
                opt = new_opt()
                step(opt)  # untimed: AdamW allocates its state on the first step
                w, c = time.perf_counter(), time.process_time()
                step(opt)
                times[side].append((time.perf_counter() - w, time.process_time() - c))
            entry = {"ours": ours.llm.layers[0].self_attn.o_proj, "hf": hf.language_model.model.layers[0].self_attn.o_proj}
            # the first repeat, checked: fp32 parameters, and `dtype` activations inside the LLM's first block
            check_dtypes(dt, params=torch.float32, **{k: (sides[k][0], entry[k], lambda k=k: run(k)) for k in sides})
            for _ in range(repeat - 1):
                for side in sides:
                    run(side)
            (wo, co), (wh, ch) = [[statistics.median(v) for v in zip(*times[side])] for side in ("ours", "hf")]
            label = "bf16 autocast" if dt != torch.float32 else dtype
            print(f"{model:13} {stage:5d} {ours.config.llm.n_layer:6d} {label:15} {b * T / wo:10.1f} {b * T / wh:7.1f} "
                  f"{wh / wo:5.2f}x {ch / co:8.2f}x  {loss_diff:9.1e} {grad_diff:9.1e}", flush=True)
        del ours, hf, sides


if __name__ == "__main__":
    benches = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_")}
    if len(sys.argv) < 2 or sys.argv[1] not in benches:
        sys.exit(f"usage: python bench.py {{{'|'.join(benches) or 'decode|vision|pipeline|chat'}}} [args]")
    torch.manual_seed(0)
    benches[sys.argv[1]](*sys.argv[2:])
