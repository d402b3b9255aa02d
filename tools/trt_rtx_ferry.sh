#!/usr/bin/env bash
# TensorRT-RTX (the `trt-rtx` extra: tensorrt-rtx-cu13 1.7, polygraphy) for a GPU machine without network
# whose calls carry at most 64 MiB each. With network, `pip install -e '.[trt-rtx]'` is all it takes.
#
#   bash tools/trt_rtx_ferry.sh pack        # here (needs pip's network): .ferry-trt/lib.tar.xz.0, .1, ...
#                                           # (the 95 MB libraries wheel unzipped, xz -9, split at 60 MiB)
#                                           # and .ferry-trt/whl/ (bindings, the tensorrt_rtx package, polygraphy)
#   bash tools/trt_rtx_ferry.sh unpack N    # device call N+1 (N = 0, 1, ...), carrying only .ferry-trt/lib.tar.xz.N:
#                                           # appends the part to /tmp/trtrtx/lib.tar.xz
#   bash tools/trt_rtx_ferry.sh install     # last call, carrying .ferry-trt/whl: unpacks the libraries and
#                                           # unzips the wheels into /tmp/trtrtx/site, then imports tensorrt_rtx
# then `export PYTHONPATH=/tmp/trtrtx/site:$PYTHONPATH` (and LD_LIBRARY_PATH is not needed: the package
# finds its libraries in the site folder). /tmp must survive between the calls (the machine stays warm).
set -euo pipefail
cd "$(dirname "$0")/.."
DST=/tmp/trtrtx
PY=${FERRY_PYTHON:-3.12}
PLAT=(--only-binary=:all: --python-version "$PY" --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
VER=1.7.1.116

case "${1:-}" in
pack)
    ex=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$ex")"
    grep -qx "/.ferry-trt/" "$ex" 2>/dev/null || echo "/.ferry-trt/" >> "$ex"
    rm -rf .ferry-trt && mkdir -p .ferry-trt/whl
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps "${PLAT[@]}" -d .ferry-trt/whl "tensorrt-rtx-cu13-bindings==$VER" \
        "polygraphy==0.53.6"
    # the tensorrt_rtx package itself is an sdist (pure Python re-exporting the bindings): carry its folder
    python3 -m pip download -q --no-deps -d "$tmp/meta" "tensorrt-rtx-cu13==$VER"
    tar -xzf "$tmp"/meta/tensorrt_rtx_cu13-*.tar.gz -C "$tmp/meta"
    tar -C "$tmp"/meta/tensorrt_rtx_cu13-*/ -cf .ferry-trt/whl/tensorrt_rtx-pkg.tar tensorrt_rtx
    python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$tmp" "tensorrt-rtx-cu13-libs==$VER"
    python3 -m zipfile -e "$tmp"/tensorrt_rtx_cu13_libs-*.whl "$tmp/x"
    echo "compressing the libraries (xz -9, a few minutes)..."
    tar -C "$tmp/x" -cf - . | xz -9 -T0 | split -b 60M -d -a 1 - .ferry-trt/lib.tar.xz.
    rm -rf "$tmp"
    ls -l .ferry-trt .ferry-trt/whl
    ;;
unpack)
    n=${2:?usage: unpack N}
    test -f ".ferry-trt/lib.tar.xz.$n" || { echo "no .ferry-trt/lib.tar.xz.$n: carry it (run 'pack' here first)" >&2; exit 2; }
    mkdir -p "$DST"
    [ "$n" = 0 ] && rm -f "$DST/lib.tar.xz"
    cat ".ferry-trt/lib.tar.xz.$n" >> "$DST/lib.tar.xz"
    ls -l "$DST/lib.tar.xz"
    ;;
install)
    test -f "$DST/lib.tar.xz" || { echo "$DST/lib.tar.xz missing: run 'unpack 0', 'unpack 1', ... first (machine still warm)" >&2; exit 2; }
    ls .ferry-trt/whl/*.whl >/dev/null || { echo "no .ferry-trt/whl/*.whl: carry .ferry-trt/whl" >&2; exit 2; }
    mkdir -p "$DST/site" && xz -dc "$DST/lib.tar.xz" | tar -xf - -C "$DST/site"
    for w in .ferry-trt/whl/*.whl; do python3 -m zipfile -e "$w" "$DST/site"; done
    tar -xf .ferry-trt/whl/tensorrt_rtx-pkg.tar -C "$DST/site"
    PYTHONPATH="$DST/site${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
        "import tensorrt_rtx as t; assert hasattr(t, 'Builder'); print('tensorrt_rtx', t.__version__)"
    du -sh "$DST/site"
    ;;
*)
    echo "usage: bash tools/trt_rtx_ferry.sh pack|unpack N|install" >&2; exit 2 ;;
esac
