"""The 4-step flow-matching schedule of the Self-Forcing family (wan-models.md §4).

Timesteps come from SF's ``FlowMatchScheduler(shift, extra_one_step=True)`` with 1000 training steps and
the warp ``warp_denoising_step``: the configured list ``[1000, 750, 500, 250]`` indexes the shifted table,
giving ``[1000, 937.5, 833.33, 625]`` at shift 5. ``sigma = t / 1000``.

Per block: ``x0 = x_t - sigma_k * v`` (v is the model's flow prediction), then re-noise for the next step
``x = (1 - sigma_{k+1}) * x0 + sigma_{k+1} * eps`` with fresh noise. The block's output is the last x0.
The maths runs in the fp32 work buffers the caller owns (in place, no allocation, no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shifted_timesteps(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """SF's training table: ``s_i = 1 - i/N``, ``sigma_i = shift*s/(1+(shift-1)*s)``, ``t_i = N*sigma_i``.

    Computed in float32 like SF's scheduler (``torch.linspace`` default dtype), on the host.
    """
    s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    sigma = shift * s / (1 + (shift - 1) * s)
    return sigma * num_train_timesteps


def warp_timesteps(steps, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[float, ...]:
    """``cat(table, [0])[N - steps]``: SF's ``warp_denoising_step`` (e.g. [1000,750,500,250] -> [1000,937.5,...])."""
    table = torch.cat([shifted_timesteps(shift, num_train_timesteps), torch.zeros(1)])
    idx = [num_train_timesteps - int(s) for s in steps]
    return tuple(float(table[i]) for i in idx)


@dataclass(frozen=True)
class Schedule:
    """The denoising timesteps of one block (floats, host side; fixed for the runtime's life)."""

    timesteps: tuple[float, ...]

    @classmethod
    def from_steps(cls, steps, shift: float) -> Schedule:
        return cls(warp_timesteps(steps, shift))

    @property
    def sigmas(self) -> tuple[float, ...]:
        return tuple(t / NUM_TRAIN_TIMESTEPS for t in self.timesteps)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def timestep_table(self, frames: int, device) -> torch.Tensor:
        """[steps + 1, frames] float32: row k is step k's per-frame timestep, the last row is 0 (commit)."""
        rows = list(self.timesteps) + [0.0]
        return torch.tensor(rows, dtype=torch.float32, device=device)[:, None].repeat(1, frames).contiguous()


def x0_from_flow_(x0: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """In place: ``x0 = x_t - sigma * v``, computed in x0's dtype (an fp32 work buffer). No allocation."""
    return x0.copy_(v).mul_(-sigma).add_(x_t)


def renoise_(x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma: float, work: torch.Tensor) -> torch.Tensor:
    """In place: ``x_t = (1 - sigma) * x0 + sigma * eps``, computed in ``work``'s dtype then cast into x_t."""
    work.copy_(x0).mul_(1.0 - sigma).add_(eps, alpha=sigma)
    return x_t.copy_(work)
