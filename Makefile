# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: venv train test test-slow bench clean

venv: $(STAMP)  ## create .venv and install the pinned requirements (idempotent)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	rm -f $(VENV)/.installed-* && touch $@

train: venv  ## the default training run (Swin pico on the embedded shapes dataset); ARGS="model=swin_local ..."
	$(PY) train.py $(ARGS)

test: venv  ## the fast test suite
	$(PY) -m pytest -q $(ARGS)

test-slow: venv  ## the slow tests (long trainings, big benchmarks)
	$(PY) -m pytest -q -m slow $(ARGS)

bench: venv  ## all benchmarks (tables and plots in bench_out/); see README
	$(PY) -m vision_attn.bench attention
	$(PY) -m vision_attn.bench model
	$(PY) -m vision_attn.bench data
	$(PY) -m vision_attn.bench knobs

clean:
	rm -rf outputs multirun bench_out
