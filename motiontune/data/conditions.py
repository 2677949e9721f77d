"""Conditions beside a clip: files named for a clip and a role, read at the clip's instants through its geometry.

A clip `walk.mp4` may have, in the same folder:

    walk-control.mp4     a control video (pose, depth, edges, scribbles...): what the clip should follow
    walk-controlmask.mp4 which part of each control frame is made anew (white) and which is kept (black): VACE's
                         inpainting and outpainting mask, read with the control video (`condition_companions`)
    walk-reference.png   a reference picture (a character, an object, a style) to keep
    walk-pose.mp4        a pose video, and walk-face.mp4 a face video (animation models)
    walk-background.mp4  a background video, and walk-mask.mp4 the character's mask in it (WAN 2.2 Animate's replace
                         mode: white where the character is made, black where the background is kept)
    walk-masklabel.png   a mask (masked training; data/masks.py, which pools it to the latent grid)

Any video or picture extension works. A video condition is read at the clip's own instants (the frame on screen at
each instant, whatever its frame rate), so it must run as long as its clip; a picture stands for every frame. It goes
through the clip's geometry: its own display rotation, scaling to cover the bucket, the clip's crop, flip and rotation,
never its colour changes. A face video is the exception: a crop around the face, of any size and aspect ratio, read
whole at the clip's instants and flipped with the clip, never cut by its crop or turned by its rotation (the model
reads it at its own square size). A model may read a reference picture whole too (`ModelFamily.whole_roles`, VACE):
fitted inside the bucket, centred, white around it (as WanVACEPipeline places its `reference_images`), never cropped,
flipped or rotated; another (Animate) reads it through the clip's geometry like a frame of the clip. Such files are
conditions, never training data.

The family says which roles it takes (`ModelFamily.condition_roles`) and encodes them (`encode_condition`); this
module names no family. `data/latents.py` caches what the family makes of each clip's conditions, keyed by the
condition file's content, so editing a condition makes it again and nothing else does.
"""

from __future__ import annotations

from ..util.lazy import np
from .augment import ImageVariant, apply_image_variant, cover_size
from .video import MEDIA_EXTENSIONS, MediaInfo, decode_clips

MASK_ROLE = "mask"
# role → the end of the file's stem; OneTrainer names masks `-masklabel`
ROLE_SUFFIXES = {"control": "-control", "controlmask": "-controlmask", "reference": "-reference", "pose": "-pose",
                 "face": "-face", "background": "-background", "charactermask": "-mask", MASK_ROLE: "-masklabel"}
# roles whose files are their own picture (a crop around the face), not the clip's frame: any aspect ratio, read whole
OWN_FRAME_ROLES = ("face",)


def role_of(path) -> str | None:
    """The role a file plays beside its clip, by its name; None for a training file."""
    if path.suffix.lower() not in MEDIA_EXTENSIONS:
        return None
    return next((role for role, suffix in ROLE_SUFFIXES.items() if path.stem.endswith(suffix)), None)


def conditions_by_clip(files) -> dict:
    """(folder / clip stem) → {role: the files named for it}, from a folder listing (no file is opened)."""
    found: dict = {}
    for path in files:
        role = role_of(path)
        if role is not None:
            clip = path.with_name(path.stem.removesuffix(ROLE_SUFFIXES[role]))
            found.setdefault(clip, {}).setdefault(role, []).append(path)
    return {clip: {role: tuple(sorted(paths)) for role, paths in roles.items()} for clip, roles in found.items()}


def fit_problem(clip: MediaInfo, condition: MediaInfo, role: str) -> str:
    """Why `condition` cannot be the `role` condition of `clip` ("" when it fits): a video for a picture (or for a
    reference, which is one picture), another aspect ratio (a smaller condition of the same aspect ratio is fine;
    not asked of a reference, which the model reads whole), or a video of another length."""
    name = "mask" if role == MASK_ROLE else f"{role} condition"
    example = f"{clip.path.stem}{ROLE_SUFFIXES[role]}.png"
    if role == "reference":
        return "" if condition.is_image else f"{name} is a video ({condition.path}); a reference is one picture, {example}"
    if clip.is_image and not condition.is_image:
        return f"{name} is a video but the clip is a picture ({condition.path}); give one picture, {example}"
    expected_height = condition.width * clip.height / clip.width
    if role not in OWN_FRAME_ROLES and abs(condition.height - expected_height) > max(1.0, 0.01 * condition.height):
        return (f"{name} size does not fit the clip ({condition.path} is {condition.width}x{condition.height}, aspect "
                f"{condition.width / condition.height:.3f}; the clip is {clip.width}x{clip.height}, aspect "
                f"{clip.width / clip.height:.3f}); make the {name} the clip's size, or at least its aspect ratio")
    if not clip.is_image and not condition.is_image:
        # one frame of the coarser of the two rates either way: the last frame's length is a guess in most files
        slack = 1.0 / max(1e-3, min(clip.fps or 1e3, condition.fps or 1e3)) + 1e-3
        if abs(condition.duration - clip.duration) > slack:
            how = "short" if condition.duration < clip.duration else "long"
            return (f"{name} length does not fit the clip ({condition.path} lasts {condition.duration:.3f} s, the clip "
                    f"{clip.duration:.3f} s: too {how}); a {name} video must run as long as its clip, frame for frame")
    return ""


def condition_frames(clip: MediaInfo, condition: MediaInfo, plan: list[tuple[float, ...]], looks: list[ImageVariant],
                     size: tuple[int, int], role: str = "control", whole: bool = False) -> list[np.ndarray]:
    """Each planned clip's condition as uint8 (F, H, W, 3) at `size`, pixel for pixel where the clip's own frames are:
    decoded at the size the clip's frames are scaled to before their crop (the condition's own rotation applied), then
    the clip's crop, flip and rotation (never its colour changes). A picture stands for every frame. A face video
    (OWN_FRAME_ROLES) keeps its own size and is only flipped with the clip. `whole`: the condition is one picture read
    whole (`fitted_whole`; the roles of `ModelFamily.whole_roles`, VACE's reference)."""
    if whole:
        return [fitted_whole(condition.path, size) for _ in plan]
    own_frame = role in OWN_FRAME_ROLES
    decoded = decode_clips(condition, plan, None if own_frame else cover_size(clip.width, clip.height, size))
    clips = []
    for frames, instants, look in zip(decoded, plan, looks):
        if own_frame:
            frames = np.ascontiguousarray(frames[:, :, ::-1]) if look.flip else frames
        else:
            frames = apply_image_variant(frames, look, size, colour=False)
        if len(frames) != len(instants):
            frames = np.repeat(frames[:1], len(instants), axis=0)
        clips.append(frames)
    return clips


def fitted_whole(path, size: tuple[int, int]) -> np.ndarray:
    """A picture whole inside `size` = (height, width), as WanVACEPipeline places a reference image: scaled by the
    smaller of the two ratios (bilinear), centred, white around it; uint8 (1, H, W, 3)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    scale = min(size[0] / rgb.height, size[1] / rgb.width)
    height, width = int(rgb.height * scale), int(rgb.width * scale)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    canvas = np.full((*size, 3), 255, dtype=np.uint8)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    canvas[top : top + height, left : left + width] = np.asarray(rgb)
    return canvas[None]
