import numpy as np
import pytest

from fedpeft.partition import PartitionError, dirichlet_partition, jensen_shannon, mean_pairwise_js


def labels(counts: dict[str, int]) -> list[str]:
    return [c for c, n in counts.items() for _ in range(n)]


def test_every_example_used_once_and_sizes_balanced():
    y = labels({"a": 50, "b": 30, "c": 23})
    part = dirichlet_partition(y, num_clients=10, alpha=0.5, seed=1)
    everything = np.concatenate(part.clients)
    assert sorted(everything.tolist()) == list(range(len(y)))
    assert part.sizes().tolist() == [11, 11, 11] + [10] * 7  # 103 = 10*10 + 3
    # Histograms count the labels of the assigned examples.
    for j, idx in enumerate(part.clients):
        for k, name in enumerate(part.classes):
            assert part.histograms[j, k] == sum(1 for i in idx if y[i] == name)


def test_pure_function_of_its_arguments():
    y = labels({"a": 40, "b": 40, "c": 40})
    p1 = dirichlet_partition(y, 6, 0.3, seed=7)
    p2 = dirichlet_partition(list(y), 6, 0.3, seed=7)
    p3 = dirichlet_partition(y, 6, 0.3, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(p1.clients, p2.clients, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(p1.clients, p3.clients, strict=True))


def test_client_proportions_follow_their_dirichlet_draw():
    # Each client's label mix is its own draw q_j ~ Dir(alpha), the generator's first draw.
    # Build a data set whose class supply equals the clients' total demand, so that no class
    # runs out early: every client's realised shares must then follow its q_j.
    q = np.random.default_rng(3).dirichlet([1.0, 1.0, 1.0], size=2)  # (clients, classes)
    per_client = 5000
    supply = np.rint(q.sum(axis=0) * per_client).astype(int)
    supply[-1] = 2 * per_client - supply[:-1].sum()
    y = labels(dict(zip("abc", supply.tolist(), strict=True)))
    part = dirichlet_partition(y, num_clients=2, alpha=1.0, seed=3)
    share = part.histograms / part.histograms.sum(axis=1, keepdims=True)
    assert np.allclose(share, q, atol=0.03)


def test_alpha_controls_heterogeneity():
    y = labels({str(c): 200 for c in range(10)})
    skewed = dirichlet_partition(y, 20, alpha=0.1, seed=0)
    near_iid = dirichlet_partition(y, 20, alpha=100.0, seed=0)
    assert mean_pairwise_js(skewed.histograms) > 0.4
    assert mean_pairwise_js(near_iid.histograms) < 0.1


def test_too_few_examples_for_min_size_is_a_clear_error():
    with pytest.raises(PartitionError, match="min-size=5"):
        dirichlet_partition(labels({"a": 10, "b": 9}), num_clients=4, alpha=1.0, seed=0,
                            min_size=5)


def test_jensen_shannon_hand_computed():
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports, base 2
    assert jensen_shannon([2, 2], [5, 5]) == pytest.approx(0.0)
    # p=(1/2,1/2), q=(1,0): m=(3/4,1/4); KL(p|m)=.5log2(2/3)+.5log2(2), KL(q|m)=log2(4/3)
    expected = 0.5 * (0.5 * np.log2(2 / 3) + 0.5 * np.log2(2)) + 0.5 * np.log2(4 / 3)
    assert jensen_shannon([1, 1], [1, 0]) == pytest.approx(expected)
