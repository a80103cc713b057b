# The two commands a newcomer needs, on a fresh Debian machine as root:
#   make run    set up, then run probe + daemon in the foreground
#   make test   set up, then run the whole test suite (kernel tests included)
# Packaging:
#   make deb           dist/agentwarden_<version>_all.deb (DEB_VERSION=... to override)
#   make systemd-test  the .deb installed, upgraded, removed and purged under a
#                      real systemd (a booted bookworm container)
VENV := .venv
PYTEST_ARGS ?=

.PHONY: setup run test bench deb systemd-test

setup:
	@sh scripts/setup.sh

run: setup
	$(VENV)/bin/agentwarden up

test: setup
	$(VENV)/bin/python -m pytest -v $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/run.py

deb:
	@sh packaging/build-deb.sh

systemd-test:
	@bash tests/systemd/run.sh
