"""CUDA graphs keyed by a host value (a block index, a state parity, ...), captured on first use; shared by
the torch and TensorRT backends."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


class CudaGraphs:
    """``run(key, fn)``: the first call of a key runs ``fn`` eagerly on a side stream (this call's real
    work, and the warm-up: cuDNN/cuBLAS plans, compiled kernels, TensorRT's deferred setup on its first
    enqueue), then captures ``fn`` on the same stream; later calls replay. If ``fn`` raises during the
    capture, the capture is ended before the error propagates and nothing is kept; if the error says
    the work cannot be captured (TensorRT's ``CaptureUnsupported``), the key runs eagerly from then on,
    with one warning. Disabled (not CUDA,
    or ``performance.cuda_graphs: false``; ``enabled`` may be flipped later, as the benchmark's
    self-check does) it just calls ``fn``.

    Contract that makes one shared memory pool safe whatever order graphs replay in: ``fn`` reads and
    writes only tensors allocated outside any graph (the component's preallocated buffers, caches and
    states); whatever it allocates is scratch, dead when it returns. Host values a graph bakes in (a block
    index, slot offsets, sigmas, stream handles read inside ``fn``) are part of its key.

    ``graph_factory`` (tests): makes a stand-in graph object with ``capture(fn)`` and ``replay()`` used
    instead of ``torch.cuda.CUDAGraph`` on any device, so the graph-enabled paths run without a GPU (the
    first call of a key still runs ``fn`` eagerly, then captures it; later calls replay).
    """

    def __init__(self, enabled: bool, device, graph_factory: Callable[[], Any] | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.factory = graph_factory
        self.enabled = bool(enabled) and (self.device.type == "cuda" or graph_factory is not None)
        self.graphs: dict[Any, Any] = {}
        self._pool = self._stream = None
        self.eager: set = set()  # keys whose capture is not possible: run eagerly
        self._warned = False

    def run(self, key, fn: Callable[[], None]) -> None:
        if not self.enabled:
            fn()
            return
        g = self.graphs.get(key)
        if g is not None:
            g.replay()
            return
        if key in self.eager:
            fn()
            return
        if self.factory is not None:
            fn()
            g = self.factory()
            g.capture(fn)
            self.graphs[key] = g
            return
        if self._stream is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            fn()  # warm-up, and this call's real work (the capture below does not execute)
            self._stream.synchronize()  # the warm-up (deferred setup) done before capturing, as trtexec does
            g = torch.cuda.CUDAGraph()
            g.capture_begin(pool=self._pool)
            try:
                fn()
            except BaseException as e:
                try:
                    g.capture_end()
                except Exception:  # noqa: BLE001 - the capture is invalid anyway; fn's error matters
                    pass
                if not _capture_unsupported(e):
                    raise
                # work that cannot be captured (TensorRT said so): this key runs eagerly from now on
                torch.cuda.synchronize(self.device)
                self.eager.add(key)
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"CUDA graph capture is not possible for {key!r} ({e}); running it eagerly",
                                  RuntimeWarning, stacklevel=2)
                current.wait_stream(self._stream)
                return
            g.capture_end()
        current.wait_stream(self._stream)
        self.graphs[key] = g


def _capture_unsupported(e: BaseException) -> bool:
    """A capture that failed because the work cannot be captured (TensorRT's ``CaptureUnsupported``)."""
    return type(e).__name__ == "CaptureUnsupported"
