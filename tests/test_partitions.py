"""The ``partition=`` schemes: balanced Dirichlet (FeDeRA), per-class Dirichlet, IID, shards,
quantity skew; their settings and errors. The flwr-datasets ones are checked against the
partitioners' own output."""

import dataclasses

import numpy as np
import pytest

from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.partition import (
    Partition,
    PartitionError,
    check_partition_settings,
    describe,
    dirichlet_partition,
    dirichlet_sizes,
    jensen_shannon,
    make_partition,
    mean_pairwise_js,
    partition_summary,
)

# One configuration per scheme (quantity twice: Dirichlet sizes and power law).
SCHEMES = {
    "balanced-dirichlet": dict(partition="balanced-dirichlet", alpha=0.5),
    "dirichlet": dict(partition="dirichlet", alpha=0.5),
    "iid": dict(partition="iid"),
    "shards": dict(partition="shards", classes_per_client=2),
    "quantity-alpha": dict(partition="quantity", quantity_alpha=1.0),
    "quantity-exponent": dict(partition="quantity", quantity_exponent=1.0),
}


def labels(counts: dict[str, int]) -> list[str]:
    # Interleaved, as a real data file would be, not sorted by class.
    y = [c for c, n in counts.items() for _ in range(n)]
    return [y[i] for i in np.random.default_rng(123).permutation(len(y))]


def cfg(num_clients: int = 10, seed: int = 0, min_size: int = 1, **settings) -> RunConfig:
    out = dataclasses.replace(RunConfig(), num_clients=num_clients,
                              clients_per_round=min(num_clients, 10), seed=seed,
                              min_size=min_size, **settings)
    check_partition_settings(out)
    return out


def same(p: Partition, q: Partition) -> bool:
    return len(p.clients) == len(q.clients) and all(
        np.array_equal(a, b) for a, b in zip(p.clients, q.clients, strict=True))


Y = labels({str(c): 60 + 10 * c for c in range(5)})  # 5 classes, 400 examples


@pytest.mark.parametrize("name", SCHEMES)
def test_every_example_assigned_exactly_once(name):
    part = make_partition(Y, cfg(**SCHEMES[name]))
    everything = np.concatenate(part.clients)
    assert sorted(everything.tolist()) == list(range(len(Y)))
    assert len(part.clients) == 10 and part.classes == sorted(set(Y))
    for j, idx in enumerate(part.clients):  # histograms count the assigned examples' classes
        assert np.all(np.diff(idx) > 0)
        for k, name_k in enumerate(part.classes):
            assert part.histograms[j, k] == sum(1 for i in idx if Y[i] == name_k)


@pytest.mark.parametrize("name", SCHEMES)
def test_deterministic_for_a_seed_and_different_across_seeds(name):
    p1 = make_partition(Y, cfg(seed=7, **SCHEMES[name]))
    p2 = make_partition(list(Y), cfg(seed=7, **SCHEMES[name]))
    p3 = make_partition(Y, cfg(seed=8, **SCHEMES[name]))
    assert same(p1, p2) and np.array_equal(p1.histograms, p2.histograms)
    assert not same(p1, p3)


def test_balanced_dirichlet_is_unchanged():
    # The default scheme is today's dirichlet_partition, number for number.
    assert RunConfig().partition == "balanced-dirichlet"
    for seed, alpha in [(0, 1.0), (3, 0.1)]:
        got = make_partition(Y, cfg(num_clients=8, seed=seed, min_size=2, alpha=alpha))
        want = dirichlet_partition(Y, 8, alpha, seed, 2)
        assert same(got, want) and np.array_equal(got.histograms, want.histograms)


def test_iid_is_close_to_the_global_class_mix():
    y = labels({str(c): 400 for c in range(8)})
    part = make_partition(y, cfg(num_clients=8, partition="iid"))
    assert part.sizes().tolist() == [400] * 8
    overall = part.histograms.sum(axis=0)
    assert max(jensen_shannon(h, overall) for h in part.histograms) < 0.02
    assert mean_pairwise_js(part.histograms) < 0.03
    skewed = make_partition(y, cfg(num_clients=8, partition="dirichlet", alpha=0.1))
    assert mean_pairwise_js(skewed.histograms) > 10 * mean_pairwise_js(part.histograms)


def test_shards_give_exactly_k_classes_per_client():
    for k in (1, 2, 3):
        part = make_partition(Y, cfg(num_clients=10, partition="shards", classes_per_client=k))
        assert ((part.histograms > 0).sum(axis=1) == k).all()
        # Each class is split evenly (to one example) among the clients that hold it.
        for c in range(len(part.classes)):
            column = part.histograms[:, c]
            held = column[column > 0]
            assert held.max() - held.min() <= 1
        assert "classes per client: min %d  mean %.1f  max %d" % (k, k, k) in describe(part)


