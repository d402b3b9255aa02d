"""The TensorRT backend: engines from ``make engines``, run with the same component API as the torch backend.

Two layers, as NVIDIA's demoDiffusion (tensorrt.md §1.4):

- ``Engine``, which knows nothing about diffusion: the plan kept as bytes in host memory (cheap
  reload), the deserialized engine, one execution context per binding set (``key``) created with
  ``USER_MANAGED`` device memory pointed at one ``ActivationMemory`` shared by every engine (they run
  one after another on one stream), ``set_input_shape`` + ``set_tensor_address`` on preallocated torch
  tensors once per key (checked: dtype, shape, contiguity, 256-byte alignment, every return value), and
  ``enqueue`` = ``execute_async_v3`` with its return value checked (a False names the engine file).
- Components with the torch backend's methods, so the loop does not know which backend runs:
  ``TrtDenoiser`` (``prepare``, ``set_seed``, ``denoise_block``, ``commit_block``, ``commit_blocks``),
  ``TrtDecoder`` (``reset``, ``decode_scratch``, ``keep_scratch``, ``decode_commit``) and ``TrtScorer``
  (``prepare``, ``score``). The per-block maths around the engine (noise, x0, re-noise) is the torch
  backend's own (``schedule``, ``noise``).

Zero copy: a DiT block's past K/V inputs and new K/V outputs are bound to the ``KVCache`` slices
themselves (io_spec), the VAE's history inputs to the committed state and its outputs to the scratch
state (accepting a draft swaps the two: one binding set per parity), and the scorer reads the
decoder's output buffer. Only the latent entering a commit or a decode is copied (600 KB).

CUDA graphs (``backends.graphs.CudaGraphs``): one per (component, block index) for the denoiser (the 4 steps with
their re-noising, and the commit), one per (kind, parity) for the decoder, one per (N, source) for the
scorer; the first call of a key runs eagerly (this flushes TensorRT's deferred setup, which must not
be captured), then the same work is captured; later calls replay it. A capture that fails ends the
capture before the error propagates. Everything is allocated at construction or on a key's first
call (the warm-up), never afterwards.

TensorRT is imported lazily; a missing package, or one without a ``Builder`` (the type stubs or the
PyPI placeholder), raises ``BackendUnavailableError`` naming what is installed. The manifest is checked
(``check_engines``) before any plan is read.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendUnavailableError, EngineMismatchError, OutOfMemoryError, SdvgError
from ..kv_cache import KVCache
from ..noise import NoiseStream
from ..schedule import Schedule, renoise_, x0_from_flow_
from .graphs import CudaGraphs

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


# --------------------------------------------------------------------------------------------------
# TensorRT discovery

def tensorrt_module():
    """The real ``tensorrt`` module, or ``BackendUnavailableError`` naming what is installed.

    ``import tensorrt`` also succeeds for the type stubs (an empty namespace package) and the PyPI
    placeholder packages, so a usable install is detected with ``hasattr(tensorrt, "Builder")``.
    """
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(
            f"TensorRT is not installed ({e}). Install TensorRT 10.x/11.x for your CUDA (NVIDIA's wheels or "
            f"container), or set the component's backend to torch in the profile (or, for builds, export the "
            f"ONNX graphs only with --onnx-only). Installed: {installed_tensorrt_packages() or 'no tensorrt package'}"
        ) from None
    if not hasattr(tensorrt, "Builder"):
        raise BackendUnavailableError(
            "`import tensorrt` finds no TensorRT library (no tensorrt.Builder), only "
            f"{installed_tensorrt_packages() or 'an empty namespace package'} (type stubs or a PyPI placeholder "
            "that could not download the real wheel). Install TensorRT 10.x/11.x with its libraries, or set the "
            "component's backend to torch (for builds: --onnx-only)")
    return tensorrt


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
    """

    def __init__(self, engines: Iterable[Engine], device: torch.device | str):
        self.size = max((e.device_memory_size for e in engines), default=0)
        raw = torch.empty(self.size + ALIGNMENT, dtype=torch.uint8, device=device)
        offset = -raw.data_ptr() % ALIGNMENT  # CUDA allocations are aligned already; CPU ones may not be
        self.buffer = raw[offset:offset + self.size]
        self.ptr = raw.data_ptr() + offset


