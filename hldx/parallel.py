"""The engine a phase trains on: its module (hldx.models.PhaseNet) as it is, under torch's DDP, or under FSDP2,
and its checkpoints through torch.distributed.checkpoint (every rank writes its part; exact resume).

    none   one process, the module itself
    ddp    DistributedDataParallel: one bucketed all-reduce per optimizer step, overlapped with the backward
           (no_sync() on all micro-batches but the last); every rank holds the whole model
    fsdp   FSDP2 (fully_shard) on each decoder layer and on the root: parameters, gradients and AdamW state
           sharded over the ranks; under bf16 (a GPU's default) bf16 parameters in compute and fp32 gradient
           reduction; the
           weights are rank 0's, broadcast into the shards (the other ranks need not read them)

train.parallel=auto picks fsdp when the plan's estimate of DDP's memory per rank exceeds plan.device_memory
(the 3.4B teacher), else ddp with several ranks and none with one.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from hldx.models import PhaseNet


class Engine:
    """A PhaseNet wrapped for the job's ranks (see the module docstring); `module(tokens)` runs it. `bf16`: the
    job computes in bfloat16 (FSDP2's mixed-precision policy)."""

    def __init__(self, net: PhaseNet, mode: str, device: torch.device, bf16: bool = False):
        self.net, self.mode, self.device = net, mode, device
        if mode == "ddp":
            self.module = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        elif mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
            whole = net.state_dict() if dist.get_rank() == 0 else {}  # rank 0's weights, before they are sharded
            for layer in net.layers():
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            self.module = fully_shard(net, mesh=mesh, mp_policy=policy)
            set_model_state_dict(self.module, whole, options=StateDictOptions(full_state_dict=True,
                                                                              broadcast_from_rank0=True))
        else:
            self.module = net
        # The student's parameters and the regressor's, clipped apart (HLDC with gamma=0 stays KD exactly).
        # (named after wrapping: FSDP2 replaces the parameters by sharded ones)
        named = list(net.named_parameters())
        self.params = [p for name, p in named if not name.startswith("regressor.")]
        self.extra = [p for name, p in named if name.startswith("regressor.")]

    def micro(self, last: bool):
        """The context of one micro-batch's forward and backward: gradients are reduced after the last one."""
        if self.mode == "ddp" and not last:
            return self.module.no_sync()
        if self.mode == "fsdp":
            self.module.set_requires_gradient_sync(last)
        return nullcontext()

    def clip(self, max_norm: float | None) -> torch.Tensor:
        """The gradients' norm (a device tensor, no host sync); with max_norm, scale the student's gradients,
        then the regressor's, so each group's norm is at most max_norm, as clip_grad_norm_ does. The norm is
        summed in float64 (over the shards, under FSDP2), so the scale, rounded to float32, does not depend on
        how the gradients are split over ranks."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for group in (self.params, self.extra):
            grads = [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in group) if g is not None]
            if not grads:
                continue
            squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads]).sum()
            if self.mode == "fsdp":
                dist.all_reduce(squares)
            total += squares
            if max_norm:
                scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0).float()
                torch._foreach_mul_(grads, scale)
        return total.sqrt()

    def _state(self, optimizer: torch.optim.Optimizer) -> dict:
        net, optim = get_state_dict(self.module, optimizer)
        return {"net": net, "optim": optim}

    def save(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """The module's and the optimizer's state into `path`, each rank writing its own part (collective)."""
        dcp.save(self._state(optimizer), checkpoint_id=str(path), no_dist=not dist.is_initialized())

    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        state = self._state(optimizer)
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        set_state_dict(self.module, optimizer, model_state_dict=state["net"], optim_state_dict=state["optim"])

    def student_state(self) -> dict[str, Tensor]:
        """The student's whole weights (its Gemma3 keys) on rank 0's host, gathered from the shards straight to
        the host (collective); {} on the other ranks."""
        if self.mode == "fsdp":
            state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif dist.is_initialized() and dist.get_rank() > 0:
            return {}
        else:
            state = self.net.state_dict()
        return {k: v.detach().cpu() for k, v in PhaseNet.student_state(state).items()}


class Control:
    """Small decisions all ranks must agree on (stop at this step?) without a host-device synchronisation:
    an all-reduce over a CPU process group of its own, started at one step and read at the next."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_world_size() > 1 else None
        self.pending: tuple[dist.Work, Tensor] | None = None

    def agreed(self, local: int) -> int:
        """The largest `local` of any rank as posted at the previous call (0 at the first); posts this one."""
        if self.group is None:
            return local
        agreed = 0
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            agreed = int(flag.item())
        flag = torch.tensor([local], dtype=torch.int64)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed
