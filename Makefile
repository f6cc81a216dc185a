# fedpeft: the two commands of the README, each doing all set-up on a fresh machine.
.PHONY: demo test install

install:
	bash scripts/install.sh

demo: install  ## the main job: federated FeDeRA vs FedLR on SemEval (embedded defaults)
	.venv/bin/fedpeft compare

# Test processes (pytest-xdist): most of the suite's time is end-to-end runs in subprocesses
# (Flower simulation, loopback deployments) that wait on process start-up as much as they
# compute, so two in parallel nearly halve it on a 2-core machine. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

test: install  ## the test suite (offline, tiny random models + end-to-end Flower runs)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest -q -n $(TEST_WORKERS) \
	  --durations=15
