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
# `make install` takes the exact versions CI tested from constraints.txt (tools/lock.py), for the packages and for the
# isolated build of this project (setuptools). EXTRAS=dev,cluster,gpu on GPUs (cluster: Ray, which the tests use;
# cpu/gpu: one FAISS build, never both).
EXTRAS      ?= dev,cluster,cpu
# make lock KEEP=constraints.txt: resolve with the old pins as constraints, so only new packages get pins
KEEP        ?=

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help install lock npm-lock test demo dataset teacher teacher-features distill eval bench clean

help:  ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip -c constraints.txt
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' -c constraints.txt --build-constraint constraints.txt
	$(PY) tools/lock.py --check --out constraints.txt --check-extras $(EXTRAS)
	touch $@

install: $(STAMP)  ## create .venv and install the locked versions (+ test, Ray and FAISS-CPU extras; EXTRAS=dev,cluster,gpu for GPUs)

# Needs only a venv with pip (not a passing install: a changed pyproject is what makes the old lock fail).
lock:  ## re-resolve constraints.txt (+ pylock.toml, PEP 751 with hashes; requirements.txt, the flat list of what `make install` installs) from pyproject.toml, then reinstall (KEEP=constraints.txt: add pins, move none)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/lock.py --out constraints.txt --extras dev,gpu,deploy,cluster,cpu $(if $(KEEP),--keep $(KEEP))
	$(PY) -m pip lock -q -e '.[dev,gpu,deploy,cluster,cpu]' -c constraints.txt -o pylock.toml
	$(PY) tools/lock.py --portable-pylock pylock.toml  # this machine's mirror URLs -> PyPI's
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' -c constraints.txt --build-constraint constraints.txt
	$(PY) tools/lock.py --check --out constraints.txt --check-extras $(EXTRAS)
	$(PY) tools/lock.py --out constraints.txt --check-extras dev,cluster,cpu --requirements requirements.txt
	touch $(STAMP)

# The npm packages the built-in datasets render, pinned (version + sha512) in pipeline/data/datasets/npm-lock.json.
npm-lock:  ## pin every npm package the datasets use (new ones at their newest release; UPGRADE=1 moves all of them)
	$(PY) tools/npm_lock.py $(if $(UPGRADE),--upgrade)

# Tests run in TEST_WORKERS processes (pytest-xdist), one thread each; --dist loadscope keeps a module's tests on one
# worker, so a module-scoped fixture (a trained tiny run, a cache) is built once, not once per worker.
TEST_WORKERS ?= 2
test: $(STAMP)  ## run the test suite (TEST_WORKERS=2 processes)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadscope

# ---- stage 0: built-in dataset and offline teacher ---------------------------------------
# Built-in datasets: openmoji (the benchmark) and emoji-corpus (the teacher's world: six other art styles of every
# emoji from npm + openmoji's train split; its test split is openmoji's, row for row).
OPENMOJI_DIR := data/openmoji
CORPUS_DIR   := data/emoji-corpus

$(OPENMOJI_DIR)/test.parquet: | $(STAMP)
	$(CLI) build-openmoji --out $(OPENMOJI_DIR)

$(CORPUS_DIR)/test.parquet: $(OPENMOJI_DIR)/test.parquet
	$(CLI) build-corpus --out $(CORPUS_DIR) --npm-cache $(ARTIFACTS)/npm --benchmark $(OPENMOJI_DIR)

# The demo's smaller world: two of the six styles, rendered at 128 px (the demo teacher's and students' inputs
# are smaller still), + openmoji's train split; its train images are the demo student's transfer images.
DEMO_CORPUS_DIR := data/emoji-demo
DEMO_STYLES     ?= noto,twemoji
$(DEMO_CORPUS_DIR)/test.parquet: $(OPENMOJI_DIR)/test.parquet
	$(CLI) build-corpus --out $(DEMO_CORPUS_DIR) --styles $(DEMO_STYLES) --size 128 --npm-cache $(ARTIFACTS)/npm \
		--benchmark $(OPENMOJI_DIR)

