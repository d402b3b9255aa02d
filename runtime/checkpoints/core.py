"""Safe checkpoint reading and strict checks shared by every format.

Only safetensors and ``torch.load(weights_only=True)`` are used. Every failure raises
``CheckpointError`` naming the file and, where it applies, the key and both shapes.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError


def read_state_dict(path: str | os.PathLike, *, map_location: str = "cpu") -> dict:
    """Read a ``.safetensors`` or torch pickle (``.pt``/``.pth``/``.bin``) file safely.

    Returns whatever the file holds at top level (a dict). Missing, truncated or corrupt files and
    pickles that need arbitrary code (``weights_only`` refuses them) raise ``CheckpointError``.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError("checkpoint file not found; check the path in your profile", path=p)
    if p.is_dir():
        raise CheckpointError("expected a checkpoint file but found a folder", path=p)
    if p.stat().st_size == 0:
        raise CheckpointError("checkpoint file is empty (0 bytes); re-download or re-create it", path=p)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device=map_location)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot read safetensors file (truncated or corrupt?): {e}", path=p
            ) from e
    try:
        obj = torch.load(str(p), map_location=map_location, weights_only=True, mmap=_can_mmap(p))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            "refusing to load: the file needs arbitrary code to unpickle (weights_only=True); "
            f"convert it to safetensors or a plain state dict. Detail: {str(e).splitlines()[0]}",
            path=p,
        ) from e
    except Exception as e:  # noqa: BLE001 - garbage bytes raise anything from IndexError to KeyError
        raise CheckpointError(
            f"cannot read torch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}", path=p
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected a dict of tensors at the top level, found {type(obj).__name__}", path=p
        )
    return dict(obj)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; unreadable, invalid or not an object -> ``CheckpointError`` naming the
    file."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse JSON of the {what} (not valid JSON: truncated or corrupt?): {e}",
                              path=p) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"the {what} must hold a JSON object, found {type(obj).__name__}", path=p)
    return obj


def check_tensors(sd: Mapping, path: str | os.PathLike, what: str) -> None:
    """Every value of a loaded state dict is a tensor (a flat dict); else ``CheckpointError`` naming the key."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"expected a flat dict of tensors ({what}); found a nested value",
                                  path=Path(path), key=k, expected="tensor", found=type(v).__name__)


def key_generator(seed: int, key: str) -> torch.Generator:
    """The random stream of one tensor of a synthetic checkpoint: (seed, key) alone decide its values, so
    a tensor can be drawn (or streamed to disk) without drawing the ones before it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def _can_mmap(p: Path) -> bool:
    # mmap needs the zip-based format (torch >= 1.6 default); legacy files fall back to a read.
    try:
        return zipfile.is_zipfile(p)
    except OSError:
        return False


def strict_check(
    expected: Mapping[str, tuple] | torch.nn.Module,
    found: Mapping[str, torch.Tensor],
    path: str | os.PathLike | None,
    *,
    what: str = "model",
) -> None:
    """Check that ``found`` has exactly the keys and shapes of ``expected``.

    ``expected`` is a module (its state dict, persistent entries only) or a name -> shape mapping.
    Raises ``CheckpointError`` for the first missing key, then the first unexpected key, then the
    first shape mismatch (sorted order, so the message is stable).
    """
    if isinstance(expected, torch.nn.Module):
        expected = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    exp_keys, got_keys = set(expected), set(found)
    missing = sorted(exp_keys - got_keys)
    unexpected = sorted(got_keys - exp_keys)
    if missing:
        raise CheckpointError(
            f"{what} checkpoint is missing {len(missing)} key(s) (first shown); "
            "is it the right file, complete and of the right model?",
            path=path, key=missing[0], expected=tuple(expected[missing[0]]), found="absent",
        )
    if unexpected:
        raise CheckpointError(
            f"{what} checkpoint has {len(unexpected)} unexpected key(s) (first shown); "
            "is it the right file and format?",
            path=path, key=unexpected[0], expected="absent", found=tuple(found[unexpected[0]].shape),
        )
    for k in sorted(exp_keys):
        if tuple(found[k].shape) != tuple(expected[k]):
            raise CheckpointError(
                f"{what} checkpoint has a tensor of the wrong shape (first shown); "
                "was it made for another model size?",
                path=path, key=k, expected=tuple(expected[k]), found=tuple(found[k].shape),
            )
