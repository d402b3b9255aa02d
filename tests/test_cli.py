"""The sdvg-rt command in-process: videos decoded back with PyAV, the JSON records, resume after an
interruption, --overwrite, the synthetic demo path, `info`, and every bad input's error and exit code."""
import json
import shutil
import sys
import types

import av
import pytest
import torch
from safetensors.torch import load_file

import sdvg_rt.checkpoints.synthetic as synthetic
import sdvg_rt.profiles as profiles
from sdvg_rt.checkpoints.synthetic import make_synthetic_set
from sdvg_rt.cli import main, output_stem, read_prompts

CAT, DOG = output_stem(0, "a cat on the moon", 2), output_stem(1, "A dog, running!", 2)

SMALL_VIDEO = "video: {width: 32, height: 32, latent_frames: 3, frames_per_block: 1}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"  # shared with the other test modules
    make_synthetic_set(d, "tiny", 0, log=None)
    return d


def small_profile(folder, root):
    """profiles/tiny.yaml at 32x32 with 3 one-frame blocks, its checkpoints under ``root``."""
    text = (profiles.DEMO_PROFILE.read_text()
            .replace("root: cache://synthetic/tiny", f"root: {root}")
            .replace("video: {width: 64, height: 64, latent_frames: 9, frames_per_block: 3}", SMALL_VIDEO)
            .replace("window_frames: 9", "window_frames: 3"))
    assert SMALL_VIDEO in text
    p = folder / "small.yaml"
    p.write_text(text)
    return p


def prompts_file(folder, text="a cat on the moon\n\n   \nA dog, running!\n"):
    p = folder / "prompts.txt"
    p.write_text(text, encoding="utf-8")
    return p


def check_video(path, frames=9, size=(32, 32)):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert s.average_rate == 16
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (*size, 3)