# Named line icons (npm Iconify mdi, tabler, lucide; issue 14): a new domain for adaptation, and datasets of three
# sizes for the training-length check (make icons; each row of the recipe table trains on one)
ICON_DATASETS := line-icons icons-tabler icons-lucide-small
ICONS_ARGS_line-icons :=
ICONS_ARGS_icons-tabler := --sets tabler
ICONS_ARGS_icons-lucide-small := --sets lucide --limit 1200
$(foreach d,$(ICON_DATASETS),data/$(d)/test.parquet): data/%/test.parquet: | $(STAMP)
	$(CLI) build-icons --out data/$* --npm-cache $(ARTIFACTS)/npm $(ICONS_ARGS_$*)

ifeq ($(filter $(DATA_DIR),$(OPENMOJI_DIR) $(CORPUS_DIR) $(DEMO_CORPUS_DIR) $(addprefix data/,$(ICON_DATASETS))),)
$(DATA_DIR)/test.parquet:
	@echo "error: no manifests in $(DATA_DIR); build them with 'clipdistill build-manifest ... --out $(DATA_DIR)' (README)" >&2; exit 2
endif

dataset: $(DATA_DIR)/test.parquet  ## build the dataset DATASET names (openmoji; emoji-corpus = make corpus)

.PHONY: corpus icons lit-teacher
corpus: $(CORPUS_DIR)/test.parquet  ## render the multi-style emoji corpus from npm packages (the teacher's world)
icons: $(foreach d,$(ICON_DATASETS),data/$(d)/test.parquet)  ## render the line-icon datasets (issue 14)

# The LiT teacher's heads train on LIT_DATA's train split (default: DATASET; LIT_DATA=emoji-corpus: the corpus).
LIT_DATA := $(or $(LIT_DATA),$(DATASET))
LIT_FILE := $(ARTIFACTS)/teachers/lit-$(LIT_DATA).pt
# build-lit options, e.g. LIT_ARGS="--image-size 128 --epochs 20" (the demo's)
LIT_ARGS ?=

$(LIT_FILE): data/$(LIT_DATA)/test.parquet
	$(CLI) build-lit --manifest data/$(LIT_DATA)/train.parquet --out $@ $(LIT_ARGS)

lit-teacher: $(LIT_FILE)  ## train the LiT teacher's heads (frozen towers; the demo's teacher)

# The strong teacher: EfficientNet-Lite2 + MiniLM-L6 fine-tuned on the corpus pairs (configs/teacher-emoji.yaml;
# about 40 minutes on a 2-core CPU). Resumes after an interruption; the copy is its export (weights, recipe, data hash).
# teacher-zs: the same recipe on a corpus without openmoji's test concepts (the zero-shot-concept teacher).
STRONG_TEACHER := $(ARTIFACTS)/teachers/emoji-strong.pt
ZS_TEACHER     := $(ARTIFACTS)/teachers/emoji-strong-zs.pt
CORPUS_ZS_DIR  := data/emoji-corpus-zs
TEACHER_CONFIG ?= configs/teacher-emoji.yaml
TEACHER_RUNS   := $(ARTIFACTS)/teachers/runs

# $(call train_teacher,RUN NAME,CORPUS DIR[,CONFIG]): train (or resume) the run, then copy its export (checksum first).
# The run name carries the recipe (6 epochs), so changing the recipe starts a new run instead of resuming an old one.
define train_teacher
	$(CLI) distill --config $(or $(3),$(TEACHER_CONFIG)) --name $(1) --set runs_dir=$(TEACHER_RUNS) \
		--set data.manifest_dir=$(2) $(if $(wildcard $(TEACHER_RUNS)/$(1)/checkpoints/last.pt),--resume)
	cp $(TEACHER_RUNS)/$(1)/export/student.pt.blake2b $@.blake2b
	cp $(TEACHER_RUNS)/$(1)/export/student.pt $@
endef

$(STRONG_TEACHER): $(CORPUS_DIR)/test.parquet $(TEACHER_CONFIG)
	$(call train_teacher,emoji-teacher-6ep,$(CORPUS_DIR))

