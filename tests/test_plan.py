"""plan.py against reality: the planned peak of CPU training steps (reduced width and depth, a
small vocabulary) against the peak RSS they reach in a fresh process, for the two public stages'
freeze settings with and without gradient checkpointing; the plan's arithmetic against the real
models; the command lines' errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import plan  # noqa: E402
from model import MMConfig, MultimodalLM  # noqa: E402
from qformer import QFormerConfig  # noqa: E402
from qwen import QwenConfig  # noqa: E402
from vit import ViTConfig  # noqa: E402

B, T = 4, 512


def small_config(freeze):
    """The real architecture, narrow (compute ~ width^2, activations ~ width) and long (activations
    ~ tokens) so activations weigh tens of MB in a step of a few bf16 GFLOP; a wide, short ViT
    (frozen: its weights count, its forward is cheap)."""
    return MMConfig(vit=ViTConfig(img_size=56, patch_size=14, width=512, depth=2, n_head=8, mlp_dim=2048),
                    qformer=QFormerConfig(hidden=128, n_layer=2, n_head=4, ffn=512, num_query=8, encoder_width=512),
                    llm=QwenConfig(vocab_size=2048, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, intermediate_size=384,
                                   rope_theta=10000.0, max_seq_len=T, tie_embeddings=False, version="qwen1"),
                    freeze=freeze, image_token_id=7)


def vm(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def batch_of(config, B, T):
    """B full-length rows of T tokens, the first num_query of each the image's slots."""
    ids = torch.randint(8, config.llm.vocab_size, (B, T))
    ids[:, :config.qformer.num_query] = config.image_token_id
    return dict(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones(B, T, dtype=torch.long),
                images=torch.randn(B, 3, config.vit.img_size, config.vit.img_size))


def child(freeze, grad_checkpointing):
    """Real training steps (train.py's optimizer and forward_backward, autocast bf16, frozen parts
    in bf16); prints the peak RSS above what the process held before the model existed. A first
    run at a tiny batch pages in the kernels' code (file-backed RSS) so that it is in the baseline."""
    import train
    torch.manual_seed(0)
    config, ctx = small_config(freeze), torch.autocast("cpu", dtype=torch.bfloat16)

    def steps(batch, n):
        with torch.device("meta"):  # born in bf16: no fp32 copy of the frozen parts first
            model = MultimodalLM(config).cast_frozen(torch.bfloat16)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.vit.grad_checkpointing = model.llm.grad_checkpointing = grad_checkpointing
        opt = train.optimizer(train.Config(), model)
        for _ in range(n):  # the second step is the steady state: the optimizer state exists
            train.forward_backward(model, [batch], B * T, ctx, torch.device("cpu"))
            opt.step()
            opt.zero_grad(set_to_none=True)

    steps(batch_of(config, 1, 64), 1)
    batch = batch_of(config, B, T)
    base = vm("VmRSS")
    steps(batch, 2)
    print(json.dumps({"peak": vm("VmHWM") - base}))


@pytest.mark.parametrize("freeze,grad_checkpointing", [("pretrain", False), ("pretrain", True),
                                                       ("sft", False), ("sft", True)])
def test_plan_matches_measured_peak(freeze, grad_checkpointing):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # big tensors: mmap, freed at once
    out = subprocess.run([sys.executable, __file__, freeze, str(grad_checkpointing)], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.splitlines()[-1])["peak"]
    (stage,) = plan.plan_training(small_config(freeze), B, T, grad_checkpointing=grad_checkpointing,
                                  frozen_dtype=torch.bfloat16, device="cpu")
    print(freeze, grad_checkpointing, stage, measured)
    assert abs(stage["peak"] - measured) <= 0.15 * measured, (stage["peak"] / 2 ** 20, measured / 2 ** 20)



