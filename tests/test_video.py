"""Output files: slugs, atomic writes, H.264 mp4 through PyAV decoded back."""
import json
import math

import av
import numpy as np
import pytest

from sdvg_rt.video import VideoWriter, atomic_write_json, read_video, slugify, write_video


@pytest.mark.parametrize("text,slug", [
    ("A cat, on the Moon!", "a-cat-on-the-moon"),
    ("Café déjà vu", "cafe-deja-vu"),
    ("../../etc/passwd", "etc-passwd"),
    ("日本語のプロンプト", "prompt"),
    ("   ", "prompt"),
    ("x" * 200, "x" * 60),
])
def test_slugify(text, slug):
    assert slugify(text) == slug


def test_atomic_json_is_strict_and_leaves_no_tmp(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": np.float32(2.0)})
    assert json.loads(p.read_text()) == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": 2.0}
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def _frames(n=9, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    f = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, 128)], -1).astype(np.uint8)
    return np.stack([np.roll(f, 2 * i, axis=1) for i in range(n)])


def test_mp4_round_trip(tmp_path):
    frames = _frames()
    p = write_video(tmp_path / "v.mp4", frames, fps=16, crf=10, preset="ultrafast")
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert s.average_rate == 16 and (s.width, s.height) == (48, 32)
    back = read_video(p)
    assert back.shape == frames.shape
    # lossy (H.264 + 4:2:0 chroma): smooth test pattern at crf 10 stays within a few levels on average
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4
    assert [x.name for x in tmp_path.iterdir()] == ["v.mp4"]


def test_writer_is_atomic_on_error(tmp_path):
    target = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(target, 48, 32, preset="ultrafast") as w:
            w.write(_frames(3))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # neither the video nor a temporary file


def test_writer_makes_its_temporary_file_at_once_and_fails_early_on_a_bad_folder(tmp_path):
    from sdvg_rt.errors import OutputError

    w = VideoWriter(tmp_path / "v.mp4", 48, 32, preset="ultrafast")
    assert [p.name for p in tmp_path.iterdir()] == [w.tmp.name]  # before any frame: a run killed now leaves it
    w.abort()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "occupied").write_text("a file where a folder should be")
    with pytest.raises(OutputError, match="occupied"):
        VideoWriter(tmp_path / "occupied" / "v.mp4", 48, 32)  # at construction, not after the generation


def test_writer_rejects_wrong_frames(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", 48, 32, preset="ultrafast") as w:
        with pytest.raises(ValueError, match="uint8 frames"):
            w.write(np.zeros((2, 32, 48, 3), np.float32))
        w.write(_frames(2))
    assert read_video(tmp_path / "v.mp4").shape == (2, 32, 48, 3)


def test_background_writer_equals_the_plain_writer_and_surfaces_errors(tmp_path):
    from sdvg_rt.video import BackgroundVideoWriter, VideoWriter, read_video

    # smooth frames, each 5 levels brighter than the one before: x264 keeps them within about a level, so
    # a dropped, repeated or reordered frame shows (random frames would not: the encoder cannot keep noise)
    yy, xx = np.mgrid[0:32, 0:48]
    src = np.stack([np.broadcast_to((20 + (xx + yy) // 2 + 5 * i)[..., None], (32, 48, 3)) for i in range(33)])
    src = src.astype(np.uint8)
    blocks = [src[:9], src[9:21], src[21:]]
    with VideoWriter(tmp_path / "a.mp4", 48, 32) as w:
        for b in blocks:
            w.write(b)
    with BackgroundVideoWriter(tmp_path / "b.mp4", 48, 32, depth=1) as w:
        for b in blocks:
            w.write(b)
    assert w.frames == 33
    a, b = (read_video(tmp_path / f).astype(np.int16) for f in ("a.mp4", "b.mp4"))
    assert a.shape == b.shape == src.shape
    # the same frames in the same order (not bit-equal: x264's threaded encodes are not guaranteed to be)
    for dec in (a, b):
        assert np.abs(dec - src).mean(axis=(1, 2, 3)).max() < 2.0
    assert np.abs(a - b).mean(axis=(1, 2, 3)).max() < 2.0
    bad = BackgroundVideoWriter(tmp_path / "c.mp4", 48, 32)
    bad.write(np.zeros((2, 16, 16, 3), np.uint8))  # wrong size: fails on the writer thread
    with pytest.raises(ValueError, match="expected uint8 frames"):
        bad.close()
    assert not (tmp_path / "c.mp4").exists() and not list(tmp_path.glob("c.mp4*"))


def test_mp4_round_trip_keeps_frame_order(tmp_path):
    """Each frame comes back at its own index: frames differ by far more than the codec's error, so two
    swapped frames (or a dropped/duplicated one) fail."""
    frames = _frames()
    frames = (frames.astype(np.int32) + (np.arange(len(frames)) * 97 % 256)[:, None, None, None]).astype(np.uint8)
    back = read_video(write_video(tmp_path / "v.mp4", frames, fps=16, crf=10, preset="ultrafast")).astype(int)
    err = np.abs(back[:, None] - frames[None].astype(int)).mean(axis=(2, 3, 4))  # [decoded, source]
    assert (err.argmin(axis=1) == np.arange(len(frames))).all()
    assert (np.sort(err, axis=1)[:, 1] > 5 * np.diag(err)).all()  # the match is unambiguous
