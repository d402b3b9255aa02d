"""Output files: sanitised names, atomic writes (tmp + os.replace), H.264 mp4 through PyAV.

A file either exists complete or not at all: everything is written to ``<name>.tmp-<pid>`` in the same
folder and renamed over the final name, so an interrupted run leaves no half files that a resumed run
would mistake for finished ones.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import unicodedata
from pathlib import Path

import numpy as np

from .errors import OutputError


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug: ASCII letters/digits and '-', lowercase, at most ``max_len`` characters."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "prompt"


TMP_PATTERN = re.compile(r"\.tmp-(\d+)$")  # <name>.tmp-<pid>: this tool's temporary files, nothing else
STALE_TMP_AGE_S = 3600.0  # a temporary file untouched this long is stale even if its pid was reused


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def output_error(e: OSError, path: str | os.PathLike) -> OutputError:
    """An OSError met writing ``path`` as a typed ``OutputError`` that names the path and what to do."""
    path, err = Path(path), e.errno
    if err in (errno.ENOSPC, errno.EDQUOT):
        what = "the disk is full" if err == errno.ENOSPC else "the disk quota is exceeded"
        return OutputError(f"cannot write {path}: {what} ({e.strerror}); free space on that filesystem or give "
                           f"--out a folder on another one, then re-run (finished prompts are kept)")
    if err in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY) or path.is_dir():
        return OutputError(f"cannot write {path}: a folder (or a non-folder in the path) occupies it "
                           f"({e.strerror}); move it away or give another --out")
    if err in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: the folder is not writable ({e.strerror}); give --out a "
                           f"writable folder or fix its permissions")
    return OutputError(f"cannot write {path} ({e.strerror or e}); check the folder and the disk, or give "
                       f"another --out")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temps(folder: str | os.PathLike, max_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """Remove this tool's ``<name>.tmp-<pid>`` files left in ``folder`` by killed runs: those whose process
    is gone, or untouched for ``max_age_s``. Another live run's fresh temporary files are kept. Returns
    the removed paths."""
    import time

    removed, now = [], time.time()
    for p in Path(folder).iterdir():
        m = TMP_PATTERN.search(p.name)
        if not m or not p.is_file() or p.is_symlink():
            continue
        pid = int(m.group(1))
        try:
            old = now - p.stat().st_mtime > max_age_s
        except FileNotFoundError:
            continue
        if pid == os.getpid() or not _pid_alive(pid) or old:
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise output_error(e, p) from None
            removed.append(p)
    return removed


def remove_own_temps(folder: str | os.PathLike) -> None:
    """Remove this process's temporary files in ``folder`` (the last resort of an interrupted run)."""
    suffix = f".tmp-{os.getpid()}"
    for p in Path(folder).glob(f"*{suffix}"):
        try:
            _unlink_quietly(p)
        except OSError:
            pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside ``path``, fsync, then rename over it (parents created). Any
    OSError becomes an ``OutputError`` naming the path; the temporary file never stays behind."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(e, path) from None
    finally:
        try:
            _unlink_quietly(tmp)
        except OSError:
            pass
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
        try:
            # libav opens the file only when the first packet is muxed, which for a short video is in
            # close(): made here, a folder that cannot take it fails before any work, and the temporary
            # file exists while the video is made, for an interrupted run's sweep to find
            self.tmp.touch()
            self._container = av.open(str(self.tmp), mode="w", format="mp4")
        except OSError as e:
            try:
                _unlink_quietly(self.tmp)
            except OSError:  # e.g. a file where the folder should be: there is nothing to remove
                pass
            raise output_error(e, self.path) from None
        self._closed = False
        try:
            self._stream = self._container.add_stream("libx264", rate=fps)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(crf), "preset": preset}
        except BaseException:  # e.g. a signal arriving here: the caller gets no object to abort
            self.abort()
            raise
        self._size = (height, width)

    def write(self, frames: np.ndarray) -> None:
        """frames: uint8 [F, H, W, 3] (RGB)."""
        import av

        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (*self._size, 3):
            raise ValueError(f"expected uint8 frames [F, {self._size[0]}, {self._size[1]}, 3], "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        try:
            for frame in frames:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                for packet in self._stream.encode(vf):
                    self._container.mux(packet)
                self.frames += 1
        except OSError as e:
            raise output_error(e, self.path) from None

    def close(self) -> Path:
        """Finish the stream, fsync, rename over ``path``. On failure the temporary file is removed and the
        OSError raised as an ``OutputError``."""
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._closed = True
            self._container.close()
            with open(self.tmp, "rb+") as f:  # durable before the rename: the JSON record written after it
                os.fsync(f.fileno())           # marks the prompt done, and a resume trusts that marker
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise output_error(e, self.path) from None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - best effort on an already failing path
                pass
        try:
            _unlink_quietly(self.tmp)
        except OSError:
            pass


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
        try:
            self.path = self._writer.path
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._error: BaseException | None = None
            self._thread = threading.Thread(target=self._run, name="sdvg-video-writer", daemon=True)
            self._thread.start()
        except BaseException:  # e.g. a signal arriving here: no object to abort later, so now
            self._writer.abort()
            raise

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
