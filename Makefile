# Two commands matter: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the tests drive as real clients and servers.
TEST_DEBS := openssl curl haproxy
# tests/test_upstream_outcome.py: nginx as a TLS backend, http and stream.
TEST_DEBS += nginx-light libnginx-mod-stream
# ... and Java's TLS stack (JSSE), run from source: a JDK, not only a JRE.
TEST_DEBS += openjdk-17-jdk-headless
# tests/test_egress_outcomes.py: stunnel, what it tells an app when its upstream fails.
TEST_DEBS += stunnel4
# deploy/ checks: promtool and a real Prometheus server; systemd-analyze.
TEST_DEBS += prometheus systemd

.PHONY: run test lint typecheck pytest fuzz system-deps bench soak scale workers instructions clean image image-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/tlsproxy run

system-deps:
	@missing=""; \
	for deb in $(TEST_DEBS); do \
		dpkg -s $$deb >/dev/null 2>&1 || missing="$$missing $$deb"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy proxy tests benchmarks

# sslyze pins an older cryptography than tlsproxy: its own virtualenv, with
# the pin read from pyproject.toml's `scan` extra.
SSLYZE := $(VENV)/tools/sslyze/bin/sslyze
$(SSLYZE): pyproject.toml | $(BIN)/python
	$(PYTHON) -m venv $(VENV)/tools/sslyze
	$(VENV)/tools/sslyze/bin/pip install --quiet \
		"$$(sed -n 's/^scan = \["\(sslyze==[^"]*\)"\]/\1/p' pyproject.toml)"
	touch $@

pytest: system-deps $(VENV)/.installed-dev $(SSLYZE)
	TLSPROXY_REQUIRE_SSLYZE=1 $(BIN)/pytest

test: lint typecheck pytest

# A long random campaign of the property-based tests (tests/test_fuzz_*.py,
# which `make test` runs on a short fixed-seed budget): the ClientHello
# reader, parser and JA4, and the config loader, 10 000 inputs each (about
# four minutes; not part of `make test`). Ends with the inputs tried and the
# failures found per target; the full log is in $(VENV)/fuzz.log.
FUZZ_LOG := $(VENV)/fuzz.log
fuzz: system-deps $(VENV)/.installed-dev
	@HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -p no:cacheprovider --timeout=1800 \
		--hypothesis-show-statistics tests/test_fuzz_clienthello.py tests/test_fuzz_config.py \
		>$(FUZZ_LOG) 2>&1; \
	status=$$?; \
	grep -E '^(FAILED|ERROR)|(passed|failed|error)[^ ]* in ' $(FUZZ_LOG); \
	echo "inputs tried and failures found, per target:"; \
	awk '/::test_.*:$$/ { target = $$1 } \
		/ passing, / { sub(/^ *- /, ""); print "  " target " " $$0 }' $(FUZZ_LOG); \
	exit $$status

# The side-by-side benchmark against stunnel, HAProxy and hitch, both
# directions (ingress: TLS in; egress: TLS out, against stunnel and HAProxy)
# and both certificate types (about twenty minutes); writes BENCHMARKS.md.
# ARGS="--direction egress --cert ecdsa" runs a part of it.
BENCH_DEBS := openssl nginx-light wrk util-linux stunnel4 haproxy hitch
bench: $(VENV)/.installed-dev
	$(MAKE) system-deps TEST_DEBS="$(BENCH_DEBS)"
	$(BIN)/python -m benchmarks.report $(ARGS)

# Ten minutes of connection churn against the real daemon (not part of
# `make test`); fails if RSS grows 5 % or more between minute 2 and 10.
soak: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.soak --minutes 10

# 10 000 established TLS connections in one worker (fewer where the
# descriptor hard limit cannot hold them; the output says so) and the rate of
# new full handshakes with them held, against the rate with none (about a
# minute; not part of `make test`).
scale: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.scale

# workers = 1 against workers = 2 on handshakes per second, RSA-4096 so that
# the load side stays small, against what the machine itself scales (about
# three minutes; not part of `make test`).
workers: $(VENV)/.installed-dev
	$(MAKE) system-deps TEST_DEBS="openssl nginx-light wrk"
	$(BIN)/python -m benchmarks.workers

# Instructions per full-handshake connection under valgrind's callgrind,
# tlsproxy against HAProxy, split by shared object: repeatable where CPU-time
# figures on a shared machine are not (about a minute; not part of `make
# test`). More options in ARGS, e.g. `make instructions ARGS="--cert rsa"`;
# `ARGS="--keep-alive 100"` for 100 requests per connection (and the figure
# per request), `ARGS="--direction egress"` for plain in and TLS out,
# `ARGS="--tree DIR"` to measure another tlsproxy source tree.
instructions: $(VENV)/.installed-dev
	$(MAKE) system-deps TEST_DEBS="nginx-light util-linux valgrind haproxy"
	$(BIN)/python -m benchmarks.instructions $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# The container image, built where no registry is reachable: a debootstrapped
# Debian base and buildah (root). With a registry, `docker build .` is enough.
image:
	$(MAKE) system-deps TEST_DEBS="buildah debootstrap"
	deploy/docker/build-offline.sh localhost/tlsproxy:dev

# Build the image, then run it: its own root filesystem, read-only, as PID 1
# and its user, serving TLS and draining on SIGTERM (root; not part of
# `make test`).
image-test: image $(VENV)/.installed-dev
	TLSPROXY_IMAGE=localhost/tlsproxy:dev $(BIN)/pytest -p no:cacheprovider tests/test_deploy_image.py
