"""The embeddable API: Runtime.from_profile, generate, stream, prompt encoding, one generation at a time,
and the typed errors of bad setups (wrong-size checkpoints, missing files, TensorRT, bad arguments)."""
import importlib.machinery
import math
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

import sdvg_rt
from sdvg_rt.memory import memory_plan
from sdvg_rt.checkpoints.synthetic import make_synthetic_set
from sdvg_rt.errors import BackendUnavailableError, BusyError, CheckpointError, SdvgError
from sdvg_rt.profiles import PROFILES_DIR, demo_profile, load_profile

SMALL = dict(width=32, height=32, latent_frames=3, frames_per_block=1, window_frames=3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"  # shared with the other test modules
    make_synthetic_set(d, "tiny", 0, log=None)
    return d


@pytest.fixture(scope="module")
def rt(tiny_dir):
    return sdvg_rt.Runtime.from_profile(demo_profile(tiny_dir), "cpu", **SMALL)


def test_public_surface():
    for name in ("Runtime", "Result", "load_profile", "PreparedPrompt", "BlockOutput", "SdvgError",
                 "CheckpointError", "ProfileError", "BusyError", "NumericalError"):
        assert hasattr(sdvg_rt, name), name
    assert issubclass(sdvg_rt.BusyError, sdvg_rt.SdvgError)


def test_generate_and_stream(rt):
    res = rt.generate("a red fox running through fresh snow", seed=0)  # a str is encoded on the fly
    assert isinstance(res, sdvg_rt.Result)
    assert res.frames.dtype == np.uint8 and res.frames.shape == (9, 32, 32, 3)
    assert res.latents.shape == (1, 16, 3, 4, 4) and res.latents.device.type == "cpu"
    s = res.stats
    for key in ("prompt", "seed", "mode", "tau", "blocks", "totals", "acceptance_rate", "wall_time_s",
                "peak_gpu_memory_bytes", "target_only_estimate_s"):
        assert key in s, key
    assert (s["seed"], s["mode"], s["tau"], s["frames"]) == (0, "sdvg", rt.profile.sampling.tau, 9)  # profile defaults
    assert [b["block"] for b in s["blocks"]] == [0, 1, 2]
    assert s["blocks"][0]["decision"] == "forced" and "target_denoise" in s["blocks"][0]["times_ms"]
    assert s["target_only_estimate_s"] > 0

    # stream: committed blocks in order, frames as they come; same seed -> the same video
    prompt = rt.encode_prompts(["a red fox running through fresh snow"])[0]
    outs = list(rt.stream(prompt, seed=0))
    assert [o.block for o in outs] == [0, 1, 2] and [len(o.frames) for o in outs] == [1, 4, 4]
    assert np.array_equal(np.concatenate([o.frames for o in outs]), res.frames)
    assert [o.record.decision for o in outs] == [b["decision"] for b in s["blocks"]]
    # another seed: another video
    assert not np.array_equal(rt.generate(prompt, seed=1).frames, res.frames)
    # warm-up (a timed phase of its own) cannot shift later outputs: noise is keyed, not stateful
    assert rt.warmup(blocks=2) > 0 and rt.timings["warmup_s"] > 0
    assert np.array_equal(rt.generate(prompt, seed=0).frames, res.frames)


def test_one_generation_at_a_time(rt):
    prompt = rt.encode_prompts(["a lighthouse at night"])[0]
    first = rt.stream(prompt, mode="target")
    next(first)  # generation in progress
    with pytest.raises(BusyError, match="one generation at a time"):
        rt.generate(prompt)
    # from another thread too
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(BusyError, lambda: next(rt.stream(prompt)))))
    t.start()
    t.join()
    assert len(errors) == 1
    first.close()  # abandoning a stream frees the runtime
    assert len(list(rt.stream(prompt, mode="target"))) == 3


def test_bad_arguments(rt):
    prompt = rt.encode_prompts(["x"])[0]
    with pytest.raises(ValueError, match="mode"):
        rt.generate(prompt, mode="fast")
    with pytest.raises(ValueError, match="NaN"):
        rt.generate(prompt, tau=math.nan)
    with pytest.raises(ValueError, match="seed"):
        rt.generate(prompt, seed=-1)
    from sdvg_rt.errors import ArgumentError

    for bad in ({"mode": "fast"}, {"tau": math.nan}, {"seed": -1}):  # typed, with the CLI's exit code
        with pytest.raises(ArgumentError) as e:
            rt.generate(prompt, **bad)
        assert isinstance(e.value, SdvgError) and e.value.exit_code == 2
    for empty in ("", "   \n"):
        with pytest.raises(ArgumentError, match="non-empty"):
            rt.generate(empty)


