"""The Python half of the C++ embedding library (``embed/``): thin adapters over the public ``Runtime``
API that hand C++ plain values (str, float, int, a uint8 numpy array, JSON text) instead of objects.

The C++ side (``sdvg::Runtime``) calls only this module; everything here is ordinary Python and usable
(and tested) on its own.
"""
from __future__ import annotations

import ast
import json
import math
from collections.abc import Iterator

from .errors import SdvgError


def to_json(obj) -> str:
    """Strict JSON text (non-finite floats as "nan"/"inf"/"-inf", as in the run's JSON records)."""
    from .video import _json_safe  # the conversion the JSON files on disk use

    return json.dumps(_json_safe(obj), ensure_ascii=False, allow_nan=False)


def parse_overrides(pairs: list[tuple[str, str]]) -> dict:
    """Profile overrides given as text: numbers, booleans, None and lists as Python literals, other text
    as a string (``("tau", "-0.5")`` -> ``tau=-0.5``, ``("backends__vae", "torch")`` -> ``"torch"``)."""
    out = {}
    for key, text in pairs:
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def create(profile: str, device: str | None, overrides: list[tuple[str, str]], text_encoder: bool):
    from .api import Runtime

    return Runtime.from_profile(profile, device or None, text_encoder=text_encoder, **parse_overrides(overrides))


def blocks(rt, prompt, seed: int | None, tau: float | None, mode: str | None) -> Iterator[tuple]:
    """``Runtime.stream`` as tuples (block, decision, min_score or nan, frames uint8 [f, H, W, 3] C-contiguous,
    record JSON). Closing this generator closes the stream (the Runtime is free again)."""
    gen = rt.stream(prompt, seed=seed, tau=None if tau is None or math.isnan(tau) else tau, mode=mode or None)
    try:
        for b in gen:
            r = b.record
            yield (b.block, r.decision, math.nan if r.min_score is None else float(r.min_score), b.frames,
                   to_json(r.to_dict()))
    finally:
        gen.close()


def stats(rt) -> tuple[str, float, float, int, int]:
    """(stats JSON, acceptance rate or nan, wall time s, frames, blocks) of the last generation."""
    s = rt.last_stats
    acc = s.get("acceptance_rate")
    return (to_json(s), math.nan if acc is None else float(acc), float(s["wall_time_s"]), int(s["frames"]),
            len(s["blocks"]))


def error_info(exc: BaseException) -> tuple[int, str, str]:
    """(exit code, type name, one-paragraph message) for any exception: ``SdvgError.exit_code``, 130 for
    KeyboardInterrupt, 1 otherwise."""
    if isinstance(exc, SdvgError):
        code = exc.exit_code
    elif isinstance(exc, KeyboardInterrupt):
        code = 130
    else:
        code = 1
    msg = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return code, type(exc).__name__, msg
