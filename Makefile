# The two commands of the README: `make serve` and `make test`. Both create (or reuse) .venv/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: on the project's CPU machines 2.13.0 is the CPU build on disk (an unpinned
# torch would pull a multi-GB CUDA build); on a GPU machine the same pin takes the CUDA build from PyPI.
TORCH ?= torch==2.13.0

.PHONY: serve demo test venv bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# The server on the built-in tiny model: a local multi-node Ray cluster when none is running, one attention
# shard and two expert shards on separate nodes, the OpenAI API on :8000 and gRPC on :9000, until Ctrl-C.
serve: $(BIN)/.installed
	$(BIN)/latentmoe serve

# One generation on a local multi-node cluster (a head, one attention node, two expert nodes), then stop it.
demo: $(BIN)/.installed
	$(BIN)/latentmoe cluster start --attention-nodes 1 --expert-nodes 2
	$(BIN)/latentmoe generate --prompt "The experts of a mixture" --max-tokens 32 \
		--attention-shards 1 --expert-shards 2; status=$$?; $(BIN)/latentmoe cluster stop; exit $$status

# The system packages the tests need (sshd, rsync, chromium, prometheus): installed when root with apt-get,
# otherwise scripts/setup-system.sh prints the command to run.
test: $(BIN)/.installed
	scripts/setup-system.sh
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
