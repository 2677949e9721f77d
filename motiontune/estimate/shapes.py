"""The batch a step trains on, rounded as the trainer rounds it."""

from __future__ import annotations

from ..config import TrainConfig
from ..models.fake_memory import quiet
from .configs import family
from .result import Shape


def config_shape(config: TrainConfig) -> Shape:
    """The batch a step trains on, as the data pipeline makes it from the config (the configured resolution; with
    aspect-ratio buckets other sizes of about the same area)."""
    from ..data.survey import sampling_grid, training_resolution

    owner = family(config)
    with quiet():
        height, width = training_resolution(config, owner)
        _, frames = sampling_grid(config, owner)
    return make_shape(config, config.batch_size, frames, height, width, from_config=True)


def make_shape(config: TrainConfig, batch: int, frames: int, height: int, width: int, from_config: bool = False) -> Shape:
    """A batch of `batch` clips of `frames` frames at height × width, rounded as the trainer rounds them."""
    from ..data.buckets import bucket_batch_size

    owner = family(config)
    vae_scale = owner.vae_compression(config.model_type)[0]
    if not from_config:
        multiple = owner.spatial_multiple
        height, width = max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)
        frames = owner.valid_frame_count(frames)
    latent = (owner.latent_frame_count(frames), height // vae_scale, width // vae_scale)
    if from_config:
        batch = bucket_batch_size(batch, latent[0], config.video_config.video_batch_size_multiplier)
    patch = owner.spatial_multiple // vae_scale  # the transformer's spatial patch (2 for WAN, HunyuanVideo; 1 for LTX-2)
    return Shape(batch, frames, height, width, latent, (1, patch, patch))
