"""Pipeline tests: the schedule tables on paper, then gloo processes on CPU whose gradients must equal
one process's (a transformer-ish chain with masked labels), torch.distributed.pipelining on the same
stages, instrumentation of in-flight microbatches, and a killed rank ending the run."""
import copy
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from pipeline import (PipelineEngine, comm_plan, make_groups, peak_in_flight, schedule_table, simulate,
                      validate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- on paper


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_tables_are_valid_deadlock_free_with_textbook_bubble(schedule):
    for p in range(1, 6):
        for m in range(1, 11):
            tables = [schedule_table(schedule, p, r, m) for r in range(p)]
            for table in tables:
                validate(table, m)
            _, bubble = simulate(tables)
            assert bubble == pytest.approx((p - 1) / (m + p - 1))
            expect = [m] * p if schedule == "gpipe" else [min(p - r, m) for r in range(p)]
            assert [peak_in_flight(t) for t in tables] == expect


def test_comm_plan_pairs_send_with_next_receive():
    # middle stage of 1F1B, p=3, m=2: F0 then (send F0 out, take grad of 0 in) ...
    plan = comm_plan(schedule_table("1f1b", 3, 1, 2), 1, 3)
    assert plan == [[("recv", "F", 0, 0)], [("send", "F", 0, 2), ("recv", "F", 1, 0)],
                    [("send", "F", 1, 2), ("recv", "B", 0, 2)], [("send", "B", 0, 0), ("recv", "B", 1, 2)],
                    [("send", "B", 1, 0)]]


def test_simulate_finds_deadlock_and_misordered_links():
    with pytest.raises(RuntimeError, match=r"deadlock: rank 0 before \('B', 0\), rank 1 before \('F', 1\)"):
        simulate([[("F", 0), ("B", 0), ("F", 1), ("B", 1)], [("F", 0), ("F", 1), ("B", 0), ("B", 1)]])
    with pytest.raises(RuntimeError, match=r"B messages 1->0: sent in order \[1, 0\], received in order \[0, 1\]"):
        simulate([[("F", 0), ("F", 1), ("B", 0), ("B", 1)], [("F", 0), ("F", 1), ("B", 1), ("B", 0)]])
    with pytest.raises(ValueError, match="microbatch 0: backward before forward"):
        validate([("B", 0), ("F", 0)], 1)


def test_cli_prints_timeline_bubble_and_peak():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pipeline.py"), "--stages", "4", "--microbatches", "8",
                          "--schedule", "1f1b"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "rank 3 |.. .. .. F0 B0 B0 F1" in out
    assert "bubble fraction 0.273  ((p-1)/(m+p-1) = 0.273)" in out
    assert "peak in-flight microbatches per rank: [4, 3, 2, 1]" in out

# ----------------------------------------------------------------------------- a chain of modules


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Chain(nn.Module):
    """embed -> blocks -> norm -> head; names shared with the stages so gradients compare by name."""

    def __init__(self, vocab=32, d=16, n=4, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleDict({str(i): Block(d) for i in range(n)})
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.norm(x))


class ChainStage(nn.Module):
    def __init__(self, full, stage, p):
        super().__init__()
        n = len(full.blocks)
        self.first, self.last = stage == 0, stage == p - 1
        self.embed = full.embed if self.first else None
        self.blocks = nn.ModuleDict({str(i): full.blocks[str(i)] for i in range(stage * n // p, (stage + 1) * n // p)})
        self.norm, self.head = (full.norm, full.head) if self.last else (None, None)

    def forward(self, x, mb):
        x = self.embed(mb["ids"]) if self.first else x
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.norm(x)) if self.last else x


def ce_sum(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def make_batch(seed, n, T=8, vocab=32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    labels = torch.randint(0, vocab, (n, T), generator=g)
    labels[torch.rand(n, T, generator=g) < 0.4] = -100  # uneven masks: a mean of means would be wrong
    return ids, labels


def reference_grads(model, ids, labels):
    loss = ce_sum(model(ids), labels) / (labels != -100).sum()
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters(remove_duplicate=False)}


def assert_grads(stage_module, ref, where):
    names = [k for k, p in stage_module.named_parameters()]
    assert names, where
    for k, p in stage_module.named_parameters():
        err = ((p.grad - ref[k]).abs() - 1e-5 * ref[k].abs()).max().item()
        assert err <= 1e-7, f"{where} {k}: gradient off by {err:.2e} beyond rtol 1e-5"


@torch.no_grad()
def sgd(params, lr=0.1):  # by hand: torch.optim's first step costs seconds of imports
    for p in params:
        p -= lr * p.grad
        p.grad = None

# ----------------------------------------------------------------------------- processes


def _entry(rank, fn, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    fn(rank, world, *args)
    dist.destroy_process_group()


def spawn(fn, world, *args, timeout=150):
    """Run fn(rank, world, *args) in `world` gloo processes; fail (and kill them) after `timeout` s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_entry, args=(fn, world, port, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{fn.__name__} with {world} processes did not finish in {timeout}s")


def _run_ours(p, pp, dpg, schedule, m, tied, b=2, steps=2):
    """Two SGD steps with our engine vs one process on the replica-concatenated batch."""
    stage, dp, d = dist.get_rank(pp), dist.get_world_size(dpg), dist.get_rank(dpg)
    torch.manual_seed(0)
    full = Chain(tied=tied)
    ref = copy.deepcopy(full)
    mod = ChainStage(full, stage, p)
    tied = tied and stage in (0, p - 1)
    engine = PipelineEngine(mod, pp, dpg, act_shape=lambda mb: (*mb["ids"].shape, 16),
                            loss_fn=(lambda out, mb: ce_sum(out, mb["labels"])) if stage == p - 1 else None,
                            schedule=schedule, tied=[mod.embed.weight if stage == 0 else mod.head.weight] if tied else (),
                            timeout=30)
    where = f"{schedule} p={p} dp={dp} m={m} tied={tied} stage={stage} dp_rank={d}"
    for step in range(steps):
        ids, labels = make_batch(100 + step, dp * m * b)
        ref_loss, grads = reference_grads(ref, ids, labels)
        mine = [dict(ids=ids[j * b:(j + 1) * b], labels=labels[j * b:(j + 1) * b]) for j in range(d * m, (d + 1) * m)]
        loss = engine.step(mine, (labels != -100).sum())
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (where, loss, ref_loss)
        assert_grads(mod, grads, f"{where} step {step}")
        peak = engine.stats["peak_in_flight"]
        assert peak == (m if schedule == "gpipe" else min(p - stage, m)), (where, peak)
        sgd(mod.parameters())
        sgd(ref.parameters())
    ref_loss = ce_sum(ref(ids), labels).item() / (labels != -100).sum().item()
    assert abs(engine.evaluate(mine, (labels != -100).sum()) - ref_loss) <= 1e-5 * ref_loss, where


def _run_torch(p, pp, schedule, m, b=2):
    """The same stages under torch.distributed.pipelining give the one-process gradients too."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    class Wrap(nn.Module):  # torch passes positional tensors only: ids in, logits out
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, x):
            return self.stage(None, {"ids": x}) if self.stage.first else self.stage(x, None)
    stage = dist.get_rank(pp)
    torch.manual_seed(0)
    full = Chain()
    ref = copy.deepcopy(full)
    mod = Wrap(ChainStage(full, stage, p))
    ids, labels = make_batch(7, m * b)
    count = (labels != -100).sum()
    _, grads = reference_grads(ref, ids, labels)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = cls(PipelineStage(mod, stage, p, torch.device("cpu"), group=pp), m,
                loss_fn=lambda out, target: ce_sum(out, target) / count, scale_grads=False)
    if stage == 0:
        sched.step(ids)
    elif stage == p - 1:
        sched.step(target=labels, losses=[])
    else:
        sched.step()
    assert_grads(mod.stage, grads, f"torch {schedule} p={p} m={m} stage={stage}")


# (phase, stages, ranks, implementations): jobs of one phase run side by side on disjoint ranks of one
# 8-process world, so p in {2, 4} x dp in {1, 2} costs a single launch
JOBS = [(0, 4, range(8), ["ours"]), (1, 2, range(4), ["ours"]), (1, 4, range(4, 8), ["ours"]),
        (2, 2, range(2), ["ours", "torch"]), (2, 4, range(4, 8), ["torch"])]


def _cases(rank, world):
    mine = []
    for _, p, ranks, impls in JOBS:  # every rank creates every group, in the same order
        pp, dpg = make_groups(p, 30, ranks)
        torch_pp, _ = make_groups(p, 30, ranks)  # torch's messages on a group of their own
        if rank in ranks:
            mine.append((p, pp, dpg, torch_pp, impls))
    for p, pp, dpg, torch_pp, impls in mine:
        for schedule in ("gpipe", "1f1b"):
            if "ours" in impls:
                for m in (1, p, 2 * p + 1):
                    _run_ours(p, pp, dpg, schedule, m, tied=False)
                _run_ours(p, pp, dpg, schedule, p + 1, tied=True)
            if "torch" in impls:
                for m in (p, 2 * p + 1):
                    _run_torch(p, torch_pp, schedule, m)


def test_gradients_equal_one_process():
    """p in {2, 4} x dp in {1, 2} x m in {1, p, 2p+1} x both schedules (+ tied weights, + torch's)."""
    spawn(_cases, 8)


def _killed(rank, world):
    """Ranks 0-1: rank 1 crashes; ranks 2-3: rank 3 stalls. The survivor's next step must fail fast,
    naming the peer."""
    groups = [make_groups(2, 5, pair) for pair in ([0, 1], [2, 3])]
    pp, dpg = groups[rank // 2]
    stage = rank % 2
    torch.manual_seed(0)
    mod = ChainStage(Chain(), stage, 2)
    engine = PipelineEngine(mod, pp, dpg, act_shape=lambda mb: (*mb["ids"].shape, 16),
                            loss_fn=(lambda out, mb: ce_sum(out, mb["labels"])) if stage == 1 else None, timeout=3)
    ids, labels = make_batch(0, 4)
    mbs = [dict(ids=ids[:2], labels=labels[:2]), dict(ids=ids[2:], labels=labels[2:])]
    engine.step(mbs, 10)
    if stage == 1:
        time.sleep(6 if rank == 3 else 0)  # rank 3 hangs past the timeout, rank 1 dies at once
        os._exit(0)
    t0 = time.time()
    with pytest.raises(RuntimeError, match=rf"pipeline rank {rank} \(stage 0\): exchange with rank {rank + 1} "
                                           r"failed or timed out after 3s"):
        engine.step(mbs, 10)
    assert time.time() - t0 < 3 + 2
    os._exit(0)  # a process group with a dead peer cannot be shut down cleanly


def test_crashed_or_stalled_rank_ends_the_step_naming_it():
    spawn(_killed, 4, timeout=90)

# ----------------------------------------------------------------------------- MultimodalLM


def test_split_layers_balances_compute_and_honours_first_share():
    from pipeline import split_layers
    assert split_layers(8, 2) == [(0, 4), (4, 8)]
    assert split_layers(8, 2, first_cost=2.0) == [(0, 3), (3, 8)]  # the vision tower counts on stage 0
    assert split_layers(24, 4, 2.5, 9.0) == [(0, 3), (3, 13), (13, 23), (23, 24)]  # and a big head on the last
    assert split_layers(8, 3, 5.0, first_share=4) == [(0, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="first_stage_share=7: need 0..6 of 8 blocks"):
        split_layers(8, 3, first_share=7)
    with pytest.raises(ValueError, match="3 decoder blocks cannot fill 4 stages"):
        split_layers(3, 4)


def mm_config(llm="qwen", freeze=(), n_layer=4):
    from model import MMConfig
    from phi import PhiConfig
    from qformer import QFormerConfig
    from qwen import QwenConfig
    from vit import ViTConfig
    llm_cfg = (QwenConfig if llm == "qwen" else PhiConfig).preset("tiny")
    llm_cfg.n_layer = n_layer
    return MMConfig(vit=ViTConfig.preset("tiny"), qformer=QFormerConfig.preset("tiny"), llm=llm_cfg, llm_type=llm,
                    freeze=freeze, image_token_id=5)


def mm_batch(seed, n, T=20, q=8, vocab=512):
    """One image per row (q image tokens after a 2-token prefix), right padding, masked labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (n, T), generator=g)
    ids[:, 2:2 + q] = 5
    lengths = torch.randint(T - 6, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = ids.masked_fill((mask == 0) | (torch.rand(n, T, generator=g) < 0.3), -100)
    labels[:, :2 + q] = -100
    return dict(input_ids=ids.masked_fill(mask == 0, 0), labels=labels, attention_mask=mask,
                images=torch.randn(n, 3, 56, 56, generator=g))


def _run_model(pp, dpg, llm, freeze, schedule, m, share, shard_dir, b=2):
    import ckpt
    from model import MultimodalLM, supervised_count
    from pipeline import PipelineRunner
    p, dp, d = dist.get_world_size(pp), dist.get_world_size(dpg), dist.get_rank(dpg)
    stage = dist.get_rank(pp)
    torch.manual_seed(0)
    model = MultimodalLM(mm_config(llm, freeze))
    ref = copy.deepcopy(model)
    runner = PipelineRunner(model, p, schedule, pp, dpg, first_stage_share=share, timeout=30)
    where = f"{llm} freeze={freeze} {schedule} p={p} dp={dp} m={m} stage={stage} dp_rank={d}"
    trainable = [p_ for p_ in ref.parameters() if p_.requires_grad]
    for step in range(2):
        batch = mm_batch(10 + step, dp * m * b)
        count = supervised_count(batch)
        _, ref_loss = ref(batch, count)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(trainable, 0.05).item()
        grads = {k: p_.grad for k, p_ in ref.named_parameters(remove_duplicate=False)}
        mine = [{k: v[j * b:(j + 1) * b] for k, v in batch.items()} for j in range(d * m, (d + 1) * m)]
        loss = runner.step(mine, count)
        assert abs(loss - ref_loss.item()) <= 1e-5 * ref_loss.item(), (where, loss, ref_loss.item())
        norm = runner.clip_grad_norm_(0.05)
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (where, norm, ref_norm)
        for k, p_ in runner.module.named_parameters():
            if not p_.requires_grad:
                assert p_.grad is None and grads[k] is None, f"{where}: frozen {k} got a gradient"
                continue
            assert grads[k].abs().sum() > 0, f"{where}: {k} does not train"
            err = ((p_.grad - grads[k]).abs() - 1e-5 * grads[k].abs()).max().item()
            assert err <= 1e-6, f"{where} step {step} {k}: gradient off by {err:.2e} beyond rtol 1e-5"
        sgd([p_ for p_ in runner.module.parameters() if p_.requires_grad], lr=1.0)
        sgd(trainable, lr=1.0)
    if d == 0:  # the first replica writes each stage's shard
        os.makedirs(shard_dir, exist_ok=True)
        ckpt.write_files(shard_dir, runner.shard_files(step=2))
    dist.barrier(group=pp)  # the replica's shards are all written (by the first replica) ...
    dist.barrier(group=dpg)  # ... including the one this stage's other replicas reload
    if stage == 0 and d == 0:  # the merged shards are the one-process model, every key of it
        merged, meta = ckpt.merge_stage_shards(sorted(os.path.join(shard_dir, f) for f in os.listdir(shard_dir)))
        full = ref.state_dict()
        assert meta["step"] == "2" and json.loads(meta["config"]) == model.config.to_dict(), where
        assert sorted(merged) == sorted(full), where
        for k, v in full.items():
            assert (merged[k] - v).abs().max() <= 1e-5 * v.abs().max() + 1e-7, f"{where}: merged {k}"
        from convert import convert_stages  # the CLI's merge: config from the shards, every key checked
        convert_stages(shard_dir, shard_dir + "-merged")
        loaded = MultimodalLM.from_checkpoint(shard_dir + "-merged").state_dict()
        assert sorted(loaded) == sorted(full) and all(torch.equal(loaded[k], merged[k]) for k in full), where
    with torch.no_grad():
        saved = {k: v.clone() for k, v in runner.module.state_dict().items()}
        for p_ in runner.module.parameters():
            p_.zero_()
    assert runner.load_shard(shard_dir) == 2  # resume: the same weights come back, and the step
    assert all(torch.equal(v, saved[k]) for k, v in runner.module.state_dict().items()), where


# (phase, stages, ranks, llm, freeze, schedule, m, first_stage_share); one phase's jobs run side by side
MODEL_JOBS = [(0, 4, range(4), "qwen", (), "1f1b", 5, None),             # everything trains, tied embeddings
              (1, 2, range(2), "qwen", "pretrain", "gpipe", 3, None),    # frozen LLM, only llm_proj learns
              (1, 2, range(2, 4), "phi", "sft", "1f1b", 3, None),        # untied Phi, frozen vision tower
              (2, 2, range(4), "qwen", "sft", "1f1b", 2, 1)]             # dp=2, tied, first-stage override


def _model_cases(rank, world, tmp):
    mine = []
    for j, (_, p, ranks, *job) in enumerate(MODEL_JOBS):
        pp, dpg = make_groups(p, 30, ranks)
        if rank in ranks:
            mine.append((pp, dpg, *job, os.path.join(tmp, str(j))))
    for job in mine:
        _run_model(*job)


def test_multimodal_pipeline_equals_one_process(tmp_path):
    """Images + masked labels + padding through MultimodalLM stages: loss, clipped gradients, frozen
    parts, tied embeddings, two steps; then stage shards merge into the one-process state."""
    spawn(_model_cases, 4, str(tmp_path))


class Reads(dict):
    """A state dict that records which keys were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _stage_from_checkpoint(rank, world, ckpt_dir):
    import ckpt
    from model import MultimodalLM
    from pipeline import PipelineRunner
    pp, dpg = make_groups(2, 30)
    model, state = MultimodalLM.from_checkpoint(ckpt_dir, lazy=True)
    state = Reads(state)
    runner = PipelineRunner(model, 2, "1f1b", pp, dpg, timeout=30, state=state)
    full = MultimodalLM.from_checkpoint(ckpt_dir).state_dict()
    mine = runner.module.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in mine.items()), rank  # the same weights as one process
    lo, hi = runner.ranges[rank]
    blocks = {f"llm.layers.{i}." for i in range(lo, hi)}
    for key in state.read:  # nothing of the other stage was read from the file
        owned = key.startswith(tuple(blocks)) or (rank == 0 and key.startswith(("vit.", "qformer.", "llm_proj.",
                                                                               "llm.embed_tokens.")))
        owned = owned or (rank == 1 and key.startswith(("llm.norm.", "llm.lm_head.", "llm.embed_tokens.")))
        assert owned, f"stage {rank} read {key}"
    share = sum(v.numel() for v in ckpt.state_of(runner.module).values())
    assert share < sum(v.numel() for k, v in full.items() if k != "llm.lm_head.weight"), rank
    assert all(not t.is_meta for t in mine.values())


def test_a_stage_loads_only_its_own_tensors_from_a_checkpoint(tmp_path):
    """MultimodalLM.from_checkpoint(lazy=True) + PipelineRunner(state=...): each of 2 ranks reads and
    casts only its stage's keys of the memory-mapped file (the tied head from the embedding's
    tensor), and holds exactly the one-process model's weights for them."""
    from model import MultimodalLM
    torch.manual_seed(0)
    MultimodalLM(mm_config()).save(str(tmp_path / "ck"))  # Qwen tiny: tied embeddings
    spawn(_stage_from_checkpoint, 2, str(tmp_path / "ck"))
