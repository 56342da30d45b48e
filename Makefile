# The two set-up commands of the README. Each creates its own virtualenv and installs what it needs.
#   make demo        prefloop quickstart: the whole loop (SFT -> annotation -> reward -> DPO -> serve -> feedback
#                    loop) on the embedded model, ending in runs/quickstart/report/report.html
#   make test        the whole test suite
#   make chat-demo   the smaller demo: fine-tune on the bundled data, chat with the result
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# 2.13.0 has a CPU build that pip finds locally here; a GPU machine gets the CUDA build from PyPI.
TORCH ?= torch==2.13.0
RUNS ?= runs/demo

.PHONY: demo chat-demo test lint install

$(BIN)/prefloop: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/prefloop

install: $(BIN)/prefloop

demo: install
	$(BIN)/prefloop quickstart

chat-demo: install
	$(BIN)/prefloop models pull smollm2-135m-instruct
	$(BIN)/prefloop train sft --config configs/sft.yaml --set output_dir=$(RUNS)/sft
	$(BIN)/prefloop chat --adapter $(RUNS)/sft "What is the capital of Peru?"

test: install
	$(BIN)/python -m tests.setup_test_env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
