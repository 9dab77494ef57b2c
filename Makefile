# The two commands of the README: `make demo` (the toy-world run) and `make test`.
# Both set up .venv on first use; pip takes the pinned torch/torchvision from the local disk where it can.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.augbench-installed
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test lint install clean-results toy-models prereqs

install: $(STAMP)

# What the two commands need before they start, checked first and named in one line: python3 >= 3.11 with venv, and
# (for a new .venv) about 8 GB of free disk for the pinned CUDA build of torch.
prereqs:
	@command -v python3 >/dev/null || { echo "make: python3 (3.11 or newer) is not installed"; exit 1; }
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: python3 is $$(python3 -V 2>&1 | cut -d' ' -f2); augbench needs 3.11 or newer"; exit 1; }
	@python3 -c 'import venv, ensurepip' 2>/dev/null || { echo "make: python3 has no venv/ensurepip module (Debian: apt-get install python3-venv)"; exit 1; }
	@test -x $(PY) || [ $$(df -Pk . | awk 'NR==2 {print $$4}') -gt 8000000 ] || { echo "make: .venv needs about 8 GB of free disk (the CUDA build of torch is 5.5 GB); $$(df -Ph . | awk 'NR==2 {print $$4}') free here"; exit 1; }

$(STAMP): pyproject.toml | prereqs
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
	$(PY) -m pytest -ra --durations=30 tests

lint: $(STAMP)
	ruff check src tests benchmarks scripts
	snakemake --lint

clean-results:
	rm -rf results/toy logs/toy benchmarks/toy
