# The two set-up commands of the README. Both create/reuse .venv and install psp-fl first.
PROFILE ?= demo
OUT ?= out/$(PROFILE)
# Test processes: the real-process fault and deployment tests mostly wait on Flower's polling, so a second
# worker runs the CPU-bound files meanwhile. Whole files go to one worker (their module fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: demo test setup

setup:
	@./scripts/setup.sh

demo: setup
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 .venv/bin/psp-sim run --profile $(PROFILE) --out $(OUT)

test: setup
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 .venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile
