"""Several tensors as one float32 row, and back: families whose prompt makes more than one tensor (hidden states,
masks, pooled vectors, ...) cache it as one row per prompt, which the cache, the batching and the step handle like
any other text embedding.

A row is a header, then each tensor's values flattened: the header is the count of tensors, the number of
dimensions of each, then their shapes. Every row of a batch has the same shapes (the encoders pad to fixed
lengths), so `unpack` reads the header of the first.
"""

from __future__ import annotations

import math

from ..util.lazy import torch

#: names this layout in the text cache's key (`ModelFamily.TEXT_FORMAT`): a changed layout re-encodes the captions
FORMAT = "packed-2"


def pack(*tensors: torch.Tensor) -> torch.Tensor:
    """One 1-D float32 row holding `tensors` (their shapes in its header)."""
    header = [len(tensors), *(t.dim() for t in tensors), *(size for t in tensors for size in t.shape)]
    head = torch.tensor(header, dtype=torch.float32, device=tensors[0].device)
    return torch.cat([head, *(t.float().flatten() for t in tensors)])


def unpack(rows: torch.Tensor) -> list[torch.Tensor]:
    """(B, N) rows made by `pack` → its tensors, each (B, *shape), in float32 (a mask comes back as 0.0 / 1.0)."""
    count = int(rows[0, 0])
    dims = [int(d) for d in rows[0, 1 : 1 + count].tolist()]
    start = 1 + count + sum(dims)
    sizes = [int(s) for s in rows[0, 1 + count : start].tolist()]
    shapes = [sizes[sum(dims[:i]) : sum(dims[: i + 1])] for i in range(count)]
    numels = [math.prod(shape) for shape in shapes]
    parts = rows[:, start : start + sum(numels)].split(numels, dim=1)
    return [part.reshape(len(rows), *shape) for part, shape in zip(parts, shapes)]
