"""
Devices and process groups: one set-up for single-process, data-parallel and pipeline runs.

`python train.py` and `torchrun ... train.py` both call `setup()`: the device is CUDA if present,
else an Ascend NPU if `torch_npu` is installed, else the CPU; under torchrun (WORLD_SIZE > 1) the
default process group starts with the backend that matches the device (nccl, hccl, gloo), with a
timeout on every collective so that a crashed rank is reported instead of hanging the others.
How the world is cut into pipeline and data-parallel groups is pipeline.py's business.
"""
import os
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
