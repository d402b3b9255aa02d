"""The TensorRT backend: engines from ``make engines`` behind the components' step signatures.

Two layers, as NVIDIA's demoDiffusion (tensorrt.md §1.4):

- ``Engine``, which knows nothing about diffusion: the plan kept as bytes in host memory (cheap
  reload), the deserialized engine, one execution context per binding set (``key``) created with
  ``USER_MANAGED`` device memory pointed at one ``ActivationMemory`` shared by every engine (they run
  one after another on one stream), ``set_input_shape`` + ``set_tensor_address`` on preallocated torch
  tensors once per key (checked: dtype, shape, contiguity, 256-byte alignment, every return value), and
  ``enqueue`` = ``execute_async_v3`` with its return value checked (a False names the engine file).
- Steps (``TrtDiTStep``, ``TrtVAEStep``, ``TrtScoreStep``): ``bind`` the component's buffers to the
  engines once, then each call enqueues. The recipe around them (noise, x0, re-noise, the committed/
  scratch pair, CUDA graphs) is the components' own (``sdvg_rt.components``), shared with torch.

Zero copy: a DiT block's past K/V inputs and new K/V outputs are bound to the ``KVCache`` slices
themselves (io_spec), the VAE's history inputs to the committed state and its outputs to the scratch
state (accepting a draft swaps the two: one binding set per parity), and the scorer reads the
decoder's output buffer. Only the latent entering a commit or a decode is copied (600 KB).

Under the components' CUDA graphs the first call of a key runs eagerly (this flushes TensorRT's
deferred setup, which must not be captured), then the same work is captured; later calls replay it.

TensorRT is imported lazily; a missing package, or one without a ``Builder`` (the type stubs or the
PyPI placeholder), raises ``BackendUnavailableError`` naming what is installed. The manifest is checked
(``check_engines``) before any plan is read.
"""
from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendUnavailableError, EngineMismatchError, OutOfMemoryError, SdvgError
from ..kv_cache import KVCache
from ..vae_state import VAEStatePair

if TYPE_CHECKING:
    import tensorrt as trt

    from ..io_spec import EngineIO

ALIGNMENT = 256  # TensorRT wants I/O and device-memory addresses 256-byte aligned

# TensorRT DataType member name -> torch dtype (by name: no tensorrt import needed to build it)
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


class EngineRunError(SdvgError):
    """A TensorRT call failed at run time (enqueue, binding, capture); the message names the engine file."""

    exit_code = 1


class CaptureUnsupported(EngineRunError):
    """``execute_async_v3`` returned False while its stream was capturing a CUDA graph: the engine holds
    work that cannot be captured (trtexec's rule); ``CudaGraphs`` then runs that key eagerly."""


# --------------------------------------------------------------------------------------------------
# TensorRT discovery

