# Source in the repository root of a GPU machine where the package is not installed (for example one
# without network, using the image's torch): makes `import sdvg_rt` / `sdvg_export` work from the tree.
mkdir -p /tmp/sdvg_pp
ln -sfn "$PWD/runtime" /tmp/sdvg_pp/sdvg_rt
ln -sfn "$PWD/export" /tmp/sdvg_pp/sdvg_export
export PYTHONPATH=/tmp/sdvg_pp${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# FlashAttention-4 unpacked by tools/fa4_ferry.sh (optional): on the path, so attention "auto" uses it
if [ -d /tmp/fa4site/nvidia_cutlass_dsl ]; then
    export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
fi