def test_shards_that_leave_a_class_without_client_are_an_error():
    # Two clients holding one class each cannot hold five classes: examples would be dropped.
    with pytest.raises(PartitionError, match="would go to no client.*no client holds"):
        make_partition(Y, cfg(num_clients=2, partition="shards", classes_per_client=1))
    with pytest.raises(PartitionError, match="classes-per-client=6"):
        make_partition(Y, cfg(num_clients=10, partition="shards", classes_per_client=6))


def test_quantity_power_law_hand_checked():
    y = labels({"a": 50, "b": 50})
    part = make_partition(y, cfg(num_clients=4, partition="quantity", quantity_exponent=1.0))
    assert part.sizes().tolist() == [10, 20, 30, 40]  # shares 1:2:3:4 of 100
    y = labels({"a": 70, "b": 70})
    part = make_partition(y, cfg(num_clients=3, partition="quantity", quantity_exponent=2.0))
    assert part.sizes().tolist() == [10, 40, 90]  # shares 1:4:9 of 140


def test_quantity_dirichlet_sizes_follow_the_draw():
    y = labels({str(c): 250 for c in range(4)})  # 1000 examples
    part = make_partition(y, cfg(num_clients=5, seed=4, partition="quantity", quantity_alpha=1.0))
    share = np.random.default_rng(4).dirichlet(np.ones(5)) * 1000  # the generator's first draw
    sizes = part.sizes()
    assert sizes.sum() == 1000 and np.all(np.abs(sizes - share) < 1)
    assert np.array_equal(sizes, dirichlet_sizes(1000, 5, 1.0, seed=4))
    # Rounding by largest remainders: floor, then one more for the largest fractional parts.
    floor = np.floor(share).astype(int)
    extra = 1000 - floor.sum()
    expected = floor.copy()
    expected[np.argsort(-(share - floor), kind="stable")[:extra]] += 1
    assert sizes.tolist() == expected.tolist()
    # Smaller quantity-alpha: more unequal sizes; the label mix stays near the global one.
    y = labels({str(c): 1000 for c in range(4)})
    spread = [make_partition(y, cfg(num_clients=10, partition="quantity", quantity_alpha=a))
              .sizes().std() for a in (100.0, 1.0)]
    assert spread[0] < spread[1]
    part = make_partition(y, cfg(num_clients=10, partition="quantity", quantity_alpha=1.0))
    big = part.histograms[part.sizes() >= 200]
    assert len(big) and max(jensen_shannon(h, part.histograms.sum(0)) for h in big) < 0.05


def test_quantity_dirichlet_honours_min_size():
    # Seed 0's first draw of 10 sizes of 400 examples has a client of 12 < min-size=20: it is
    # redrawn, and every client then has min-size examples.
    assert dirichlet_sizes(400, 10, 5.0, seed=0).min() == 12
    part = make_partition(Y, cfg(num_clients=10, min_size=20, partition="quantity",
                                 quantity_alpha=5.0))
    assert part.sizes().min() >= 20 and part.sizes().sum() == len(Y)
    with pytest.raises(PartitionError, match="fewer than min-size=30"):
        make_partition(Y, cfg(num_clients=10, min_size=30, partition="quantity",
                              quantity_alpha=0.05))


def test_per_class_dirichlet_heterogeneity_grows_as_alpha_falls():
    y = labels({str(c): 300 for c in range(10)})
    js = [mean_pairwise_js(make_partition(y, cfg(num_clients=10, partition="dirichlet",
                                                 alpha=a)).histograms)
          for a in (100.0, 1.0, 0.1)]
    assert js[0] < 0.05 and js[0] < js[1] < js[2]
    # Unlike balanced-dirichlet, client sizes vary.
    part = make_partition(y, cfg(num_clients=10, partition="dirichlet", alpha=0.5))
    assert part.sizes().max() > 1.5 * part.sizes().min()


def flwr_reference(y, partitioner, seed):
    """What flwr-datasets gives on its own: FederatedDataset's shuffle, then the partitioner."""
    from datasets import Dataset

    dataset = Dataset.from_list([{"label": sorted(set(y)).index(c), "id": i}
                                 for i, c in enumerate(y)]).shuffle(seed=seed)
    partitioner.dataset = dataset
    return [sorted(partitioner.load_partition(j)["id"]) for j in range(partitioner.num_partitions)]


def test_schemes_are_flwr_datasets_own_partitioners():
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        LinearPartitioner,
        PathologicalPartitioner,
        SquarePartitioner,
    )

    cases = [
        (dict(partition="dirichlet", alpha=0.3),
         DirichletPartitioner(10, "label", alpha=0.3, min_partition_size=1, seed=5)),
        (dict(partition="iid"), IidPartitioner(10)),
        (dict(partition="shards", classes_per_client=2),
         PathologicalPartitioner(10, "label", 2, "first-deterministic", seed=5)),
        (dict(partition="quantity", quantity_exponent=1.0), LinearPartitioner(10)),
        (dict(partition="quantity", quantity_exponent=2.0), SquarePartitioner(10)),
    ]
    for settings, partitioner in cases:
        ours = make_partition(Y, cfg(num_clients=10, seed=5, **settings))
        assert [c.tolist() for c in ours.clients] == flwr_reference(Y, partitioner, 5), settings


