"""Where a job runs: its device, its documented peak, and the ranks it trains with (torch.distributed)."""
from __future__ import annotations

import logging
import os
import platform
import socket

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from hldx.errors import ConfigError

log = logging.getLogger("hldx")

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def machine(device: torch.device) -> str:
    """What a job ran on, in one line without the host's name: the GPU, or the CPU's model and cores; torch."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                 platform.machine())
    return f"cpu: {model}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def device_of(cfg: DictConfig) -> torch.device:
    """train.device: cuda is this rank's GPU (local_gpu); auto is that when torch sees a GPU, else cpu. A GPU
    asked for where torch sees none, or that is not there, is refused (ConfigError), before any work."""
    name = cfg.train.device
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} is invalid here: {_cuda_report()}; run it where torch sees a GPU, or "
                          f"pass train.device=cpu (or auto)")
    if name.startswith("cuda:"):
        index = int(name[5:])
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name} is invalid here: {_cuda_report()}")
        return torch.device("cuda", index)
    return torch.device("cuda", local_gpu(name))


def _cuda_report() -> str:
    """What torch reports about CUDA, in words."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {torch.cuda.device_count()} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def local_gpu(name: str = "cuda") -> int:
    """The GPU index this rank was given: its LOCAL_RANK (torchrun, or SLURM_LOCALID) among the GPUs torch
    sees, or the only one it sees (a task given its own GPU through CUDA_VISIBLE_DEVICES)."""
    local = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local >= count:
        raise ConfigError(f"train.device={name} is invalid for local rank {local}: it has no GPU of its own, "
                          f"{_cuda_report()}; start one rank per GPU (hydra.launcher.gpus_per_node = tasks_per_node)")
    return local


def check_gpu(device: torch.device) -> str:
    """The GPU this rank computes on, said in one line (logged): torch's current device must be the rank's, and
    once the ranks have joined, no two of them may share a GPU (their device UUIDs, gathered)."""
    rank, size = world()
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", device.index))
    if torch.cuda.current_device() != device.index:
        raise RuntimeError(f"rank {rank} was given cuda:{device.index} but computes on cuda:"
                           f"{torch.cuda.current_device()}")
    if size > 1:
        uuids: list = [None] * size
        dist.all_gather_object(uuids, uuid)
        if (shared := [r for r, u in enumerate(uuids) if u == uuid]) != [rank]:
            raise ConfigError(f"train.device={device} is shared by ranks {shared} (GPU {uuid}): give each rank its "
                              f"own GPU (LOCAL_RANK indexes CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    line = (f"rank {rank} of {size}: cuda:{device.index} = {props.name} ({props.total_memory / 2**30:.0f} GiB, GPU "
            f"{uuid}), LOCAL_RANK={os.environ.get('LOCAL_RANK', 'unset')}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
    log.info(line)
    return line


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
    NCCL on GPUs, gloo on CPUs. On a GPU, the rank's device is set first, then checked (check_gpu)."""
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if dist.is_initialized():
        return
    device = device_of(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        log.info("rank %d of %d joined (%s, rendezvous %s:%s) on node %s", dist.get_rank(), dist.get_world_size(),
                 backend, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"),
                 os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    elif alone:  # an engine (DDP, FSDP2) on one process: a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if device.type == "cuda":
        check_gpu(device)
