#!/usr/bin/env bash
# FlashAttention-4 (the optional `fa4` extra) for a GPU machine without network access. With network,
# `pip install -e '.[fa4]'` is all it takes. Otherwise, on any machine with pip's network and a copy of
# this repository, then on the GPU machine (in its copy of the repository):
#
#   bash tools/fa4_ferry.sh pack      # with network: .ferry/ (CUTLASS DSL cu13 libraries, xz, about
#                                     # 61 MiB) and .whl/ (the other wheels, about 10 MiB)
#   (copy .ferry/ and .whl/ into the GPU machine's repository; each stays under 64 MiB, for transfers
#   with a size limit)
#   bash tools/fa4_ferry.sh unpack    # GPU machine: unpacks .ferry into /tmp/fa4site
#   bash tools/fa4_ferry.sh install   # GPU machine: unzips .whl's wheels into /tmp/fa4site (the same
#                                     # machine as unpack: /tmp must still hold the libraries)
# then `source tools/device_env.sh` puts /tmp/fa4site on PYTHONPATH and `performance.attention: auto`
# picks FlashAttention-4 on Hopper. The GPU machine needs cuda-bindings, protobuf, einops and
# typing-extensions already installed (CUDA images usually have them). Versions are those of the `fa4`
# extra in pyproject.toml; the wheels are for CPython 3.12 on x86-64 Linux (PLAT below).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/fa4site
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
WHEELS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
        nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2
        torch-c-dlpack-ext==0.1.5)

case "${1:-}" in
pack)
    for d in .ferry .whl; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
    rm -rf .ferry .whl && mkdir -p .ferry .whl
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps "${PLAT[@]}" -d .whl "${WHEELS[@]}"
    python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
    python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp/x"
    echo "compressing the cu13 libraries (xz -9, a few minutes)..."
    tar -C "$tmp/x" -cf - nvidia_cutlass_dsl | xz -9 -T0 > .ferry/cutlass-dsl-cu13.tar.xz
    rm -rf "$tmp"
    du -sh .ferry .whl
    ;;
unpack)
    test -f .ferry/cutlass-dsl-cu13.tar.xz || { echo "no .ferry/cutlass-dsl-cu13.tar.xz: run 'pack' on a machine with network and copy .ferry here" >&2; exit 2; }
    mkdir -p "$SITE" && tar -xJf .ferry/cutlass-dsl-cu13.tar.xz -C "$SITE"
    du -sh "$SITE"
    ;;
install)
    test -d "$SITE/nvidia_cutlass_dsl/cu13" || { echo "$SITE lacks the cu13 libraries: run 'unpack' first, on this machine" >&2; exit 2; }
    ls .whl/*.whl >/dev/null || { echo "no .whl/*.whl: run 'pack' on a machine with network and copy .whl here" >&2; exit 2; }
    for w in .whl/*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
    PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}" \
        python3 -c "import flash_attn.cute.interface; print('flash-attn-4 importable')"
    ;;
*)
    echo "usage: bash tools/fa4_ferry.sh pack|unpack|install" >&2; exit 2 ;;
esac
