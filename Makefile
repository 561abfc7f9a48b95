# sbroker: build, test bed and demo. Run as root on Debian 12 (CI: a fresh machine, fresh clone).
#
#   make demo    install, bring the local SLURM + sshd test bed up, show how to get a shell
#   make test    install, run the whole pytest suite (cluster tests included)
#   make down    stop the test bed's daemons (only those it started)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

export DEBIAN_FRONTEND := noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK := 1

VENV   := /opt/sbroker/venv
PY     := $(VENV)/bin/python
APT_PACKAGES := slurm-wlm munge openssh-server openssh-client openssh-sftp-server bubblewrap \
	tmux rsync python3 python3-venv python3-dev sqlite3 systemd procps iproute2 util-linux
# Re-install when pyproject.toml or the package list changes; otherwise `install` is instant.
STAMP  := $(VENV)/.sbroker-installed-$(shell { cat pyproject.toml; echo '$(APT_PACKAGES)'; } | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: install test demo up down status bench clean

install: $(STAMP)

$(STAMP):
	@[ "$$(id -u)" = 0 ] || { echo "make install: run as root (apt-get, /opt/sbroker)"; exit 1; }
	@echo "== apt-get: $(APT_PACKAGES)"
	apt-get update -q
	apt-get install -y -q --no-install-recommends $(APT_PACKAGES)
	@echo "== venv $(VENV) from Debian's /usr/bin/python3 (readable by ordinary users)"
	umask 022; mkdir -p $(dir $(VENV)); [ -x $(PY) ] || /usr/bin/python3 -m venv $(VENV)
	umask 022; $(VENV)/bin/pip install -q --upgrade pip 'setuptools>=68' wheel
	umask 022; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
		rsync -a --exclude .git --exclude build --exclude '*.egg-info' --exclude __pycache__ ./ "$$tmp/src/"; \
		$(VENV)/bin/pip install -q "$$tmp/src[test]"
	rm -f $(VENV)/.sbroker-installed-*
	touch $@
	@echo "== installed"

# The whole suite, from the repo root, with the product venv's python. The cluster fixture
# brings the test bed up itself. pytest's exit code is make's exit code (5 = no tests ran = failure).
test: install
	@echo "== pytest (whole suite) with $(PY)"
	@rc=0; $(PY) -m pytest -ra $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED: pytest collected no tests (exit 5)"; fi; \
	exit $$rc

up: install
	$(PY) -m tests.cluster up

demo: install
	$(PY) -m tests.cluster demo

down:
	@if [ -x $(PY) ]; then $(PY) -m tests.cluster down; else /usr/bin/python3 -m tests.cluster down; fi

status:
	@$(PY) -m tests.cluster status

bench: install
	@if [ -f benchmarks/__main__.py ]; then $(PY) -m benchmarks; \
	else echo "make bench: no benchmarks yet (benchmarks/__main__.py does not exist)"; fi

# Removes build litter and the venv. Leaves the test bed's users and /opt/sbroker-testbed
# (run `make down` first to stop its daemons).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf $(VENV)

# The broker as a systemd service on a login node (docs/admin.md). Installs the unit, a tmpfiles
# snippet and the admin docs; does not enable or start it (write /etc/sbroker/broker.toml first).
.PHONY: install-systemd
install-systemd: install
	install -D -m 0644 systemd/sbroker.service /etc/systemd/system/sbroker.service
	install -D -m 0644 systemd/sbroker.tmpfiles /usr/lib/tmpfiles.d/sbroker.conf
	install -D -m 0644 docs/admin.md /usr/share/doc/sbroker/admin.md
	install -d -m 0755 /etc/sbroker
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	else echo "== systemd is not running here: unit installed, not loaded"; fi
	@[ -e /etc/sbroker/broker.toml ] || echo "== next: write /etc/sbroker/broker.toml (docs/admin.md), then"
	@echo "== systemctl enable --now sbroker"