def test_released_text_encoder(tiny_dir):
    r = sdvg_rt.Runtime.from_profile(demo_profile(tiny_dir, **SMALL), "cpu")
    prompts = r.encode_prompts(["one", "two"])
    assert prompts[0].context.shape == (1, 512, 64)
    r.release_text_encoder()
    with pytest.raises(SdvgError, match="released"):
        r.generate("three")
    assert r.state_tensors()["drafter.kv"].shape[2] == 3 * 4  # allocate after release: 3 frames x 4 tokens
    r.close()
    from sdvg_rt.errors import ClosedError

    for call in (lambda: r.generate(prompts[0]), lambda: list(r.stream(prompts[0])), r.allocate,
                 lambda: r.encode_prompts(["x"])):
        with pytest.raises(ClosedError, match="closed"):
            call()


def test_tensorrt_backend_is_refused_before_loading(tiny_dir, monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):  # neither flavour importable (CI installs TensorRT-RTX's builder)
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match="backends.target") as e:
        sdvg_rt.Runtime.from_profile(demo_profile(tiny_dir), "cpu", backends__target="tensorrt")
    assert "backends.target: torch" in str(e.value) and e.value.exit_code == 4


def test_tensorrt_parts_load_no_torch_weights_and_go_through_the_trt_factory(tiny_dir, monkeypatch):
    fake = types.ModuleType("tensorrt")  # a usable-looking TensorRT (has Builder) on a CPU machine
    fake.Builder, fake.__version__ = object, "10.99"
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    r = sdvg_rt.Runtime.from_profile(demo_profile(tiny_dir, **SMALL), "cpu", text_encoder=False,
                                     backends__target="tensorrt")
    assert "target" not in r.models and "drafter" in r.models  # the 14B lives in its engines only
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        r.allocate()


def test_wrong_size_and_missing_checkpoints(tiny_dir):
    p = demo_profile(tiny_dir)
    # drafter and target swapped: the 'tiny' (drafter-size) file given where 'tiny-target' is expected
    swapped = p.replace(checkpoints__target=str(p.checkpoints.drafter))
    with pytest.raises(CheckpointError, match="wrong model size") as e:
        sdvg_rt.Runtime.from_profile(swapped, "cpu", text_encoder=False)
    assert str(p.checkpoints.drafter) in str(e.value) and e.value.exit_code == 3
    missing = p.replace(checkpoints__vae=str(tiny_dir / "nope.pth"))
    with pytest.raises(CheckpointError, match="not found") as e:
        sdvg_rt.Runtime.from_profile(missing, "cpu", text_encoder=False)
    assert "nope.pth" in str(e.value)
    with pytest.raises(CheckpointError, match="VAE"):
        sdvg_rt.Runtime.from_profile(p.replace(models__vae="wan2.1"), "cpu", text_encoder=False)


def test_memory_plan_of_the_paper_profile():
    plan = memory_plan(load_profile(PROFILES_DIR / "paper-832x480.yaml"))
    # wan-models.md §9: 14B cache 40 layers x 2 x 32760 tokens x 5120 x bf16 = 26.84 GB; 1.3B 6.04 GB
    assert plan["target KV cache"] == 40 * 2 * 32760 * 5120 * 2
    assert plan["drafter KV cache"] == 30 * 2 * 32760 * 1536 * 2
    assert plan["target weights"] == 14_288_491_584 * 2 and plan["drafter weights"] == 1_418_996_800 * 2
    assert 1.7 * 2**30 < plan["VAE states (committed + scratch)"] / 2 < 1.8 * 2**30  # ~1.76 GiB each
    window = memory_plan(load_profile(PROFILES_DIR / "paper-832x480-window.yaml"))
    assert window["target KV cache"] == plan["target KV cache"] * 9 // 21


def test_profile_overrides_through_from_profile(tiny_dir):
    path = tiny_dir / "p.yaml"
    path.write_text((PROFILES_DIR / "tiny.yaml").read_text().replace("cache://synthetic/tiny", str(tiny_dir)))
    r = sdvg_rt.Runtime.from_profile(path, "cpu", text_encoder=False, tau=-0.25, mode="target", **SMALL)
    assert (r.profile.sampling.tau, r.profile.sampling.mode) == (-0.25, "target")
    assert r.profile.path == path and torch.device("cpu") == r.device


