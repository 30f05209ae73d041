"""train.py: config parsing, a short run learns, exact resume after Ctrl-C, plain python as 2
processes that stop together on Ctrl-C, NaN stop, a crash at every step of a save then resume,
held-out evaluation (evaluate.py) by the model's chat template, and DDP / accumulation gradients equal to one
process on the whole batch (2 gloo processes)."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

import ckpt
import train
from conftest import interrupt_after
from data import IMAGE_TOKEN, TEMPLATES, collate
from evaluate import evaluate
from model import MMConfig, MultimodalLM
from phi import PhiConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(tmp_path, out="run", **kw):
    args = dict(synthetic_root=tmp_path / "data", out_dir=tmp_path / out, n_train=128, n_val=16, batch_size=8,
                max_iters=12, warmup_iters=2, curriculum_iters=6, eval_every=0, eval_samples=16, log_every=1, ckpt_every=0, threads=1,
                cpu_processes=1)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def test_overrides_are_type_checked():
    cfg = train.parse_args(["--lr=1e-3", "--max_iters=7", "--resume", "--augment=false", "--preset=toy-long"])
    assert (cfg.lr, cfg.max_iters, cfg.resume, cfg.augment) == (1e-3, 7, True, False)
    assert cfg.eval_every == train.TRAIN_PRESETS["toy-long"]["eval_every"] and cfg.out_dir == os.path.join("out", "toy-long")
    cases = {"--lr=fast": "--lr: expected float, got 'fast'",
             "--max_iters=1.5": "--max_iters: expected int, got '1.5'",
             "--resume=maybe": "--resume: expected true or false, got 'maybe'",
             "--lr": "--lr needs a value: --lr=...",
             "--preset=huge": "unknown preset 'huge'; presets: toy, toy-long, mpp-qwen7b-pretrain, mpp-qwen7b-sft, "
                              "mpp-qwen14b-pretrain, mpp-qwen14b-sft, minigpt4qwen, mpp-qwen2.5-0.5b-pretrain, "
                              "mpp-qwen2.5-1.5b-pretrain, tinygptv-phi2, minigpt4-vicuna7b-finetune",
             "--frozen_dtype=fp8": "--frozen_dtype='fp8': expected one of fp32, bf16",
             "--num_stages=0": "--num_stages=0: expected 1 or more",
             "--frozen_dtype=bf16": "--frozen_dtype=bf16 needs --dtype=bf16: the bf16 frozen parts and the fp32 "
                                    "trainable ones meet inside one autocast (got --dtype=auto)"}
    for arg, msg in cases.items():
        with pytest.raises(train.ConfigError) as e:
            train.parse_args([arg])
        assert str(e.value) == msg
    for arg in ("--learning_rate=1", "lr=1"):
        with pytest.raises(train.ConfigError, match=f"^unknown config key '{arg}'; keys: preset, data, "):
            train.parse_args([arg])
    assert train.main(["--nope=1"]) == 2


def test_short_run_lowers_loss(tmp_path):
    curve, _ = train.train(train.parse_args(tiny_args(tmp_path, max_iters=25, lr=3e-3)))
    losses = [l for _, l in curve]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    step = ckpt.resolve(tmp_path / "run")  # the files of the last save, which `latest` names
    assert os.path.basename(step) == "step-000025" and sorted(os.listdir(tmp_path / "run")) == [
        "latest", "loss.png", "metrics.jsonl", "step-000025"]
    assert sorted(os.listdir(step)) == ["config.json", "model.safetensors", "tokenizer.tiktoken", "tokenizer_config.json",
                                        "train_state.pt"]
    model = MultimodalLM.from_checkpoint(tmp_path / "run")  # what chat.py loads
    assert model.config.loss_norm == "sample"


def test_ctrl_c_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    full, _ = train.train(train.parse_args(tiny_args(tmp_path, "full", grad_accum=2)))
    monkeypatch.setattr(train, "step_batches", interrupt_after(5))
    first, _ = train.train(train.parse_args(tiny_args(tmp_path, "split", grad_accum=2)))
    assert [s for s, _ in first] == [1, 2, 3, 4, 5]  # finished the step it was in, saved, stopped
    monkeypatch.undo()
    rest, _ = train.train(train.parse_args(tiny_args(tmp_path, "split", grad_accum=2) + ["--resume"]))
    assert first + rest == full  # bit-identical losses, steps 1..12


def test_background_workers_give_the_same_run_and_the_same_errors(tmp_path):
    """Batches built by 2 DataLoader workers: the same losses as in-process, an exact resume, and a
    bad image reported with its row and file as without workers. Augmentation is on: its draws
    depend on (seed, step, rank) only, so a worker draws what the training process would."""
    args = lambda out, **kw: tiny_args(tmp_path, out, **{"max_iters": 6, "ckpt_every": 3, "augment": True, **kw})
    here, _ = train.train(train.parse_args(args("here")))
    there, _ = train.train(train.parse_args(args("workers", num_workers=2)))
    assert there == here
    first, _ = train.train(train.parse_args(args("resumed", num_workers=2, max_iters=3)))
    rest, _ = train.train(train.parse_args(args("resumed", num_workers=2) + ["--resume"]))
    assert first + rest == here
    cfg = train.parse_args(args("bad", num_workers=2))
    torch.manual_seed(0)
    model, tok, _ = train.build(cfg, train.datasets(cfg))
    ds = train.datasets(cfg, tok, model.config)[0]
    first_rows = train.StepBatches(cfg, ds, 0, 0, 1).rows(0)
    broken = ds.samples[first_rows[0]]["media"][0]
    with open(broken, "r+b") as f:  # truncate an image the first step needs
        f.truncate(40)
    with pytest.raises(ValueError) as here_error:
        next(train.step_batches(train.parse_args(args("bad")), ds, 0, 0, 1, 0))
    with pytest.raises(ValueError) as worker_error:
        next(train.step_batches(cfg, ds, 0, 0, 1, 0))
    msg = str(here_error.value)
    assert msg == f"{ds.json_path} row {ds.samples[first_rows[0]]['row']}: not an image file (unrecognised format): {broken}"
    assert msg in str(worker_error.value) and "DataLoader worker process" in str(worker_error.value)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    args = tiny_args(tmp_path, ckpt_every=4)
    forward = MultimodalLM.forward
    calls = []

    def poisoned(self, batch, count=None, **kw):
        logits, loss = forward(self, batch, count, **kw)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) == 7 else loss
    monkeypatch.setattr(MultimodalLM, "forward", poisoned)
    out = tmp_path / "run"
    assert train.main(args) == 1
    msg = (f"error: step 6: loss is nan; stopping without saving. The last good checkpoint in {out} "
           f"(step 4) is intact.\n")
    assert capsys.readouterr().err.endswith(msg)
    step = ckpt.resolve(out)
    assert torch.load(os.path.join(step, "train_state.pt"), weights_only=True)["step"] == 4
    assert ckpt.load_config(out)["train"]["step"] == 4
    monkeypatch.undo()
    MultimodalLM.from_checkpoint(out)  # the checkpoint is whole and loads


# ----------------------------------------------------------------------------- crash in the middle of a save

CRASH = """
import os, sys
import train
# Count this rank's file-system events (fsync, rename, delete: those named in argv[3]) during the
# save of step 4 and end the process with no clean-up, as a power cut would, right after the k-th.
k, rank, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
events, armed = [0], [False]
save = train.save
def counted_save(cfg, model, tok, opt, step, runner=None):
    armed[0] = step == 4 and int(os.environ.get("RANK", 0)) == rank
    save(cfg, model, tok, opt, step, runner)
    if armed[0]:
        print("events", events[0], flush=True)
