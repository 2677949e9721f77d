"""Which process of a `torchrun` job this is, and what the processes exchange (train/distributed.py starts them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sharded: bool = False  # FSDP2: each rank holds a shard of the trained weights
    # `experts_on: split` (WAN 2.2 A14B): the expert this rank holds and trains, and the ranks holding it too
    expert: str | None = None
    group: list[int] | None = None  # global ranks of this rank's expert group, in order
    group_handle: object = None  # its torch.distributed process group (None: the whole world)
    # `context_parallel`: consecutive ranks in groups of `context` share each clip's tokens (one data-parallel
    # rank between them); `context_mesh` is the (ring, ulysses) device mesh diffusers' attention splits over
    context: int = 1
    context_mesh: object = None

    @property
    def data_rank(self) -> int:
        """Which rows of the global batch this rank trains: the same for the ranks of one context group."""
        return self.rank // self.context

    @property
    def data_size(self) -> int:
        return self.world_size // self.context

    @property
    def group_rank(self) -> int:
        """This rank's place in its expert group (the world when the experts are not split)."""
        return self.group.index(self.rank) if self.group else self.rank

    @property
    def group_size(self) -> int:
        return len(self.group) if self.group else self.world_size

    @property
    def group_lead(self) -> bool:
        """The first rank of its expert group: it saves that expert (rank 0 saves everything else)."""
        return self.group_rank == 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def rows(self, global_rows: int, per_rank: int) -> range:
        """This rank's rows of a global batch: consecutive blocks of `per_rank` (the last ranks may get fewer)."""
        start = min(self.data_rank * per_rank, global_rows)
        return range(start, min(start + per_rank, global_rows))

    def barrier(self) -> None:
        if self.several:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over ranks (a copy; gloo and NCCL reduce in place)."""
        if not self.several:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def all_agree(self, flag: bool) -> bool:
        """True only when `flag` is true on every rank (so all ranks take the same branch)."""
        if not self.several:
            return flag
        value = torch.tensor([0 if flag else 1], device=_collective_device())
        dist.all_reduce(value)
        return int(value.item()) == 0

    def any_of(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether any rank set it: one exchange, after which all ranks take the same branches."""
        if not self.several:
            return tuple(bool(flag) for flag in flags)
        values = torch.tensor([int(bool(flag)) for flag in flags], device=_collective_device())
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return tuple(bool(value) for value in values.tolist())

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), on every rank, in rank order."""
        if not self.several:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def to_main(self, value) -> list:
        """Every rank's `value` (picklable, in host memory) on rank 0, in rank order; the others get []."""
        if not self.several:
            return [value]
        values = [None] * self.world_size if self.main else None
        dist.gather_object(value, values, dst=0)
        return values if self.main else []

    def from_main(self, value):
        """Rank 0's `value` on every rank."""
        if not self.several:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_gradients(self, parameters: list[torch.nn.Parameter], divide_by: int = 1, within_group: bool = False) -> None:
        """Sum replicated parameters' gradients over ranks in one flat all-reduce; a rank that had no sample
        for them contributes zeros. `divide_by` undoes a loss scale meant for FSDP's averaging. `within_group`:
        only over this rank's expert group (an expert's parameters live on its group alone)."""
        if not self.several or not parameters or (within_group and self.group_size == 1):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group_handle if within_group else None)
        if divide_by != 1:
            flat /= divide_by
        offset = 0
        for parameter, grad in zip(parameters, grads):
            count = grad.numel()
            parameter.grad = flat[offset : offset + count].view_as(grad).clone()
            offset += count

    def finish(self) -> None:
        if self.several and dist.is_initialized():
            dist.barrier()  # a rank leaving while another still talks aborts the job
            dist.destroy_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def is_sharded(parameters) -> bool:
    """Whether these parameters are FSDP2 shards (DTensors) rather than whole, replicated tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in parameters)