FLAVOURS = ("tensorrt", "tensorrt_rtx")
# Oldest version each flavour is used with: TensorRT 10.11 (set_device_memory/device_memory_size_v2 since
# 10.1, an ONNX-1.17 parser for opset 22 since 10.6, tensors over 2^31 elements since 10.10/10.11);
# TensorRT-RTX 1.0 (the first release).
MIN_VERSIONS = {"tensorrt": (10, 11), "tensorrt_rtx": (1, 0)}
PIP_EXTRAS = {"tensorrt": "sdvg-rt[trt]", "tensorrt_rtx": "sdvg-rt[trt-rtx]"}
# TensorRT-RTX targets Ampere-and-later consumer/workstation architectures; it has no Hopper (9.x) or
# data-centre Blackwell (10.x) code, so an H100/H200/B200 takes TensorRT 10/11.
RTX_COMPUTE_CAPABILITIES = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
# What an RTX build targets when no --compute-capability is given (TensorRT-RTX's own portable default).
RTX_PORTABLE = ((8, 0), (8, 6), (8, 9), (12, 0))


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def tensorrt_module(flavour: str = "tensorrt"):
    """The real module of ``flavour`` (``tensorrt`` or ``tensorrt_rtx``), or ``BackendUnavailableError``
    naming what is installed.

    ``import tensorrt`` also succeeds for the type stubs (an empty namespace package) and the PyPI
    placeholder packages, so a usable install is detected with ``hasattr(module, "Builder")``; its
    version must be at least ``MIN_VERSIONS[flavour]``.
    """
    if flavour not in FLAVOURS:
        raise BackendUnavailableError(f"unknown TensorRT flavour {flavour!r}; one of {', '.join(FLAVOURS)}")
    floor = ".".join(map(str, MIN_VERSIONS[flavour]))
    label = {"tensorrt": f"TensorRT >= {floor}", "tensorrt_rtx": f"TensorRT-RTX >= {floor}"}[flavour]
    try:
        mod = importlib.import_module(flavour)
    except ImportError as e:
        raise BackendUnavailableError(
            f"{label} is not installed ({e}). Install it (pip install '{PIP_EXTRAS[flavour]}', or NVIDIA's "
            f"wheels/container), or set the component's backend to torch in the profile (or, for builds, export "
            f"the ONNX graphs only with --onnx-only). Installed: "
            f"{installed_tensorrt_packages() or 'no tensorrt package'}") from None
    if not hasattr(mod, "Builder"):
        raise BackendUnavailableError(
            f"`import {flavour}` finds no library (no {flavour}.Builder), only "
            f"{installed_tensorrt_packages() or 'an empty namespace package'} (type stubs or a PyPI placeholder "
            f"that could not download the real wheel). Install {label} with its libraries, or set the "
            "component's backend to torch (for builds: --onnx-only)")
    version = str(getattr(mod, "__version__", "0"))
    if _version_tuple(version) < MIN_VERSIONS[flavour]:
        raise BackendUnavailableError(f"{flavour} {version} is installed; sdvg-rt needs {label}. Upgrade it "
                                      f"(pip install -U '{PIP_EXTRAS[flavour]}')")
    return mod


def flavour_runs_on(flavour: str, cc: tuple[int, int]) -> bool:
    """Whether ``flavour``'s runtime runs on a GPU of compute capability ``cc``."""
    if flavour == "tensorrt_rtx":
        return tuple(cc) in RTX_COMPUTE_CAPABILITIES or tuple(cc) > (12, 1)
    return tuple(cc) >= (7, 5)


def choose_flavour(requested: str, cc: tuple[int, int] | None) -> str:
    """The profile's ``backends.tensorrt`` resolved: ``auto`` is the installed flavour that runs on this GPU
    (``cc``; None: no GPU, where only TensorRT-RTX builds ahead of time). An explicit flavour is checked
    the same way and raises ``BackendUnavailableError`` saying which GPU takes which."""
    candidates = FLAVOURS if requested == "auto" else (requested,)
    errors = []
    for fl in candidates:
        if cc is None and fl == "tensorrt":
            errors.append("TensorRT 10/11 builds plans for the GPU it runs on, and there is none")
            continue
        if cc is not None and not flavour_runs_on(fl, cc):
            errors.append(f"{fl} does not run on compute capability {cc[0]}.{cc[1]} (TensorRT-RTX: "
                          f"{', '.join(f'{a}.{b}' for a, b in RTX_COMPUTE_CAPABILITIES)} and later; "
                          "Hopper and data-centre Blackwell take TensorRT 10/11)")
            continue
        try:
            tensorrt_module(fl)
        except BackendUnavailableError as e:
            errors.append(str(e))
            continue
        return fl
    raise BackendUnavailableError(f"no usable TensorRT flavour for backends.tensorrt: {requested}: "
                                  + " | ".join(errors))


def flavour_status() -> tuple[bool, str]:
    """(usable, detail) over both flavours: usable if either imports as a real library of a supported
    version; the detail names each flavour's version or why not (for ``sdvg-rt info`` and the gate)."""
    found, why = [], []
    for fl in FLAVOURS:
        try:
            found.append(f"{fl} {tensorrt_module(fl).__version__}")
        except BackendUnavailableError as e:
            why.append(str(e))
    return (True, ", ".join(found)) if found else (False, " | ".join(why))


def installed_tensorrt_packages() -> str:
    """Installed distributions named tensorrt*, with versions (for messages)."""
    from importlib import metadata

    found = set()
    for d in metadata.distributions():
        name = d.metadata["Name"] or ""
        if name.lower().replace("_", "-").startswith("tensorrt"):
            found.add(f"{name} {d.version}")
    return ", ".join(sorted(found))


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in _TORCH_DTYPES:
        raise EngineMismatchError(f"engine tensor dtype {name} has no torch equivalent in sdvg-rt")
    return _TORCH_DTYPES[name]


