"""What a TensorRT builder made of an exported graph, checked against ``io_spec``.

``network_io`` reads a parsed network's inputs and outputs (name, dtype, shape with -1 for a dynamic
axis); ``check_network`` compares them with an ``EngineIO`` (names, dtypes, which axes are dynamic and
the static sizes) and raises on any difference; ``build_warnings`` lists the warnings of a build log
that matter (everything except ``BENIGN``). ``build_plan`` runs both on every build, so ``make engines``
fails on a network that is not the one the runtime binds.
"""
from __future__ import annotations

import re
from pathlib import Path

from sdvg_rt.io_spec import EngineIO

# TensorRT DataType name -> io_spec dtype name
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
           "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}

# Warnings that say nothing about the engine: int64 token ids are what the scorer binds (io_spec), and
# polygraphy's note about its optional colour module.
BENIGN = (
    re.compile(r"Make sure input \w+ has Int64 binding"),
    re.compile(r"'colored' module is not installed"),
)


def network_io(network) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """name -> (dtype, shape (-1: dynamic), is_input) of a parsed ``INetworkDefinition``."""
    out = {}
    for tensors, is_input in (([network.get_input(i) for i in range(network.num_inputs)], True),
                              ([network.get_output(i) for i in range(network.num_outputs)], False)):
        for t in tensors:
            dt = _DTYPES.get(t.dtype.name, t.dtype.name)
            out[t.name] = (dt, tuple(int(d) for d in t.shape), is_input)
    return out


def expected_io(io: EngineIO) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    want = {}
    for tensors, is_input in ((io.inputs, True), (io.outputs, False)):
        for t in tensors:
            want[t.name] = (t.dtype, tuple(d if isinstance(d, int) else -1 for d in t.shape), is_input)
    return want


def check_network(network, io: EngineIO, onnx_path: Path | str = "") -> None:
    """Raise ``RuntimeError`` naming every tensor whose name, dtype, dynamic axes or static sizes in the
    parsed network differ from ``io``."""
    have, want = network_io(network), expected_io(io)
    diff = sorted((n, want.get(n), have.get(n)) for n in set(have) | set(want) if have.get(n) != want.get(n))
    if diff:
        raise RuntimeError(f"the network TensorRT parsed from {onnx_path or io.name} is not the I/O the runtime "
                           f"binds (name, io_spec, parsed; first of {len(diff)}): {diff[:4]}")


def build_warnings(log: str) -> list[str]:
    """The warning lines of a polygraphy/TensorRT build log that are not in ``BENIGN``."""
    lines = [ln.strip() for ln in log.splitlines() if ln.startswith("[W]")]
    return [ln for ln in lines if not any(p.search(ln) for p in BENIGN)]