train.save = counted_save
def crash_after(fn):
    def wrapped(*args, **kw):
        out = fn(*args, **kw)
        if armed[0]:
            events[0] += 1
            if events[0] == k:
                os._exit(3)
        return out
    return wrapped
for name in names:
    setattr(os, name, crash_after(getattr(os, name)))
sys.exit(train.main(sys.argv[4:]))
"""
EVENTS = "fsync,replace,rename,unlink,rmdir"


def crash_run(tmp_path, k, args, rank=0, events=EVENTS, nproc=1):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(nproc), "--master_port", str(free_port())]
    return subprocess.run([*launch, str(script), str(k), str(rank), events, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_crash_at_any_instant_of_a_save_resumes_exactly(tmp_path):
    """Crash after each fsync, rename and delete of the save at step 4 of a run checkpointed every
    2 steps; --resume then continues from step 2 or step 4 and gives the uninterrupted losses."""
    args = lambda k: tiny_args(tmp_path, f"crash{k}", max_iters=6, ckpt_every=2)  # a fresh run each time
    full, _ = train.train(train.parse_args(tiny_args(tmp_path, "full", max_iters=6, ckpt_every=2)))
    counted = crash_run(tmp_path, 0, args(0))  # k = 0: no crash, just count
    assert counted.returncode == 0, counted.stderr
    n = int(counted.stdout.split("events ")[1].split()[0])
    assert n >= 5, counted.stdout  # at least one event per file of the save
    resumed_from = set()
    for k in range(1, n + 1):
        crashed = crash_run(tmp_path, k, args(k))
        assert crashed.returncode == 3, (k, crashed.stderr[-2000:])
        step = int(os.path.basename(ckpt.resolve(tmp_path / f"crash{k}")).split("-")[1])
        resumed_from.add(step)
        rest, _ = train.train(train.parse_args(args(k) + ["--resume"]))
        assert rest == full[step:], f"crash after event {k} of {n}, resumed from step {step}"
    assert resumed_from == {2, 4}  # before the pointer moved, the old step; after it, the new one


def test_plain_python_runs_two_processes_that_stop_together_on_ctrl_c(tmp_path):
    """`python train.py` with cpu_processes=2 on a 2+ core CPU re-runs itself as 2 gloo
    processes. Ctrl-C (SIGINT to the terminal's process group) lands mid-step at a different point
    on each; they agree to stop after the same step, save it, and every process exits cleanly."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPU cores")
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "train.py", *tiny_args(tmp_path, cpu_processes=2, max_iters=100000)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while p.poll() is None and (not os.path.exists(out / "metrics.jsonl") or (out / "metrics.jsonl").read_text().count('"loss"') < 3):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert "2 data-parallel x 1 stage(s)" in stdout
    step = int(stdout.split("interrupted: saved step ")[1].split()[0])
    assert step >= 3 and ckpt.load_config(out)["train"]["step"] == step == len(losses(out))


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_pipeline_run_saves_every_stage_or_none_and_resumes_exactly(tmp_path):
    """torchrun, 2 gloo processes, 2 pipeline stages: each stage writes its shard and optimizer into
    the step's staging directory and rank 0 merges and commits. A crash of the stage-1 process
    while it writes its shard, or of rank 0 at either rename, then --resume gives the losses of
    the uninterrupted run; the merged model of the last step loads for chat."""
    args = lambda out: tiny_args(tmp_path, out, max_iters=6, ckpt_every=2, num_stages=2, max_len=128, batch_size=4,
                                 grad_accum=2)
    full = crash_run(tmp_path, 0, args("full"), nproc=2)
    assert full.returncode == 0, full.stderr[-3000:]
    want = losses(tmp_path / "full")
    assert len(want) == 6
    step = ckpt.resolve(tmp_path / "full")
    assert {"stage0-of-2.safetensors", "stage1-of-2.safetensors", "train_state0.pt", "train_state1.pt",
            "model.safetensors"} <= set(os.listdir(step))
    MultimodalLM.from_checkpoint(tmp_path / "full")  # the merged shards: every key checked
    for name, (k, rank, events, start) in {"stage1-shard": (1, 1, "fsync", 2), "commit": (1, 0, "replace,rename", 2),
                                           "latest": (2, 0, "replace,rename", 4)}.items():
        crashed = crash_run(tmp_path, k, args(name), rank=rank, events=events, nproc=2)
        assert crashed.returncode != 0 and "events" not in crashed.stdout, (name, crashed.stdout[-2000:])
        assert os.path.basename(ckpt.resolve(tmp_path / name)) == f"step-{start:06d}", name
        resumed = crash_run(tmp_path, 0, args(name) + ["--resume"], nproc=2)
        assert resumed.returncode == 0, (name, resumed.stderr[-3000:])
        assert losses(tmp_path / name)[-(6 - start):] == want[start:], name


