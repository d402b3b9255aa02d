"""Benchmark: component and end-to-end timings vs the hardware floor (see sdvg_rt.bench).

    python tools/bench.py --json outputs/bench.json          # one GPU, full-size random weights
    python tools/bench.py --size tiny --device cpu           # the same code paths, tiny models (numbers meaningless)
"""
import sys

from sdvg_rt.bench import main

if __name__ == "__main__":
    sys.exit(main())