class Engine:
    """One TensorRT engine with explicit, idempotent lifecycle verbs: ``load`` (plan bytes into host
    memory), ``activate`` (deserialize), ``bind`` (a context per key), ``enqueue``."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, *, rebuild: str = "",
                 alignment: int | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.rebuild = rebuild
        self.alignment = alignment  # None: ALIGNMENT for device tensors (TensorRT's rule), none on the host
        self.plan: bytes | None = None
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

    def activate(self, runtime: trt.Runtime) -> Engine:
        import tensorrt as trt

        if self.engine is not None:
            return self
        self.load()
        assert self.plan is not None
        engine = runtime.deserialize_cuda_engine(self.plan)
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
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
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
        import tensorrt as trt

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
        for name, t in tensors.items():
            # torch reports address 0 for an empty tensor (block 0's past): bind a valid, aligned,
            # never-read address instead of a null pointer
            ptr = t.data_ptr() if t.numel() else memory.ptr
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
        """``execute_async_v3`` on the context of ``key``; a False return raises naming the engine file."""
        ok = self.contexts[key].execute_async_v3(stream)
        if not ok:
            raise EngineRunError(f"TensorRT execute_async_v3 failed for engine {self.path} (binding {key!r}); "
                                 "see the TensorRT log above")


def current_stream(device: torch.device) -> int:
    """The raw handle of torch's current stream on ``device`` (0 off the GPU: fake engines in tests)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


# --------------------------------------------------------------------------------------------------
# Components

class TrtDenoiser:
    """One DiT (``kind`` drafter or target) on its ``<kind>.step`` and ``<kind>.context`` engines.

    Same state and methods as ``TorchDenoiser``; the cache slices of block b are bound to the step
    engine's ``k_head.i``/``k_new.i``/``k_tail.i`` (and v) in the context for block b.
    """

    def __init__(self, step: Engine, context: Engine, memory: ActivationMemory, cfg, kind: str, *,
                 latent_shape: tuple[int, int, int], window_frames: int, sink_frames: int, schedule: Schedule,
                 device, dtype: torch.dtype, num_blocks: int = 0, use_cuda_graphs: bool = True):
        from ..models.wan_dit import WanRoPE

        frames, h, w = latent_shape
        self.step, self.context_engine, self.memory = step, context, memory
        self.cfg, self.kind, self.schedule = cfg, kind, schedule
        self.device, self.dtype = torch.device(device), dtype
        self.frames_per_block, self.grid = frames, (frames, h // cfg.patch_size[1], w // cfg.patch_size[2])
        tpf = self.grid[1] * self.grid[2]
        self.cache = KVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, tpf, frames, window_frames, sink_frames,
                             dtype=dtype, device=self.device)
        T = cfg.text_len
        dev = self.device
        self.context = torch.zeros(1, T, cfg.text_dim, dtype=dtype, device=dev)
        self.ctx_kv = torch.zeros(cfg.num_layers, 2, T, cfg.num_heads, cfg.head_dim, dtype=dtype, device=dev)
        shape = (1, cfg.in_dim, frames, h, w)
        self.x = torch.zeros(shape, dtype=dtype, device=dev)        # engine input x_t
        self.flow = torch.zeros(shape, dtype=dtype, device=dev)     # engine output v
        self.x0 = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.work = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.out = torch.zeros(shape, dtype=dtype, device=dev)
        self.noise = NoiseStream(shape, schedule.num_steps, dev)
        self.t = schedule.timestep_table(frames, dev)               # [steps + 1, F]; last row: commit
        self.t_in = torch.zeros(frames, dtype=torch.float32, device=dev)  # engine input t
        self.sigmas = schedule.sigmas
        self._rope_tables = WanRoPE(cfg).to(dev)
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs = CudaGraphs(use_cuda_graphs, self.device)
        self.context_engine.bind("prompt", {"context": self.context, "ctx_kv": self.ctx_kv}, memory)
        for b in range(num_blocks):  # bind (and validate) every block of a video at load time
            self._bind_block(b)

    # ---- bindings --------------------------------------------------------------------------------
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
             "flow": self.flow}
        for i in range(self.cfg.num_layers):
            for j, a in enumerate("kv"):
                t[f"{a}_head.{i}"] = kv[i, j, :ws]
                t[f"{a}_new.{i}"] = kv[i, j, ws:ws + n]
                t[f"{a}_tail.{i}"] = kv[i, j, ws + n:re]
        return t

    def _bind_block(self, block: int) -> None:
        if block not in self.step.contexts:  # once per block index (at load for a video's blocks)
            self.step.bind(block, self.step_tensors(block), self.memory)

    # ---- per prompt ------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, context: torch.Tensor) -> None:
        """context [1, T, text_dim] -> ctx_kv through the context engine, once per prompt."""
        if tuple(context.shape) != tuple(self.context.shape):
            raise ValueError(f"{self.kind}: context must be {tuple(self.context.shape)}, found {tuple(context.shape)}")
        self.context.copy_(context, non_blocking=True)
        self.context_engine.enqueue("prompt", current_stream(self.device))

    def set_seed(self, seed: int) -> None:
        self.noise.set_seed(seed)

    # ---- per block -------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise_block(self, block: int) -> torch.Tensor:
        """4 denoising steps of ``block`` -> clean latent ``self.out`` [1, 16, F, h, w] (valid until the next call)."""
        self._bind_block(block)
        self.graphs.run(("denoise", block), lambda: self._denoise_body(block))
        return self.out

    def _denoise_body(self, block: int) -> None:
        eps = self.noise.fill(block)
        self.x.copy_(eps[0])
        last = len(self.sigmas) - 1
        stream = current_stream(self.device)
        for k, sigma in enumerate(self.sigmas):
            # 1. flow prediction at t_k, 2. x0 = x_t - sigma_k * v, 3. re-noise to sigma_{k+1}
            self.t_in.copy_(self.t[k])
            self.step.enqueue(block, stream)
            x0_from_flow_(self.x0, self.x, self.flow, sigma)
            if k < last:
                renoise_(self.x, self.x0, eps[k + 1], self.sigmas[k + 1], self.work)
        self.out.copy_(self.x0)

    @torch.no_grad()
    def commit_block(self, block: int, x: torch.Tensor) -> None:
        """t = 0 forward on the clean latent x: writes the block's clean K/V into its cache slots."""
        self._bind_block(block)
        self.x.copy_(x)  # x comes from either model's buffer: copied in, outside the graph
        self.graphs.run(("commit", block), lambda: self._commit_body(block))

    def _commit_body(self, block: int) -> None:
        self.t_in.copy_(self.t[-1])
        self.step.enqueue(block, current_stream(self.device))

    @torch.no_grad()
    def commit_blocks(self, blocks: list[int], xs: torch.Tensor, fused: bool = False) -> None:
        """Commit consecutive blocks one by one (the engine has no span mask; per-block commits are what
        eager commits compute, so ``fused`` is accepted and ignored)."""
        for i, b in enumerate(blocks):
            self.commit_block(b, xs[i])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"kv": self.cache.kv, "context": self.context, "ctx_kv": self.ctx_kv, "x": self.x, "x0": self.x0,
                "work": self.work, "out": self.out, "flow": self.flow, "noise": self.noise.out,
                "noise_key": self.noise.key, "t": self.t, "t_in": self.t_in}


