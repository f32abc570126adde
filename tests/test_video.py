"""The mp4 writer: files decode with PyAV as h264 yuv420p with the frames, size and rate given."""

from fractions import Fraction

import numpy as np
import pytest

from mixpolicy.errors import UserError
from mixpolicy.video import VideoWriter, write_video

av = pytest.importorskip("av")


def _probe(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return stream.codec_context.name, stream.codec_context.pix_fmt, stream.average_rate, frames


def _frames(t, h, w, seed=0):
    rng = np.random.default_rng(seed)
    # flat colour blocks survive lossy coding; noise would not
    base = rng.integers(0, 256, size=(t, 1, 1, 3), dtype=np.uint8)
    return np.broadcast_to(base, (t, h, w, 3)).copy()


def test_write_video_is_h264_yuv420p_with_every_frame(tmp_path):
    frames = _frames(7, 32, 48)
    path = write_video(tmp_path / "sub" / "clip.mp4", frames, fps=10)
    codec, pix_fmt, rate, decoded = _probe(path)
    assert (codec, pix_fmt, rate) == ("h264", "yuv420p", Fraction(10))
    assert len(decoded) == 7 and decoded[0].shape == (32, 48, 3)
    assert np.abs(np.stack(decoded).astype(int) - frames.astype(int)).max() <= 6


def test_odd_sizes_are_padded_to_even(tmp_path):
    frames = _frames(3, 15, 21)
    codec, pix_fmt, _, decoded = _probe(write_video(tmp_path / "odd.mp4", list(frames), fps=12.5))
    assert (codec, pix_fmt) == ("h264", "yuv420p")
    assert len(decoded) == 3 and decoded[0].shape == (16, 22, 3)
    np.testing.assert_allclose(decoded[1][:15, :21].mean((0, 1)), frames[1, 0, 0], atol=6)


def test_writer_appends_clips_and_passes_encoder_options(tmp_path):
    with VideoWriter(tmp_path / "two.mp4", fps=30, options={"crf": "10", "g": "1"}) as writer:
        writer.write(_frames(4, 16, 16, seed=1))
        writer.write(_frames(5, 16, 16, seed=2))
        with pytest.raises(ValueError, match="differs from the video's"):
            writer.write(_frames(1, 8, 8))
    _, _, rate, decoded = _probe(tmp_path / "two.mp4")
    assert len(decoded) == 9 and rate == Fraction(30) and writer.frames_written == 9
    with av.open(str(tmp_path / "two.mp4")) as container:  # g=1: every frame a keyframe
        assert all(p.is_keyframe for p in container.demux(video=0) if p.size)


def test_bad_frames_and_rate(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \(T, H, W, 3\)"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8), np.uint8), fps=10)
    with pytest.raises(ValueError, match=r"uint8 \(T, H, W, 3\)"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=10)
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "a.mp4", np.zeros((0, 8, 8, 3), np.uint8), fps=10)
    with pytest.raises(UserError, match="frame rate must be > 0"):
        write_video(tmp_path / "a.mp4", _frames(2, 8, 8), fps=0)
    assert not (tmp_path / "a.mp4").exists()
