"""SGD on shuffled minibatches: real torch.optim.SGD epochs, their exact mean over
every ordering, the modified loss f_SGD and its field, and the shuffle statistics."""

import copy
import itertools
import math

import pytest
import torch

import eomlib
from eomlib import _tree
from eomlib.data import Dataset
from eomlib.figures import fit_slope
from eomlib.optimizers import minibatch as mb

ATOL = 1e-12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The networks here are tiny; threads that wait for each other only slow
    their products down, most of all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """Six digits, a 3-unit MLP: 6! / 2!^3 = 90 orderings in batches of two."""
    return eomlib.make_problem("mlp", num_samples=6, hidden=(3,), seed=1)


@pytest.fixture(scope="module")
def small():
    return eomlib.make_problem("mlp", num_samples=12, hidden=(4, 3), seed=2)


def _subset(problem, indices):
    data = problem.data
    indices = torch.as_tensor(list(indices))
    return Dataset(data.name, data.X[indices], data.y[indices], data.num_classes)


def _flat(tree):
    return _tree.flatten(tree)


def _end_of_flow(field, params, time):
    times = torch.tensor([0.0, time], dtype=torch.float64)
    end = eomlib.integrate(field, params, times, solver="dopri8", rtol=1e-13)
    return _tree.tree_map(lambda x: x[-1], end)


def _local_errors(problem, lrs, batch_size, partition=None):
    """|flow(m lr) - exact mean epoch| for GF, GD's EoM_1 and the minibatch flow."""
    m = len(problem.data) // batch_size
    errors = {"GF": [], "EoM1": [], "SGD": []}
    for lr in lrs:
        mean = _flat(mb.exact_mean_epoch(problem, lr, batch_size, partition=partition))
        fields = {
            "GF": mb.minibatch_field(problem, lr, batch_size, order=0),
            "EoM1": eomlib.eom_field(problem.loss, lr, 1),
            "SGD": mb.minibatch_field(problem, lr, batch_size, partition=partition),
        }
        for name, field in fields.items():
            end = _flat(_end_of_flow(field, problem.params, m * lr))
            errors[name].append((end - mean).norm().item())
    return errors


LRS = [0.003125, 0.00625, 0.0125, 0.025]


def test_exact_mean_epoch_meets_the_minibatch_flow_with_slope_3_and_gf_with_slope_2(
    tiny,
):
    errors = _local_errors(tiny, LRS, batch_size=2)
    assert abs(fit_slope(LRS, errors["GF"]) - 2) < 0.3
    assert abs(fit_slope(LRS, errors["EoM1"]) - 2) < 0.3
    assert abs(fit_slope(LRS, errors["SGD"]) - 3) < 0.3


def test_mean_over_orders_of_a_fixed_partition_meets_its_flow_with_slope_3(tiny):
    partition = [[0, 5], [1, 3], [2, 4]]
    errors = _local_errors(tiny, LRS, batch_size=2, partition=partition)
    assert abs(fit_slope(LRS, errors["SGD"]) - 3) < 0.3
    assert abs(fit_slope(LRS, errors["EoM1"]) - 2) < 0.3


def _example_grads(problem):
    rows = []
    for n in range(len(problem.data)):
        loss = eomlib.make_loss(problem.model, _subset(problem, [n]))
        rows.append(_flat(eomlib.grad(loss, problem.params)))
    return torch.stack(rows)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 6])
def test_noise_penalty_over_all_partitions_is_the_closed_form(tiny, batch_size):
    rows = _example_grads(tiny)
    g = rows.mean(0)
    num_samples = len(tiny.data)
    enumerated = []
    for ordering in mb.all_orderings(num_samples, batch_size):
        batch_grads = torch.stack([rows[list(batch)].mean(0) for batch in ordering])
        enumerated.append((batch_grads - g).pow(2).sum(1).mean())
    enumerated = torch.stack(enumerated).mean().item()

    closed = (
        (num_samples - batch_size)
        / (batch_size * (num_samples - 1))
        * (rows - g).pow(2).sum(1).mean().item()
    )
    measured = mb.penalties(tiny, tiny.params, 0.4, batch_size)["noise"] / 0.1
    assert enumerated == pytest.approx(closed, rel=1e-10, abs=ATOL)
    assert measured == pytest.approx(closed, rel=1e-10, abs=ATOL)


def test_gd_penalty_is_a_quarter_lr_times_the_squared_gradient(small):
    g = _flat(eomlib.grad(small.loss, small.params))
    measured = mb.penalties(small, small.params, 0.2, 3)["gd"]
    assert measured == pytest.approx(0.05 * g.pow(2).sum().item(), rel=1e-12)


