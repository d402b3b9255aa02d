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

import numpy as np
import torch

from . import backends
from .decide import check_mode, check_tau
from .errors import (ArgumentError, BackendUnavailableError, BusyError, CheckpointError, ClosedError,
                     OutOfMemoryError, SdvgError)
from .io_spec import DTYPES
from .loop import BlockOutput, DecideFn, PreparedPrompt, SpeculativeLoop
from .memory import check_fits, oom_message
from .placement import Placement, resolve
from .profiles import Profile, load_profile
from .schedule import Schedule



@dataclass(frozen=True)
class Result:
    """One generated video: ``frames`` uint8 [F, H, W, 3] (host), ``stats`` (the JSON record, spec §3)
    and ``latents``, the committed latents [1, 16, latent_frames, h, w] (host, model dtype)."""

    frames: np.ndarray
    stats: dict
    latents: torch.Tensor | None = None


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


class Runtime:
    """SDVG generation on one device, or with the target on a second one (the profile's ``devices``).
    Build it with ``Runtime.from_profile``."""

    def __init__(self, profile: Profile, device: torch.device, models: dict, text_encoder, load_s: float,
                 placement: Placement | None = None):
        """``models`` loaded on their parts' devices; ``placement`` (default: the profile's ``devices``
        over ``device``, ``placement.resolve``) says which; ``device`` becomes the drafter side's."""
        self.placement = resolve(profile, device) if placement is None else placement
        self.profile, self.device = profile, self.placement.home
        device = self.device
        backends.configure(profile, models, device)  # the torch fast path, held by the models
        self.math = backends.math_flags(profile)  # TF32 / cuDNN autotuning around the torch parts' calls
        from .models.fp8 import apply_quantization  # quantization section: fp8 DiT linears (after the fast path's
        apply_quantization(profile, torch.device(device), {k: models[k] for k in ("drafter", "target") if k in models})
        self.dtype = DTYPES[profile.precision]
        self.models = models  # the torch modules by part (drafter, target, vae, scorer, scorer_tokenizer)
        self.text_encoder = text_encoder
        self.loop: SpeculativeLoop | None = None
        self.timings = {"load_s": load_s}
        self._lock = threading.Lock()
        self._closed = False

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
        placement = resolve(prof, dev)
        dev = placement.home
        backends.check(prof)
        if dev.type == "cuda":
            check_fits(prof, {str(d): torch.cuda.mem_get_info(d)[0] for d in placement.devices},
                       text_encoder=text_encoder, placement=placement)
        t0 = time.perf_counter()
        try:
            te = _load_text_encoder(prof, dev) if text_encoder else None
            models = _load_models(prof, placement)
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(oom_message(prof, placement, "loading the model weights")) from e
        text_dim = _dit_config(prof, models, "drafter").text_dim
        if te is not None and te.config.d_model != text_dim:
            raise CheckpointError(
                f"the text encoder's width ({te.config.d_model}) does not match the DiTs' text_dim "
                f"({text_dim}); checkpoints.text_encoder belongs to another model family",
                path=prof.checkpoints.text_encoder)
        return cls(prof, dev, models, te, time.perf_counter() - t0, placement)

    # ---- prompts ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[PreparedPrompt]:
        """umT5-encode prompts once; the contexts are kept on the host (pinned on CUDA)."""
        self._check_open()
        if self.text_encoder is None:
            raise SdvgError("the text encoder was released (or never loaded); encode prompts before "
                            "release_text_encoder(), or build the Runtime with text_encoder=True")
        if isinstance(prompts, str):
            prompts = [prompts]
        with self.math.scope():
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
        if not prompt.strip():
            raise ArgumentError(f"prompt must be non-empty text, got {prompt!r}; give the scene to generate")
        return self.encode_prompts([prompt])[0]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Runtime was closed (its models and caches were freed); create a new one "
                              "with Runtime.from_profile(...)")

    # ---- allocate, warm up -----------------------------------------------------------------------
    def allocate(self) -> None:
        """Preallocate every cache and buffer (idempotent)."""
        self._check_open()
        if self.loop is not None:
            return
        t0 = time.perf_counter()
        try:
            self.loop = _build_loop(self.profile, self.models, self.placement, self.dtype)
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(oom_message(self.profile, self.placement, "allocating caches and buffers")) from e
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
        cfg = _dit_config(self.profile, self.models, "drafter")
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
               mode: str | None = None, *, max_blocks: int | None = None,
               decide: DecideFn | None = None) -> Iterator[BlockOutput]:
        """Yield each committed block (``BlockOutput(block, frames uint8 [f, H, W, 3], record)``) as soon as
        its frames are on the host. The generation starts at the first ``next()``; ``BusyError`` there if
        another generation of this Runtime is running. The generator returns the stats dict. ``decide``
        replaces ``decide.decide`` for this video (fixed acceptance patterns: ``bench.pattern_decisions``)."""
        self._acquire()
        try:
            return (yield from self._generate_blocks(prompt, seed, tau, mode, max_blocks, decide))
        finally:
            self._lock.release()

    def _acquire(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise BusyError("this Runtime is already generating (one generation at a time); wait for it to "
                            "finish, or create another Runtime")

    def _generate_blocks(self, prompt, seed, tau, mode, max_blocks, decide=None) -> Iterator[BlockOutput]:
        """The generation itself; the caller holds the lock."""
        self.allocate()
        s = self.profile.sampling
        seed = s.seed if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ArgumentError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        tau = check_tau(s.tau if tau is None else tau)
        mode = check_mode(s.mode if mode is None else mode)
        p = self._prepared(prompt)
        records = []
        gen = self.loop.run(p, mode=mode, tau=tau, seed=seed, max_blocks=max_blocks, decide=decide)
        try:
            for out in gen:
                records.append(out.record)
                yield out
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(oom_message(self.profile, self.placement, "generating (activations)")) from e
        self.last_stats = self._stats(p, seed, tau, mode, records, self.loop.summary)
        return self.last_stats

    def generate(self, prompt: str | PreparedPrompt, seed: int | None = None, tau: float | None = None,
                 mode: str | None = None, *, decide: DecideFn | None = None) -> Result:
        """Generate one whole video; see ``stream`` for the arguments (defaults from the profile). The
        result (frames, stats, committed latents) is taken while this generation still holds the Runtime."""
        self._acquire()
        try:
            frames = [b.frames for b in self._generate_blocks(prompt, seed, tau, mode, None, decide)]
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
            "lazy_commit": self.loop.defers_target_commits,
            "profile": prof.name,
            "device": str(self.device),
            "devices": self.placement.describe(),
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
        self.loop, self.models, self._closed = None, {}, True
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


def _load_models(prof: Profile, placement: Placement) -> dict:
    """The torch weights of every part whose backend is torch (TensorRT parts live in their engines), each
    on its part's device."""
    from .checkpoints.imagereward import load_imagereward
    from .checkpoints.wan_dit import load_dit
    from .checkpoints.wan_vae import load_vae_decoder
    from .models.imagereward import ImageRewardConfig
    from .models.wan_vae import WanVAEConfig

    ck, m, dt = prof.checkpoints, prof.models, DTYPES[prof.precision]
    torch_parts = backends.torch_parts(prof)
    out = {kind: load_dit(getattr(ck, kind), getattr(placement, kind), dt, expect=getattr(m, kind))
           for kind in ("drafter", "target") if kind in torch_parts}
    a, b = _dit_config(prof, out, "drafter"), _dit_config(prof, out, "target")
    if (a.in_dim, a.patch_size, a.text_dim, a.text_len) != (b.in_dim, b.patch_size, b.text_dim, b.text_len):
        raise CheckpointError("drafter and target disagree on latent channels, patch size or text width; they "
                              "must be the same model family", path=ck.target,
                              expected=(a.in_dim, a.patch_size, a.text_dim), found=(b.in_dim, b.patch_size, b.text_dim))
    if "vae" in torch_parts:
        vae = load_vae_decoder(ck.vae, placement.vae, dt, channels_last=placement.vae.type == "cuda")
        want = WanVAEConfig.from_name(m.vae)
        if vae.config != want:
            raise CheckpointError(f"the VAE checkpoint is not the {m.vae} architecture (models.vae)", path=ck.vae,
                                  expected=want, found=vae.config)
        if vae.config.z_dim != a.in_dim:
            raise CheckpointError("VAE latent channels differ from the DiT's", path=ck.vae, expected=a.in_dim,
                                  found=vae.config.z_dim)
        out["vae"] = vae
    if "scorer" in torch_parts:
        scorer, tok = load_imagereward(ck.scorer, device=placement.scorer, dtype=DTYPES[prof.scorer_precision])
        want_ir = ImageRewardConfig.preset(m.scorer)
        if scorer.cfg != want_ir:
            raise CheckpointError(f"the ImageReward checkpoint is not the {m.scorer} architecture (models.scorer)",
                                  path=ck.scorer, expected=m.scorer, found="another size")
        out.update(scorer=scorer, scorer_tokenizer=tok)
    return out


def _build_loop(prof: Profile, models: dict, placement: Placement, dtype: torch.dtype) -> SpeculativeLoop:
    """The components over one step per part (``backends.build``: torch or TensorRT as the profile says),
    each on its part's device."""
    from . import backends, io_spec
    from .components import Decoder, Denoiser, Scorer

    v = prof.video
    h, w = v.latent_height, v.latent_width
    sched = Schedule.from_steps(prof.schedule.steps, prof.schedule.shift)
    window, sink = prof.cache_geometry()
    dev = placement.home
    graphs = prof.performance.cuda_graphs and dev.type == "cuda"
    steps = backends.build(prof, models, placement)
    den = {kind: Denoiser(steps[kind], kind, latent_shape=(v.frames_per_block, h, w), window_frames=window,
                          sink_frames=sink, schedule=sched, device=getattr(placement, kind), dtype=dtype,
                          num_blocks=v.num_blocks, graphs=graphs)
           for kind in ("drafter", "target")}
    cfgs, geo = io_spec.model_configs(prof), io_spec.profile_geometry(prof)
    vcfg = models["vae"].config if "vae" in models else cfgs["vae"]
    decoder = Decoder(steps["vae"], *(io_spec.vae_io(vcfg, geo, prof.precision, first) for first in (True, False)),
                      placement.vae, graphs=graphs)
    icfg = models["scorer"].cfg if "scorer" in models else cfgs["scorer"]
    scorer = Scorer(steps["scorer"], _scorer_tokenizer(prof, models),
                    io_spec.scorer_io(icfg, geo, prof.scorer_precision, prof.precision), placement.scorer,
                    graphs=graphs)
    return SpeculativeLoop(
        den["drafter"], den["target"], decoder, scorer, num_blocks=v.num_blocks,
        frames_per_block=v.frames_per_block, latent_hw=(h, w), pixel_hw=(v.height, v.width),
        latent_channels=_dit_config(prof, models, "drafter").in_dim, dtype=dtype, device=dev,
        lazy_commit=prof.sampling.lazy_commit, fused_commits=prof.sampling.fused_commits, placement=placement,
    )


def _scorer_tokenizer(prof: Profile, models: dict):
    if "scorer_tokenizer" in models:
        return models["scorer_tokenizer"]
    from .checkpoints.imagereward import resolve_paths
    from .models.imagereward import ImageRewardTokenizer

    return ImageRewardTokenizer(resolve_paths(prof.checkpoints.scorer)[2])
