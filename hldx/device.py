"""Where a job runs: its device, its documented peak, and the ranks it trains with (torch.distributed)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from omegaconf import DictConfig

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_of(cfg: DictConfig) -> torch.device:
    """train.device: auto is cuda when there is one (the rank's own: join() sets it), else cpu."""
    name = cfg.train.device
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def peak_flops(device: torch.device) -> float | None:
    """The device's documented dense bf16 peak, for MFU; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    gpu = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)


def world() -> tuple[int, int]:
    """(rank, world size) in the process group this process joined; (0, 1) before it joins one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def ranks() -> int:
    """How many ranks this job has (torchrun's WORLD_SIZE, or SLURM's tasks), before it joins them."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def join(cfg: DictConfig, alone: bool = False) -> None:
    """Join the job's process group when it has several ranks (torchrun's variables, or SLURM's for several
    tasks of one job, exported as torchrun's), or, `alone`, a group of one (DDP or FSDP2 on one process).
    NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if dist.is_initialized():
        return
    cuda = device_of(cfg).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    elif alone:  # an engine (DDP, FSDP2) on one process: a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
