"""Where the parts run (the profile's ``devices``): parsing, the check against the visible GPUs, the memory
plan per device, and Ray's one actor per GPU pair. The loop across devices is tested in
test_loop_invariants (bit-identity, commit order) and test_host_sync, through the CPU two-device path."""
import dataclasses
import functools
import os
from pathlib import Path

import pytest
import torch
import yaml

from sdvg_rt.errors import BackendUnavailableError, OutOfMemoryError, ProfileError, SdvgError
from sdvg_rt.memory import check_fits
from sdvg_rt.placement import Placement, for_worker, resolve, worker_gpus
from sdvg_rt.profiles import Devices, load_profile
from sdvg_rt.scaleout import execute, worker_placement

PAPER = Path(__file__).resolve().parents[1] / "profiles" / "paper-832x480.yaml"
GiB = 2**30
MINIMAL = {
    "name": "t",
    "checkpoints": {"drafter": "d.pt", "target": "t.safetensors", "vae": "v.pth", "text_encoder": "te.pth",
                    "tokenizer": "tok", "scorer": "ir"},
}
SPLIT = {"drafter": "cuda:0", "vae": "cuda:0", "scorer": "cuda:0", "target": "cuda:1"}


def _profile(tmp_path, devices=None, name="p.yaml"):
    data = dict(MINIMAL, **({"devices": devices} if devices is not None else {}))
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine shows ``n`` CUDA devices (only the placement's own checks ask)."""
    def show(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return show


def test_devices_section_parses_and_defaults_to_the_runtime_device(tmp_path, gpus):
    p = load_profile(_profile(tmp_path, SPLIT))
    assert p.devices == Devices(drafter="cuda:0", vae="cuda:0", scorer="cuda:0", target="cuda:1")
    plain = load_profile(_profile(tmp_path, name="plain.yaml"))
    assert plain.devices == Devices()
    one = resolve(plain, torch.device("cpu"))
    assert one == Placement.one("cpu") and not one.target_apart and one.devices == (torch.device("cpu"),)
    gpus(2)
    two = resolve(p, torch.device("cuda:0"))
    assert two.target_apart and two.devices == (torch.device("cuda:0"), torch.device("cuda:1"))
    assert two.parts_on(torch.device("cuda:1")) == ["target"]
    assert two.parts_on(torch.device("cuda:0")) == ["drafter", "vae", "scorer"]
    only_target = resolve(load_profile(_profile(tmp_path, {"target": "cuda:1"}, "t1.yaml")), torch.device("cuda:0"))
    assert only_target == two  # the unnamed parts run on the runtime's device
    same = resolve(load_profile(_profile(tmp_path, {"target": "cuda:0"}, "t0.yaml")), torch.device("cuda"))
    assert not same.target_apart and len(same.devices) == 1  # "cuda" is cuda:0 here: one device


@pytest.mark.parametrize("key,value", [("target", "gpu1"), ("target", 1), ("vae", "cuda:x"), ("drafter", "")])
def test_a_bad_device_name_names_the_key_and_the_value(tmp_path, key, value):
    with pytest.raises(ProfileError) as e:
        load_profile(_profile(tmp_path, {key: value}))
    msg = str(e.value)
    assert f"devices.{key}" in msg and repr(value) in msg and "cuda:N" in msg and "p.yaml" in msg


def test_unknown_part_in_devices_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="unknown field devices.text_encoder"):
        load_profile(_profile(tmp_path, {"text_encoder": "cuda:0"}))


def test_the_drafter_side_shares_one_device(tmp_path, gpus):
    with pytest.raises(ProfileError) as e:
        load_profile(_profile(tmp_path, {"drafter": "cuda:0", "vae": "cuda:1"}))
    assert "devices.vae" in str(e.value) and "share one device" in str(e.value)
    gpus(2)  # only the scorer named: it would leave the drafter's side (the runtime's device)
    p = load_profile(_profile(tmp_path, {"scorer": "cuda:1"}, "s.yaml"))
    with pytest.raises(ProfileError) as e:
        resolve(p, torch.device("cuda:0"))
    assert "devices.scorer (cuda:1)" in str(e.value) and "runtime's device (cuda:0)" in str(e.value)
    p = load_profile(_profile(tmp_path, {"target": "cuda:1"}, "mix.yaml"))
    with pytest.raises(ProfileError, match="mix cpu and cuda"):
        resolve(p, torch.device("cpu"))


def test_a_device_this_machine_does_not_show_names_profile_key_device_and_count(tmp_path, gpus):
    p = load_profile(_profile(tmp_path, SPLIT))
    gpus(1)
    with pytest.raises(BackendUnavailableError) as e:
        resolve(p, torch.device("cuda"))
    msg = str(e.value)
    assert "profile 't'" in msg and "p.yaml" in msg and "devices.target is cuda:1" in msg
    assert "1 CUDA device(s) are visible" in msg and "cuda:0..cuda:0" in msg and "set devices.target" in msg
    gpus(0)
    with pytest.raises(BackendUnavailableError, match=r"devices.drafter is cuda:0, but CUDA is not available here "
                                                      r"\(0 CUDA devices visible\)"):
        resolve(p, torch.device("cpu"))


def test_fit_check_plans_each_device():
    """The paper profile needs about 66 GiB on one GPU; split, the drafter's side needs about 18 and the
    target's about 56: two 60 GiB GPUs fit what one does not, and the message gives each device's table."""
    prof = load_profile(PAPER)
    split = Placement.split("cuda:0", "cuda:1")
    plan = check_fits(prof, {"cuda:0": 60 * GiB, "cuda:1": 60 * GiB}, text_encoder=False, placement=split)
    assert plan["target KV cache"] == 40 * 2 * 32760 * 5120 * 2
    assert plan["drafter KV cache"] == 30 * 2 * 32760 * 1536 * 2
    one_gpu = sum(plan.values()) - plan["activations and graph pool (reserve)"] / 2  # one device, one reserve
    assert one_gpu > 60 * GiB
    with pytest.raises(OutOfMemoryError) as e:
        check_fits(prof, {"cuda:0": 60 * GiB, "cuda:1": 40 * GiB}, text_encoder=False, placement=split)
    msg = str(e.value)
    home, target = msg.index("cuda:0 (drafter, vae, scorer)"), msg.index("cuda:1 (target)")
    assert home < msg.index("drafter KV cache") < msg.index("VAE states") < target < msg.index("target KV cache")
    assert msg.count("DOES NOT FIT") == 1 and msg.index("DOES NOT FIT") > target  # only the target's GPU
    assert "40.0 GiB are free" in msg and "60.0 GiB are free" in msg and "devices.<part>" in msg


def test_ray_asks_one_actor_per_gpu_pair_from_the_profile(tmp_path):
    split, plain = load_profile(_profile(tmp_path, SPLIT)), load_profile(_profile(tmp_path, name="plain.yaml"))
    assert worker_placement(split).gpus_per_worker == 2
    assert worker_placement(split).bundles({"GPU": 8, "CPU": 64}) == [{"CPU": 2.0, "GPU": 2.0}] * 4
    assert worker_placement(plain).bundles({"GPU": 8, "CPU": 64}) == [{"CPU": 2.0, "GPU": 1.0}] * 8
    with pytest.raises(SdvgError, match="--ray-gpus-per-worker 2"):
        worker_placement(split, gpus_per_worker=1)
    assert worker_placement(split, gpus_per_worker=4).gpus_per_worker == 4  # more is allowed
    # devices named for a larger host map onto the actor's own GPUs, which it sees as cuda:0, cuda:1
    far = split.replace(devices__drafter="cuda:4", devices__vae="cuda:4", devices__scorer="cuda:4",
                        devices__target="cuda:6")
    assert worker_gpus(far) == (2, {4: 0, 6: 1})
    assert for_worker(far).devices == split.devices and for_worker(split) is split
    assert for_worker(split.replace(devices__drafter="cuda:0", devices__target="cuda:3")).devices.target == "cuda:1"
    only_target = load_profile(_profile(tmp_path, {"target": "cuda:3"}, "t3.yaml"))
    assert worker_gpus(only_target) == (2, {0: 0, 3: 1}) and for_worker(only_target).devices.target == "cuda:1"
    assert worker_gpus(plain) == (1, {0: 0})


@pytest.mark.slow
def test_ray_actors_each_get_a_gpu_pair(tmp_path):
    """A local Ray cluster declaring 4 GPUs (none exist; nothing touches CUDA): a profile placed on cuda:2 and
    cuda:3 gets two actors of two GPUs each, each seeing its own pair and the profile renumbered onto it."""
    ray = pytest.importorskip("ray")

    class ReportGPUs:  # a job that reports what its actor sees (defined here: pickled by value for the actors)
        def __init__(self, profile):
            self.profile = profile

        def process(self, unit, on_output=None):
            import ray

            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return {"visible": visible, "devices": dataclasses.asdict(self.profile.devices),
                    "gpus": sorted(int(g) for g in ray.get_gpu_ids())}

    prof = load_profile(_profile(tmp_path, {"drafter": "cuda:2", "vae": "cuda:2", "scorer": "cuda:2",
                                            "target": "cuda:3"}))
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        units = [{"key": str(i)} for i in range(6)]
        rep = execute(units, functools.partial(ReportGPUs, for_worker(prof)), use_ray=True,
                      placement=worker_placement(prof, cpus_per_worker=1))
    finally:
        ray.shutdown()
    assert rep.workers == 2 and len(rep.results) == 6
    for r in rep.results.values():
        assert len(r["gpus"]) == 2 and len(r["visible"].split(",")) == 2
        assert r["devices"] == SPLIT
    seen = [tuple(r["gpus"]) for r in rep.results.values()]
    assert len({g for pair in seen for g in pair}) == 2 * len(set(seen))  # the actors' pairs are disjoint
