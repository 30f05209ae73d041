"""train.py: config parsing, a short run learns, exact resume after Ctrl-C, NaN stop, and DDP /
accumulation gradients equal to one process on the whole batch (2 gloo processes)."""
import json
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

import train
from data import collate
from model import MultimodalLM


def tiny_args(tmp_path, out="run", **kw):
    args = dict(synthetic_root=tmp_path / "data", out_dir=tmp_path / out, n_train=128, n_val=16, batch_size=8,
                max_iters=12, warmup_iters=2, curriculum_iters=6, eval_every=0, eval_samples=16, log_every=1, ckpt_every=0, threads=1)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def test_overrides_are_type_checked():
    cfg = train.parse_args(["--lr=1e-3", "--max_iters=7", "--resume", "--augment=false", "--preset=toy-long"])
    assert (cfg.lr, cfg.max_iters, cfg.resume, cfg.augment) == (1e-3, 7, True, False)
    assert cfg.eval_every == train.PRESETS["toy-long"]["eval_every"] and cfg.out_dir == os.path.join("out", "toy-long")
    cases = {"--lr=fast": "--lr: expected float, got 'fast'",
             "--max_iters=1.5": "--max_iters: expected int, got '1.5'",
             "--resume=maybe": "--resume: expected true or false, got 'maybe'",
             "--lr": "--lr needs a value: --lr=...",
             "--preset=huge": "unknown preset 'huge'; presets: toy, toy-long, mpp-qwen7b-pretrain, mpp-qwen7b-sft, tinygptv-phi2"}
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
    for name in ("model.safetensors", "config.json", "tokenizer.tiktoken", "train_state.pt", "loss.png", "metrics.jsonl"):
        assert (tmp_path / "run" / name).exists(), name
    model = MultimodalLM.from_checkpoint(tmp_path / "run")  # what chat.py loads
    assert model.config.loss_norm == "sample"


def interrupt_after(n):
    """Wrap step_batches: deliver a real SIGINT while the n-th step's batch is handed out, as a
    user pressing Ctrl-C in the middle of that step."""
    original = train.step_batches

    def wrapped(*args):
        for k, micro in enumerate(original(*args), 1):
            if k == n:
                signal.raise_signal(signal.SIGINT)
            yield micro
    return wrapped


def test_ctrl_c_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    full, _ = train.train(train.parse_args(tiny_args(tmp_path, "full", grad_accum=2)))
    monkeypatch.setattr(train, "step_batches", interrupt_after(5))
    first, _ = train.train(train.parse_args(tiny_args(tmp_path, "split", grad_accum=2)))
    assert [s for s, _ in first] == [1, 2, 3, 4, 5]  # finished the step it was in, saved, stopped
    monkeypatch.undo()
    rest, _ = train.train(train.parse_args(tiny_args(tmp_path, "split", grad_accum=2) + ["--resume"]))
    assert first + rest == full  # bit-identical losses, steps 1..12


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    args = tiny_args(tmp_path, ckpt_every=4)
    forward = MultimodalLM.forward
    calls = []

    def poisoned(self, batch, count=None):
        logits, loss = forward(self, batch, count)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) == 7 else loss
    monkeypatch.setattr(MultimodalLM, "forward", poisoned)
    out = tmp_path / "run"
    assert train.main(args) == 1
    msg = (f"error: step 6: loss is nan; stopping without saving. The last good checkpoint in {out} "
           f"(step 4) is intact.\n")
    assert capsys.readouterr().err.endswith(msg)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 4
    assert json.loads((out / "config.json").read_text())["train"]["step"] == 4
    monkeypatch.undo()
    MultimodalLM.from_checkpoint(out)  # the checkpoint is whole and loads


# ----------------------------------------------------------------------------- data parallel

def setup(tmp_path):
    cfg = train.parse_args(tiny_args(tmp_path))
    torch.manual_seed(0)
    model, tok = train.build(cfg, train.datasets(cfg, None, 0))
    ds = train.datasets(cfg, tok, model.config.qformer.num_query)[0]
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

    class Rows:  # a dataset whose rows carry no `task` field (real data)
        samples = [dict(task=None)] * 64

        def __len__(self):
            return 64
    cfg = train.parse_args(["--data=mine.json"])
    with pytest.raises(ValueError, match=r"no training row has a task in curriculum_tasks='count,shape,caption' "
                                         r"\(rows name it in a 'task' field\); set --curriculum_iters=0"):
        next(train.step_batches(cfg, Rows(), 0, 0, 1, 0))
    for name in ("mpp-qwen7b-pretrain", "mpp-qwen7b-sft", "tinygptv-phi2"):
        assert train.parse_args([f"--preset={name}"]).curriculum_iters == 0
