#!/usr/bin/env sh
# Build tools/embed/embed_demo without make: ./tools/embed/build.sh [python]  (default python3)
set -eu
PY="${1:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
EXE="$("$PY" -c 'import sys; print(sys.executable)')"
BIN="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("BINDIR"))')"
VER="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("VERSION"))')"
CONFIG="$BIN/python$VER-config"
[ -x "$CONFIG" ] || CONFIG="$BIN/python3-config"
[ -x "$CONFIG" ] || CONFIG="python3-config"
# shellcheck disable=SC2046  # word splitting of the flags is intended
${CXX:-g++} -O2 -std=c++17 $("$CONFIG" --includes) -DSDVG_PYTHON="\"$EXE\"" \
  -o "$HERE/embed_demo" "$HERE/embed_demo.cpp" $("$CONFIG" --embed --ldflags)
echo "built $HERE/embed_demo"
