# The two commands of the README: `make demo` (the toy-world run) and `make test`.
# Both set up .venv on first use; pip takes the pinned torch/torchvision from the local disk where it can.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.augbench-installed
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test lint install clean-results toy-models

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev,slurm]"
	touch $(STAMP)

demo: $(STAMP)
	@start=$$(date +%s); \
	snakemake --profile profiles/default --configfile config.yaml && \
	snakemake --profile profiles/default --configfile config.yaml --report results/toy/report/report.html && \
	echo && cat results/toy/report/results.md && \
	echo "demo finished in $$(( $$(date +%s) - start )) s"

# The toy foundation models: trained once on the default world (config/toy_models.yaml), shipped in fp16 under
# models/toy/ with a manifest (sha256, world spec, command, measured time and quality). Rarely rebuilt.
toy-models: $(STAMP)
	snakemake results/toy/clip/model results/toy/diffusion/model --profile profiles/default --configfile config/toy_models.yaml
	$(PY) -m augbench ship-toy --clip results/toy/clip/model --diffusion results/toy/diffusion/model \
		--world results/toy/world --out models/toy --command "make toy-models"

test: $(STAMP)
	$(PY) -m pytest -ra tests

lint: $(STAMP)
	ruff check src tests
	snakemake --lint

clean-results:
	rm -rf results/toy logs/toy benchmarks/toy
