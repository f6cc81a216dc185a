# fedpeft: the two commands of the README, each doing all set-up on a fresh machine.
.PHONY: demo test install

install:
	bash scripts/install.sh

demo: install  ## the main job: federated FeDeRA vs FedLR on SemEval (embedded defaults)
	.venv/bin/fedpeft compare

test: install  ## the test suite (offline, tiny random models + end-to-end Flower runs)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest -q --durations=15