# --------------------------------------------------------------------------------------------------
# Shared activation memory and the engine

class ActivationMemory:
    """One device allocation shared by the execution contexts of engines that run one after another.

    Sized as the largest ``device_memory_size_v2`` (the requirement over every profile shape) of the
    engines given; every context is created ``USER_MANAGED`` and pointed at it.

    Also holds one 256-byte slot per I/O tensor of the widest engine, for empty tensors (block 0's past):
    TensorRT wants a non-null address for them, distinct per tensor, and the activation memory is not
    to be used for anything else (``empty_address``). And one non-default stream for enqueues made
    from torch's legacy default stream (``stream_for``).
    """

    def __init__(self, engines: Iterable[Engine], device: torch.device | str):
        engines = list(engines)
        self.size = max((e.device_memory_size for e in engines), default=0)
        raw = torch.empty(self.size + ALIGNMENT, dtype=torch.uint8, device=device)
        offset = -raw.data_ptr() % ALIGNMENT  # CUDA allocations are aligned already; CPU ones may not be
        self.buffer = raw[offset:offset + self.size]
        self.ptr = raw.data_ptr() + offset
        self.slots = max((len(e.inputs) + len(e.outputs) for e in engines), default=0)
        raw_empty = torch.zeros((self.slots + 1) * ALIGNMENT, dtype=torch.uint8, device=device)
        self._empty = raw_empty
        self._empty_ptr = raw_empty.data_ptr() + (-raw_empty.data_ptr() % ALIGNMENT)
        self.device = torch.device(device)
        self._side: torch.cuda.Stream | None = None

    def empty_address(self, index: int) -> int:
        """A valid, aligned address of its own for the ``index``-th I/O tensor of an engine when it is
        empty (never read or written by TensorRT: the tensor has no elements)."""
        if not 0 <= index < self.slots:
            raise EngineRunError(f"no empty-tensor slot {index} (the engines have {self.slots} I/O tensors at most)")
        return self._empty_ptr + index * ALIGNMENT

    def stream_for(self, stream: int) -> int | None:
        """None when ``stream`` can be used as is; else (the legacy default stream, handle 0, on which
        TensorRT adds device synchronisations) the handle of this set's own stream, ordered after the
        current one (``Engine.enqueue`` orders the current one after it again)."""
        if stream != 0 or self.device.type != "cuda":
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side.cuda_stream


