"""Clips carry their sound: the audio window is exactly the clip's frames (audio and video streams that start at
different times included), `motiontune inspect` says which files have sound and which sound cannot be decoded,
and the latent cache keys name how sound is read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from motiontune.cli import main
from motiontune.data.audio import decode_audio
from motiontune.data.cache import Cache
from motiontune.data.video import decode_clips, plan_clips, probe
from motiontune.testing.clips import read_timestamp, write_clip_with_broken_audio, write_clip_with_tone, write_timestamped_clip

RATE = 16000
STEP = 160 * 4 / RATE  # one LTX-2 audio latent step: 40 ms


def _pitch(wave: np.ndarray, window: int = 320) -> np.ndarray:
    """Hz per 20 ms window, from zero crossings (0 for silence, or the near-silent priming an AAC encoder adds)."""
    return np.array([np.sum(np.abs(np.diff(np.sign(wave[i : i + window]))) > 0) / 2 / (window / RATE)
                     if np.abs(wave[i : i + window]).max() > 0.05 else 0.0 for i in range(0, len(wave) - window + 1, window)])


@pytest.mark.parametrize("suffix, codec", [(".mkv", "flac"), (".mp4", "aac")])
def test_audio_window_is_the_clips_frames_when_the_audio_starts_later(tmp_path, suffix, codec):
    """The audio stream starts 0.5 s after the video, and its tone jumps from 440 to 880 Hz at 1.25 s (video clock).
    For each planned clip, silence lasts until 0.5 s and the pitch changes at 1.25 s, both measured from the clip's
    first instant, to within one audio latent step; the frame on screen then is the clip's first frame."""
    path = write_clip_with_tone(tmp_path / f"tone{suffix}", 2.0, fps=24, tones=((0.0, 440.0), (1.25, 880.0)),
                                audio_start=0.5, audio_codec=codec)
    info = probe(path)
    assert info.audio is not None and not info.audio_problem and abs(info.audio.start - info.start - 0.5) < 0.07
    clips = plan_clips(info, "uniform", 24.0, 25, 2.0, clips_per_file=3)
    assert len(clips) == 3 and clips[0][0] == 0.0 and clips[-1][0] > 0.9
    for clip, frames in zip(clips, decode_clips(info, clips)):
        shown = read_timestamp(frames[0]) / 1000  # when the clip's first frame came on screen
        assert shown <= clip[0] + 1e-3 < shown + 1 / 24
        first = clip[0]
        wave = decode_audio(info.path, info.start, clip[0], len(clip) / 24.0, RATE, 2)
        assert wave.shape == (2, round(len(clip) / 24.0 * RATE))
        assert np.array_equal(wave[0], wave[1])  # mono made stereo
        pitch = _pitch(wave[0])
        sounding = np.nonzero(pitch)[0]
        onset = sounding[0] * 0.02 if len(sounding) else None
        if first < 0.5:  # the sound starts inside the window
            assert abs(onset - (0.5 - first)) <= STEP
        else:
            assert onset == 0.0
        high = np.nonzero(pitch > 660)[0]
        if first < 1.25 < first + len(clip) / 24.0:
            assert abs(high[0] * 0.02 - (1.25 - first)) <= STEP
        assert np.median(pitch[pitch > 0][:5]) == pytest.approx(880.0 if first >= 1.25 else 440.0, rel=0.2)


def test_inspect_lists_sound_and_reports_audio_that_cannot_be_decoded(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write_clip_with_tone(folder / "tone.mkv", 1.5)
    write_timestamped_clip(folder / "silent.mp4", [i / 24 for i in range(36)])
    write_clip_with_broken_audio(folder / "broken.mkv", frames=36)
    for name in ("tone", "silent", "broken"):
        (folder / f"{name}.txt").write_text("a clip\n")
    overrides = ["--set", f"cache_dir={tmp_path / 'cache'}"]

    assert main(["inspect", str(folder), *overrides]) == 0
    summary = capsys.readouterr().out
    assert "3 of 3 files usable" in summary  # bad sound costs the sound, never the clip
    assert "sound: 1 of 3 videos carry an audio stream that decodes" in summary
    assert f"{folder / 'broken.mkv'}: the audio stream (flac) cannot be decoded" in summary

    assert main(["inspect", str(folder), "--files", *overrides]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()[:1]}
    assert " flac 16000Hz " in rows["tone.mkv"] and " no " in rows["silent.mp4"] and " bad " in rows["broken.mkv"]

    assert main(["inspect", str(folder), "--json", *overrides]) == 0
    files = {f["path"].rsplit("/", 1)[-1]: f for f in json.loads(capsys.readouterr().out)["files"]}
    assert files["tone.mkv"]["metadata"]["audio"] == {"codec": "flac", "rate": 16000, "channels": 1, "start": 0.0, "decodes": True}
    assert files["silent.mp4"]["metadata"]["audio"] is None
    assert files["broken.mkv"]["metadata"]["audio"]["decodes"] is False
    assert any("cannot be decoded" in p for p in files["broken.mkv"]["problems"])


def test_latent_keys_name_how_sound_is_read():
    key = Cache.latent_key("file", (0.0, 0.125), (32, 32), "vae")
    assert key == Cache.latent_key("file", (0.0, 0.125), (32, 32), "vae", audio=None)  # other families' keys unchanged
    stereo = Cache.latent_key("file", (0.0, 0.125), (32, 32), "vae", audio={"rate": 16000, "channels": 2})
    mono = Cache.latent_key("file", (0.0, 0.125), (32, 32), "vae", audio={"rate": 16000, "channels": 1})
    assert len({key, stereo, mono}) == 3
