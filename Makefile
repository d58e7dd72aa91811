# One command sets up and runs the main job (`make demo`), one runs the tests (`make test`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORK ?= work
# espeak-ng speaks the corpora and Flite part of their training sentences; Festival (a third
# engine) speaks the unseen-voice evaluation sets (kal, slt) and is an optional training voice (ked).
APT_PACKAGES := espeak-ng festival festvox-kallpc16k festvox-us-slt-hts festvox-kdlpc16k flite

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes. torch comes first and pinned: any looser torch
# requirement on a fresh venv makes pip download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@if ! ldconfig -p | grep -q libespeak-ng.so.1 || ! command -v festival >/dev/null \
		|| ! command -v flite >/dev/null \
		|| [ ! -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] \
		|| [ ! -d /usr/share/festival/voices/english/ked_diphone ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES); fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	@# The Khronos glTF validator, for the rigged-glb test (tests/io/test_export.py).
	@if command -v npm >/dev/null; then \
		npm install --silent --no-audit --no-fund --prefix $(VENV) gltf-validator@2.0.0-dev.3.10; fi
	@touch $(STAMP)

# Synthesise the demo corpus, train on it with Ray Train (2 workers), register, list versions,
# then animate a small catalog of speech clips with the champion (jobs/animate.yaml) and render
# a preview video of one of them. Quiet: a line per stage and per epoch, Ray's and the
# libraries' own logs in $(WORK)/logs (paths printed); `make demo VERBOSE=1` shows them here.
# Each demo is a fresh run: the previous one's Ray Train state would make the job a finished one.
demo: export MMTALKER_VERBOSE = $(if $(VERBOSE),1,0)
demo: setup
	@echo "== 1/5 the demo corpus: $(WORK)/datasets/demo"
	@$(BIN)/mmtalker data synth --out $(WORK)/datasets/demo --overwrite
	@rm -rf $(WORK)/ray_results/demo
	@echo "== 2/5 training (jobs/train.yaml)"
	@$(BIN)/mmtalker run jobs/train.yaml
	@echo "== 3/5 registered versions"
	@$(BIN)/mmtalker models list
	@echo "== 4/5 animating a catalog of clips with mmtalker@champion (jobs/animate.yaml)"
	@$(BIN)/mmtalker data clips --out $(WORK)/catalogs/demo --count 12
	@$(BIN)/mmtalker run jobs/animate.yaml
	@echo "== 5/5 a preview video"
	@$(BIN)/mmtalker render $(WORK)/animations/demo/clip_00000.npz \
		--audio $(WORK)/catalogs/demo/clip_00000.wav -o $(WORK)/previews/demo.mp4 \
		--still $(WORK)/previews/demo.png

# One thread per test process: the suite is many small ops, and on 2 cores torch's default
# thread pool stalled under any other load (23 min instead of under 3).
test: setup lint
	OMP_NUM_THREADS=1 $(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Figures, not pass/fail. accuracy.py trains two models side by side for 20 minutes per seed
# on the > 1 h corpus (three seeds, then scoring: about 1.5 hours); multires.py about 30 minutes.
bench: setup
	$(BIN)/python bench/corpus.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/accuracy.py
	$(BIN)/python bench/ceiling.py
	$(BIN)/python bench/stop_timing.py
	$(BIN)/python bench/articulation.py --checkpoint $(WORK)/bench/accuracy/seed0/mmtalker
	$(BIN)/python bench/upper_face.py --checkpoint $(WORK)/bench/accuracy/seed0/mmtalker \
		--data $(WORK)/datasets/bench
	$(BIN)/python bench/multires.py
	$(BIN)/python bench/arkit_recovery.py --data $(WORK)/datasets/ict-2500v \
		--checkpoint $(WORK)/bench/multires/coarse
	$(BIN)/mmtalker data clips --out $(WORK)/catalogs/bench --count 12
	$(BIN)/python bench/whole_head.py --data $(WORK)/datasets/ict-2500v \
		--checkpoint $(WORK)/bench/multires/coarse --catalog $(WORK)/catalogs/bench
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/batch_throughput.py
	$(BIN)/python bench/render.py

clean:
	rm -rf $(WORK) .pytest_cache .ruff_cache
