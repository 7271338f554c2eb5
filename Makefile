# salt_megatron: `make demo` and `make test` work on a fresh machine (Python 3.11, CPU).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
# constraints.txt pins every package to the version CI uses: torch is the CPU wheel (a looser spec drags a multi-GB
# CUDA build), megatron-core 0.16.1 the newest release for Python 3.11.
CONSTRAINTS := -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install test demo demo-full experiment experiment-quick experiment-paper experiment-cache bench wheel-smoke clean

$(STAMP): pyproject.toml setup.py constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# what the ahead-of-time kernel build needs in the environment (it runs without build isolation)
	$(PIP) install $(CONSTRAINTS) torch megatron-core setuptools ninja
	# DeepSpeed builds from source: its ops stay unbuilt (DS_BUILD_OPS=0), JIT-built on first use where needed
	DS_BUILD_OPS=0 $(PIP) install $(CONSTRAINTS) deepspeed
	$(PIP) install $(CONSTRAINTS) --no-build-isolation -e '.[deepspeed,demo,hf,dev]'
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero code.  Two test files
# run at a time (pytest-xdist): most of the suite's time is single-threaded process start-up, so two cores halve it.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20 tests

# the package as a user gets it: an isolated wheel build, installed into a fresh venv outside the repository
wheel-smoke:
	bash .ci/wheel_smoke.sh

# the main job on this CPU: real corpus, tiny teacher, baseline vs SALT students; prints the table, writes a plot
demo: $(STAMP)
	$(PY) -m salt_megatron.cli demo --out demo_out

demo-full: $(STAMP)
	$(PY) -m salt_megatron.cli demo --full --out demo_out_full

# the reproduction report (docs/experiment/): baselines, ablations, paired seeds; ~100 min on 2 cores (quick: ~23 min)
experiment: $(STAMP)
	$(PY) -m salt_megatron.cli experiment --out experiment_out --report-dir docs/experiment

experiment-quick: $(STAMP)
	$(PY) -m salt_megatron.cli experiment --quick --out experiment_out_quick --report-dir docs/experiment/quick

# the paper's regime, pre-registered (docs/experiment/paper_regime/): ~35 min on 2 cores
experiment-paper: $(STAMP)
	$(PY) -m salt_megatron.cli experiment --preset paper-regime --out experiment_out_paper \
	  --report-dir docs/experiment/paper_regime

# the offline teacher: SALT from the running teacher vs from top-64 / top-16 caches, 3 paired seeds (~15 min)
experiment-cache: $(STAMP)
	$(PY) -m salt_megatron.cli experiment --preset teacher-cache --out experiment_out_cache \
	  --report-dir docs/experiment/teacher_cache

bench: $(STAMP)
	$(PY) benchmarks/kd_loss.py
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info
