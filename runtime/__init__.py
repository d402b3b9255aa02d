"""sdvg_rt: inference runtime for SDVG (speculative decoding for block-autoregressive video diffusion).

Public surface::

    import sdvg_rt
    rt = sdvg_rt.Runtime.from_profile("profiles/paper-832x480.yaml")
    result = rt.generate("a red fox running through fresh snow")   # Result(frames, stats, latents)

``Runtime``, ``Result``, ``PreparedPrompt``, ``BlockOutput``, ``load_profile`` and ``demo_profile`` are
imported on first use (``import sdvg_rt`` alone stays light); the error types are always here.
"""
from .errors import (  # noqa: F401
    BackendUnavailableError,
    BusyError,
    CheckpointError,
    DependencyError,
    EngineMismatchError,
    NumericalError,
    OutOfMemoryError,
    OutputError,
    ProfileError,
    PromptFileError,
    ArgumentError,
    ClosedError,
    ResumeMismatchError,
    SdvgError,
)

__version__ = "0.1.0"

_LAZY = {
    "Runtime": "api",
    "Result": "api",
    "PreparedPrompt": "loop",
    "BlockOutput": "loop",
    "load_profile": "profiles",
    "demo_profile": "profiles",
    "Profile": "profiles",
    "run_prompts": "batch",
}

__all__ = sorted(
    list(_LAZY)
    + [
        "BackendUnavailableError", "BusyError", "CheckpointError", "DependencyError", "EngineMismatchError", "NumericalError",
        "OutOfMemoryError", "OutputError", "ProfileError", "PromptFileError", "SdvgError", "__version__",
        "ArgumentError", "ClosedError", "ResumeMismatchError",
    ]
)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdvg_rt' has no attribute {name!r}")


def __dir__():
    return __all__
