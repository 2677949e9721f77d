"""Plants for tests/test_cache.py, in the process that encodes for `train` (motiontune/data/encoder_process.py:
BEFORE) or in the test's own process: a clip that fails to decode; a gigabyte the encoding process holds."""

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


HELD = []


def encoder_holds_a_gigabyte():
    """The encoding process holds 1 GiB more than it needs (resident: every page written), so its peak is far above
    the training process's."""
    block = bytearray(2**30)
    block[::4096] = b"\1" * (2**30 // 4096)
    HELD.append(block)
