# Two commands a new user needs:
#   make demo   install, then segment a CT for "liver, spleen, aorta" and write a PNG overlay to open
#   make test   install everything from scratch into .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip resolves torch within the pinned range in pyproject.toml; override for a specific build,
# e.g. TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch torchvision
DEMO_OUT ?= demo_output

.PHONY: install test demo bench sample-data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

sample-data: install
	$(BIN)/python Resources/fetch_sample_data.py

test: install
	$(BIN)/python -m pytest Testing

# Until the trained demo model lands (issue 7), the demo runs the real pipeline on a real CT with
# a tiny RANDOM-WEIGHT model: it shows the files and geometry, not a meaningful segmentation.
demo: sample-data
	rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	$(BIN)/medsam3 make-tiny-model $(DEMO_OUT)/tiny_random_model
	$(BIN)/medsam3 segment "$$($(BIN)/python Resources/fetch_sample_data.py --print-dir)/example_ct_sm.nii.gz" \
		--prompt "liver, spleen, aorta" --model $(DEMO_OUT)/tiny_random_model \
		--threshold 0.2 --new-object-threshold 0.22 \
		-o $(DEMO_OUT)/example_ct_sm_seg.nii.gz --seg-nrrd --overlay
	@echo "Open $(DEMO_OUT)/example_ct_sm_seg_overlay.png to look at the result."

# Engine vs the per-prompt, per-slice baseline (CPU bench config, about 2 minutes on 2 cores);
# results are recorded in Testing/benchmarks/RESULTS.md
bench: install
	$(BIN)/python Testing/benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