def test_fixed_partition_field_is_minus_g_minus_lr_over_2m_sum_of_batch_hvps(small):
    lr, partition = 0.3, [[0, 4, 8, 11], [1, 2, 3, 9], [5, 6, 7, 10]]
    field = _flat(mb.minibatch_field(small, lr, 4, partition=partition)(small.params))
    expected = -_flat(eomlib.grad(small.loss, small.params))
    for batch in partition:
        loss = eomlib.make_loss(small.model, _subset(small, batch))
        g_a = eomlib.grad(loss, small.params)
        expected -= (
            lr / (2 * len(partition)) * _flat(eomlib.hvp(loss, small.params, g_a))
        )
    torch.testing.assert_close(field, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("partition", [None, [list(range(12))]])
def test_batch_size_n_gives_gds_eom_of_order_1(small, partition):
    lr = 0.25
    field = mb.minibatch_field(small, lr, 12, partition=partition)(small.params)
    eom = eomlib.eom_field(small.loss, lr, 1)(small.params)
    torch.testing.assert_close(_flat(field), _flat(eom), atol=ATOL, rtol=0)
    assert mb.penalties(small, small.params, lr, 12)["noise"] == pytest.approx(
        0.0, abs=ATOL
    )


def test_sgd_keywords_build_the_same_field_and_dampening_is_ignored(small):
    mine = mb.minibatch_field(small, 0.2, 3)(small.params)
    keyed = mb.shuffled_sgd_field(small, lr=0.2, batch_size=3, dampening=0.3)
    torch.testing.assert_close(_flat(keyed(small.params)), _flat(mine))


def test_modified_loss_is_f_plus_both_penalties(small):
    lr = 0.2
    value = mb.modified_loss(small, lr, 3)(small.params).item()
    parts = mb.penalties(small, small.params, lr, 3)
    f = small.loss(small.params).item()
    assert value == pytest.approx(f + parts["gd"] + parts["noise"], rel=1e-13)


def test_linear_gram_matches_per_example_gradients_through_vmap(small):
    private = copy.deepcopy(small.model)
    data = small.data
    loss_a, fast = mb.gradient_gram(small)(small.params)
    loss_b, slow = mb._gram_vmap(private, data.X, data.y, small.params)
    rows = _example_grads(small)
    torch.testing.assert_close(fast, rows @ rows.T, atol=ATOL, rtol=0)
    torch.testing.assert_close(slow, rows @ rows.T, atol=ATOL, rtol=0)
    assert loss_a.item() == pytest.approx(small.loss(small.params).item(), rel=1e-14)
    assert loss_b.item() == pytest.approx(small.loss(small.params).item(), rel=1e-14)


def test_cnn_penalties_come_from_the_vmap_route():
    problem = eomlib.make_problem("cnn", num_samples=4, channels=1, seed=0)
    rows = _example_grads(problem)
    g = rows.mean(0)
    expected = 0.1 / 4 * (2 / (2 * 3)) * (rows - g).pow(2).sum(1).mean().item()
    noise = mb.penalties(problem, problem.params, 0.1, 2)["noise"]
    assert noise == pytest.approx(expected, rel=1e-10)


def test_batch_loss_is_make_loss_on_the_subset(small):
    indices = torch.tensor([3, 7, 1])
    mine = mb.batch_loss(small)(small.params, indices)
    theirs = eomlib.make_loss(small.model, _subset(small, indices))(small.params)
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-15)


def test_sgd_epochs_takes_one_sgd_step_per_batch_in_the_given_order(small):
    lr, epochs = 0.3, [[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]] * 2
    epochs[1] = epochs[1][::-1]
    iterates = mb.sgd_epochs(small, lr, 3, batches=epochs)
    params = small.params
    for k, epoch in enumerate(epochs, start=1):
        for batch in epoch:
            loss = eomlib.make_loss(small.model, _subset(small, batch))
            params = _tree.axpy(-lr, eomlib.grad(loss, params), params)
        reached = _tree.tree_map(lambda x, k=k: x[k], iterates)
        torch.testing.assert_close(_flat(reached), _flat(params), atol=ATOL, rtol=0)


def test_shuffled_batches_cut_a_permutation_into_full_batches():
    batches = mb.shuffled_batches(12, 4, torch.Generator().manual_seed(5))
    assert [len(b) for b in batches] == [4, 4, 4]
    assert sorted(torch.cat(batches).tolist()) == list(range(12))


@pytest.mark.parametrize("num_samples, batch_size", [(4, 2), (6, 2), (6, 3), (5, 1)])
def test_all_orderings_lists_each_epoch_once(num_samples, batch_size):
    orderings = list(mb.all_orderings(num_samples, batch_size))
    assert len(orderings) == len(set(orderings))
    assert len(orderings) == mb.count_orderings(num_samples, batch_size)
    expected = {
        tuple(
            tuple(sorted(p[i : i + batch_size]))
            for i in range(0, num_samples, batch_size)
        )
        for p in itertools.permutations(range(num_samples))
    }
    assert set(orderings) == expected


