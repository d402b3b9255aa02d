#!/usr/bin/env python
"""Write a complete synthetic SDVG model set in the official formats and layout.

    python tools/make_synthetic_checkpoints.py --size tiny --out /tmp/sdvg-models
    python tools/make_synthetic_checkpoints.py --size full --out /data/sdvg-models --seed 0

Layout, formats and the manifest (synthetic.json with sizes and sha256) are described in
`sdvg_rt.checkpoints.synthetic`; this is a thin command-line wrapper around `make_synthetic_set`.
An existing complete set is skipped unless --overwrite; an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from sdvg_rt.checkpoints.synthetic import SIZES, make_synthetic_set
    from sdvg_rt.errors import SdvgError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="tiny",
                    help="tiny: CPU test presets (a few MB); full: real architectures with random weights (~50 GB)")
    ap.add_argument("--out", required=True, help="folder to write the set into")
    ap.add_argument("--seed", type=int, default=0, help="random seed of every weight (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="rewrite every file even if the set exists")
    args = ap.parse_args(argv)
    try:
        make_synthetic_set(args.out, args.size, args.seed, overwrite=args.overwrite,
                           log=lambda s: print(s, flush=True))
    except SdvgError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