def test_pipeline_without_a_fitting_world_is_one_error_line(tmp_path, monkeypatch, capsys):
    """`python train.py --num_stages=2` without torchrun (or with a world that is not a multiple of
    it): one line, exit 2, nothing written, like every other bad config."""
    for world, n, processes in ((None, 1, 1), ("3", 3, 1), (None, 3, 3)):  # the last: 3 self-launched CPU workers
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        assert train.main(tiny_args(tmp_path, num_stages=2, cpu_processes=processes)) == 2
        assert capsys.readouterr().err == (f"error: --num_stages=2 needs torchrun with a multiple of 2 processes, "
                                           f"this run has {n}\n")
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "data")


def stalled_stage_worker(rank, tmp_path, port, timeout):
    """One of 2 pipeline ranks of train.train with --timeout; stage 1 stalls in its first forward.
    Writes (the timeouts of its default, pipeline and data-parallel groups, the error it ended with)."""
    import pipeline
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    cfg = train.parse_args(tiny_args(tmp_path, num_stages=2, max_len=128, batch_size=4, grad_accum=2, max_iters=2,
                                     timeout=timeout))
    seen, setup, forward = {}, train.setup, pipeline.PipelineRunner.stage_forward

    def recording_setup(cfg):
        out = setup(cfg)
        seen["groups"] = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                          for g in (torch.distributed.group.WORLD, *out[2:])]
        return out

    def stalling_forward(self, x, mb):
        if not self.is_first:
            time.sleep(600)  # killed by the test once rank 0 has reported
        return forward(self, x, mb)
    train.setup, pipeline.PipelineRunner.stage_forward = recording_setup, stalling_forward
    try:
        train.train(cfg)
        seen["error"] = None
    except RuntimeError as e:
        seen["error"] = str(e)
    torch.save(seen, tmp_path / f"stalled{rank}.pt")
    os._exit(0)  # a process group with a stalled peer cannot be shut down cleanly