# The recipe at 3 epochs (its first version): the second member of the teacher ensemble (issue 13).
SHORT_TEACHER := $(ARTIFACTS)/teachers/emoji-strong-3ep.pt
$(SHORT_TEACHER): $(CORPUS_DIR)/test.parquet configs/teacher-emoji-3ep.yaml
	$(call train_teacher,emoji-teacher,$(CORPUS_DIR),configs/teacher-emoji-3ep.yaml)

$(CORPUS_ZS_DIR)/test.parquet: $(OPENMOJI_DIR)/test.parquet
	$(CLI) build-corpus --out $(CORPUS_ZS_DIR) --npm-cache $(ARTIFACTS)/npm --benchmark $(OPENMOJI_DIR) \
		--exclude-concepts $(OPENMOJI_DIR)/test.parquet

$(ZS_TEACHER): $(CORPUS_ZS_DIR)/test.parquet $(TEACHER_CONFIG)
	$(call train_teacher,emoji-teacher-zs-6ep,$(CORPUS_ZS_DIR))

.PHONY: teacher-zs teacher-3ep
teacher: $(STRONG_TEACHER)  ## train the strong teacher (use it with TEACHER=strong DATASET=emoji-corpus)
teacher-3ep: $(SHORT_TEACHER)  ## the same recipe at 3 epochs (TEACHER=strong-3ep; TEACHER=strong-ensemble: both)
teacher-zs: $(ZS_TEACHER)  ## the same teacher without openmoji's test concepts (TEACHER=strong-zs)

# ---- stage 1: teacher features ---------------------------------------------------------
# TEACHER: lit (LiT heads on DATASET), strong (the fine-tuned corpus teacher), strong-zs, strong-3ep,
# strong-ensemble (the normalised mean of strong and strong-3ep), or any spec (hf:...)
TEACHER_FILE := $(if $(filter lit,$(TEACHER)),$(LIT_FILE),$(if \
                $(filter strong,$(TEACHER)),$(STRONG_TEACHER),$(if $(filter strong-zs,$(TEACHER)),$(ZS_TEACHER),$(if \
                $(filter strong-3ep,$(TEACHER)),$(SHORT_TEACHER),$(if \
                $(filter strong-ensemble,$(TEACHER)),$(STRONG_TEACHER) $(SHORT_TEACHER))))))
TEACHER_SPEC := $(if $(filter lit,$(TEACHER)),lit:$(TEACHER_FILE),$(if \
                $(filter strong-ensemble,$(TEACHER)),ensemble:dual:$(STRONG_TEACHER)+dual:$(SHORT_TEACHER),$(if \
                $(filter strong%,$(TEACHER)),dual:$(TEACHER_FILE),$(TEACHER))))
# Path-safe folder name for a teacher spec (make targets cannot contain ':'): openclip:A/B -> openclip-A-B
# VIEWS=K also caches K augmented views per image (reinforced cache, issue 13) in a folder of its own: <teacher>-viewsK
VIEWS        ?= 0
TEACHER_NAME := $(subst /,-,$(subst :,-,$(TEACHER)))$(if $(and $(filter lit,$(TEACHER)),$(filter-out $(DATASET),$(LIT_DATA))),-$(LIT_DATA))$(if $(filter-out 0,$(VIEWS)),-views$(VIEWS))
FEATURES_STAMP := $(CACHE_DIR)/$(DATASET)/$(TEACHER_NAME)/.complete

# ENGINE=ray runs the shards on a Ray actor pool (the cluster extra): RAY_ADDRESS=auto (or HOST:PORT) joins a
# running cluster (README: several machines), unset starts a local one; RAY_WORKERS, GPUS_PER_WORKER size it.
ENGINE       ?= local
RAY_ADDRESS  ?=
RAY_WORKERS  ?=
GPUS_PER_WORKER ?= 0
RAY_ARGS     := $(if $(filter ray,$(ENGINE)),$(if $(RAY_ADDRESS),--address $(RAY_ADDRESS)) \
                $(if $(RAY_WORKERS),--ray-workers $(RAY_WORKERS)) --gpus-per-worker $(GPUS_PER_WORKER))

