# lare2: the recipe. `make help` lists the targets. Every target sets up .venv first if needed.
# README command 1: `make demo`; README command 2: `make test`.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
LARE2       := $(VENV)/bin/lare2
RUFF        := $(VENV)/bin/ruff
# CPU build from local disk by default; e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124" on GPU nodes.
TORCH_SPEC  ?= torch==2.13.0

# Stage 1 inputs (override on the command line: make extract SPLIT=val SD=/models/sd15 CLIP=/models/RN50.pt).
# SD and CLIP are local paths (placeholders: put the weights there or point elsewhere); never a hub id.
MANIFEST    ?= data_manifests/genimage.parquet
LAYOUT      ?= genimage
SRC         ?= /data/GenImage
SPLIT       ?= train
SD          ?= ./models/stable-diffusion-v1-5
CLIP        ?= ./models/RN50.pt
CACHE       ?= cache
EXTRACT_ARGS ?=
NPROC       ?= 1
RECOMPUTE   ?= 0
MANIFEST_ARGS ?=

# Stage 2
MODEL       ?= egre
RUN         ?= runs/$(MODEL)
REF_RUN     ?= runs/reference
TRAIN_ARGS  ?=
CKPT        ?= ./models/lare2_reference.pth
PYTEST_ARGS ?=

# `make help` lists these with their current values
HELP_VARS := MANIFEST LAYOUT SRC SPLIT SD CLIP CACHE NPROC RECOMPUTE EXTRACT_ARGS MANIFEST_ARGS MODEL RUN REF_RUN TRAIN_ARGS CKPT \
             TORCH_SPEC PYTEST_ARGS PYTHON VENV
HELP_MANIFEST      := manifest parquet (manifest, extract, verify)
HELP_LAYOUT        := manifest builder: genimage, folders, list or webdataset
HELP_SRC           := dataset folder the manifest is built from
HELP_SPLIT         := split to extract/verify/export: train, val or test (cache goes to CACHE/SPLIT)
HELP_SD            := Stable Diffusion v1.5: a LOCAL diffusers folder or .safetensors/.ckpt (placeholder path, not a hub id)
HELP_CLIP          := CLIP RN50 weights: a LOCAL RN50.pt or state dict (placeholder path)
HELP_CACHE         := folder holding the caches (CACHE/train, CACHE/val, CACHE/test*)
HELP_NPROC         := extraction processes (1: plain; >1: accelerate launch, one per GPU)
HELP_RECOMPUTE     := verify: re-extract this many samples and compare bit for bit
HELP_EXTRACT_ARGS  := more lare2 extract options, e.g. "--timestep 280 --set batch_size=16"
HELP_MANIFEST_ARGS := more lare2 manifest build options, e.g. "--val-fraction 0.05"
HELP_MODEL         := detector: egre, linear or lare-only
HELP_RUN           := run directory (train, eval, calibrate)
HELP_REF_RUN       := run directory make convert writes (then make calibrate RUN=$(REF_RUN))
HELP_TRAIN_ARGS    := more lare2 train options, e.g. "--preset debug --epochs 3"
HELP_CKPT          := reference LaRE^2 checkpoint for make convert (placeholder path)
HELP_TORCH_SPEC    := what setup installs torch from (CPU build by default)
HELP_PYTHON        := the Python that creates the virtual environment
HELP_VENV          := the virtual environment folder
HELP_PYTEST_ARGS   := more pytest options for make test / test-fast

.DEFAULT_GOAL := help
.PHONY: help setup lint test test-fast demo demo-robustness manifest extract verify export-wds train eval convert calibrate zoo minigenimage bench clean

help: ## list the targets and the variables (with their current values)
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'
	@echo ""
	@echo "Variables (make TARGET VAR=value; [current value]):"
	@$(foreach v,$(HELP_VARS),printf '  %-14s %s [%s]\n' '$(v)' '$(HELP_$(v))' '$($(v))';)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[extract,demo,dev,serve]"
	touch $@

setup: $(VENV)/.installed ## create .venv: torch (TORCH_SPEC, CPU build by default) first, then lare2 with extract, demo, dev and serve extras

lint: setup ## ruff check over the tree (rules and line length 120 in pyproject.toml); fails on any finding
	$(RUFF) check .