class Engine:
    """One TensorRT engine with explicit, idempotent lifecycle verbs: ``load`` (plan bytes into host
    memory), ``activate`` (deserialize), ``bind`` (a context per key), ``enqueue``."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, *, rebuild: str = "",
                 alignment: int | None = None, keep_plan: bool = False):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.rebuild = rebuild
        self.alignment = alignment  # None: ALIGNMENT for device tensors (TensorRT's rule), none on the host
        self.keep_plan = keep_plan  # False: the plan bytes (28 GB for the 14B) are dropped once deserialized
        self.plan: bytes | None = None
        self.memory: ActivationMemory | None = None
        self.engine: trt.ICudaEngine | None = None
        self.inputs: dict[str, torch.dtype] = {}
        self.outputs: dict[str, torch.dtype] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # as built: -1 for a dynamic axis
        self.contexts: dict[Any, trt.IExecutionContext] = {}
        self.addresses: dict[Any, dict[str, int]] = {}
        self._bound: dict[Any, dict[str, torch.Tensor]] = {}  # keeps bound tensors alive

    # ---- lifecycle -------------------------------------------------------------------------------
    def load(self) -> Engine:
        if self.plan is None:
            if not self.path.is_file():
                raise EngineMismatchError(f"TensorRT plan {self.path} is missing; rebuild with: {self.rebuild}")
            self.plan = self.path.read_bytes()
        return self

    def activate(self, runtime: trt.Runtime, trt_mod=None) -> Engine:
        """Deserialize with ``runtime`` (of ``trt_mod``, the flavour's module; default ``tensorrt``)."""
        if self.engine is not None:
            return self
        self.trt = trt_mod if trt_mod is not None else tensorrt_module("tensorrt")
        self.load()
        assert self.plan is not None
        engine = runtime.deserialize_cuda_engine(self.plan)
        if not self.keep_plan:
            self.plan = None
        if engine is None:
            raise EngineMismatchError(
                f"TensorRT could not deserialize {self.path} (built by another TensorRT version, for another "
                f"GPU, a truncated file, or no device memory left; see the TensorRT log above). If the GPU has "
                f"room, rebuild with: {self.rebuild} --force")
        self.engine = engine
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dt = torch_dtype(engine.get_tensor_dtype(name))
            dims = engine.get_tensor_shape(name)
            self.shapes[name] = tuple(int(dims[k]) for k in range(len(dims)))
            if engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                self.inputs[name] = dt
            else:
                self.outputs[name] = dt
        return self

    @property
    def device_memory_size(self) -> int:
        assert self.engine is not None, "activate() first"
        return int(self.engine.device_memory_size_v2)

    def check_io(self, io: EngineIO) -> None:
        """The engine's tensors are exactly io's (names, dtypes, static dims; -1 where io has an axis):
        anything else is an engine from another build."""
        want = {t.name: (t.torch_dtype, tuple(d if isinstance(d, int) else -1 for d in t.shape), True)
                for t in io.inputs}
        want.update({t.name: (t.torch_dtype, tuple(d if isinstance(d, int) else -1 for d in t.shape), False)
                     for t in io.outputs})
        have = {n: (dt, self.shapes.get(n), n in self.inputs) for n, dt in {**self.inputs, **self.outputs}.items()}
        if want != have:
            diff = sorted((n, want.get(n), have.get(n)) for n in set(want) | set(have) if want.get(n) != have.get(n))
            raise EngineMismatchError(f"engine {self.path} does not have the I/O this sdvg-rt expects "
                                      f"(name, expected, found: {diff[:3]}); rebuild with: {self.rebuild} --force")

    # ---- binding and running ---------------------------------------------------------------------
    def bind(self, key, tensors: Mapping[str, torch.Tensor], memory: ActivationMemory) -> trt.IExecutionContext:
        """Create the context for ``key`` and bind every I/O tensor by address (once; later calls reuse it)."""
        trt = self.trt
        if key in self.contexts:
            return self.contexts[key]
        assert self.engine is not None, "activate() first"
        names = set(self.inputs) | set(self.outputs)
        if set(tensors) != names:
            raise EngineRunError(f"{self.path}: bindings for {key!r} miss {sorted(names - set(tensors))[:4]} "
                                 f"and have extra {sorted(set(tensors) - names)[:4]}")
        ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise OutOfMemoryError(f"TensorRT could not create an execution context for {self.path}")
        if memory.size < self.device_memory_size:
            raise EngineRunError(f"{self.path}: shared activation memory {memory.size} B is smaller than the "
                                 f"engine's {self.device_memory_size} B")
        ctx.set_device_memory(memory.ptr, memory.size)
        self.memory = memory
        for name, dt in self.inputs.items():
            t = tensors[name]
            self._check_tensor(key, name, t, dt)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise EngineMismatchError(
                    f"{self.path}: input {name} of shape {tuple(t.shape)} is outside the engine's optimization "
                    f"profile (binding {key!r}); the engines were built for other shapes: rebuild with: "
                    f"{self.rebuild}")
        missing = ctx.infer_shapes()
        if missing:
            raise EngineRunError(f"{self.path}: TensorRT cannot infer shapes for {list(missing)[:4]} ({key!r})")
        for name, dt in self.outputs.items():
            t = tensors[name]
            self._check_tensor(key, name, t, dt)
            dims = ctx.get_tensor_shape(name)
            want = tuple(int(dims[i]) for i in range(len(dims)))
            if want != tuple(t.shape):
                raise EngineRunError(f"{self.path}: output {name} is {want} for these inputs, but its buffer is "
                                     f"{tuple(t.shape)} ({key!r})")
        addresses = {}
        order = {n: i for i, n in enumerate([*self.inputs, *self.outputs])}
        for name, t in tensors.items():
            # torch reports address 0 for an empty tensor (block 0's past): bind a valid, aligned,
            # never-read address of its own instead (TensorRT: non-null, distinct per tensor)
            ptr = t.data_ptr() if t.numel() else memory.empty_address(order[name])
            if not ctx.set_tensor_address(name, ptr):
                raise EngineRunError(f"{self.path}: set_tensor_address({name}) failed ({key!r})")
            addresses[name] = ptr
        self.contexts[key], self.addresses[key], self._bound[key] = ctx, addresses, dict(tensors)
        return ctx

    def _check_tensor(self, key, name: str, t: torch.Tensor, dt: torch.dtype) -> None:
        if t.dtype != dt:
            raise EngineRunError(f"{self.path}: {name} is {dt} in the engine but the buffer is {t.dtype} ({key!r})")
        if not t.is_contiguous():
            raise EngineRunError(f"{self.path}: {name} must be one contiguous region (binding {key!r})")
        align = self.alignment or (ALIGNMENT if t.device.type == "cuda" else 1)
        if t.numel() and t.data_ptr() % align:
            raise EngineRunError(
                f"{self.path}: {name} is at {t.data_ptr():#x}, not {align}-byte aligned as TensorRT "
                f"requires ({key!r}); for KV cache slices heads*head_dim*element_size must be a multiple of "
                f"{align}")

    def enqueue(self, key, stream: int) -> None:
        """``execute_async_v3`` on the context of ``key``; a False return raises naming the engine file
        (``CaptureUnsupported`` while the stream is capturing a CUDA graph). On torch's legacy default
        stream (handle 0, where TensorRT adds device synchronisations) the work runs on the activation
        memory's own stream, ordered between the current stream's work by events (no host wait)."""
        mem = self.memory
        side = mem.stream_for(stream) if mem is not None else None
        if side is not None:
            assert mem is not None and mem._side is not None
            current, own = torch.cuda.current_stream(mem.device), mem._side
            own.wait_stream(current)
            ok = self.contexts[key].execute_async_v3(side)
            current.wait_stream(own)
        else:
            ok = self.contexts[key].execute_async_v3(stream)
        if not ok:
            if stream and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise CaptureUnsupported(f"{self.path}: execute_async_v3 cannot be captured in a CUDA graph "
                                         f"(binding {key!r})")
            raise EngineRunError(f"TensorRT execute_async_v3 failed for engine {self.path} (binding {key!r}); "
                                 "see the TensorRT log above")


def current_stream(device: torch.device) -> int:
    """The raw handle of torch's current stream on ``device`` (0 off the GPU: fake engines in tests)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


# --------------------------------------------------------------------------------------------------
# Steps: the engines behind the components' step signatures (``components.DiTStep`` etc.)

class TrtDiTStep:
    """One DiT on its ``<kind>.step`` and ``<kind>.context`` engines. ``bind`` binds the context engine to the
    denoiser's context/ctx_kv and, per block index, the step engine to the cache slices of that block
    (``k_head.i``/``k_new.i``/``k_tail.i`` and v), the denoiser's ``x``, this step's ``t`` and ``flow`` and
    the block's RoPE tables: every block of a video is bound (and validated) at load."""

    fused_commits = False  # the engine has no span mask: commits go block by block

    def __init__(self, step: Engine, context: Engine, memory: ActivationMemory, cfg, device):
        from ..models.wan_dit import WanRoPE

        self.engine, self.context_engine, self.memory, self.cfg = step, context, memory, cfg
        self.device = torch.device(device)
        self._rope_tables = WanRoPE(cfg).to(self.device)
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def bind(self, cache: KVCache, context: torch.Tensor, ctx_kv: torch.Tensor, x: torch.Tensor,
             num_blocks: int) -> None:
        self.cache, self.ctx_kv, self.x = cache, ctx_kv, x
        self.grid = (cache.frames_per_block, x.shape[3] // self.cfg.patch_size[1], x.shape[4] // self.cfg.patch_size[2])
        self.t_in = torch.zeros(x.shape[2], dtype=torch.float32, device=self.device)  # engine input t
        self.flow_out = torch.zeros_like(x)  # engine output v
        self.context_engine.bind("prompt", {"context": context, "ctx_kv": ctx_kv}, self.memory)
        for b in range(num_blocks):
            self._bind_block(b)

    def step_tensors(self, block: int) -> dict[str, torch.Tensor]:
        """The step engine's bindings for ``block``: cache slices for the past and the new K/V."""
        s = self.cache.slots(block)
        n = self.cache.tokens_per_block
        ws, re = s.write_start, s.read_end
        if block not in self.rope:
            self.rope[block] = self._rope_tables.factors(*self.grid, frame_offset=s.frame_offset)
        cos, sin = self.rope[block]
        kv = self.cache.kv
        t = {"x": self.x, "t": self.t_in, "rope_cos": cos, "rope_sin": sin, "ctx_kv": self.ctx_kv,
             "flow": self.flow_out}
        for i in range(self.cfg.num_layers):
            for j, a in enumerate("kv"):
                t[f"{a}_head.{i}"] = kv[i, j, :ws]
                t[f"{a}_new.{i}"] = kv[i, j, ws:ws + n]
                t[f"{a}_tail.{i}"] = kv[i, j, ws + n:re]
        return t

    def _bind_block(self, block: int) -> None:
        if block not in self.engine.contexts:  # once per block index (at load for a video's blocks)
            self.engine.bind(block, self.step_tensors(block), self.memory)

    def context(self) -> None:
        self.context_engine.enqueue("prompt", current_stream(self.device))

    def flow(self, block: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._run(block, x, t)
        return self.flow_out

    def write_kv(self, block: int, x: torch.Tensor, t: torch.Tensor, blocks: int = 1) -> None:
        assert blocks == 1, "the step engine commits one block at a time"
        self._run(block, x, t)

    def _run(self, block: int, x: torch.Tensor, t: torch.Tensor) -> None:
        self._bind_block(block)
        if x.data_ptr() != self.x.data_ptr():  # the engine reads the bound input
            self.x.copy_(x)
        self.t_in.copy_(t)
        self.engine.enqueue(block, current_stream(self.device))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"flow": self.flow_out, "t_in": self.t_in}


class TrtVAEStep:
    """The streaming VAE on ``vae.first`` / ``vae.step``. ``bind`` makes one binding set per (kind, source
    parity, destination parity): ``z`` and the frames of its kind, ``state_in.j`` on the source state and
    ``state_out.j`` on the destination, so accepting a draft (a parity flip) copies nothing."""

    memory_format = torch.contiguous_format

    def __init__(self, first: Engine, step: Engine, memory: ActivationMemory, device):
        self.first, self.step, self.memory = first, step, memory
        self.device = torch.device(device)

    def bind(self, states: VAEStatePair, z: torch.Tensor, frames: dict[bool, torch.Tensor]) -> None:
        self.states, self.z, self.frames = states.states, z, frames
        for out in (0, 1):
            self.first.bind(("first", out), self._tensors(True, None, out), self.memory)
            self.step.bind(("step", 1 - out, out), self._tensors(False, 1 - out, out), self.memory)

    def _tensors(self, first: bool, src: int | None, dst: int) -> dict[str, torch.Tensor]:
        t = {"z": self.z, "frames": self.frames[first]}
        for j, s in enumerate(self.states[dst].slots):
            t[f"state_out.{j}"] = s
        if src is not None:
            for j, s in enumerate(self.states[src].slots):
                t[f"state_in.{j}"] = s
        return t

    def decode(self, z: torch.Tensor, first: bool, src: int, dst: int) -> torch.Tensor:
        if z.data_ptr() != self.z.data_ptr():
            self.z.copy_(z)
        if first:
            self.first.enqueue(("first", dst), current_stream(self.device))
        else:
            self.step.enqueue(("step", src, dst), current_stream(self.device))
        return self.frames[first]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}


class TrtScoreStep:
    """ImageReward on ``scorer`` (preprocessing in the engine). A contiguous frames tensor of the engine's
    dtype (the decoder's output buffer) is bound where it is (one binding per (N, address)); anything
    else is first copied into this step's own buffer."""

    def __init__(self, engine: Engine, memory: ActivationMemory, io: EngineIO, device):
        self.engine, self.memory, self.io = engine, memory, io
        self.device = torch.device(device)
        spec = {t.name: t for t in io.tensors}
        shapes = io.shapes()  # N at its max
        self.frames_dtype = spec["frames"].torch_dtype
        self._frames = torch.zeros(math.prod(shapes["frames"]), dtype=self.frames_dtype, device=self.device)

    def bind(self, ids: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor) -> None:
        self.ids, self.mask, self.rewards = ids, mask, rewards

    def score(self, frames: torch.Tensor) -> torch.Tensor:
        n = frames.shape[2]
        aligned = frames.device.type != "cuda" or frames.data_ptr() % ALIGNMENT == 0
        if frames.dtype == self.frames_dtype and frames.is_contiguous() and aligned:
            src = frames
        else:
            src = self._frames[: math.prod(frames.shape)].view(frames.shape)
            src.copy_(frames)
        key = (n, src.data_ptr())
        rewards = self.rewards[:n]
        self.engine.bind(key, {"frames": src, "ids": self.ids, "mask": self.mask, "rewards": rewards}, self.memory)
        self.engine.enqueue(key, current_stream(self.device))
        return rewards

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"frames": self._frames}




# --------------------------------------------------------------------------------------------------
# Loading: manifest check, engines, steps

def engines_folder(profile, engines_dir: str | os.PathLike | None = None) -> Path:
    from ..profiles import ENGINES_DIR

    return Path(engines_dir or ENGINES_DIR) / profile.name


def open_engines(profile, names: Sequence[str], device, *, engines_dir: str | os.PathLike | None = None
                 ) -> tuple[dict[str, Engine], ActivationMemory]:
    """Check the manifest against this profile, the TensorRT flavour (``backends.tensorrt``) and GPU,
    then load and activate ``names`` with one runtime and one shared activation allocation."""
    from .. import io_spec
    from ..manifest import Expected, check_engines, rebuild_command

    device = torch.device(device)
    if device.type != "cuda":
        raise BackendUnavailableError(f"the TensorRT backend runs on a CUDA GPU, not {device}; use backend torch")
    cc = tuple(torch.cuda.get_device_capability(device))
    flavour = choose_flavour(profile.backends.tensorrt, cc)  # type: ignore[arg-type]
    trt = tensorrt_module(flavour)
    ios = io_spec.engine_ios(profile)
    unknown = [n for n in names if n not in ios]
    assert not unknown, f"unknown engines {unknown}"
    parts = sorted({ios[n].part for n in names}, key=io_spec.PARTS.index)
    folder = engines_folder(profile, engines_dir)
    rebuild = rebuild_command(profile.path, parts)
    if flavour == "tensorrt_rtx":
        rebuild += f" --tensorrt tensorrt_rtx --compute-capability {cc[0]}.{cc[1]}"
    exp = Expected(
        part_hashes=io_spec.engine_hashes(profile, ios), io_hashes={n: ios[n].hash() for n in names},
        checkpoints={n: io_spec.engine_checkpoints(profile, ios[n].part) for n in names},
        tensorrt_version=trt.__version__, gpu_name=torch.cuda.get_device_name(device),
        compute_capability=cc, flavour=flavour)  # type: ignore[arg-type]
    manifest = check_engines(folder, names, exp, rebuild)  # the plans only: a plans-only deployment runs
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines = {}
    for n in names:
        plan = manifest.engines[n].plan
        assert plan is not None  # check_engines reports engines without plans
        e = Engine(folder / plan.file, n, rebuild=rebuild).load().activate(runtime, trt)
        e.check_io(ios[n])
        engines[n] = e
    return engines, ActivationMemory(engines.values(), device)


def build_steps(profile, parts: Sequence[str], device, *,
                engines_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The TensorRT steps of ``parts`` (``drafter``/``target``: ``TrtDiTStep``, ``vae``: ``TrtVAEStep``,
    ``scorer``: ``TrtScoreStep``) on the profile's engines; one activation allocation serves all of them."""
    from .. import io_spec

    if not parts:
        return {}
    ios = io_spec.engine_ios(profile, parts)
    engines, memory = open_engines(profile, list(ios), device, engines_dir=engines_dir)
    cfgs = io_spec.model_configs(profile)
    out: dict[str, Any] = {}
    for kind in ("drafter", "target"):
        if kind in parts:
            out[kind] = TrtDiTStep(engines[f"{kind}.step"], engines[f"{kind}.context"], memory, cfgs[kind], device)
    if "vae" in parts:
        out["vae"] = TrtVAEStep(engines["vae.first"], engines["vae.step"], memory, device)
    if "scorer" in parts:
        out["scorer"] = TrtScoreStep(engines["scorer"], memory, ios["scorer"], device)
    return out
