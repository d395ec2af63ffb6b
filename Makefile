# Two commands for a fresh machine with Python 3.11 and make: `make demo` and `make test`
# (and `make demo-keypoints`, the Keypoint R-CNN demo on stick figures).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.installed-base
TEST   := $(VENV)/.installed-test
# Two workers (the CI machine's two cores), a test file per worker at a time: tests/conftest.py
# orders the files longest first. PYTEST_ARGS= runs in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile
DEMO_DIR ?= demo_out
DEMO_KEYPOINTS_DIR ?= demo_keypoints_out

.PHONY: test demo demo-keypoints venv clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need Python 3.11 on PATH (or: make PYTHON=/path/to/python3.11 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo needs the package with tf.data and COCO tools; the tests add torch/torchvision for
# parity checks. Each step reruns when pyproject.toml changes.
$(BASE): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[all]"
	@touch $(BASE)

$(TEST): pyproject.toml $(BASE)
	$(PY) -m pip install -q -e ".[test]"
	@touch $(TEST)

venv: $(TEST)

test: $(TEST)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(BASE)
	$(PY) -m mrcnn_jax.cli demo --workdir $(DEMO_DIR)

demo-keypoints: $(BASE)
	$(PY) -m mrcnn_jax.cli demo --task keypoints --workdir $(DEMO_KEYPOINTS_DIR)

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_DIR) $(DEMO_KEYPOINTS_DIR)
