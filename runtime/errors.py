"""Typed errors for sdvg-rt.

Every error a user can meet says the rule, what was found, where (file, key, field, shape) and
what to do. Asserts are kept for internal invariants only.
"""
from __future__ import annotations


class SdvgError(Exception):
    """Base class of all sdvg-rt errors. ``exit_code`` is what the CLI returns for it."""

    exit_code = 1


class CheckpointError(SdvgError):
    """A checkpoint file is missing, corrupt, of the wrong format or does not match the model."""

    exit_code = 3

    def __init__(self, message: str, *, path=None, key=None, expected=None, found=None):
        parts = [message]
        if path is not None:
            parts.append(f"file: {path}")
        if key is not None:
            parts.append(f"key: {key}")
        if expected is not None or found is not None:
            parts.append(f"expected: {expected}, found: {found}")
        super().__init__("\n  ".join(parts))
        self.path, self.key, self.expected, self.found = path, key, expected, found


class ProfileError(SdvgError):
    """A profile YAML is missing, malformed or has an invalid field."""

    exit_code = 2

    def __init__(self, message: str, *, path=None, field=None):
        where = []
        if path is not None:
            where.append(f"profile: {path}")
        if field is not None:
            where.append(f"field: {field}")
        super().__init__("\n  ".join([message] + where))
        self.path, self.field = path, field


class PromptFileError(SdvgError):
    """The prompts file is missing, empty or not UTF-8."""

    exit_code = 2


class EngineMismatchError(SdvgError):
    """TensorRT engines were built for another profile, GPU, TensorRT version or checkpoint."""

    exit_code = 4


class BackendUnavailableError(SdvgError):
    """A backend named in the profile cannot be used on this machine (e.g. no TensorRT)."""

    exit_code = 4


class OutOfMemoryError(SdvgError):
    """The models, caches and buffers of a profile do not fit the device."""

    exit_code = 5


class NumericalError(SdvgError):
    """NaN or inf where a finite value is required (latents)."""

    exit_code = 6


class BusyError(SdvgError):
    """A Runtime runs one generation at a time; another one is in progress."""

    exit_code = 7


class OutputError(SdvgError):
    """The output folder or a file in it cannot be written."""

    exit_code = 8


class ResumeMismatchError(OutputError):
    """Finished outputs in the folder were made with other settings, prompts, checkpoints or code."""

    exit_code = 9


class ArgumentError(SdvgError, ValueError):
    """A bad argument to the Python API (empty prompt, unknown mode, NaN tau, ...)."""

    exit_code = 2


class ClosedError(SdvgError, RuntimeError):
    """The Runtime was closed: its models and caches are gone."""

    exit_code = 1


class DependencyError(SdvgError):
    """An optional extra a command needs is not installed (the message names the pip extra)."""

    exit_code = 10
