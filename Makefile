# Every target creates .venv on first use, so `make demo` and `make test` are the only
# set-up a fresh machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,metrics,kafka,postgres]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/onceflow demo

# Two pytest processes, whole files each (module fixtures run once): most tests wait on
# a broker's session timeouts or a server, so the two cores are used twice over.
test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench infra examples
	$(BIN)/ruff format --check src tests bench infra examples
	$(BIN)/mypy

bench: $(STAMP)
	bash bench/make_baseline_venv.sh bytewax 0.21.1
	$(BIN)/python bench/bench_embedded.py

bench-quick: $(STAMP)
	$(BIN)/python bench/bench_embedded.py --quick --no-bytewax

clean:
	rm -rf $(VENV) .venv-bytewax demo-data
