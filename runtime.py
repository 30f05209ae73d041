"""
Devices and process groups: one set-up for single-process, data-parallel and pipeline runs.

`python train.py` and `torchrun ... train.py` both call `setup()`: the device is CUDA if present,
else an Ascend NPU if `torch_npu` is installed, else the CPU; under torchrun (WORLD_SIZE > 1) the
default process group starts with the backend that matches the device (nccl, hccl, gloo), with a
timeout on every collective so that a crashed rank is reported instead of hanging the others.
Plain `python train.py --cpu_processes=N` on a CPU calls `launch()`, which starts the script again as N
such processes with the environment torchrun would give them. How the world is cut into pipeline
and data-parallel groups is pipeline.py's business.
"""
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def pick_device(local_rank=0):
    """CUDA if present, else an Ascend NPU if torch_npu is installed, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except ImportError:
        return torch.device("cpu")
    if torch.npu.is_available():
        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)
    return torch.device("cpu")


def setup(timeout=60.0):
    """(device, distributed): this process's device and, under torchrun, the started default
    process group. A single process needs no group (distributed is False)."""
    device = pick_device(int(os.environ.get("LOCAL_RANK", 0)))
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        dist.init_process_group(BACKENDS[device.type], timeout=timedelta(seconds=timeout))
    return device, distributed


def launch(script, argv, nproc):
    """Plain `python train.py` on a CPU: run `script` again as nproc data-parallel gloo processes
    (one per core; on fewer cores they share them) and wait for them, as `torchrun --standalone
    --nproc_per_node=nproc` would. Ctrl-C goes to the workers (the terminal signals its whole
    process group): they stop after the same step and save; a worker that fails takes the others
    down with it."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc))
    procs = [subprocess.Popen([sys.executable, script, *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(nproc)]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while None in (codes := [p.poll() for p in procs]) and not any(codes):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    return next((abs(p.wait()) for p in procs if p.wait()), 0)
