"""``python -m sdvg_export build --profile P [--parts ...] [--force] [--tensorrt FLAVOUR] [--compute-capability CCS] ...``.

What ``make engines PROFILE=...`` runs. Errors are printed as one message (no traceback) and map to
the sdvg-rt exit codes (``SdvgError.exit_code``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdvg_rt.errors import SdvgError


def main(argv: list[str] | None = None) -> int:
    from sdvg_rt import io_spec

    from .build import DEFAULT_ENGINES_DIR, BuildOptions, build, parse_compute_capabilities, parse_parts

    ap = argparse.ArgumentParser(prog="python -m sdvg_export", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="export ONNX and build TensorRT engines for a profile (only what is stale)")
    b.add_argument("--profile", required=True, help="profile YAML (e.g. profiles/paper-832x480.yaml)")
    b.add_argument("--parts", default=None,
                   help=f"comma-separated parts to build (default: all of {','.join(io_spec.PARTS)})")
    b.add_argument("--force", action="store_true", help="rebuild even what is up to date")
    b.add_argument("--onnx-only", action="store_true", help="export the ONNX graphs only (no TensorRT needed)")
    b.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                   help="TensorRT builder optimization level (default 3)")
    b.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file (default: one per GPU and TensorRT version in the engines folder)")
    b.add_argument("--workspace-gb", type=float, default=None, help="limit the builder's workspace (GiB)")
    b.add_argument("--engines-dir", type=Path, default=DEFAULT_ENGINES_DIR,
                   help=f"root of the engine folders (default {DEFAULT_ENGINES_DIR})")
    b.add_argument("--device", default=None, help="device for the ONNX export (default: cuda if available)")
    b.add_argument("--tensorrt", default=None, choices=("auto", "tensorrt", "tensorrt_rtx"),
                   help="TensorRT flavour (default: the profile's backends.tensorrt; auto: what is installed and "
                        "runs on this GPU, TensorRT-RTX without a GPU)")
    b.add_argument("--compute-capability", default=None, metavar="8.6,8.9,...",
                   help="TensorRT-RTX: compute capabilities to build for, without needing a GPU "
                        "(default: 8.0,8.6,8.9,12.0, TensorRT-RTX's portable set)")
    b.add_argument("--random-weights", action="store_true",
                   help="export from the synthetic-weight rule's random weights at the profile's size instead of "
                        "the checkpoints (build tests of full-size graphs; the engines compute noise)")
    args = ap.parse_args(argv)
    try:
        opts = BuildOptions(
            parts=parse_parts(args.parts), force=args.force, onnx_only=args.onnx_only, opt_level=args.opt_level,
            timing_cache=args.timing_cache,
            workspace_bytes=int(args.workspace_gb * 2**30) if args.workspace_gb else None,
            engines_dir=args.engines_dir, device=args.device, flavour=args.tensorrt,
            compute_capabilities=parse_compute_capabilities(args.compute_capability),
            random_weights=args.random_weights)
        report = build(args.profile, opts)
    except SdvgError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:  # bad --parts
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {report.seconds:.1f} s: exported {len(report.exported)}, built {len(report.built)}, "
          f"up to date {len(report.up_to_date)} ({report.folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