def test_dirichlet_calls_flwr_datasets(monkeypatch):
    import flwr_datasets.partitioner as fp

    calls = []
    real = fp.DirichletPartitioner

    class Spy(real):
        def __init__(self, *args, **kwargs):
            calls.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fp, "DirichletPartitioner", Spy)
    make_partition(Y, cfg(num_clients=6, seed=3, min_size=4, partition="dirichlet", alpha=0.7))
    assert calls == [dict(num_partitions=6, partition_by="label", alpha=0.7,
                          min_partition_size=4, self_balancing=False, shuffle=True, seed=3)]


@pytest.mark.parametrize("name", SCHEMES)
def test_too_few_examples_for_min_size(name):
    with pytest.raises(PartitionError, match="min-size=90"):
        make_partition(Y, cfg(num_clients=10, min_size=90, **SCHEMES[name]))


def test_per_class_dirichlet_below_min_size_is_a_partition_error():
    # alpha tiny: some client nearly always ends with (almost) nothing; flwr-datasets redraws
    # 10 times, then we report it.
    y = labels({str(c): 30 for c in range(3)})
    with pytest.raises(PartitionError, match="partition=dirichlet alpha=0.01.*min-size=8"):
        make_partition(y, cfg(num_clients=9, min_size=8, partition="dirichlet", alpha=0.01))


def test_config_errors_name_the_key_and_the_choices():
    base = RunConfig()

    def check(**settings):
        check_partition_settings(dataclasses.replace(base, **settings))

    with pytest.raises(ConfigError, match="partition='dirichelt' is unknown; choose from "
                                          "balanced-dirichlet, dirichlet, iid, shards, quantity"):
        check(partition="dirichelt")
    with pytest.raises(ConfigError, match="partition=shards needs classes-per-client"):
        check(partition="shards")
    with pytest.raises(ConfigError, match="classes-per-client"):
        check(partition="shards", classes_per_client=0)
    with pytest.raises(ConfigError, match="exactly one of quantity-alpha .* quantity-exponent"):
        check(partition="quantity")
    with pytest.raises(ConfigError, match="exactly one"):
        check(partition="quantity", quantity_alpha=1.0, quantity_exponent=1.0)
    with pytest.raises(ConfigError, match="quantity-alpha must be a finite number > 0"):
        check(partition="quantity", quantity_alpha=-1.0)
    with pytest.raises(ConfigError, match="quantity-exponent must be a finite number > 0"):
        check(partition="quantity", quantity_exponent=float("inf"))
    # A setting of another scheme.
    with pytest.raises(ConfigError, match="classes-per-client is a setting of partition=shards, "
                                          "not of partition=iid"):
        check(partition="iid", classes_per_client=2)
    with pytest.raises(ConfigError, match="quantity-alpha is a setting of partition=quantity, "
                                          "not of partition=balanced-dirichlet"):
        check(quantity_alpha=1.0)
    with pytest.raises(ConfigError, match="alpha is a setting of partition=balanced-dirichlet / "
                                          "dirichlet, not of partition=shards"):
        check(partition="shards", classes_per_client=2, alpha=0.1)
    check(partition="iid")  # alpha at its default is fine
    # The checks are part of validation, so the CLI and TOML files get them.
    with pytest.raises(ConfigError, match="partition='bogus' is unknown"):
        load_config(overrides=["partition=bogus"])
    with pytest.raises(ConfigError, match="quantity-exponent is a setting of partition=quantity"):
        load_config(overrides=["partition=dirichlet", "quantity-exponent=1"])
    cfg_ok = load_config(overrides=["partition=shards", "classes-per-client=3"])
    assert (cfg_ok.partition, cfg_ok.classes_per_client) == ("shards", 3)
    assert partition_summary(cfg_ok) == "partition=shards classes-per-client=3"


def test_fedpeft_partition_prints_the_statistics_for_every_scheme(capsys):
    from fedpeft.cli import main

    for overrides, header in [
        (["partition=iid"], "partition=iid"),
        (["partition=shards", "classes-per-client=2"], "partition=shards classes-per-client=2"),
        (["partition=quantity", "quantity-exponent=0.5"],
         "partition=quantity quantity-exponent=0.5"),
    ]:
        assert main(["partition", "num-clients=20", "max-train-samples=800", *overrides]) == 0
        out = capsys.readouterr().out
        assert header in out
        for line in ("client size: min", "mean pairwise Jensen-Shannon divergence",
                     "per-client class histograms", "classes per client"):
            assert line in out
    # A split that leaves a client below min-size is a one-line error, before any training:
    # 800 examples, client j's share ~ (j+1)^1.5, client 0 gets 1.
    assert main(["partition", "num-clients=20", "max-train-samples=800", "partition=quantity",
                 "quantity-exponent=1.5"]) == 2
    assert "client 0 gets 1 examples, fewer than min-size=2" in capsys.readouterr().err
