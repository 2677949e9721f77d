"""A clip that fails to decode, planted in the process that encodes for `train` (motiontune/data/encoder_process.py:
BEFORE) or in the test's own process, for tests/test_cache.py."""

from motiontune.data import latents
from motiontune.data.video import MediaError


def webm_fails_to_decode():
    """Decoding the WebM of the test dataset fails, as a file damaged past its first frame does (the survey, which
    reads its first frame, accepts it)."""
    decode = latents.decode_clips

    def decode_clips(info, clips, size):
        if info.path.suffix == ".webm":
            raise MediaError(f"{info.path}: decoding failed (planted by the test)")
        return decode(info, clips, size)

    latents.decode_clips = decode_clips
