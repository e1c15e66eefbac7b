# The two set-up commands of the README. Both create/reuse .venv and install psp-fl first.
PROFILE ?= demo
OUT ?= out/$(PROFILE)

.PHONY: demo test setup

setup:
	@./scripts/setup.sh

demo: setup
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 .venv/bin/psp-sim run --profile $(PROFILE) --out $(OUT)

test: setup
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 .venv/bin/python -m pytest
