# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo study study-data-quality study-ladder bench clean

# compat: the checkout itself on sys.path, so Hydra finds glam's sweeper in hydra_plugins/
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

# The tests not marked slow (no CLI training, multirun or multi-process run): about 3 minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "not slow"

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

bench: $(STAMP)
	$(BIN)/glam-bench

study: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/study.sh

# GLaM's data-quality study at 2.5x the demo's budget, 3 seeds: docs/results/study_data_quality/.
study-data-quality: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" STUDY=study_data_quality bash scripts/study.sh

# A scaling ladder (3 sizes x 3 token budgets x dense/MoE) for glam-plan --budget:
# docs/results/study_ladder/.
study-ladder: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" STUDY=study_ladder bash scripts/study.sh

clean:
	rm -rf $(VENV) outputs mlflow.db mlflow.db.lock mlflow.db-journal .pytest_cache build dist
