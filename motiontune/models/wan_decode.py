"""How much memory WAN's VAE needs to decode a sample, whole frames or in tiles, and whether to tile now.

Sampling (models/wan.py) asks `decode_in_tiles` before the pipeline decodes; `motiontune estimate` asks
`decode_peak` for a card of a given size. The decode runs on fake tensors (models/fake_memory.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .fake_memory import LiveBytes, fakeify, init_kwargs, quiet, storage_bytes

# Sampling decodes in tiles when decoding whole frames needs more than the memory free, with this margin for the
# allocator's rounding and fragmentation (models/wan.py at run time, `estimate` for a card of a given size).
TILE_MARGIN = 1.1


def vae_from(cfg: dict, dtype: torch.dtype = torch.float32):
    """AutoencoderKLWan on the meta device, in `dtype` (as the trainer loads it: vae.weight_dtype)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**init_kwargs(cfg, AutoencoderKLWan)).to(dtype)


_DECODER_CALLS: dict = {}


def _decoder_calls(cfg: dict, height: int, width: int, dtype: torch.dtype) -> list[tuple[int, tuple[int, ...]]]:
    """What one call of the VAE's decoder on a (height, width) latent tile reaches, for a tile's first, second and
    later latent frames (its feature cache is full from the third on): (peak bytes above what was live before the
    call, the cache it found counted in, as a stand-in makes none; the output's shape)."""
    key = (json.dumps(cfg, sort_keys=True), height, width, dtype)
    if key in _DECODER_CALLS:
        return _DECODER_CALLS[key]
    vae = vae_from(cfg, dtype)
    mode = FakeTensorMode()
    fakeify(vae, mode)
    with mode:
        z = torch.empty(1, vae.config.z_dim, 3, height, width, dtype=dtype)
    tracker = LiveBytes([*vae.parameters(), *vae.buffers(), z])
    calls = []
    with mode, tracker, torch.no_grad(), quiet():
        vae.clear_cache()
        x = vae.post_quant_conv(z)
        for k in range(3):
            vae._conv_idx = [0]
            cache = storage_bytes(vae._feat_map)
            start = tracker.current
            tracker.peak = start
            out = vae.decoder(x[:, :, k : k + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=k == 0)
            calls.append((tracker.peak - start + cache, tuple(out.shape)))
            del out
    _DECODER_CALLS[key] = calls
    return calls


class _DecoderStandIn(torch.nn.Module):
    """In a simulated decode, in place of the VAE's decoder: each call makes the output a real call makes and raises
    the tracker's peak by what a real call of its kind reached (measured by `_decoder_calls` on the largest tile,
    scaled by the tile's area: the decoder's tensors all grow with it)."""

    def __init__(self, calls: list[tuple[int, tuple[int, ...]]], height: int, width: int):
        super().__init__()
        self.calls, self.height, self.width = calls, height, width
        self.tracker: LiveBytes | None = None
        self.index = 0

    def forward(self, x, feat_cache=None, feat_idx=None, first_chunk=False):
        self.index = 0 if first_chunk else min(self.index + 1, 2)
        extra, shape = self.calls[self.index]
        height, width = x.shape[-2:]
        reached = self.tracker.current + extra * height * width // (self.height * self.width)
        self.tracker.peak = max(self.tracker.peak, reached)
        scale = shape[-1] // self.width
        return x.new_empty(x.shape[0], shape[1], shape[2], height * scale, width * scale)


_DECODE: dict = {}


def decode_peak(vae_cfg: dict, latent: tuple[int, int, int], tiled: bool, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of the tensors AutoencoderKLWan.decode makes for one sample's latents (F', H', W'; the weights not
    counted), as diffusers runs it: whole frames, or (`tiled`) its tiled_decode with the VAE's default tiles (256
    pixels, 192 apart), which diffusers uses only when the frame is larger than a tile. On fake tensors: the decode's
    own loops and concatenations run as written; each decoder call is a stand-in for a real one measured on the
    largest tile, and the blending of overlapping tiles, which writes into a tile in place a row at a time (tensors
    of a row: nothing to count), is skipped (a test compares with simulating everything). A full-size decode takes
    a second or two."""
    cfg = {k: v for k, v in vae_cfg.items() if not k.startswith("_")}
    from ..util.sim_cache import cached

    key = (json.dumps(cfg, sort_keys=True), tuple(latent), tiled, dtype)
    if key not in _DECODE:
        _DECODE[key] = cached("wan_decode", key, lambda: _decode_peak(cfg, latent, tiled, dtype))
    return _DECODE[key]


def _decode_peak(cfg: dict, latent: tuple[int, int, int], tiled: bool, dtype: torch.dtype) -> int:
    vae = vae_from(cfg, dtype)
    frames, height, width = latent
    if tiled:
        vae.enable_tiling()
        height = min(height, vae.tile_sample_min_height // vae.spatial_compression_ratio)
        width = min(width, vae.tile_sample_min_width // vae.spatial_compression_ratio)
    mode = FakeTensorMode()
    fakeify(vae, mode)
    vae.decoder = _DecoderStandIn(_decoder_calls(cfg, height, width, dtype), height, width)
    vae.blend_v = vae.blend_h = lambda above, tile, extent: tile
    with mode:
        z = torch.empty(1, vae.config.z_dim, *latent, dtype=dtype)
    tracker = LiveBytes([*vae.parameters(), *vae.buffers(), z])
    vae.decoder.tracker = tracker
    with mode, tracker, torch.no_grad(), quiet():
        vae.decode(z)
    return tracker.peak


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device` now: on CUDA what the driver has free plus what PyTorch's allocator
    holds unused; on the CPU the system's available memory (Linux; elsewhere, and on other devices, unknown: a very
    large number)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return 2**62


def decode_in_tiles(vae, latent: tuple[int, int, int], device: torch.device) -> tuple[bool, int, int]:
    """Whether a sample's latents (F', H', W') should be decoded in tiles on `device` now, with the VAE there: when
    decoding whole frames would need more than the memory free (with TILE_MARGIN). (tiles?, bytes of decoding whole
    frames, bytes free)."""
    whole = decode_peak(dict(vae.config), latent, tiled=False, dtype=vae.dtype)
    free = free_bytes(device)
    return TILE_MARGIN * whole > free, whole, free
