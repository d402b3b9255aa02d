PYTHON ?= python3
PROFILE ?= profiles/tiny.yaml

.PHONY: install test engines demo bench

install:
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest -q tests

engines:
	$(PYTHON) -m sdvg_export build --profile $(PROFILE)

demo:
	sdvg-rt run tools/demo_prompts.txt

bench:
	$(PYTHON) tools/bench.py
