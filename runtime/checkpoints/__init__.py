"""Checkpoint loading for the official formats (wan-models.md §7, imagereward.md §3).

`core` holds safe reading and the strict key/shape check; one module per model family holds that
family's formats and key maps (`wan_dit`, `wan_vae`, `imagereward`, `umt5`).
"""
from .core import read_state_dict, strict_check  # noqa: F401