def test_plan_arithmetic_matches_the_model():
    """Parameters per stage add up to the real model's; gradients, AdamW state and the data-parallel
    buffer are 4, 8 and 4 bytes per trainable parameter; frozen weights count at 2 bytes; the
    in-flight microbatches are the schedule's."""
    config = small_config("sft")
    with torch.device("meta"):
        model = MultimodalLM(config)
    numel = sum(p.numel() for p in model.parameters())
    stages = plan.plan_training(config, 2, 64, grad_accum=4, num_stages=2, nproc=4, frozen_dtype=torch.bfloat16,
                                device="cpu")
    assert sum(s["params"] for s in stages) == numel
    assert sum(s["trainable"] for s in stages) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for n in ("vit", "qformer") for p in model.parts()[n].parameters())
    assert sum(s["weights"] for s in stages) == 2 * frozen + 4 * (numel - frozen)
    for s in stages:
        assert (s["grads"], s["optimizer"], s["dp_buffer"]) == (4 * s["trainable"], 8 * s["trainable"], 4 * s["trainable"])
        assert s["peak"] == s["weights"] + 16 * s["trainable"] + max(s["activations"], s["optimizer_step"])
    assert [s["in_flight"] for s in stages] == [2, 1]  # 1F1B: p - stage
    gpipe = plan.plan_training(config, 2, 64, grad_accum=4, num_stages=2, schedule="gpipe", device="cpu")
    assert [s["in_flight"] for s in gpipe] == [4, 4] and [s["blocks"] for s in gpipe] == [s["blocks"] for s in stages]
    assert gpipe[0]["activations"] > stages[0]["activations"]


def test_public_parameter_counts():
    """The published sizes: Qwen-7B 7.72B, BLIP-2's EVA-ViT-g (39 of its 40 blocks) 0.99B."""
    mode, model = plan.fake_model(MMConfig.preset("minigpt4qwen"))
    ranges = [(0, model.config.llm.n_layer)]
    counts = {}
    for name, t in plan.stage_parts(model, ranges, 0):
        if isinstance(t, torch.nn.Parameter):
            counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + t.numel()
    assert round(counts["llm"] / 1e9, 2) == 7.72 and round(counts["vit"] / 1e9, 2) == 0.99
    assert counts["llm"] == sum(p.numel() for p in model.llm.parameters())


def test_chat_plan_kv_cache():
    config = small_config("sft")
    p = plan.plan_chat(config, torch.bfloat16, context=128, new_tokens=32)
    llm = config.llm
    assert p["kv_cache"] == 2 * llm.n_layer * 128 * llm.n_kv_head * (llm.n_embd // llm.n_head) * 2
    with torch.device("meta"):
        model = MultimodalLM(config)
    assert p["weights"] == 2 * sum(p.numel() for p in model.parameters())


def test_frozen_dtype_casts_frozen_parts():
    import train
    cfg = train.parse_args(["--freeze=pretrain", "--dtype=bf16", "--frozen_dtype=bf16"])
    model = train.build(cfg, ["red", "square"])[0]
    assert {n: next(m.parameters()).dtype for n, m in model.parts().items()} == \
        dict(vit=torch.bfloat16, qformer=torch.bfloat16, proj=torch.float32, llm=torch.bfloat16)


def test_plan_command_line_errors(capsys):
    import chat
    import train
    cases = {("--preset=huge", "--plan"): "error: unknown preset 'huge'; presets: toy, toy-long,",
             ("--preset=minigpt4qwen", "--plan", "--device_memory=lots"):
                 "error: --device_memory='lots': expected a size like 24GB or 8000MB",
             ("--preset=mpp-qwen7b-pretrain", "--plan", "--nproc=3"): "error: --nproc=3 is not a multiple of --num_stages=2",
             ("--nproc=8",): "error: --nproc need --plan"}
    for argv, msg in cases.items():
        assert train.main(list(argv)) == 2
        assert capsys.readouterr().err.startswith(msg), argv
    assert chat.main(["--plan", "--model=huge"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown model preset 'huge'")
    assert chat.main(["--plan", "--model=tinygpt-v", "--device_memory=8 gigs"]) == 1
    assert "expected a size like 24GB" in capsys.readouterr().err
    assert plan.parse_size("24GB") == 24 * 2 ** 30 and plan.parse_size("8000MB") == 8000 * 2 ** 20


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2] == "True")
