"""Output files: sanitised names, atomic writes (tmp + os.replace), H.264 mp4 through PyAV.

A file either exists complete or not at all: everything is written to ``<name>.tmp-<pid>`` in the same
folder and renamed over the final name, so an interrupted run leaves no half files that a resumed run
would mistake for finished ones.
"""
from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from pathlib import Path

import numpy as np


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug: ASCII letters/digits and '-', lowercase, at most ``max_len`` characters."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "prompt"


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside ``path``, fsync, then rename over it (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _json_safe(obj):
    """JSON has no NaN/inf: non-finite floats become strings ("nan", "inf", "-inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Strict JSON (non-finite floats as strings), indented, written atomically."""
    text = json.dumps(_json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


class _Finishing:
    """Context manager: ``close()`` on success, ``abort()`` (discard the temporary file) on an exception."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(_Finishing):
    """H.264 (libx264, yuv420p) mp4 writer fed with uint8 [F, H, W, 3] frames, block by block.

    Writes to a temporary file; ``close()`` finishes the stream and renames it over ``path``.
    Used as a context manager, an exception discards the temporary file instead.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: int = 16, crf: int = 18,
                 preset: str = "medium"):
        import av

        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs an even width and height, got {width}x{height}")
        self.path = Path(path)
        self.tmp = _tmp(self.path)
        self.frames = 0
        self._container = av.open(str(self.tmp), mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": preset}
        self._size = (height, width)

    def write(self, frames: np.ndarray) -> None:
        """frames: uint8 [F, H, W, 3] (RGB)."""
        import av

        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (*self._size, 3):
            raise ValueError(f"expected uint8 frames [F, {self._size[0]}, {self._size[1]}, 3], "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames += 1

    def close(self) -> Path:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        with open(self.tmp, "rb+") as f:  # durable before the rename: the JSON record written after it marks
            os.fsync(f.fileno())           # the prompt done, and a resume trusts that marker
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - best effort on an already failing path
            pass
        if self.tmp.exists():
            self.tmp.unlink()


class BackgroundVideoWriter(_Finishing):
    """A ``VideoWriter`` fed from another thread: ``write`` queues the block and returns at once, so the
    generation loop goes back to the GPU while libx264 (which releases the GIL) encodes. At most
    ``depth`` blocks wait; ``close`` drains the queue, finishes the file and re-raises any encoding error.
    """

    _STOP = object()

    def __init__(self, *args, depth: int = 4, **kwargs):
        import queue
        import threading

        self._writer = VideoWriter(*args, **kwargs)
        self.path = self._writer.path
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sdvg-video-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is None:
                try:
                    self._writer.write(item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller in close()
                    self._error = e

    @property
    def frames(self) -> int:
        return self._writer.frames

    def write(self, frames: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(frames)

    def _join(self) -> None:
        self._queue.put(self._STOP)
        self._thread.join()

    def close(self) -> Path:
        self._join()
        if self._error is not None:
            self._writer.abort()
            raise self._error
        return self._writer.close()

    def abort(self) -> None:
        self._join()
        self._writer.abort()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 16, crf: int = 18,
                preset: str = "medium") -> Path:
    """Write a whole uint8 [F, H, W, 3] video atomically."""
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, crf, preset) as w:
        w.write(frames)
    return Path(path)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode an mp4 back to uint8 [F, H, W, 3] RGB (for checks and tests)."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