class TrtDecoder:
    """The streaming VAE on ``vae.first`` / ``vae.step`` with a committed and a scratch state.

    The two states are preallocated; ``parity`` says which one is committed. A draft decodes from the
    committed state into the scratch one (binding key ``("step", parity, 1 - parity)``), accepting it
    flips the parity, so no state is ever copied. Frames are the engines' output buffers (valid until
    the next decode of the same kind).
    """

    def __init__(self, first: Engine, step: Engine, memory: ActivationMemory, io_first: EngineIO,
                 io_step: EngineIO, device, use_cuda_graphs: bool = True):
        self.first, self.step, self.memory = first, step, memory
        self.device = torch.device(device)
        dev = self.device
        shapes = io_step.shapes()
        n_states = sum(1 for t in io_step.inputs if t.name.startswith("state_in."))
        dt = io_step.inputs[0].torch_dtype
        self.states = tuple([torch.zeros(shapes[f"state_in.{j}"], dtype=dt, device=dev) for j in range(n_states)]
                            for _ in range(2))
        self.z = torch.zeros(shapes["z"], dtype=dt, device=dev)
        self.frames = {"first": torch.zeros(io_first.shapes()["frames"], dtype=dt, device=dev),
                       "step": torch.zeros(shapes["frames"], dtype=dt, device=dev)}
        self.parity = 0
        self._scratch_ready = False
        self.graphs = CudaGraphs(use_cuda_graphs, dev)
        for out in (0, 1):
            self.first.bind(("first", out), self._tensors("first", None, out), memory)
            self.step.bind(("step", 1 - out, out), self._tensors("step", 1 - out, out), memory)

    def _tensors(self, kind: str, src: int | None, dst: int) -> dict[str, torch.Tensor]:
        t = {"z": self.z, "frames": self.frames[kind]}
        for j, s in enumerate(self.states[dst]):
            t[f"state_out.{j}"] = s
        if src is not None:
            for j, s in enumerate(self.states[src]):
                t[f"state_in.{j}"] = s
        return t

    @property
    def committed(self) -> list[torch.Tensor]:
        return self.states[self.parity]

    @property
    def scratch(self) -> list[torch.Tensor]:
        return self.states[1 - self.parity]

    def reset(self) -> None:
        for st in self.states:
            for s in st:
                s.zero_()
        self.parity = 0
        self._scratch_ready = False

    @torch.no_grad()
    def decode_scratch(self, z: torch.Tensor, block: int) -> torch.Tensor:
        """Decode a block from the committed state into the scratch state (the committed one is only read)."""
        self.z.copy_(z)
        out = 1 - self.parity
        if block == 0:
            key: tuple = ("first", out)
            self.graphs.run(key, lambda: self.first.enqueue(key, current_stream(self.device)))
            frames = self.frames["first"]
        else:
            key = ("step", self.parity, out)
            self.graphs.run(key, lambda: self.step.enqueue(key, current_stream(self.device)))
            frames = self.frames["step"]
        self._scratch_ready = True
        return frames

    def keep_scratch(self) -> None:
        """Accept: the scratch state becomes the committed one (the parity flips; nothing is copied)."""
        assert self._scratch_ready, "keep_scratch() needs a decode_scratch() since the last keep/reset"
        self.parity = 1 - self.parity
        self._scratch_ready = False

    @torch.no_grad()
    def decode_commit(self, z: torch.Tensor, block: int) -> torch.Tensor:
        frames = self.decode_scratch(z, block)
        self.keep_scratch()
        return frames

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"state{p}.{j}": s for p, st in enumerate(self.states) for j, s in enumerate(st)}
        return {**out, "z": self.z, **{f"frames_{k}": v for k, v in self.frames.items()}}