def test_shuffles_are_bit_reproducible_for_a_seed(small):
    def quantity(iterates):
        return _flat(_tree.tree_map(lambda x: x[-1], iterates))

    kwargs = {"num_shuffles": 3, "num_epochs": 2}
    first = mb.mean_over_shuffles(quantity, small, 0.1, 3, seed=7, **kwargs)
    again = mb.mean_over_shuffles(quantity, small, 0.1, 3, seed=7, **kwargs)
    other = mb.mean_over_shuffles(quantity, small, 0.1, 3, seed=8, **kwargs)
    assert torch.equal(first.samples, again.samples)
    assert not torch.equal(first.samples, other.samples)
    runs = [
        mb.sgd_epochs(
            small, 0.1, 3, num_epochs=2, generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    ]
    assert torch.equal(_flat(runs[0]), _flat(runs[1]))


def test_confidence_interval_of_a_fixed_sample_is_mean_plus_minus_z_stderr():
    samples = torch.tensor([[1.0, 10.0], [2.0, 14.0], [4.0, 9.0], [7.0, 11.0]])
    ci = mb.confidence_interval(samples, confidence=0.9)
    mean = samples.mean(0)
    stderr = samples.std(0, correction=1) / 2
    z = 1.6448536269514722  # the 95% point of the standard normal
    torch.testing.assert_close(ci.mean, mean)
    torch.testing.assert_close(ci.half_width, z * stderr)
    torch.testing.assert_close(ci.low, mean - z * stderr)
    assert ci.covers(mean).all() and not ci.covers(mean + 2 * z * stderr).any()


def test_confidence_interval_covers_the_true_mean_at_its_nominal_rate():
    generator = torch.Generator().manual_seed(0)
    repeats, size = 4000, 200
    samples = 3.0 + 2.0 * torch.randn(size, repeats, generator=generator)
    coverage = mb.confidence_interval(samples, 0.95).covers(3.0).double().mean()
    # 4000 repeats: the coverage's own standard error is 0.0034.
    assert abs(coverage.item() - 0.95) < 0.015


def test_a_single_shuffle_has_an_infinite_interval():
    ci = mb.confidence_interval(torch.tensor([2.0]))
    assert ci.mean.item() == 2.0 and math.isinf(ci.half_width.item())


def _bn_problem():
    return eomlib.make_problem("bn_mlp", num_samples=4, hidden=(2,), seed=0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda p: mb.sgd_epochs(p, 0.1, 0, generator=torch.Generator()),
            ValueError,
            "batch_size must be an integer >= 1",
        ),
        (
            lambda p: mb.sgd_epochs(p, 0.1, 5, generator=torch.Generator()),
            ValueError,
            "batch_size must divide the number of examples, 12",
        ),
        (
            lambda p: mb.sgd_epochs(p, 0.1, 24, generator=torch.Generator()),
            ValueError,
            "batch_size=24",
        ),
        (
            lambda p: mb.sgd_epochs(p, 0.0, 3, generator=torch.Generator()),
            ValueError,
            "lr must be positive",
        ),
        (
            lambda p: mb.sgd_epochs(p, -0.1, 3, generator=torch.Generator()),
            ValueError,
            "lr=-0.1",
        ),
        (
            lambda p: mb.sgd_epochs(
                p, 0.1, 3, num_epochs=0, generator=torch.Generator()
            ),
            ValueError,
            "num_epochs",
        ),
        (lambda p: mb.sgd_epochs(p, 0.1, 3), TypeError, "generator must be"),
        (
            lambda p: mb.sgd_epochs(p, 0.1, 3, batches=[[[0, 1, 2]] * 4]),
            ValueError,
            "each example once",
        ),
        (
            lambda p: mb.mean_over_shuffles(len, p, 0.1, 3, num_shuffles=0),
            ValueError,
            "num_shuffles must be an integer >= 1",
        ),
        (
            lambda p: mb.mean_over_shuffles(
                len, p, 0.1, 3, num_shuffles=2, confidence=1.5
            ),
            ValueError,
            "confidence must be in",
        ),
        (
            lambda p: mb.mean_over_shuffles(3, p, 0.1, 3, num_shuffles=2),
            TypeError,
            "quantity must be a function",
        ),
        (lambda p: mb.minibatch_field(p, 0.1, 3, order=2), ValueError, "order=2"),
        (
            lambda p: mb.minibatch_field(p, 0.1, 4, partition=[[0, 1, 2, 3]]),
            ValueError,
            "each example once",
        ),
        (
            lambda p: mb.shuffled_sgd_field(p, lr=0.1, batch_size=3, momentum=0.9),
            ValueError,
            "momentum=0.9",
        ),
        (lambda p: mb.every_epoch(p, 0.1, 2), ValueError, "MAX_ORDERINGS"),
        (
            lambda p: mb.sgd_epochs(_bn_problem(), 0.1, 2, generator=torch.Generator()),
            ValueError,
            "BatchNorm1d couples the examples",
        ),
        (
            lambda p: mb.sgd_epochs(p.loss, 0.1, 2, generator=torch.Generator()),
            TypeError,
            "problem must be an eomlib.Problem",
        ),
    ],
)
def test_bad_input_is_named(small, call, error, match):
    with pytest.raises(error, match=match):
        call(small)


def test_float_batch_indices_are_refused_not_truncated():
    problem = eomlib.make_problem("mlp", "digits", num_samples=6, hidden=[3])
    with pytest.raises(
        TypeError, match=r"batch indices must be integers; got \[0.0, 1.7\]"
    ):
        eomlib.sgd_epochs(problem, 0.1, 2, batches=[[[0.0, 1.7], [2, 3], [4, 5]]])
