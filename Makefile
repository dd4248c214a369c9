# Two commands do all the set-up on a fresh machine (Python 3.10+, a C++17 compiler):
#   make demo   trains a small MoE classifier and prints its held-out accuracy
#   make test   runs the test suite
# Each creates .venv, installs torch (CPU build by default), builds moefast._C and the extras.
# Override TORCH to use another build, e.g. `make test TORCH='torch==2.14.1'`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
STAMP := $(VENV)/.moefast-installed

.PHONY: demo test lint format native-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstall when the build inputs change.
$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/include/*/*.h)
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet setuptools wheel ninja pybind11 numpy
	MAX_JOBS=$(JOBS) $(PIP) install --quiet --no-build-isolation -e ".[test,demo,dev,transformers,research]"
	$(PIP) install --quiet --no-deps cifar-10-model
	@# Fashion-MNIST ships in a Debian package; without root or apt-get the tests that need it skip.
	-@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || echo "dataset-fashion-mnist not installed: its tests will skip"; fi
	@touch $@

demo: $(STAMP)
	$(PY) -m moefast.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check moefast tests bench setup.py
	$(VENV)/bin/ruff format --check moefast tests bench setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(shell git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')

format: $(STAMP)
	$(VENV)/bin/ruff check --fix moefast tests bench setup.py
	$(VENV)/bin/ruff format moefast tests bench setup.py
	$(VENV)/bin/clang-format -i $(shell git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')

# Native unit tests of csrc/include and the CPU kernels: once plain, once with ASan + UBSan.
native-test:
	cmake -S . -B build/native -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build build/native -j $(JOBS)
	ctest --test-dir build/native --output-on-failure
	cmake -S . -B build/native-sanitize -DCMAKE_BUILD_TYPE=Debug -DMOEFAST_SANITIZE=ON
	cmake --build build/native-sanitize -j $(JOBS)
	ctest --test-dir build/native-sanitize --output-on-failure

bench: $(STAMP)
	$(PY) -m pytest bench -q

clean:
	rm -rf build $(VENV) moefast/_C*.so *.egg-info
