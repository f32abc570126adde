"""Data-parallel process group for training launched by ``torchrun``.

``torchrun --nproc_per_node=N -m mixpolicy.cli train ...`` starts N processes with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in their environment; :class:`ProcessGroup`
joins them (NCCL on GPUs, gloo on CPUs). Without those variables it is a one-process
group whose collectives are no-ops, so the trainer has a single code path.

Collectives exchange JSON through uint8 tensors: nothing is pickled.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mixpolicy.errors import UserError

# Rank 0 evaluates closed-loop while the others wait at a barrier; evaluation can take
# many minutes on CPUs, so the collective timeout is generous.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


class ProcessGroup:
    """Rank, world size and the few collectives the trainer needs."""

    def __init__(self, device_name: str):
        self.world_size = _env_int("WORLD_SIZE", 1)
        self.rank = _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.local_world_size = _env_int("LOCAL_WORLD_SIZE", self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"RANK={self.rank} is outside WORLD_SIZE={self.world_size}")
        self.device = self._device(device_name)
        self._owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise UserError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are unset: launch with torchrun")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
            self._owns_group = True

    def _device(self, name: str) -> torch.device:
        from mixpolicy.utils import resolve_device

        device = resolve_device(name)
        if self.world_size > 1 and device.type == "cuda":
            if name not in ("auto", "cuda"):
                raise UserError(f"device={name!r} with {self.world_size} processes: use device=auto or cuda (each process takes cuda:LOCAL_RANK)")
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK={self.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
            device = torch.device("cuda", self.local_rank)
        return device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def cores_per_process(self) -> int:
        """CPU cores for this process's intra-op threads: the machine's cores split between local ranks."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, self.local_world_size))

    # ------------------------------------------------------------------ collectives
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        device = self._comm_device()
        data = torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8, device=device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s.item()) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: data.numel()] = data
        gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return [json.loads(bytes(g[: int(s.item())].cpu().tolist())) for g, s in zip(gathered, sizes)]

    def check_same(self, what: str, obj: dict[str, Any]) -> None:
        """Raise on every rank, naming the differing keys, unless all ranks hold the same ``obj``."""
        if not self.distributed:
            return
        everyone = self.all_gather_json(obj)
        reference = _flatten(everyone[0])
        problems = []
        for rank, other in enumerate(everyone[1:], start=1):
            flat = _flatten(other)
            keys = sorted(k for k in set(reference) | set(flat) if reference.get(k, "<unset>") != flat.get(k, "<unset>"))
            if keys:
                shown = ", ".join(f"{k}={flat.get(k, '<unset>')!r} (rank 0: {reference.get(k, '<unset>')!r})" for k in keys[:4])
                more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
                problems.append(f"rank {rank} has {shown}{more}")
        if problems:
            raise UserError(f"ranks disagree on the {what}: {'; '.join(problems)}")

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
