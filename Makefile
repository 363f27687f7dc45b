# clipdistill - three stages chained by file targets; finished stages are not redone.
# `make help` lists the targets. Variables can be overridden: make distill STUDENT=tiny

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
CLI         := $(VENV)/bin/clipdistill
DATASET     ?= openmoji
TEACHER     ?= lit
DATA_DIR    ?= data/$(DATASET)
ARTIFACTS   ?= artifacts
CACHE_DIR   ?= $(ARTIFACTS)/cache
STAMP       := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install test demo dataset teacher teacher-features distill eval bench clean

help:  ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)  ## create .venv and install the project (+ test extras)

test: $(STAMP)  ## run the test suite
	$(PY) -m pytest -q

# ---- stage 0: built-in dataset and offline teacher ---------------------------------------
$(DATA_DIR)/test.parquet: $(STAMP)
	$(CLI) build-openmoji --out $(DATA_DIR)

dataset: $(DATA_DIR)/test.parquet  ## build the built-in openmoji dataset (manifests + rendered images)

$(ARTIFACTS)/teachers/lit-$(DATASET).pt: $(DATA_DIR)/test.parquet
	$(CLI) build-lit --manifest $(DATA_DIR)/train.parquet --out $@

teacher: $(ARTIFACTS)/teachers/lit-$(DATASET).pt  ## train the offline LiT teacher heads

# ---- stage 1: teacher features ---------------------------------------------------------
TEACHER_SPEC := $(if $(filter lit,$(TEACHER)),lit:$(ARTIFACTS)/teachers/lit-$(DATASET).pt,$(TEACHER))
FEATURES_STAMP := $(CACHE_DIR)/$(DATASET)/$(TEACHER)/.complete

$(FEATURES_STAMP): $(DATA_DIR)/test.parquet $(if $(filter lit,$(TEACHER)),$(ARTIFACTS)/teachers/lit-$(DATASET).pt)
	$(CLI) teacher-features --teacher $(TEACHER_SPEC) --manifest-dir $(DATA_DIR) --out $(CACHE_DIR)/$(DATASET)/$(TEACHER)
	touch $@

teacher-features: $(FEATURES_STAMP)  ## cache L2-normalised teacher embeddings (HDF5 shards)

clean:  ## remove generated data and artifacts (keeps .venv)
	rm -rf $(ARTIFACTS) data/openmoji/images data/openmoji/*.parquet
