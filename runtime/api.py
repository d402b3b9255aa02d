"""The embeddable Python API: load once, then generate many videos (optionally block by block).

    import sdvg_rt
    rt = sdvg_rt.Runtime.from_profile("profiles/paper-832x480.yaml")     # load (weights)
    prompts = rt.encode_prompts(["a red fox in the snow", "a city at night"])
    rt.release_text_encoder()                                            # frees umT5 before allocating caches
    for p in prompts:
        result = rt.generate(p, tau=-0.7)                                # frames uint8 [F, H, W, 3], stats dict
    for block in rt.stream(prompts[0]):                                  # committed blocks as they come
        print(block.block, block.frames.shape, block.record.decision)

Lifecycle: load (text encoder and the four models' weights) -> encode prompts -> release the text encoder
-> allocate (KV caches, VAE states, all buffers; on the first generation, or ``allocate()``) -> warm up
(``warmup()``, timed on its own) -> serve. One generation at a time per Runtime: a second one started
while the first runs raises ``BusyError`` (thread-safe).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .decide import check_mode, check_tau
from .errors import BackendUnavailableError, BusyError, CheckpointError, OutOfMemoryError, SdvgError
from .io_spec import DTYPES
from .loop import BlockOutput, PreparedPrompt, SpeculativeLoop
from .profiles import COMPONENTS, Profile, load_profile
from .schedule import Schedule



@dataclass(frozen=True)
class Result:
    """One generated video: ``frames`` uint8 [F, H, W, 3] (host), ``stats`` (the JSON record, spec §3)
    and ``latents``, the committed latents [1, 16, latent_frames, h, w] (host, model dtype)."""

    frames: np.ndarray
    stats: dict
    latents: torch.Tensor | None = None


def tensorrt_status() -> tuple[bool, str]:
    """(usable, detail) from ``tensorrt_backend.tensorrt_module`` (a bare import can succeed on a stub)."""
    from .backends.tensorrt_backend import tensorrt_module

    try:
        trt = tensorrt_module()
    except BackendUnavailableError as e:
        return False, str(e)
    return True, f"tensorrt {getattr(trt, '__version__', '?')}"


def check_backend(component: str, name: str) -> None:
    """The backend factory's gate, before anything is loaded: ``torch`` is always usable; ``tensorrt`` needs
    an importable TensorRT with a ``Builder`` (its engines and manifest are checked when they are opened)."""
    if name == "torch":
        return
    usable, detail = tensorrt_status()
    if not usable:
        raise BackendUnavailableError(
            f"backends.{component} is '{name}' but TensorRT is not usable here: {detail}. Install TensorRT "
            f"(pip install 'sdvg-rt[trt]' tensorrt) and build the engines (make engines PROFILE=<profile>), or "
            f"set backends.{component}: torch in the profile (or pass backends__{component}='torch')")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BackendUnavailableError(f"device {device!r} is not a torch device name (e.g. cpu, cuda, cuda:1): {e}") \
            from None
    if dev.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"device {device!r}: sdvg-rt runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendUnavailableError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                      f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def memory_plan(profile: Profile) -> dict[str, int]:
    """Bytes each part of a profile needs on the device (weights, caches, VAE states), before loading."""
    from .kv_cache import KVCache
    from .models.wan_dit import WanDiTConfig
    from .models.wan_vae import VAEStream, WanVAEConfig

    dt = DTYPES[profile.precision]
    el = torch.empty((), dtype=dt).element_size()
    v = profile.video
    window, _ = profile.cache_geometry()
    out = {}
    for kind in ("drafter", "target"):
        try:
            cfg = WanDiTConfig.from_name(getattr(profile.models, kind))
        except ValueError:
            continue
        tpf = (v.latent_height // cfg.patch_size[1]) * (v.latent_width // cfg.patch_size[2])
        params = sum(p.numel() for p in _meta_dit(cfg).parameters())
        out[f"{kind} weights"] = params * el
        out[f"{kind} KV cache"] = KVCache.nbytes(cfg.num_layers, cfg.num_heads, cfg.head_dim, tpf, window, dt)
    try:
        vcfg = WanVAEConfig.from_name(profile.models.vae)
        out["VAE states (committed + scratch)"] = VAEStream.nbytes_for(vcfg, v.latent_height, v.latent_width, dt)
        out["VAE decoder weights"] = vcfg_params(vcfg) * el
    except ValueError:
        pass
    try:
        from .models.imagereward import ImageReward, ImageRewardConfig

        with torch.device("meta"):
            ir = ImageReward(ImageRewardConfig.preset(profile.models.scorer))
        out["ImageReward weights"] = sum(p.numel() for p in ir.parameters()) * \
            torch.empty((), dtype=DTYPES[profile.scorer_precision]).element_size()
    except ValueError:
        pass
    return out


def vcfg_params(vcfg) -> int:
    from .models.wan_vae import WanVAEDecoder

    with torch.device("meta"):
        return sum(p.numel() for p in WanVAEDecoder(vcfg).parameters())


# Activations and the shared CUDA-graph pool at 832x480 (measured on the H100: peak 66.8 GiB against
# 63.3 GiB of weights, caches and states, docs/PERFORMANCE.md), scaled by tokens per block.
ACTIVATION_RESERVE_BYTES_832x480 = 4 * 2**30


def check_fits(profile: Profile, free_bytes: int, *, text_encoder: bool = True) -> dict[str, int]:
    """Before anything is loaded: do the profile's weights, caches, states and activations fit in
    ``free_bytes``? Two peaks are checked: loading (weights plus the text encoder, which is freed before
    the caches are allocated) and generating (weights, caches, states, activations). Raises
    ``OutOfMemoryError`` with the table; returns the plan."""
    plan = dict(memory_plan(profile))
    v = profile.video
    plan["activations and graph pool (reserve)"] = int(
        ACTIVATION_RESERVE_BYTES_832x480 * (v.latent_height * v.latent_width) / (60 * 104))
    weights = sum(b for k, b in plan.items() if "weights" in k)
    te = 0
    te_path = Path(profile.checkpoints.text_encoder)
    if text_encoder and te_path.is_file():
        te = te_path.stat().st_size  # bf16 on disk, bf16 on the device
    need_load, need_run = weights + te, sum(plan.values())
    if max(need_load, need_run) > free_bytes:
        rows = "\n    ".join(f"{k:40s} {b / 2**30:7.2f} GiB" for k, b in plan.items())
        raise OutOfMemoryError(
            f"profile {profile.name!r} does not fit this device: generating needs {need_run / 2**30:.1f} GiB "
            f"and loading (weights + text encoder {te / 2**30:.1f} GiB) {need_load / 2**30:.1f} GiB, but "
            f"{free_bytes / 2**30:.1f} GiB are free.\n    {rows}\n  Use a smaller cache window "
            f"(cache.window_frames with a sink), a lower resolution, or a GPU with more memory")
    return plan


def _meta_dit(cfg):
    from .models.wan_dit import WanDiT

    with torch.device("meta"):
        return WanDiT(cfg)


def _oom_message(profile: Profile, device: torch.device, what: str) -> str:
    plan = memory_plan(profile)
    lines = "; ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in plan.items())
    free = ""
    if device.type == "cuda":
        f, t = torch.cuda.mem_get_info(device)
        free = f" The device has {t / 2**30:.1f} GiB ({f / 2**30:.1f} GiB free now)."
    return (f"out of device memory while {what}. Needs: {lines} (plus activations; the text encoder is "
            f"freed before caches are allocated).{free} Use a profile with a smaller cache window "
            f"(cache.window_frames) or resolution, or a GPU with more memory")


class Runtime:
    """SDVG generation on one device. Build it with ``Runtime.from_profile``."""

    def __init__(self, profile: Profile, device: torch.device, models: dict, text_encoder, load_s: float):
        self.profile, self.device = profile, device
        self.dtype = DTYPES[profile.precision]
        self._models = models  # drafter, target, vae, scorer, scorer_tokenizer
        self.text_encoder = text_encoder
        self.loop: SpeculativeLoop | None = None
        self.timings = {"load_s": load_s}
        self._lock = threading.Lock()

    # ---- load ------------------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: str | os.PathLike | Profile, device=None, *, text_encoder: bool = True,
                     **overrides) -> Runtime:
        """Load a profile (a YAML path or a ``Profile``; ``overrides`` replace fields by name, e.g.
        ``tau=-0.5, window_frames=9``) on ``device`` (default: CUDA if available, else CPU).

        Loads the four models' weights and (``text_encoder=True``) the umT5 text encoder; caches and
        buffers are allocated later (``allocate``), after the text encoder can be released.
        """
        if isinstance(profile, Profile):
            prof = profile.replace(**overrides) if overrides else profile
        else:
            prof = load_profile(profile, **overrides)
        dev = resolve_device(device)
        for comp in COMPONENTS:
            check_backend(comp, getattr(prof.backends, comp))
        if dev.type == "cuda":
            check_fits(prof, torch.cuda.mem_get_info(dev)[0], text_encoder=text_encoder)
        t0 = time.perf_counter()
        try:
            te = _load_text_encoder(prof, dev) if text_encoder else None
            models = _load_models(prof, dev)
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(_oom_message(prof, dev, "loading the model weights")) from e
        text_dim = _dit_config(prof, models, "drafter").text_dim
        if te is not None and te.config.d_model != text_dim:
            raise CheckpointError(
                f"the text encoder's width ({te.config.d_model}) does not match the DiTs' text_dim "
                f"({text_dim}); checkpoints.text_encoder belongs to another model family",
                path=prof.checkpoints.text_encoder)
        return cls(prof, dev, models, te, time.perf_counter() - t0)

    # ---- prompts ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PreparedPrompt]:
        """umT5-encode prompts once; the contexts are kept on the host (pinned on CUDA)."""
        if self.text_encoder is None:
            raise SdvgError("the text encoder was released (or never loaded); encode prompts before "
                            "release_text_encoder(), or build the Runtime with text_encoder=True")
        if isinstance(prompts, str):
            prompts = [prompts]
        ctx = self.text_encoder.encode(list(prompts), out_device="cpu")
        pin = self.device.type == "cuda"
        return [PreparedPrompt(p, c.pin_memory() if pin else c) for p, c in zip(prompts, ctx)]

    def release_text_encoder(self) -> None:
        """Free the umT5 weights (about 11.4 GB in bf16) before caches are allocated."""
        if self.text_encoder is not None:
            self.text_encoder.release()
            self.text_encoder = None

    def _prepared(self, prompt: str | PreparedPrompt) -> PreparedPrompt:
        if isinstance(prompt, PreparedPrompt):
            return prompt
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or a PreparedPrompt from encode_prompts(), got {type(prompt)}")
        return self.encode_prompts([prompt])[0]

    # ---- allocate, warm up -----------------------------------------------------------------------
    def allocate(self) -> None:
        """Preallocate every cache and buffer (idempotent)."""
        if self.loop is not None:
            return
        t0 = time.perf_counter()
        try:
            self.loop = _build_loop(self.profile, self._models, self.device, self.dtype)
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(_oom_message(self.profile, self.device, "allocating caches and buffers")) from e
        self.timings["allocate_s"] = time.perf_counter() - t0

    def warmup(self, blocks: int | None = None) -> float:
        """Run every component once before serving, timed on its own: ``blocks`` blocks (default: the whole
        video, so every block index's CUDA graphs are captured here rather than inside a real generation)
        on an empty prompt with tau = +inf (target, draft, scratch decode, score, reject; the VAE's two
        states alternate) and then -inf (accept, keep_scratch), plus the drafter's block 0 of draft mode
        (the one graph sdvg mode never uses). Noise is keyed by (seed, block, step), so warm-up cannot
        shift later outputs."""
        self.allocate()
        blocks = self.profile.video.num_blocks if blocks is None else blocks
        cfg = _dit_config(self.profile, self._models, "drafter")
        empty = PreparedPrompt("", torch.zeros(1, cfg.text_len, cfg.text_dim))
        t0 = time.perf_counter()
        for tau in (float("inf"), float("-inf")):
            for _ in self.stream(empty, tau=tau, mode="sdvg", max_blocks=blocks):
                pass
        for _ in self.stream(empty, mode="draft", max_blocks=min(blocks, 1)):
            pass
        self.timings["warmup_s"] = time.perf_counter() - t0
        return self.timings["warmup_s"]

    # ---- serve -----------------------------------------------------------------------------------
    def stream(self, prompt: str | PreparedPrompt, seed: int | None = None, tau: float | None = None,
               mode: str | None = None, *, max_blocks: int | None = None) -> Iterator[BlockOutput]:
        """Yield each committed block (``BlockOutput(block, frames uint8 [f, H, W, 3], record)``) as soon as
        its frames are on the host. The generation starts at the first ``next()``; ``BusyError`` there if
        another generation of this Runtime is running. The generator returns the stats dict."""
        self._acquire()
        try:
            return (yield from self._generate_blocks(prompt, seed, tau, mode, max_blocks))
        finally:
            self._lock.release()

    def _acquire(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise BusyError("this Runtime is already generating (one generation at a time); wait for it to "
                            "finish, or create another Runtime")

    def _generate_blocks(self, prompt, seed, tau, mode, max_blocks) -> Iterator[BlockOutput]:
        """The generation itself; the caller holds the lock."""
        self.allocate()
        s = self.profile.sampling
        seed = s.seed if seed is None else seed
        tau = check_tau(s.tau if tau is None else tau)
        mode = check_mode(s.mode if mode is None else mode)
        p = self._prepared(prompt)
        records = []
        gen = self.loop.run(p, mode=mode, tau=tau, seed=seed, max_blocks=max_blocks)
        try:
            for out in gen:
                records.append(out.record)
                yield out
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(_oom_message(self.profile, self.device, "generating (activations)")) from e
        self.last_stats = self._stats(p, seed, tau, mode, records, self.loop.summary)
        return self.last_stats

    def generate(self, prompt: str | PreparedPrompt, seed: int | None = None, tau: float | None = None,
                 mode: str | None = None) -> Result:
        """Generate one whole video; see ``stream`` for the arguments (defaults from the profile). The
        result (frames, stats, committed latents) is taken while this generation still holds the Runtime."""
        self._acquire()
        try:
            frames = [b.frames for b in self._generate_blocks(prompt, seed, tau, mode, None)]
            return Result(np.concatenate(frames), self.last_stats, self.loop.committed_latents().cpu())
        finally:
            self._lock.release()

    def _stats(self, p: PreparedPrompt, seed, tau, mode, records, summary) -> dict:
        prof, v = self.profile, self.profile.video
        return {
            "prompt": p.text,
            "seed": seed,
            "mode": mode,
            "tau": tau,
            "lazy_commit": self.loop.lazy_commit,
            "profile": prof.name,
            "device": str(self.device),
            "precision": prof.precision,
            "width": v.width,
            "height": v.height,
            "fps": prof.output.fps,
            "latent_frames": len(records) * v.frames_per_block,
            "frames": summary["frames"],
            "acceptance_rate": summary["acceptance_rate"],
            "wall_time_s": summary["wall_time_s"],
            "peak_gpu_memory_bytes": summary["peak_gpu_memory_bytes"],
            "target_only_estimate_s": summary["target_only_estimate_s"],
            "speedup_estimate": summary["speedup_estimate"],
            "blocks": [r.to_dict() for r in records],
            "totals": {k: summary[k] for k in ("blocks", "frames", "forced", "accepted", "rejected", "times_ms",
                                               "prepare_ms", "target_commits_skipped")},
        }

    # ---- introspection ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every preallocated state tensor (KV caches, text K/V, VAE states, buffers) by name."""
        self.allocate()
        return self.loop.state_tensors()

    def close(self) -> None:
        """Drop models, caches and buffers (the Runtime cannot generate afterwards)."""
        self.release_text_encoder()
        self.loop, self._models = None, {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_text_encoder(prof: Profile, dev: torch.device):
    from .models.umt5 import TextEncoder

    ck = prof.checkpoints
    dtype = DTYPES[prof.precision] if dev.type == "cuda" or prof.precision == "fp32" else torch.float32
    return TextEncoder.from_files(ck.text_encoder, ck.tokenizer, device=dev, dtype=dtype)


def _dit_config(prof: Profile, models: dict, kind: str):
    """The loaded DiT's config, or the profile's preset where the part runs on TensorRT (no torch weights)."""
    from .models.wan_dit import WanDiTConfig

    return models[kind].cfg if kind in models else WanDiTConfig.from_name(getattr(prof.models, kind))


def _load_models(prof: Profile, dev: torch.device) -> dict:
    """The torch weights of every part whose backend is torch (TensorRT parts live in their engines)."""
    from .checkpoints.imagereward import load_imagereward
    from .checkpoints.wan_dit import load_dit
    from .checkpoints.wan_vae import load_vae_decoder
    from .models.imagereward import ImageRewardConfig
    from .models.wan_vae import WanVAEConfig

    ck, m, dt = prof.checkpoints, prof.models, DTYPES[prof.precision]
    torch_parts = {c for c in COMPONENTS if getattr(prof.backends, c) == "torch"}
    out = {kind: load_dit(getattr(ck, kind), dev, dt, expect=getattr(m, kind))
           for kind in ("drafter", "target") if kind in torch_parts}
    apply_performance(prof, dev, out)
    from .models.fp8 import apply_quantization  # profile section quantization (fp8 DiT linears)
    apply_quantization(prof, dev, out)
    a, b = _dit_config(prof, out, "drafter"), _dit_config(prof, out, "target")
    if (a.in_dim, a.patch_size, a.text_dim, a.text_len) != (b.in_dim, b.patch_size, b.text_dim, b.text_len):
        raise CheckpointError("drafter and target disagree on latent channels, patch size or text width; they "
                              "must be the same model family", path=ck.target,
                              expected=(a.in_dim, a.patch_size, a.text_dim), found=(b.in_dim, b.patch_size, b.text_dim))
    if "vae" in torch_parts:
        vae = load_vae_decoder(ck.vae, dev, dt, channels_last=dev.type == "cuda")
        want = WanVAEConfig.from_name(m.vae)
        if vae.config != want:
            raise CheckpointError(f"the VAE checkpoint is not the {m.vae} architecture (models.vae)", path=ck.vae,
                                  expected=want, found=vae.config)
        if vae.config.z_dim != a.in_dim:
            raise CheckpointError("VAE latent channels differ from the DiT's", path=ck.vae, expected=a.in_dim,
                                  found=vae.config.z_dim)
        out["vae"] = vae
    if "scorer" in torch_parts:
        scorer, tok = load_imagereward(ck.scorer, device=dev, dtype=DTYPES[prof.scorer_precision])
        want_ir = ImageRewardConfig.preset(m.scorer)
        if scorer.cfg != want_ir:
            raise CheckpointError(f"the ImageReward checkpoint is not the {m.scorer} architecture (models.scorer)",
                                  path=ck.scorer, expected=m.scorer, found="another size")
        out.update(scorer=scorer, scorer_tokenizer=tok)
    return out


def apply_performance(prof: Profile, dev: torch.device, dits: dict) -> None:
    """The torch backend's GPU fast path (profile section ``performance``), chosen once at load:
    the attention implementation, one q/k GEMM per layer (v's GEMM writes the cache), and the elementwise groups of the DiT and VAE compiled into
    single kernels. On CPU only the attention choice applies (everything else stays eager)."""
    from .models import wan_dit, wan_vae
    from .models.attention import set_attention_backend

    perf = prof.performance
    set_attention_backend(perf.attention, dev)
    if dev.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True  # the VAE's 3D convolutions: pick the fastest algorithm once
    # fp32 parts (the scorer by default) use TF32 tensor cores for matmuls: ~1e-3 relative error, far below
    # what separates decisions at tau, and about 3x faster than IEEE fp32 on the H100
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for model in dits.values():
        model.fuse_qk()
    wan_dit.compile_elementwise(perf.compile)
    wan_vae.compile_elementwise(perf.compile)


def _build_loop(prof: Profile, models: dict, dev: torch.device, dtype: torch.dtype) -> SpeculativeLoop:
    """The backend factory: one component per part, torch or TensorRT as the profile says."""
    from .backends.torch_backend import TorchDecoder, TorchDenoiser, TorchScorer
    from .models.wan_vae import VAEStream

    v = prof.video
    h, w = v.latent_height, v.latent_width
    sched = Schedule.from_steps(prof.schedule.steps, prof.schedule.shift)
    window, sink = prof.cache_geometry()
    graphs = prof.performance.cuda_graphs and dev.type == "cuda"
    comps = {}
    if any(getattr(prof.backends, c) == "tensorrt" for c in COMPONENTS):
        from .backends.tensorrt_backend import build_components

        comps = build_components(prof, dev, use_cuda_graphs=graphs)
    for kind in ("drafter", "target"):
        if kind not in comps:
            comps[kind] = TorchDenoiser(models[kind], kind, latent_shape=(v.frames_per_block, h, w),
                                        window_frames=window, sink_frames=sink, schedule=sched, device=dev,
                                        dtype=dtype, graphs=graphs)
    if "vae" not in comps:
        comps["vae"] = TorchDecoder(VAEStream(models["vae"], h, w, dtype, dev), graphs=graphs)
    if "scorer" not in comps:
        comps["scorer"] = TorchScorer(models["scorer"], models["scorer_tokenizer"], dev, graphs=graphs)
    return SpeculativeLoop(
        comps["drafter"], comps["target"], comps["vae"], comps["scorer"], num_blocks=v.num_blocks,
        frames_per_block=v.frames_per_block, latent_hw=(h, w), pixel_hw=(v.height, v.width),
        latent_channels=_dit_config(prof, models, "drafter").in_dim, dtype=dtype, device=dev,
        lazy_commit=prof.sampling.lazy_commit, fused_commits=prof.sampling.fused_commits,
    )
