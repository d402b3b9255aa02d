"""The VAE's streaming state: the preallocated history of every causal conv (``VAEState``) and the
committed/scratch pair a speculative decode needs (``VAEStatePair``). Plain tensors, no model.

A draft decodes from the committed state into the scratch state, so the committed history is never
disturbed; accepting the draft is a swap of the two roles (``keep``), rejecting it is doing nothing.
``parity`` says which of the two preallocated states is committed, so a CUDA-graph or TensorRT binding
can be keyed by it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class VAEState:
    """The preallocated temporal history of every causal conv: ``slots[i]`` is ``[1, C_i, 2, h_i, w_i]``."""

    slots: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def zeros(cls, shapes: Sequence[Sequence[int]], dtype: torch.dtype, device,
              memory_format: torch.memory_format = torch.contiguous_format) -> VAEState:
        return cls([torch.zeros(tuple(s), dtype=dtype, device=device).contiguous(memory_format=memory_format)
                    for s in shapes])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots)

    def zero_(self) -> VAEState:
        for t in self.slots:
            t.zero_()
        return self

    def clone(self) -> VAEState:
        """A copy (tests and debugging only; the runtime never copies a state)."""
        return VAEState([t.clone() for t in self.slots])

    def data_ptrs(self) -> list[int]:
        return [t.data_ptr() for t in self.slots]


class VAEStatePair:
    """Two preallocated ``VAEState``s: ``committed`` (the history of the committed video) and ``scratch``
    (where a draft's decode writes). ``wrote_scratch()`` records a decode into the scratch state (host
    bookkeeping, called by whoever enqueued it, graph replay or not); ``keep()`` swaps the roles."""

    def __init__(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype, device,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.states = (VAEState.zeros(shapes, dtype, device, memory_format),
                       VAEState.zeros(shapes, dtype, device, memory_format))
        self.parity = 0  # index of the committed state
        self._scratch_written = False

    @staticmethod
    def nbytes_for(config, h: int, w: int, dtype: torch.dtype) -> int:
        """Bytes of both states for a VAE config (``config.state_nbytes``), before allocating."""
        return 2 * config.state_nbytes(h, w, dtype)

    @property
    def committed(self) -> VAEState:
        return self.states[self.parity]

    @property
    def scratch(self) -> VAEState:
        return self.states[1 - self.parity]

    def wrote_scratch(self) -> None:
        self._scratch_written = True

    def keep(self) -> None:
        """Accept the last scratch decode: swap committed and scratch (references only, no copy)."""
        assert self._scratch_written, "keep_scratch() needs a decode_scratch() since the last keep/reset"
        self.parity = 1 - self.parity
        self._scratch_written = False

    def reset(self) -> None:
        """New video: zero both states (block 0 does not read them; this keeps them deterministic)."""
        for s in self.states:
            s.zero_()
        self.parity = 0
        self._scratch_written = False

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Both states' slots by (state index, slot) (memory accounting and tests)."""
        return {f"state{p}.{j}": t for p, st in enumerate(self.states) for j, t in enumerate(st.slots)}
