PYTHON ?= python3
PROFILE ?= profiles/tiny.yaml

.PHONY: install test engines onnx demo bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0" || $(PYTHON) -m pip install torch
	$(PYTHON) -m pip install -e ".[test,serve]"
	$(PYTHON) -m pip install --no-deps "tensorrt-stubs==10.13.*"

test:
	$(PYTHON) -m pytest -q tests

engines:
	$(PYTHON) -m sdvg_export build --profile $(PROFILE)

onnx:
	$(PYTHON) -m sdvg_export build --profile $(PROFILE) --onnx-only

demo:
	sdvg-rt run tools/demo_prompts.txt

bench:
	$(PYTHON) tools/bench.py --json outputs/bench.json
