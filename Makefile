# The README's two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-plain test-all lint format bench bench-quick system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,redis,amqp,http,cron]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/msgd -c examples/msgd.toml

test: $(STAMP) system-deps lint test-plain
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The way users install msgd: `pip install .`, no extras. The spool suites run again there, so
# that a missing optional library can never hide behind the development environment.
PLAIN := .venv-plain
PLAIN_TESTS := tests/test_extras.py tests/test_core.py tests/test_messages.py
test-plain: $(PLAIN)/.installed
	$(PLAIN)/bin/python -m pip install -q --no-deps --no-build-isolation --force-reinstall .
	$(PLAIN)/bin/python -m pytest -q -p no:cacheprovider -n 2 $(PLAIN_TESTS)

$(PLAIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PLAIN)
	$(PLAIN)/bin/python -m pip install -q . "setuptools>=68" "pytest>=8.0" "pytest-timeout>=2.2" \
	  "pytest-xdist>=3.5"
	touch $@

# The long fault-injection runs too (100 worker kills in a 10,000-message stream, ...).
test-all: $(STAMP) system-deps
	$(PY) -m pytest -q -m ''

# Programs the tests drive, as program:Debian package: redis-server and rabbitmq-server (the Redis
# and AMQP backends), logrotate (the packaged snippet), systemd-nspawn (the unit under a real
# systemd), fusermount3 (the power-cut disk), chromium (the dashboard), prometheus (a real scrape).
# Installed when root; otherwise those tests skip and say why.
SYSTEM_PROGRAMS := redis-server:redis-server logrotate:logrotate \
  rabbitmq-server:rabbitmq-server systemd-nspawn:systemd-container fusermount3:fuse3 \
  chromium:chromium prometheus:prometheus
# Libraries, as library:Debian package: libfuse 2, which fusepy (the power-cut disk's server) loads.
SYSTEM_LIBRARIES := libfuse.so.2:libfuse2
system-deps:
	@missing=""; for p in $(SYSTEM_PROGRAMS); do \
	  command -v $${p%%:*} >/dev/null || missing="$$missing $${p#*:}"; done; \
	for l in $(SYSTEM_LIBRARIES); do \
	  ldconfig -p | grep -q "$${l%%:*}" || missing="$$missing $${l#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing$$missing and not root; their tests will be skipped"; fi; fi

lint: $(STAMP)
	$(PY) -m ruff check daemon ctl tests bench
	$(PY) -m ruff format --check daemon ctl tests bench
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format daemon ctl tests bench

bench: $(STAMP) system-deps
	$(PY) bench/run.py

bench-quick: $(STAMP) system-deps
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) $(PLAIN) .venv-bench examples/var
