"""Masks for masked training: which file is a clip's mask, whether it fits the clip, and the mask on the clip's
latent grid.

A clip's mask lies beside it, named `<clip stem>-masklabel.<ext>` (OneTrainer names image masks
`-masklabel.png`): a mask video, read at the clip's own instants, or one picture for every frame. White (1) is
learnt, black (0) is not; greys weigh in between. Such files are masks, never training data.

The mask goes through the clip's geometry (rotation for display, scaling to cover the bucket, the crop, the
flip, the concept's rotation; never its colour changes), with `enable_random_circular_mask_shrink` one disc of
it is kept, then each latent cell gets the share of its pixels that are inside the mask (area pooling over the
cell's pixels and, past the first latent frame, over the frames the VAE folds into it). A soft edge weighs a
cell by how much of it is the subject: max pooling would give a one-pixel outline the weight of whole cells.
"""

from __future__ import annotations

from ..util.lazy import np, torch
from .augment import ImageVariant, apply_image_variant, cover_size, shrink_mask
from .video import IMAGE_EXTENSIONS, MEDIA_EXTENSIONS, MediaInfo, decode_clips

MASK_SUFFIX = "-masklabel"
POOLING = "area"  # named in the cache key: a change of rule makes the masks again


def is_mask_file(path) -> bool:
    return path.stem.endswith(MASK_SUFFIX) and path.suffix.lower() in MEDIA_EXTENSIONS


def masks_by_clip(files) -> dict:
    """(folder / clip stem) → the mask files named for it, from a folder listing (no file is opened)."""
    found: dict = {}
    for path in files:
        if is_mask_file(path):
            found.setdefault(path.with_name(path.stem.removesuffix(MASK_SUFFIX)), []).append(path)
    return {key: tuple(sorted(paths)) for key, paths in found.items()}


def fit_problem(clip: MediaInfo, mask: MediaInfo) -> str:
    """Why `mask` cannot be the mask of `clip` ("" when it fits): a shape other than the clip's (a smaller mask
    of the same aspect ratio is fine), a video mask for a picture, or a mask video of another length."""
    if clip.is_image and not mask.is_image:
        return f"mask is a video but the clip is a picture ({mask.path}); give one picture, {clip.path.stem}{MASK_SUFFIX}.png"
    expected_height = mask.width * clip.height / clip.width
    if abs(mask.height - expected_height) > max(1.0, 0.01 * mask.height):
        return (f"mask size does not fit the clip ({mask.path} is {mask.width}x{mask.height}, aspect "
                f"{mask.width / mask.height:.3f}; the clip is {clip.width}x{clip.height}, aspect {clip.width / clip.height:.3f}); "
                "make the mask the clip's size, or at least its aspect ratio")
    if not clip.is_image and not mask.is_image:
        # one frame of the coarser of the two rates either way: the last frame's length is a guess in most files
        slack = 1.0 / max(1e-3, min(clip.fps or 1e3, mask.fps or 1e3)) + 1e-3
        if abs(mask.duration - clip.duration) > slack:
            return (f"mask length does not fit the clip ({mask.path} lasts {mask.duration:.3f} s, the clip "
                    f"{clip.duration:.3f} s); a mask video must run as long as its clip, frame for frame")
    return ""


def clip_masks(clip: MediaInfo, mask: MediaInfo, plan: list[tuple[float, ...]], looks: list[ImageVariant],
               size: tuple[int, int], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Each planned clip's mask as (F', H', W') weights in [0, 1] on its latent grid `grids[i]`. The mask is
    decoded at the size the clip's frames are scaled to before their crop (the mask's own rotation applied), so
    the same crop and flip cut the same pixels; a picture mask stands for every frame."""
    cover = cover_size(clip.width, clip.height, size)
    decoded = decode_clips(mask, plan, cover)  # a picture: one frame per clip; a video: the clip's instants
    masks = []
    for frames, instants, look, grid in zip(decoded, plan, looks, grids):
        frames = apply_image_variant(frames, look, size, colour=False)
        grey = frames.astype(np.float32).mean(axis=-1) / 255.0
        if look.shrink is not None:
            grey = shrink_mask(grey, *look.shrink)
        grey = torch.from_numpy(np.ascontiguousarray(grey))
        if len(grey) != len(instants):
            grey = grey[:1].expand(len(instants), -1, -1)
        masks.append(pool_to_grid(grey, grid))
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