def test_timeout_is_every_collectives_bound_and_a_stalled_stage_is_named(tmp_path):
    """--timeout reaches the default group, the pipeline and data-parallel groups and the pipeline's
    exchanges: rank 0 reports the stalled stage-1 rank after --timeout seconds, not the default 60."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train.datasets(train.parse_args(tiny_args(tmp_path)))  # the dataset once, before the workers race for it
    procs = mp.start_processes(stalled_stage_worker, args=(tmp_path, port, 10.0), nprocs=2, start_method="spawn",
                               join=False)
    try:
        for _ in range(150):
            if os.path.exists(tmp_path / "stalled0.pt"):
                break
            time.sleep(1)
        else:
            pytest.fail("rank 0 did not report the stalled stage in 150 s")
    finally:
        for p in procs.processes:
            p.kill()
    seen = torch.load(tmp_path / "stalled0.pt", weights_only=True)
    assert seen["groups"] == [10.0, 10.0, 10.0]
    assert seen["error"].startswith("pipeline rank 0 (stage 0): exchange with rank 1 failed or timed out after 10.0s: ")


def test_resume_refuses_files_of_different_steps(tmp_path):
    args = tiny_args(tmp_path, max_iters=4, ckpt_every=2)
    train.train(train.parse_args(args))
    d = ckpt.resolve(tmp_path / "run")
    state = torch.load(os.path.join(d, "train_state.pt"), weights_only=True)
    torch.save({**state, "step": 2}, os.path.join(d, "train_state.pt"))  # a file from another save
    with pytest.raises(ckpt.CheckpointError, match=rf"^--resume: the files of {d} belong to different steps: "
                                                   rf"{d}/train_state.pt step 2, {d}/config.json step 4$"):
        train.train(train.parse_args(args + ["--max_iters=6", "--resume"]))


# ----------------------------------------------------------------------------- held-out evaluation

@pytest.mark.parametrize("llm_type", ["qwen", "phi"])
def test_evaluate_cuts_answers_by_the_models_template(tmp_path, llm_type, monkeypatch):
    """An oracle that answers every held-out question with the true answer scores 100% for either
    template: the gold answer is cut at the template's own end (ChatML: <|im_end|>\\n, phi:
    <|endoftext|>) and generation stops on its stop tokens."""
    cfg = train.parse_args(tiny_args(tmp_path))
    torch.manual_seed(0)
    model, tok, _ = train.build(cfg, train.datasets(cfg))
    if llm_type == "phi":
        llm = PhiConfig(**{**PhiConfig.preset("tiny").__dict__, "vocab_size": model.config.llm.vocab_size})
        model = MultimodalLM(MMConfig(vit=model.config.vit, qformer=model.config.qformer, llm=llm, llm_type="phi",
                                      image_token_id=tok.token_id(IMAGE_TOKEN)))
    val = train.datasets(cfg, tok, model.config)[1]
    template = TEMPLATES[{"qwen": "chatml", "phi": "phi"}[llm_type]]
    rows = json.load(open(val.ds.json_path))
    lead = " " if llm_type == "phi" else ""  # phi answers follow [/INST] after a space
    answers = [tok.encode(lead + (r["output"][-1] if isinstance(r["output"], list) else r["output"])) for r in rows]

    def oracle(ids, images, mask, max_new_tokens, stop_ids):
        assert stop_ids == [tok.token_id(s) for s in template["stops"]]
        lo = oracle.seen
        oracle.seen += len(ids)
        return answers[lo:lo + len(ids)]
    oracle.seen = 0
    monkeypatch.setattr(model, "generate", oracle)
    _, acc = evaluate(model, val, tok, cfg, train.nullcontext())
    assert set(acc.values()) == {1.0} and oracle.seen == 16


# ----------------------------------------------------------------------------- data parallel

def setup(tmp_path):
    cfg = train.parse_args(tiny_args(tmp_path))
    torch.manual_seed(0)
    model, tok, _ = train.build(cfg, train.datasets(cfg))
    ds = train.datasets(cfg, tok, model.config)[0]
    return cfg, model, [ds[i] for i in range(8)], tok.token_id("<|endoftext|>")


def ddp_worker(rank, tmp_path, port):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=60))
    cfg, model, items, pad = setup(tmp_path)
    # rank r gets items r*4 .. r*4+3 as two microbatches of 2: accumulation and DDP at once
    micro = [collate(items[rank * 4 + k:rank * 4 + k + 2], pad) for k in (0, 2)]
    count = train.step_count(micro, cfg.loss_norm, dist.group.WORLD)
    loss = train.forward_backward(DistributedDataParallel(model), micro, count, train.nullcontext(), "cpu",
                                  dist.group.WORLD)
    if rank == 0:
        torch.save({"loss": loss, "count": count,
                    "grads": {n: p.grad for n, p in model.named_parameters()}}, tmp_path / "ddp.pt")
    dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_whole_batch(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    setup(tmp_path)  # generate the dataset once, before the workers race for it
    procs = mp.start_processes(ddp_worker, args=(tmp_path, port), nprocs=2, start_method="spawn", join=False)
    for _ in range(120):  # a hung collective fails the test instead of hanging it
        if procs.join(timeout=1):
            break
    else:
        for p in procs.processes:
            p.kill()
        pytest.fail("DDP workers did not finish in 120 s")
    cfg, model, items, pad = setup(tmp_path)
    whole = [collate(items, pad)]
    count = train.step_count(whole, cfg.loss_norm)
    loss = train.forward_backward(model, whole, count, train.nullcontext(), "cpu")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["count"] == count == 8  # per-sample normalisation: 8 samples in the step
    assert abs(ddp["loss"] - loss) < 1e-6
    for n, p in model.named_parameters():
        torch.testing.assert_close(ddp["grads"][n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_warm_up_on_data_without_tasks_is_refused_and_public_presets_skip_it():
    import train

    cfg = train.parse_args(["--data=mine.json"])
    with pytest.raises(ValueError, match=r"no training row has a task in curriculum_tasks="
                                         r"'position,position,position,position,count,shape,shape,caption' "
                                         r"\(rows name it in a 'task' field\); set --curriculum_iters=0"):
        next(train.step_batches(cfg, Rows([None] * 64), 0, 0, 1, 0))  # rows with no `task` field (real data)
    for name in (p for p in train.TRAIN_PRESETS if not p.startswith("toy")):
        assert train.parse_args([f"--preset={name}"]).curriculum_iters == 0, name


def test_synthetic_training_split_triples_count_and_held_out_split_is_even(tmp_path):
    from collections import Counter
    from synthetic import TASKS, make_synthetic
    d = make_synthetic(str(tmp_path), n_train=40, n_val=16, image_size=8, count_share=3)
    tasks = {}
    for split in ("train", "val"):
        with open(d[split]) as f:
            tasks[split] = Counter(r["task"] for r in json.load(f))
    assert tasks["train"] == {**{t: 4 for t in TASKS}, "count": 12}  # 4 cycles of 8 tasks + 2 more counts
    assert tasks["val"] == {t: 2 for t in TASKS}


DRAW = """import json, sys, synthetic
drew, draw = [], synthetic._draw
synthetic._draw = lambda *a: drew.append(1) or draw(*a)
d = synthetic.make_synthetic(sys.argv[1], n_train=2000, n_val=16, image_size=8)
print(json.dumps(dict(drew=bool(drew), rows=open(d["train"]).read())))"""


def test_two_processes_starting_together_draw_the_synthetic_data_once(tmp_path):
    """The ranks of `python train.py` start together: one draws the data, the other waits for it."""
    run = lambda: subprocess.Popen([sys.executable, "-c", DRAW, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                                   text=True, env={**os.environ, "PYTHONPATH": ROOT})
    procs = [run(), run()]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o["drew"] for o in outs) == [False, True] and outs[0]["rows"] == outs[1]["rows"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # no half-drawn copy left behind


class Rows:
    """The part of a VLDataset that StepBatches reads: rows whose `task` fields are `tasks`."""

    def __init__(self, tasks):
        self.tasks = tasks

    def __len__(self):
        return len(self.tasks)

    def rows_with_task(self, names):
        return [i for i, t in enumerate(self.tasks) if t in names]


def test_data_parallel_ranks_share_out_the_rows_one_process_draws_and_keep_their_own():
    """Each step, the ranks' rows together are the rows a one-process run of the whole batch draws;
    a row goes back to its own rank (row % ranks) unless that rank's hand is full."""
    tasks = ["count", "colour", "shape"] * 100
    for ranks in (2, 3):
        cfg = train.parse_args(["--curriculum_tasks=count,colour", "--curriculum_iters=4", "--oversample=shape",
                                f"--batch_size={12 // ranks}", "--grad_accum=2", "--max_iters=60"])
        one = train.StepBatches(replace(cfg, batch_size=12, grad_accum=2), Rows(tasks), 0, 0, 1)
        split = [train.StepBatches(cfg, Rows(tasks), 0, r, ranks) for r in range(ranks)]
        owned = 0
        for step in range(60):  # the warm-up, then epochs of the whole pool
            hands = [s.rows(step) for s in split]
            assert sorted(i for h in hands for i in h) == sorted(one.rows(step)), (ranks, step)
            assert [len(h) for h in hands] == [24 // ranks] * ranks
            owned += sum(i % ranks == r for r, h in enumerate(hands) for i in h)
        assert owned / (60 * 24) > 0.8, owned
    assert train.deal([4, 2, 6, 0, 1, 8, 5, 3, 7], 3, 3) == [[6, 0, 3], [4, 1, 7], [2, 8, 5]]
    assert train.deal([0, 2, 4, 6, 8, 1, 3, 5], 2, 4) == [[0, 2, 4, 6], [1, 3, 5, 8]]  # 8 overflows to rank 1


def test_a_task_named_twice_has_its_rows_twice_in_the_warm_up_and_after_it():
    from collections import Counter
    tasks = ["compare", "position", "count", "colour"] * 8
    cfg = train.parse_args(["--oversample=compare,compare,position", "--curriculum_tasks=count,colour,colour",
                            "--curriculum_iters=3", "--batch_size=4", "--max_iters=40"])
    steps = train.StepBatches(cfg, Rows(tasks), 0, 0, 1)
    assert Counter(tasks[i] for i in steps.easy) == {"count": 8, "colour": 16}
    assert Counter(tasks[i] for i in steps.everything) == {"compare": 24, "position": 16, "count": 8, "colour": 8}
    assert {tasks[i] for s in range(3) for i in steps.rows(s)} <= {"count", "colour"}  # the warm-up
    drawn = Counter(tasks[i] for s in range(3, 3 + 14) for i in steps.rows(s))  # one epoch: 56 rows
    assert drawn == {"compare": 24, "position": 16, "count": 8, "colour": 8}