class TrtScorer:
    """ImageReward on ``scorer`` (preprocessing in the engine): ``score(frames [1, 3, N, H, W]) -> [N]``.

    A contiguous frames tensor of the engine's dtype (the decoder's output buffer) is bound where it is
    (one binding per (N, address)); anything else is first copied into the scorer's own buffer.
    """

    def __init__(self, engine: Engine, memory: ActivationMemory, io: EngineIO, tokenizer, device,
                 use_cuda_graphs: bool = True):
        self.engine, self.memory, self.io, self.tokenizer = engine, memory, io, tokenizer
        self.device = torch.device(device)
        spec = {t.name: t for t in io.tensors}
        shapes = io.shapes()  # N at its max
        self.frames_dtype = spec["frames"].torch_dtype
        self.n_max = shapes["frames"][2]
        self.frame_shape = shapes["frames"][3:]
        self.ids = torch.zeros(shapes["ids"], dtype=torch.int64, device=self.device)
        self.mask = torch.zeros(shapes["mask"], dtype=torch.int64, device=self.device)
        self._frames = torch.zeros(math.prod(shapes["frames"]), dtype=self.frames_dtype, device=self.device)
        self._rewards = torch.zeros(self.n_max, dtype=torch.float32, device=self.device)
        self.graphs = CudaGraphs(use_cuda_graphs, self.device)

    def prepare(self, prompt: str) -> None:
        ids, mask = self.tokenizer(prompt)
        self.ids.copy_(ids, non_blocking=True)
        self.mask.copy_(mask, non_blocking=True)

    @torch.no_grad()
    def score(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [1, 3, N, H, W] in [-1, 1] -> per-frame rewards [N] float32 (a view of the scorer's buffer)."""
        n = frames.shape[2]
        aligned = frames.device.type != "cuda" or frames.data_ptr() % ALIGNMENT == 0
        if frames.dtype == self.frames_dtype and frames.is_contiguous() and aligned:
            src = frames
        else:
            src = self._frames[: math.prod(frames.shape)].view(frames.shape)
            src.copy_(frames)
        key = (n, src.data_ptr())
        rewards = self._rewards[:n]
        self.engine.bind(key, {"frames": src, "ids": self.ids, "mask": self.mask, "rewards": rewards}, self.memory)
        self.graphs.run(key, lambda: self.engine.enqueue(key, current_stream(self.device)))
        return rewards

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "mask": self.mask, "frames": self._frames, "rewards": self._rewards}



# --------------------------------------------------------------------------------------------------
# Loading: manifest check, engines, components

def engines_folder(profile, engines_dir: str | os.PathLike | None = None) -> Path:
    from ..profiles import ENGINES_DIR

    return Path(engines_dir or ENGINES_DIR) / profile.name


def open_engines(profile, names: Sequence[str], device, *, engines_dir: str | os.PathLike | None = None
                 ) -> tuple[dict[str, Engine], ActivationMemory]:
    """Check the manifest against this profile, TensorRT and GPU, then load and activate ``names``
    with one runtime and one shared activation allocation."""
    from .. import io_spec
    from ..manifest import Expected, check_engines, rebuild_command

    trt_mod = tensorrt_module()
    import tensorrt as trt

    device = torch.device(device)
    if device.type != "cuda":
        raise BackendUnavailableError(f"the TensorRT backend runs on a CUDA GPU, not {device}; use backend torch")
    ios = io_spec.engine_ios(profile)
    unknown = [n for n in names if n not in ios]
    assert not unknown, f"unknown engines {unknown}"
    parts = sorted({ios[n].part for n in names}, key=io_spec.PARTS.index)
    folder = engines_folder(profile, engines_dir)
    rebuild = rebuild_command(profile.path, parts)
    exp = Expected(
        part_hashes=io_spec.engine_hashes(profile, ios), io_hashes={n: ios[n].hash() for n in names},
        checkpoints={n: io_spec.engine_checkpoints(profile, ios[n].part) for n in names},
        tensorrt_version=trt_mod.__version__, gpu_name=torch.cuda.get_device_name(device),
        compute_capability=tuple(torch.cuda.get_device_capability(device)))
    manifest = check_engines(folder, names, exp, rebuild)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines = {}
    for n in names:
        plan = manifest.engines[n].plan
        assert plan is not None  # check_engines reports engines without plans
        e = Engine(folder / plan.file, n, rebuild=rebuild).load().activate(runtime)
        e.check_io(ios[n])
        engines[n] = e
    return engines, ActivationMemory(engines.values(), device)


def build_components(profile, device, *, engines_dir: str | os.PathLike | None = None,
                     use_cuda_graphs: bool = True) -> dict[str, Any]:
    """The TensorRT components of every part whose backend is ``tensorrt`` in the profile, keyed like the
    loop's components: ``drafter``, ``target`` (``TrtDenoiser``), ``vae`` (``TrtDecoder``), ``scorer``
    (``TrtScorer``). One activation allocation serves all of them."""
    from .. import io_spec
    from ..checkpoints.imagereward import resolve_paths
    from ..models.imagereward import ImageRewardTokenizer

    parts = [p for p in io_spec.PARTS if getattr(profile.backends, p) == "tensorrt"]
    if not parts:
        return {}
    ios = io_spec.engine_ios(profile, parts)
    engines, memory = open_engines(profile, list(ios), device, engines_dir=engines_dir)
    cfgs, v = io_spec.model_configs(profile), profile.video
    window, sink = profile.cache_geometry()
    sched = Schedule.from_steps(profile.schedule.steps, profile.schedule.shift)
    dtype = io_spec.DTYPES[profile.precision]
    out: dict[str, Any] = {}
    for kind in ("drafter", "target"):
        if kind in parts:
            out[kind] = TrtDenoiser(
                engines[f"{kind}.step"], engines[f"{kind}.context"], memory, cfgs[kind], kind,
                latent_shape=(v.frames_per_block, v.latent_height, v.latent_width), window_frames=window,
                sink_frames=sink, schedule=sched, device=device, dtype=dtype, num_blocks=v.num_blocks,
                use_cuda_graphs=use_cuda_graphs)
    if "vae" in parts:
        out["vae"] = TrtDecoder(engines["vae.first"], engines["vae.step"], memory, ios["vae.first"],
                                ios["vae.step"], device, use_cuda_graphs)
    if "scorer" in parts:
        _, _, vocab = resolve_paths(profile.checkpoints.scorer)
        out["scorer"] = TrtScorer(engines["scorer"], memory, ios["scorer"], ImageRewardTokenizer(vocab), device,
                                  use_cuda_graphs)
    return out
