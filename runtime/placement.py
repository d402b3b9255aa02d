"""Where the parts run: the profile's ``devices`` section resolved against the runtime's device and the
visible GPUs (``Placement``), and the link that carries committed blocks between the drafter's side and
the target (``link_for``).

One device (the default): the target commits the loop's own latents; nothing crosses, and accepted
drafts may wait in the lazy commit queue until the target is next needed (sdvg-runtime.md §4).

The target on a device of its own (``devices: {drafter: cuda:0, vae: cuda:0, scorer: cuda:0, target:
cuda:1}``): the drafter's side (drafter, VAE, scorer and the loop's buffers) is the *home* device; the
target keeps a mirror of the committed latents on its device (``CrossDevice``). Each committed block
crosses once, in one small asynchronous copy: an accepted draft to the target's mirror, a target block
from the mirror to home. Copies are ordered by stream waits (CUDA events), never by the host, and run
beside the work already queued on the receiving device. Accepted blocks are committed to the target as
soon as they are decided, so the target's commits run while home drafts and scores the next block; home's
one sync per block never waits for them, and a rejected block waits only for the target's own queue. The
prepare and final syncs first make home wait for the target's queue (``join``, a wait on the device), so
they complete both devices and the loop keeps its one named host sync. Without CUDA every stream and
event operation is a no-op, so the same path runs on the CPU (``Placement.split(cpu, cpu)``, tests).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import BackendUnavailableError, ProfileError
from .stats import Timer

PARTS = ("drafter", "vae", "scorer", "target")
DRAFTER_SIDE = ("drafter", "vae", "scorer")


def _index(d: torch.device) -> int:
    """A CUDA device's index (``cuda`` alone: the current device)."""
    if d.index is not None:
        return d.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two device names denote one device (``cuda`` is the current CUDA device)."""
    return a.type == b.type and (a.type != "cuda" or _index(a) == _index(b))


@dataclass(frozen=True)
class Placement:
    """The device of each part. ``target_apart``: the target's work goes through the cross-device path
    (its own mirror of the latents, commits enqueued when decided); ``resolve`` sets it where the target's
    device differs from the drafter side's, ``split`` always (on the CPU: the same path on one device)."""

    drafter: torch.device
    vae: torch.device
    scorer: torch.device
    target: torch.device
    target_apart: bool = False

    @classmethod
    def one(cls, device) -> Placement:
        d = torch.device(device)
        return cls(d, d, d, d, False)

    @classmethod
    def split(cls, home, target) -> Placement:
        h = torch.device(home)
        return cls(h, h, h, torch.device(target), True)

    @property
    def home(self) -> torch.device:
        """The drafter side's device: the loop's buffers, its frames and its one sync per block."""
        return self.drafter

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The distinct devices in use, home first."""
        return (self.home,) if same_device(self.target, self.home) else (self.home, self.target)

    def parts_on(self, device: torch.device) -> list[str]:
        return [p for p in PARTS if same_device(getattr(self, p), device)]

    def describe(self) -> dict[str, str]:
        return {p: str(getattr(self, p)) for p in PARTS}


def resolve(profile, device) -> Placement:
    """The profile's ``devices`` section over the runtime's ``device`` (unset parts run there), checked
    against the visible CUDA devices. Raises ``ProfileError`` for a placement the loop cannot run and
    ``BackendUnavailableError`` for a device this machine does not have."""
    runtime = torch.device(device)
    named = {p: getattr(profile.devices, p) for p in PARTS}
    devs = {p: torch.device(named[p]) if named[p] is not None else runtime for p in PARTS}

    def where(p):
        return f"devices.{p} ({devs[p]})" if named[p] is not None else f"{p} on the runtime's device ({runtime})"
    for p in ("vae", "scorer"):
        if not same_device(devs[p], devs["drafter"]):
            raise ProfileError(f"{where(p)} differs from {where('drafter')}: the drafter, the VAE and the scorer "
                               "share one device (a draft is decoded and scored where it is made); set "
                               f"devices.{p} to the drafter's device, or set devices.drafter too",
                               path=profile.path, field=f"devices.{p}")
    if devs["target"].type != devs["drafter"].type:
        raise ProfileError(f"{where('target')} and {where('drafter')} mix cpu and cuda; the target runs on a GPU "
                           "of its own or on the drafter's device: put both on cuda devices (or both on cpu)",
                           path=profile.path, field="devices.target")
    for p in PARTS:
        if named[p] is not None and devs[p].type == "cuda":
            _check_visible(profile, p, devs[p])
    return Placement(**devs, target_apart=not same_device(devs["target"], devs["drafter"]))


def _check_visible(profile, part: str, dev: torch.device) -> None:
    fix = (f"Run on a host with enough GPUs (under Ray each actor gets the GPUs the profile's devices section "
           f"names), or set devices.{part} to a visible device (or leave it out: every part on one device)")
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"profile {profile.name!r} ({profile.path}): devices.{part} is {dev}, but CUDA "
                                      f"is not available here (0 CUDA devices visible). {fix}")
    n = torch.cuda.device_count()
    if _index(dev) >= n:
        raise BackendUnavailableError(
            f"profile {profile.name!r} ({profile.path}): devices.{part} is {dev}, but {n} CUDA device(s) are "
            f"visible here (cuda:0..cuda:{n - 1}; CUDA_VISIBLE_DEVICES may hide others). {fix}")


def worker_gpus(profile) -> tuple[int, dict[int, int]]:
    """GPUs one worker of ``profile`` needs, and how the profile's CUDA indices map onto a worker that sees
    exactly that many (numbered from 0, as Ray's ``CUDA_VISIBLE_DEVICES`` shows them): the distinct
    indices named in ``devices``, plus 0 where a part runs on the runtime's device, in order."""
    named = [getattr(profile.devices, p) for p in PARTS]
    if any(n is not None and n.startswith("cpu") for n in named):
        return 0, {}
    used = {int(n.split(":")[1]) if ":" in n else 0 for n in named if n is not None}
    if any(n is None for n in named):
        used.add(0)
    order = sorted(used)
    return len(order), {old: new for new, old in enumerate(order)}


def for_worker(profile):
    """``profile`` with its CUDA indices renumbered for a worker that sees only the GPUs it needs
    (``worker_gpus``): e.g. ``cuda:2``/``cuda:3`` become ``cuda:0``/``cuda:1``."""
    n, mapping = worker_gpus(profile)
    if not mapping or all(k == v for k, v in mapping.items()):
        return profile
    over = {f"devices__{p}": f"cuda:{mapping[int(v.split(':')[1]) if ':' in v else 0]}"
            for p in PARTS if (v := getattr(profile.devices, p)) is not None}
    return profile.replace(**over)


# ---- the link between the drafter's side and the target ---------------------------------------------------
class SharedDevice:
    """Every part on one device: the target commits the loop's own committed latents; nothing crosses,
    nothing waits, and the target's times are the loop's timer's."""

    defers_target_commits = True  # the lazy queue skips commits nobody needs

    def __init__(self, latents: torch.Tensor, timer: Timer):
        self.latents = self.target_latents = latents
        self.timer = timer

    def begin(self) -> None:
        pass

    def to_target(self, blocks: list[int]) -> None:
        pass

    def from_target(self, block: int, x: torch.Tensor) -> torch.Tensor:
        self.latents[block].copy_(x)
        return self.latents[block]

    def join(self) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}


