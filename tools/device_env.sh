# Source on the device machine: makes `import sdvg_rt` / `sdvg_export` work from the working tree
# without installing (the device has no network; its torch is the image's).
mkdir -p /tmp/sdvg_pp
ln -sfn "$PWD/runtime" /tmp/sdvg_pp/sdvg_rt
ln -sfn "$PWD/export" /tmp/sdvg_pp/sdvg_export
export PYTHONPATH=/tmp/sdvg_pp${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
