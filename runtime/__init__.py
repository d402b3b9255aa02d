"""sdvg_rt: inference runtime for SDVG (speculative decoding for block-autoregressive video diffusion)."""
from .errors import (  # noqa: F401
    BackendUnavailableError,
    BusyError,
    CheckpointError,
    EngineMismatchError,
    NumericalError,
    OutOfMemoryError,
    ProfileError,
    PromptFileError,
    SdvgError,
)

__version__ = "0.1.0"
