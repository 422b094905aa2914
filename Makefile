# fhavatar — set-up, demo and tests. `make demo` and `make test` work on a fresh clone (they run `setup` first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FHAV   := $(VENV)/bin/fhavatar
STAMP  := $(VENV)/.fhavatar-setup
DEMO   ?= demo_out

.PHONY: setup demo test test-fast clean bench-cpu

setup: $(STAMP)

# torch is pinned to the CPU wheel (2.13.0); an unpinned `torch` would pull GBs of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	@# lpips: data only (LPIPS linear layers). --no-deps, since its torchvision requirement would pull another torch;
	@# installed last because pip reports an unmet requirement of an installed package on every later install.
	$(PY) -m pip install -q --no-deps "lpips==0.1.4"
	touch $(STAMP)

# Sample portrait -> avatar -> 360-degree turntable video (CPU, a few minutes).
demo: $(STAMP)
	$(FHAV) reconstruct sample_inputs/astronaut.jpg --out $(DEMO)
	$(FHAV) turntable $(DEMO)/*/avatar/avatar.npz --frames 60 --size 384 --fps 20
	$(FHAV) reenact $(DEMO)/*/avatar/avatar.npz sample_inputs/driving_motion.npz --out $(DEMO) --size 384
	@echo "demo: turntable and reenactment videos written under $(DEMO)/*/"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(DEMO) .pytest_cache