test: setup ## ruff check, then the whole test suite (slow-marked cases included), 2 workers
	$(RUFF) check .
	$(PY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

test-fast: setup ## the suite without slow-marked cases
	$(PY) -m pytest -n 2 --dist loadfile -q -m "not slow" $(PYTEST_ARGS)

demo: setup ## the main job on the embedded MiniGenImage: build, extract with ldm-a, train 4 detectors (egre, linear, lare-only, egre-zero-lare), evaluate on 4 generators
	$(LARE2) minigenimage demo --out runs/minigenimage

demo-robustness: setup ## after make demo: audit its manifest, re-extract its test split under JPEG 90/75/50, blur 1/2, resize 0.5, evaluate every detector on them
	$(LARE2) minigenimage robustness --out runs/minigenimage

manifest: setup ## build a manifest: make manifest LAYOUT=genimage SRC=/data/GenImage MANIFEST=... MANIFEST_ARGS="--val-fraction 0.05"
	$(LARE2) manifest build $(LAYOUT) $(SRC) -o $(MANIFEST) $(MANIFEST_ARGS)
	$(LARE2) manifest show $(MANIFEST)

extract: setup ## stage 1 for one split: make extract SPLIT=train SD=/models/sd15 CLIP=/models/RN50.pt [NPROC=8: one process per GPU]
	$(if $(filter 1,$(NPROC)),$(LARE2) extract,$(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NPROC) -m lare2.extract) --manifest $(MANIFEST) --split $(SPLIT) --sd $(SD) --clip $(CLIP) --out $(CACHE)/$(SPLIT) $(EXTRACT_ARGS)
	$(LARE2) cache info $(CACHE)/$(SPLIT)

verify: setup ## prove cache/SPLIT whole against MANIFEST; RECOMPUTE=K re-extracts K samples bit for bit
	$(LARE2) cache verify $(CACHE)/$(SPLIT) --manifest $(MANIFEST) --recompute $(RECOMPUTE)

export-wds: setup ## export cache/SPLIT as WebDataset shards into cache/SPLIT-wds
	$(LARE2) cache export $(CACHE)/$(SPLIT) --format webdataset --out $(CACHE)/$(SPLIT)-wds --shard-size 1000

train: setup ## stage 2: fit MODEL (egre|linear|lare-only) on cache/train, select on cache/val
	$(LARE2) train --model $(MODEL) --train $(CACHE)/train --val $(CACHE)/val --out $(RUN) $(TRAIN_ARGS)

eval: setup ## per-generator report of RUN on every cache/test* cache
	$(LARE2) eval $(RUN) $(foreach c,$(wildcard $(CACHE)/test*),--test $(c)) --report $(RUN)/report

convert: setup ## reference checkpoint CKPT -> uncalibrated REF_RUN (then extract val with CLIP=REF_RUN/backbone.safetensors, make calibrate RUN=REF_RUN)
	$(LARE2) convert-reference $(CKPT) --out $(REF_RUN)

calibrate: setup ## set RUN's threshold on cache/val reals (after make convert, or to recalibrate a trained run)
	$(LARE2) calibrate $(RUN) --val $(CACHE)/val

zoo: setup ## retrain the MiniGenImage generator zoo on the CPU (~45 min; the weights are committed, not part of demo)
	OMP_NUM_THREADS=1 $(LARE2) minigenimage zoo  # one thread per script: measured fastest, and what the committed weights were made with

minigenimage: setup ## build the MiniGenImage benchmark into data/minigenimage
	$(LARE2) minigenimage build --out data/minigenimage

bench: setup ## speed, cost-ratio, FLOP and disk figures into bench/results/ (~8 min on 2 idle CPU cores, the writer and serve figures included); FULL=1 adds the full-size DIRE-style/LaRE ratio (~6 min more)
	$(PY) bench/run_bench.py --out bench/results $(if $(filter 1,$(FULL)),--dire-full-size-images 2)
	$(PY) bench/serve.py --out bench/results

clean: ## remove caches, runs and build outputs (keeps .venv)
	rm -rf cache runs data/minigenimage .pytest_cache  # bench/results holds the committed figures: kept
