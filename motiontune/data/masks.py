"""Masks for masked training: which file is a clip's mask, whether it fits the clip, and the mask on the clip's
latent grid.

A clip's mask lies beside it, named `<clip stem>-masklabel.<ext>` (OneTrainer names image masks
`-masklabel.png`): a mask video, read at the clip's own instants, or one picture for every frame. White (1) is
learnt, black (0) is not; greys weigh in between. Such files are masks, never training data. A mask is one of the
conditions beside a clip (data/conditions.py: how they are found, checked and read through the clip's geometry).

The mask goes through the clip's geometry (rotation for display, scaling to cover the bucket, the crop, the
flip, the concept's rotation; never its colour changes), with `enable_random_circular_mask_shrink` one disc of
it is kept, then each latent cell gets the share of its pixels that are inside the mask (area pooling over the
cell's pixels and, past the first latent frame, over the frames the VAE folds into it). A soft edge weighs a
cell by how much of it is the subject: max pooling would give a one-pixel outline the weight of whole cells.
"""

from __future__ import annotations

from ..util.lazy import np, torch
from .augment import ImageVariant, shrink_mask
from .conditions import MASK_ROLE, ROLE_SUFFIXES, condition_frames
from .conditions import fit_problem as condition_fit_problem
from .video import MediaInfo

MASK_SUFFIX = ROLE_SUFFIXES[MASK_ROLE]
POOLING = "area"  # named in the cache key: a change of rule makes the masks again


def fit_problem(clip: MediaInfo, mask: MediaInfo) -> str:
    """Why `mask` cannot be the mask of `clip` ("" when it fits): the rules of every condition beside a clip."""
    return condition_fit_problem(clip, mask, MASK_ROLE)


def clip_masks(clip: MediaInfo, mask: MediaInfo, plan: list[tuple[float, ...]], looks: list[ImageVariant],
               size: tuple[int, int], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Each planned clip's mask as (F', H', W') weights in [0, 1] on its latent grid `grids[i]`. The mask is
    decoded at the size the clip's frames are scaled to before their crop (the mask's own rotation applied), so
    the same crop and flip cut the same pixels; a picture mask stands for every frame."""
    masks = []
    for frames, look, grid in zip(condition_frames(clip, mask, plan, looks, size), looks, grids):
        grey = frames.astype(np.float32).mean(axis=-1) / 255.0
        if look.shrink is not None:
            grey = shrink_mask(grey, *look.shrink)
        masks.append(pool_to_grid(torch.from_numpy(np.ascontiguousarray(grey)), grid))
    return masks


def pool_to_grid(mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(F, H, W) pixel weights → (F', H', W') latent cells, each the mean of the pixels it encodes. A causal video
    VAE encodes the first frame alone and each later latent frame from (F - 1) / (F' - 1) frames."""
    frames, height, width = mask.shape
    latent_frames, latent_height, latent_width = grid
    if height % latent_height or width % latent_width:
        raise ValueError(f"a {height}x{width} mask does not divide into a {latent_height}x{latent_width} latent grid")
    if latent_frames == 1:
        per_frame = mask.mean(dim=0, keepdim=True)
    else:
        step, spare = divmod(frames - 1, latent_frames - 1)
        if spare:
            raise ValueError(f"{frames} frames do not fold into {latent_frames} latent frames")
        rest = mask[1:].reshape(latent_frames - 1, step, height, width).mean(dim=1)
        per_frame = torch.cat([mask[:1], rest])
    cell = (height // latent_height, width // latent_width)
    return torch.nn.functional.avg_pool2d(per_frame[:, None], cell)[:, 0].contiguous()
