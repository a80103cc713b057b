# The two commands a newcomer needs, on a fresh Debian machine as root:
#   make run    set up, then run probe + daemon in the foreground
#   make test   set up, then run the whole test suite (kernel tests included)
# Packaging:
#   make deb           dist/agentwarden_<version>_<arch>.deb (DEB_VERSION=... to override)
#   make systemd-test  the .deb installed, upgraded, removed and purged under a
#                      real systemd (a booted bookworm container)
VENV := .venv
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup run test bench bench-archive bench-notify bench-restart bench-drift bench-kill bench-fleet fleet-demo archive-soak deb systemd-test

setup:
	@sh scripts/setup.sh

run: setup
	$(VENV)/bin/agentwarden up

test: setup
	$(VENV)/bin/python -m pytest -v --durations=30 $(PYTEST_ARGS)

# Measures, prints, saves bench/results/ and rewrites docs/benchmarks.md's blocks
# (BENCH_ARGS="--quick" for a short run; see bench/run.py --help).
bench: setup
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# Archive figures: records/s appended and verified, bytes per exec and open on disk;
# its block of docs/benchmarks.md likewise.
bench-archive: setup
	$(VENV)/bin/python bench/archive.py

# Hold to notification delivered (notify_command and notify_webhook), median and
# p99 over 50 holds (root); the notify block of docs/benchmarks.md likewise.
bench-notify: setup
	$(VENV)/bin/python bench/notify.py

# Drift: a tracked write's added cost under run, the store's size for 1,000
# changes to a 10 KB file (root); the drift block of docs/benchmarks.md likewise.
bench-drift: setup
	$(VENV)/bin/python bench/drift.py
# The fleet on a local three-node NATS cluster: records/s shipped with nothing lost,
# hold -> visible in `fleet holds` -> approved and running (root); its block of
# docs/benchmarks.md likewise.
bench-fleet: setup
	$(VENV)/bin/python bench/fleet.py $(BENCH_ARGS)

# A local three-node NATS cluster, the collector and two agentwarden instances
# (hosts demo-a, demo-b) to watch the fleet work (root; Ctrl-C stops it all).
fleet-demo: setup
	$(VENV)/bin/python scripts/fleet-demo.py
# The daemon-restart gap as a session sees it (kill -9 → first exec decided),
# median over 5 restarts (root); the restart block of docs/benchmarks.md likewise.
bench-restart: setup
	$(VENV)/bin/python bench/restart.py
bench-flood: setup ; $(VENV)/bin/python bench/flood.py $(BENCH_ARGS)

# Violation to process gone alone, 200 trials a path, for a p99 (TRIALS=n for another count).
bench-kill: setup
	$(VENV)/bin/python bench/kill.py --trials $(or $(TRIALS),200)

# The kill -9 crash test, 500 times (ITERATIONS=n for another count).
archive-soak: setup
	AGENTWARDEN_CRASH_ITERATIONS=$${ITERATIONS:-500} $(VENV)/bin/python -m pytest -q -s tests/test_archive_crash.py

deb:
	@sh packaging/build-deb.sh

systemd-test:
	@bash tests/systemd/run.sh