def test_demo_run_then_resume_then_overwrite(tmp_path, tiny_dir, monkeypatch, capsys):
    # 1. no --profile: the demo profile (made small here) creates its synthetic set on first use
    demo_root = tmp_path / "synthetic-tiny"
    demo = small_profile(tmp_path, demo_root)
    monkeypatch.setattr(profiles, "DEMO_PROFILE", demo)
    made = []

    def fake_make(root, size, seed, **kw):  # copy the session's set instead of writing a new one
        made.append((size, seed))
        shutil.copytree(tiny_dir, root, dirs_exist_ok=True)
    monkeypatch.setattr(synthetic, "make_synthetic_set", fake_make)
    out = tmp_path / "out"
    prompts = prompts_file(tmp_path)
    assert main(["run", str(prompts), "--out", str(out), "--save-latents", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "SYNTHETIC DEMO" in err and "RANDOM WEIGHTS" in err and made == [("tiny", 0)]
    assert "skipping 2 blank line(s)" in err and "line 2, 3" in err
    names = sorted(p.name for p in out.iterdir())
    assert CAT.startswith("000-a-cat-on-the-moon-") and DOG.startswith("001-a-dog-running-")
    assert names == sorted([f"{CAT}.json", f"{CAT}.latents.safetensors", f"{CAT}.mp4", f"{DOG}.json",
                            f"{DOG}.latents.safetensors", f"{DOG}.mp4", "summary.json"])
    for stem in (CAT, DOG):
        check_video(out / f"{stem}.mp4")
        rec = json.loads((out / f"{stem}.json").read_text())
        for key in ("prompt", "seed", "mode", "tau", "blocks", "totals", "acceptance_rate", "wall_time_s",
                    "peak_gpu_memory_bytes", "target_only_estimate_s", "video"):
            assert key in rec, key
        assert rec["video"] == f"{stem}.mp4" and rec["mode"] == "sdvg" and rec["frames"] == 9
        for b in rec["blocks"]:
            assert b["decision"] in ("forced", "accepted", "rejected") and b["times_ms"]
            assert (b["scores"] is None) == (b["block"] == 0)
            if b["scores"]:
                assert len(b["scores"]) == 4 and b["min_score"] == min(b["scores"])
        lat = load_file(str(out / f"{stem}.latents.safetensors"))["latents"]
        assert lat.shape == (1, 16, 3, 4, 4)
    rec = json.loads((out / f"{DOG}.json").read_text())
    assert rec["prompt"] == "A dog, running!" and rec["line"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == 2 and summary["skipped"] == 0 and summary["blank_lines"] == [2, 3]
    assert [p["status"] for p in summary["prompts"]] == ["generated", "generated"]
    assert summary["finished"] == 2 and [v["video"] for v in summary["videos"]] == [f"{CAT}.mp4", f"{DOG}.mp4"]

    # 2. an interrupted run: prompt 1 has its video but no record, and a stray temporary file
    first = (out / f"{CAT}.mp4").stat().st_mtime_ns
    (out / f"{DOG}.json").unlink()
    (out / f"{DOG}.mp4.tmp-999999999").write_bytes(b"partial")  # no such pid: a killed run's
    assert main(["run", str(prompts), "--profile", str(demo), "--out", str(out), "--quiet"]) == 0
    assert not list(out.glob("*.tmp-*"))
    summary = json.loads((out / "summary.json").read_text())
    assert [p["status"].split()[0] for p in summary["prompts"]] == ["skipped", "generated"]
    assert (out / f"{CAT}.mp4").stat().st_mtime_ns == first  # untouched
    check_video(out / f"{DOG}.mp4")
    capsys.readouterr()
    # 3. everything finished: nothing to do (and no model is loaded)
    assert main(["run", str(prompts), "--profile", str(demo), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "2 of 2 prompt(s) already finished" in err and "loaded in" not in err
    # 4. --overwrite regenerates, here in target mode
    assert main(["run", str(prompts), "--profile", str(demo), "--out", str(out), "--quiet", "--overwrite",
                 "--mode", "target", "--seed", "7"]) == 0
    rec = json.loads((out / f"{CAT}.json").read_text())
    assert rec["mode"] == "target" and rec["seed"] == 7 and rec["acceptance_rate"] is None
    assert [b["decision"] for b in rec["blocks"]] == ["forced"] * 3
    assert (out / f"{CAT}.mp4").stat().st_mtime_ns != first
    assert made == [("tiny", 0)]  # the demo set was created once


def test_a_sigterm_dropped_in_a_finalizer_still_ends_the_run(tmp_path, tiny_dir, capsys, monkeypatch):
    """A SIGTERM whose handler runs inside a finalizer (where Python prints "Exception ignored" and drops the
    exception, as in an import lock's weakref callback) still stops the run at its next block: exit 128 + 15,
    the unfinished video discarded, no record, no temporary file."""
    import signal

    import sdvg_rt.batch as batch
    from sdvg_rt import cli

    class SignalOnDel:
        def __del__(self):
            if isinstance(signal.getsignal(signal.SIGTERM), cli._SignalLatch):  # never the default: it would kill
                signal.raise_signal(signal.SIGTERM)  # its handler runs here; what it raises is dropped

    write, sent = batch.BackgroundVideoWriter.write, []

    def write_then_signal(self, frames):
        write(self, frames)
        if not sent:
            sent.append(1)
            SignalOnDel()

    monkeypatch.setattr(batch.BackgroundVideoWriter, "write", write_then_signal)
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    demo, prompts, out = small_profile(tmp_path, tiny_dir), prompts_file(tmp_path), tmp_path / "out"
    assert main(["run", str(prompts), "--profile", str(demo), "--out", str(out), "--quiet"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert sent and dropped == [cli.Interrupted] and "interrupted (SIGTERM)" in err
    assert not list(out.glob("*.json")) and not list(out.glob("*.mp4")) and not list(out.glob("*.tmp-*"))
    assert not isinstance(signal.getsignal(signal.SIGTERM), cli._SignalLatch)  # the previous handler is back


def _error(capsys, argv, code, *needles):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdvg-rt: error (") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_bad_inputs_map_to_errors_and_exit_codes(tmp_path, tiny_dir, capsys, monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):  # no TensorRT flavour importable here
        monkeypatch.setitem(sys.modules, name, None)
    prof = small_profile(tmp_path, tiny_dir)
    good = prompts_file(tmp_path, "a cat\n")
    out = str(tmp_path / "out")
    _error(capsys, ["run", str(tmp_path / "missing.txt"), "--profile", str(prof)], 2, "PromptFileError",
           "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _error(capsys, ["run", str(empty), "--profile", str(prof)], 2, "empty.txt", "it is empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n")
    _error(capsys, ["run", str(blank), "--profile", str(prof)], 2, "only blank lines")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a cat\ncaf\xe9 au lait\n".encode("latin-1"))
    _error(capsys, ["run", str(latin), "--profile", str(prof)], 2, "not UTF-8", "line 2", "latin1.txt")
    bad = tmp_path / "bad.yaml"
    bad.write_text(prof.read_text().replace("width: 32", "width: 33"))
    _error(capsys, ["run", str(good), "--profile", str(bad), "--out", out], 2, "ProfileError", "video.width",
           "bad.yaml")
    nock = tmp_path / "nock.yaml"
    nock.write_text(prof.read_text().replace(f"root: {tiny_dir}", f"root: {tmp_path / 'empty-dir'}"))
    _error(capsys, ["run", str(good), "--profile", str(nock), "--out", out], 3, "CheckpointError", "empty-dir")
    trt = tmp_path / "trt.yaml"
    trt.write_text(prof.read_text().replace("vae: torch", "vae: tensorrt"))
    _error(capsys, ["run", str(good), "--profile", str(trt), "--out", out], 4, "BackendUnavailableError",
           "backends.vae")
    with pytest.raises(SystemExit) as e:
        main(["run", str(good), "--tau", "nan"])
    assert e.value.code == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_read_prompts_strips_bom_and_keeps_line_numbers(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes("\ufefffirst\r\n\r\n second \n".encode("utf-8"))
    assert read_prompts(p) == ([(1, "first"), (3, "second")], [2])


def test_info(tmp_path, tiny_dir, capsys, monkeypatch):
    prof = small_profile(tmp_path, tiny_dir)
    assert main(["info", "--profile", str(prof)]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends:" in out and "tensorrt" in out and "checkpoints:" in out
    assert "MISSING" not in out
    # tensorrt detection: a module without Builder (a stub) is not usable; one with Builder is
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # the other flavour absent
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert main(["info", "--profile", str(prof), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["tensorrt"]["usable"] is False and "Builder" in info["backends"]["tensorrt"]["detail"]
    assert info["profile"]["checkpoints"]["drafter"]["exists"] is True
    fake = types.ModuleType("tensorrt")
    fake.Builder, fake.__version__ = object, "10.99"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert main(["info", "--profile", str(prof), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backends"]["tensorrt"]["usable"] is True
    # a missing checkpoint folder is reported, not raised
    nock = tmp_path / "nock.yaml"
    nock.write_text(prof.read_text().replace(f"root: {tiny_dir}", f"root: {tmp_path / 'nothing'}"))
    assert main(["info", "--profile", str(nock)]) == 0
    assert "MISSING" in capsys.readouterr().out
    # an invalid or missing profile: reported, and the profile error's exit code
    bad = tmp_path / "bad.yaml"
    bad.write_text(prof.read_text().replace("width: 32", "width: 33"))
    assert main(["info", "--profile", str(bad)]) == 2
    assert "INVALID" in capsys.readouterr().out
    assert main(["info", "--profile", str(tmp_path / "nope.yaml"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["profile"]["ok"] is False


def test_bad_device_and_unwritable_out_are_typed_errors(tmp_path):
    """--device with a non-device name, and --out naming an existing file: one-line errors, not tracebacks."""
    from sdvg_rt.api import resolve_device
    from sdvg_rt.errors import BackendUnavailableError, OutputError
    from sdvg_rt.cli import main

    with pytest.raises(BackendUnavailableError, match="not a torch device name"):
        resolve_device("foo")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n", encoding="utf-8")
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    assert main(["run", str(prompts), "--out", str(blocker)]) == OutputError.exit_code


def test_profile_rejects_unknown_model_preset_and_x264_preset(tmp_path):
    from sdvg_rt.errors import ProfileError
    from sdvg_rt.profiles import demo_profile

    with pytest.raises(ProfileError, match="models.drafter"):
        demo_profile(models__drafter="wan2.1-7b")
    with pytest.raises(ProfileError, match="output.preset"):
        demo_profile(preset="turbo")


def test_device_flag_reaches_the_runtime(tmp_path, monkeypatch):
    """``run --device`` is what the Runtime is built on (a name the default would never pick fails typed)."""
    from sdvg_rt import api
    from sdvg_rt.errors import BackendUnavailableError
    from sdvg_rt.cli import main

    seen = []
    real = api.resolve_device
    monkeypatch.setattr(api, "resolve_device", lambda d=None: (seen.append(d), real(d))[1])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n", encoding="utf-8")
    assert main(["run", str(prompts), "--out", str(tmp_path / "o"), "--device", "cuda:7"]) == \
        BackendUnavailableError.exit_code or torch.cuda.device_count() > 7
    assert "cuda:7" in seen
