PYTHON ?= python3
PROFILE ?= profiles/tiny.yaml

.PHONY: install test test-quick engines onnx demo bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0" || $(PYTHON) -m pip install torch
	$(PYTHON) -m pip install -e ".[test,sweep,ray,serve]"
	$(PYTHON) -m pip install --no-deps "tensorrt-stubs==10.13.*"

# everything, the slow tests included (what CI runs)
test:
	$(PYTHON) -m pytest -q tests

# without the tests marked slow (torch.compile on CPU, the C++ embedding, real subprocess runs, the wheel)
test-quick:
	$(PYTHON) -m pytest -q -m "not slow" tests

# TensorRT engines (the flavour: the profile's backends.tensorrt, or TRT=tensorrt|tensorrt_rtx; TensorRT-RTX
# builds without a GPU for SM=8.0,8.6,8.9,12.0 by default; PARTS=target,... for some parts only). A synthetic
# tiny set is written if missing.
TRT ?=
SM ?=
PARTS ?=

engines:
	$(PYTHON) -m sdvg_export build --profile $(PROFILE) $(if $(TRT),--tensorrt $(TRT)) $(if $(SM),--compute-capability $(SM)) $(if $(PARTS),--parts $(PARTS))

onnx:
	$(PYTHON) -m sdvg_export build --profile $(PROFILE) --onnx-only

demo:
	sdvg-rt run tools/demo_prompts.txt

bench:
	$(PYTHON) tools/bench.py --json outputs/bench.json
