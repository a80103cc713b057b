# The two commands a newcomer needs, on a fresh Debian machine as root:
#   make run    set up, then run probe + daemon in the foreground
#   make test   set up, then run the whole test suite (kernel tests included)
VENV := .venv
PYTEST_ARGS ?=

.PHONY: setup run test bench

setup:
	@sh scripts/setup.sh

run: setup
	$(VENV)/bin/agentwarden up

test: setup
	$(VENV)/bin/python -m pytest -v $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/run.py