# SPLITS=train caches one split (e.g. a transfer set, whose val and test nothing reads)
SPLITS       ?=
$(FEATURES_STAMP): $(DATA_DIR)/test.parquet $(TEACHER_FILE)
	$(CLI) teacher-features --teacher $(TEACHER_SPEC) --manifest-dir $(DATA_DIR) --out $(CACHE_DIR)/$(DATASET)/$(TEACHER_NAME) \
		$(if $(filter-out 0,$(VIEWS)),--views $(VIEWS)) $(if $(SPLITS),--splits $(SPLITS)) --engine $(ENGINE) $(RAY_ARGS)
	touch $@

teacher-features: $(FEATURES_STAMP)  ## cache L2-normalised teacher embeddings (HDF5 shards; ENGINE=ray on a Ray cluster)

# ---- stage 2: distillation -----------------------------------------------------------------
CONFIG      ?= configs/openmoji-lite.yaml
RUN         ?= $(notdir $(basename $(CONFIG)))
RUNS_DIR    ?= runs
STUDENT_EXPORT := $(RUNS_DIR)/$(RUN)/export/student.pt

# The data and cache come from DATASET and TEACHER (the cache this rule depends on), whatever the config names.
$(STUDENT_EXPORT): $(FEATURES_STAMP) $(CONFIG)
	$(CLI) distill --config $(CONFIG) --name $(RUN) --set runs_dir=$(RUNS_DIR) \
		--set data.manifest_dir=$(DATA_DIR) --set data.cache_dir=$(CACHE_DIR)/$(DATASET)/$(TEACHER_NAME) \
		$(if $(wildcard $(RUNS_DIR)/$(RUN)/checkpoints/last.pt),--resume)

distill: $(STUDENT_EXPORT)  ## train the default student from the cache (resumes an interrupted run)

# ---- adaptation with few captions: supervised or mean-teacher fine-tuning (method.md 3) -----------
ADAPT_CONFIG ?= configs/openmoji-adapt.yaml
ADAPT_START  ?= student:$(STUDENT_EXPORT)
ADAPT_RUN    ?= $(notdir $(basename $(ADAPT_CONFIG)))
ADAPT_SET    ?=
ADAPT_EXPORT := $(RUNS_DIR)/$(ADAPT_RUN)/export/student.pt
# The default start export is built when missing, never redone because the distill inputs changed.
ADAPT_NEEDS  := $(if $(filter student:$(STUDENT_EXPORT),$(ADAPT_START)),\
                  $(if $(wildcard $(STUDENT_EXPORT)),,$(STUDENT_EXPORT)))

.PHONY: adapt
$(ADAPT_EXPORT): $(ADAPT_CONFIG) | $(DATA_DIR)/test.parquet $(ADAPT_NEEDS)
	$(CLI) adapt --config $(ADAPT_CONFIG) --name $(ADAPT_RUN) --set runs_dir=$(RUNS_DIR) \
		--set start=$(ADAPT_START) --set data.manifest_dir=$(DATA_DIR) $(foreach s,$(ADAPT_SET),--set $(s)) \
		$(if $(wildcard $(RUNS_DIR)/$(ADAPT_RUN)/checkpoints/last.pt),--resume)

adapt: $(ADAPT_EXPORT)  ## fine-tune on few captions (ADAPT_SET="mode=supervised labelled_fraction=0.1")

# ---- stage 3: evaluation --------------------------------------------------------------------
EVAL_DIR    ?= $(ARTIFACTS)/eval/$(DATASET)

eval: $(FEATURES_STAMP)  ## evaluate every finished run + the teacher; writes report.md and figures
	$(CLI) eval --cache-dir $(CACHE_DIR)/$(DATASET)/$(TEACHER_NAME) --manifest-dir $(DATA_DIR) \
		--runs-dir $(RUNS_DIR) --out $(EVAL_DIR) --teacher-spec $(TEACHER_SPEC)

# The demo (<= 10 min after the install on 2 cores): a LiT teacher on the demo world (128 px, 20 epochs of heads),
# then the default student at 96 px for 3 epochs twice on openmoji's train pairs: alone, and distilled with the
# world's caption-less images as transfer rows; RESULTS Table D has the same comparison over 3 seeds.
DEMO_LIT_ARGS ?= --image-size 128 --epochs 20
DEMO_RUNS     ?= runs/demo
DEMO_MAKE      = $(MAKE) --no-print-directory LIT_DATA=emoji-demo LIT_ARGS="$(DEMO_LIT_ARGS)" RUNS_DIR=$(DEMO_RUNS) \
                 EVAL_DIR=$(ARTIFACTS)/eval/demo

.PHONY: demo-steps
demo:  ## everything: install, openmoji, a small corpus, its LiT teacher, caches, two students (pairs / distilled), eval
	$(DEMO_MAKE) demo-steps

demo-steps: $(FEATURES_STAMP)
	$(MAKE) --no-print-directory teacher-features DATASET=emoji-demo SPLITS=train
	$(MAKE) --no-print-directory distill CONFIG=configs/demo-pairs.yaml
	$(MAKE) --no-print-directory distill CONFIG=configs/demo-distilled.yaml
	$(MAKE) --no-print-directory eval
	@echo; cat $(EVAL_DIR)/report.md
	@$(PY) tools/cite_results.py demo

# ---- experiments: many students from one cache, tables in docs/RESULTS.md ------------------------
SWEEP       ?= sweeps/openmoji.yaml
JOBS        ?= 1
EXTRA       ?=

.PHONY: experiments
experiments: $(FEATURES_STAMP)  ## train+evaluate a sweep's runs, write docs/RESULTS.md (EXTRA="--only ID --set device=cuda")
	$(CLI) experiments --sweep $(SWEEP) --jobs $(JOBS) $(EXTRA)

# ---- classification: representation head + self-distillation (method.md 4) ------------------------
# The emoji-subgroup study with the strong teacher (issue 14): RH_CONFIG=configs/emoji-subgroups-rephead.yaml
# LABELS_DIR=data/openmoji-subgroups LABEL_LEVEL=subgroup RH_TEACHER_FILE=artifacts/teachers/emoji-strong.pt
RH_CONFIG   ?= configs/openmoji-rephead.yaml
LABELS_DIR  ?= data/openmoji-groups
LABEL_LEVEL ?= group
RH_TEACHER_FILE ?= $(ARTIFACTS)/teachers/lit-openmoji.pt

.PHONY: emoji-labels teacher-tokens rephead self-distill
$(LABELS_DIR)/test.parquet: $(OPENMOJI_DIR)/test.parquet
	$(CLI) emoji-labels --manifest-dir data/openmoji --out $(LABELS_DIR) --level $(LABEL_LEVEL)

emoji-labels: $(LABELS_DIR)/test.parquet  ## openmoji manifests labelled with Unicode emoji groups (images reused)

teacher-tokens: $(LABELS_DIR)/test.parquet $(RH_TEACHER_FILE)  ## cache teacher image tokens + text embeddings (RH_CONFIG)
	$(CLI) teacher-tokens --config $(RH_CONFIG)

rephead: teacher-tokens  ## step 1: representation head (text) + linear probe (no text) on cached features
	$(CLI) rephead --config $(RH_CONFIG) --resume

self-distill: rephead  ## step 2: student generations for both teachers; results table in runs/<name>/results.md
	$(CLI) self-distill --config $(RH_CONFIG) --resume

bench: $(STAMP)  ## run the benchmarks (cache read, feature stage, distill step, evaluation)
	$(PY) bench/bench_cache.py
	$(PY) bench/bench_features.py
	$(PY) bench/bench_distill.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_startup.py

clean:  ## remove generated data and artifacts (keeps .venv)
	rm -rf $(ARTIFACTS) $(RUNS_DIR) data/openmoji/images data/openmoji/*.parquet