def test_importing_the_library_changes_nothing_process_wide():
    """The allocator setting belongs to the command-line entry points, not to ``import sdvg_rt``; torch's
    math flags and dynamo's configuration are untouched by importing the runtime and its models."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    code = ("import os, torch, torch._dynamo\n"
            "b = torch.backends\n"
            "state = lambda: (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark,"
            " torch._dynamo.config.recompile_limit)\n"
            "before = state()\n"
            "import sdvg_rt, sdvg_rt.api, sdvg_rt.cli, sdvg_rt.backends.torch_backend, sdvg_rt.models.wan_dit,"
            " sdvg_rt.models.wan_vae\n"
            "assert 'PYTORCH_CUDA_ALLOC_CONF' not in os.environ\n"
            "assert state() == before, (state(), before)\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def _tf32_seen(runtime, prompt, outside: bool):
    """(TF32 flags seen inside the runtime's DiT forwards, the process flag after the generation), the
    process flag being ``outside`` before it."""
    seen = []
    mm = torch.backends.cuda.matmul
    hook = runtime.models["target"].head.register_forward_pre_hook(lambda m, a: seen.append(mm.allow_tf32))
    saved = mm.allow_tf32
    mm.allow_tf32 = outside
    try:
        runtime.generate(prompt, seed=1, mode="target")
        return set(seen), mm.allow_tf32
    finally:
        mm.allow_tf32 = saved
        hook.remove()


def test_math_flag_scopes_in_two_threads_do_not_see_each_others_flags():
    """Two steps with different TF32 flags in two threads: the second waits for the first's call to end
    instead of switching the process's flag under it; each sees its own, and the flag is restored after."""
    from sdvg_rt.backends.torch_backend import MathFlags

    mm = torch.backends.cuda.matmul
    saved = mm.allow_tf32
    first_in, seen = threading.Event(), {}

    def run(name, flags, wait):
        if wait:
            first_in.wait(5)
        with flags.scope():
            first_in.set()
            time.sleep(0.3)  # the other thread tries to enter meanwhile
            seen[name] = mm.allow_tf32

    try:
        mm.allow_tf32 = False
        threads = [threading.Thread(target=run, args=("on", MathFlags(tf32=True), False)),
                   threading.Thread(target=run, args=("off", MathFlags(tf32=False), True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == {"on": True, "off": False}
        assert mm.allow_tf32 is False
    finally:
        mm.allow_tf32 = saved


def test_two_runtimes_in_one_process_keep_their_own_performance_choices(tiny_dir, rt):
    """The performance choices are held by each Runtime's models and steps, not by module state: a second
    Runtime with another attention kernel and TF32 off leaves the first one's choices and output unchanged;
    each runs its forwards under its own TF32 flag and leaves the process's flag as it found it; and
    kernels given to the second one's models (Triton groups, a sub-pixel upsample mode) are its own."""
    from sdvg_rt.models import dit_kernels, wan_vae
    from sdvg_rt.models.wan_dit import DiTKernels
    from sdvg_rt.models.wan_vae import VAEKernels

    prompt = rt.encode_prompts(["a lighthouse at night"])[0]
    before = rt.generate(prompt, seed=1, mode="target")
    other = sdvg_rt.Runtime.from_profile(demo_profile(tiny_dir), "cpu", text_encoder=False, attention="math",
                                         tf32=False, **SMALL)
    assert {other.models[k].attention.name for k in ("drafter", "target")} == {"math"}
    assert {rt.models[k].attention.name for k in ("drafter", "target")} == {rt.profile.performance.attention}
    assert rt.profile.performance.attention == "auto"
    after = rt.generate(prompt, seed=1, mode="target")
    assert np.array_equal(before.frames, after.frames) and torch.equal(before.latents, after.latents)

    # TF32: each Runtime's steps set its own flag for their calls and restore the process's afterwards
    assert (rt.math.tf32, other.math.tf32) == (True, False)
    assert _tf32_seen(rt, prompt, outside=False) == ({True}, False)
    assert _tf32_seen(other, prompt, outside=True) == ({False}, True)

    # kernels: the second Runtime's models get their own; the first one's keep the eager groups (CPU)
    shuffles = []

    def counted_shuffle(*args):
        shuffles.append(1)
        return wan_vae._EAGER["bias_pixel_shuffle"](*args)
    other.models["vae"].set_kernels(VAEKernels(subpixel="3x3", ops={"bias_pixel_shuffle": counted_shuffle}))
    triton = DiTKernels(triton=True)
    for k in ("drafter", "target"):
        other.models[k].set_kernels(triton)
    for k in ("drafter", "target"):
        m = rt.models[k]
        assert m.kernels.eager and all(b.kernels.eager and b.self_attn.kernels.eager for b in m.blocks)
        assert m.kernels["rms_norm"] is m.kernels.ops["rms_norm"] is other.models[k].kernels["rms_norm"]  # eager
        assert other.models[k].blocks[0].cross_attn.kernels is triton
        assert (other.models[k].blocks[0].kernels["gated_add_ln"] is not m.blocks[0].kernels["gated_add_ln"]) \
            == dit_kernels.AVAILABLE
    assert rt.models["vae"].kernels.eager and rt.models["vae"].kernels.subpixel == "auto"
    again = rt.generate(prompt, seed=1, mode="target")
    assert np.array_equal(before.frames, again.frames) and torch.equal(before.latents, again.latents)
    assert not shuffles  # the first Runtime's VAE never ran the second one's sub-pixel path
    res = other.generate(prompt, seed=1, mode="target")
    assert shuffles and res.frames.shape == before.frames.shape  # its own path: the 3x3 sub-pixel upsample
    # same function, other kernels: the latents agree to rounding (fp32; math attention and Triton groups)
    torch.testing.assert_close(res.latents, before.latents, rtol=1e-4, atol=1e-4)
    other.close()