def _on(stream):
    """Make ``stream`` (and its device) current; nothing without CUDA."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class CrossDevice:
    """The target on a device of its own (module docstring): its mirror of the committed latents, the two
    one-way copy streams, the target's timer.

    torch performs a copy between two GPUs on the source device's current stream, after the destination
    device's current stream (both ways: a barrier). Each copy here makes a side stream of the receiving
    device current while it is issued (``_inbox`` on the target's, ``_outbox`` on home's), so the barrier
    waits only for earlier copies, not for the receiving device's queue; the receiver's own stream then
    waits for the side stream before it uses the block. Each side stream also waits for the sender's stream
    explicitly before its copy: with both sides on one device (``Placement.split(d, d)``) the copy runs on
    the side stream itself, and without that wait it would read the block before it is written."""

    defers_target_commits = False  # the target's commits run beside home's work: enqueue them when decided

    def __init__(self, latents: torch.Tensor, home: torch.device, target: torch.device):
        self.latents, self.home, self.target = latents, home, target
        self.target_latents = torch.zeros_like(latents, device=target)  # the mirror, one slot per block
        self.timer = Timer(target)
        cuda = target.type == "cuda"
        self._inbox = torch.cuda.Stream(target) if cuda else None
        self._outbox = torch.cuda.Stream(home) if cuda else None

    def _after(self, stream, sender: torch.device) -> None:
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(sender))

    def _wait(self, device: torch.device, stream) -> None:
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)

    def begin(self) -> None:
        """Per video: the mirror's slots are rewritten only after the target's reads of the last video
        (even one abandoned midway, which never reached its final sync)."""
        if self._inbox is not None:
            self._inbox.wait_stream(torch.cuda.current_stream(self.target))

    def to_target(self, blocks: list[int]) -> None:
        """Committed latents of consecutive ``blocks`` (written on home) -> the mirror; the target's stream
        waits for the copy, home's does not wait for the target."""
        if not blocks:
            return
        i, j = blocks[0], blocks[-1] + 1
        self._after(self._inbox, self.home)  # the block is written on home's stream
        with _on(self._inbox):
            self.target_latents[i:j].copy_(self.latents[i:j], non_blocking=True)
        self._wait(self.target, self._inbox)

    def from_target(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """The target's block ``x`` -> its mirror slot (on the target) -> the loop's latents (home, after
        the target's queue up to here); returns the mirror slot, which the target commits."""
        xt = self.target_latents[block]
        xt.copy_(x)
        self._after(self._outbox, self.target)  # the slot is written on the target's stream
        with _on(self._outbox):
            self.latents[block].copy_(xt, non_blocking=True)
        self._wait(self.home, self._outbox)
        return xt

    def join(self) -> None:
        """Home's stream waits for the target's queue (on the device): the next host sync completes both."""
        if self._inbox is not None:
            torch.cuda.current_stream(self.home).wait_stream(torch.cuda.current_stream(self.target))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"loop.target_latents": self.target_latents}


def link_for(placement: Placement, latents: torch.Tensor, timer: Timer) -> SharedDevice | CrossDevice:
    """The link of a placement over the loop's committed latents (on home) and its timer."""
    if placement.target_apart:
        return CrossDevice(latents, placement.home, placement.target)
    return SharedDevice(latents, timer)
