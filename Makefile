# Set-up and everyday commands. `make test` and `make app` build the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Training on this 2-core CPU: two one-thread processes take more steps than one two-thread process (docs/TRAINING.md).
TRAIN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m train
DATA ?= $(or $(DIGIT_READER_DATA),data)
export DIGIT_READER_DATA := $(DATA)

.PHONY: setup test lint fuzz app read eval eval-views classifier train race finetune calibrate bench-train bench-inputs benchmark screenshots clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

fuzz: setup
	FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/test_fuzz.py

app: setup
	$(VENV)/bin/streamlit run app.py

read: setup
	$(PY) -m model.read examples/*.png

eval: setup
	$(PY) -m train.evaluate --suites all --n 2000 --beam 4 --beam-n 300 --out docs/eval

eval-views: setup  # as the app reads: from three views of each image (model.pipeline.VIEW_SCALES), with a beam of 4 on 300 a suite
	$(PY) -m train.evaluate --suites all --n 1000 --views --beam 4 --beam-n 300 --out docs/eval-views

classifier: setup
	$(TRAIN) --preset classifier --out runs/classifier

train: setup
	$(TRAIN) --preset default --out runs/default

race: setup
	$(TRAIN) --preset race --out runs/race

finetune: setup  # after `make train`: an hour more from its weights (checkpoint v9 is v5, then this)
	$(TRAIN) --preset finetune --out runs/finetune

calibrate: setup
	$(PY) -m train.calibrate --checkpoint checkpoints/digit-reader.safetensors --n 300

bench-train: setup
	$(PY) -m benchmarks.training

bench-inputs: setup
	$(PY) -m benchmarks.bad_inputs

benchmark: setup
	$(PY) -m benchmarks.decoding

screenshots: setup
	DIGIT_READER_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q tests/test_browser.py

clean:
	rm -rf $(VENV) .pytest_cache out
