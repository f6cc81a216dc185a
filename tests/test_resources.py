"""sim-workers=auto: the workers, threads and GPU shares a simulation asks Ray for."""

import pytest

from fedpeft.config import ConfigError, load_config
from fedpeft.federation.resources import plan_resources


def _plan(*overrides, **machine):
    return plan_resources(load_config(None, list(overrides)), **machine)


def test_auto_on_a_cpu_is_one_worker_per_core_within_the_round_and_the_memory():
    plan = _plan(cores=2, gpus=0, memory_gib=24)  # this project's machine: measured 1.28x
    assert (plan.workers, plan.threads, plan.cpus, plan.gpus) == (2, 1, 1, 0.0)
    plan = _plan(cores=16, gpus=0, memory_gib=64)  # no more workers than clients per round
    assert (plan.workers, plan.threads) == (10, 1)
    assert (_plan("clients-per-round=1", cores=16, gpus=0, memory_gib=64).workers) == 1
    plan = _plan(cores=16, gpus=0, memory_gib=4)  # 3/4 of 4 GiB holds one 2-GiB encoder worker
    assert (plan.workers, plan.threads) == (1, 16)


def test_auto_gives_a_decoder_fewer_workers_each_holding_its_causal_lm():
    from fedpeft.federation.resources import WORKER_GIB

    plan = _plan("task=squad-gen", "model=smollm2-135m", cores=16, gpus=0, memory_gib=24)
    assert plan.workers == int(0.75 * 24 / WORKER_GIB["decoder"]) == 2
    assert plan.threads == 8
    assert _plan("task=squad-gen", cores=16, gpus=0, memory_gib=8).workers == 1


def test_a_number_of_workers_shares_the_cores_and_threads_win():
    assert (_plan("sim-workers=1", cores=2, gpus=0).threads) == 2
    plan = _plan("sim-workers=4", "threads=3", cores=16, gpus=0)
    assert (plan.workers, plan.threads, plan.cpus) == (4, 3, 4)


@pytest.mark.parametrize(("share", "workers", "gpus"), [(None, 4, 1.0), ("0.5", 8, 0.5),
                                                         ("0.25", 16, 0.25)])
def test_cuda_spreads_workers_over_the_gpus(share, workers, gpus, monkeypatch):
    import fedpeft.federation.resources as resources

    monkeypatch.setattr(resources, "_gpu_count", lambda: 4)
    extra = [f"sim-gpus-per-worker={share}"] if share else []
    cfg = load_config(None, ["device=auto", *extra])
    plan = plan_resources(cfg, cores=16)
    assert (plan.workers, plan.gpus, plan.cpus) == (workers, gpus, max(1, 16 // workers))
    from fedpeft.federation.simulation import backend_config

    monkeypatch.setattr("fedpeft.federation.simulation.plan_resources", lambda c: plan)
    backend = backend_config(cfg)
    assert backend["client_resources"] == {"num_cpus": plan.cpus, "num_gpus": gpus}
    assert backend["init_args"]["num_gpus"] == 4


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_worker_counts_are_refused(value):
    with pytest.raises(ConfigError, match="sim-workers must be auto or a number > 0"):
        load_config(None, [f"sim-workers={value}"])
