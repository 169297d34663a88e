"""sieve.py's expert plans on a hand-made profile whose answers are worked out by hand below."""

import pytest

import sieve

# 3 MoE layers with real ids 0, 2, 5 (as if 1, 3, 4 were dense), 8 experts, each layer's total 100.
PROFILE = {"num_experts": 8, "layers": [0, 2, 5], "counts": [
    [12, 13, 12, 13, 12, 13, 12, 13],  # layer 0: near uniform; ties go to the lower id: 1, 3, 5, 7, 0, 2, ...
    [40, 0, 25, 5, 15, 5, 10, 0],      # layer 2: skewed: 0 (40), 2 (25), 4 (15), 6 (10), 3, 5 (5), 1, 7 (0)
    [5, 30, 5, 30, 10, 10, 5, 5],      # layer 5: two hot experts: 1, 3 (30), 4, 5 (10), 0, 2, 6, 7 (5)
]}


def test_topk_count():
    """topk_plan with an int k keeps the k highest counts per layer, ties to the lower expert id."""
    assert sieve.topk_plan(PROFILE, 2) == {0: [1, 3], 2: [0, 2], 5: [1, 3]}
    assert sieve.topk_plan(PROFILE, 3) == {0: [1, 3, 5], 2: [0, 2, 4], 5: [1, 3, 4]}


def test_topk_fraction():
    """A float k is floor(k * E), at least 1: 0.25 -> 2, 0.3 -> 2 (2.4), 0.3125 -> 2 (2.5), 0.375 -> 3, 1.0 -> all 8."""
    assert sieve.topk_plan(PROFILE, 0.25) == sieve.topk_plan(PROFILE, 2)
    assert sieve.topk_plan(PROFILE, 0.3) == sieve.topk_plan(PROFILE, 2)
    assert sieve.topk_plan(PROFILE, 0.3125) == sieve.topk_plan(PROFILE, 2)
    assert sieve.topk_plan(PROFILE, 0.375) == sieve.topk_plan(PROFILE, 3)
    assert sieve.experts_per_layer(0.3, 10) == 3  # 0.3 * 10 is 2.9999999999999996 in floats: still 3
    assert sieve.topk_plan(PROFILE, 1.0) == {layer: list(range(8)) for layer in (0, 2, 5)}
    assert sieve.topk_plan(PROFILE, 0.01) == sieve.topk_plan(PROFILE, 1)  # at least one expert


@pytest.mark.parametrize("k", [0, 9, 1.5, 0.0, -0.25, True, "2"])
def test_bad_k_refused(k):
    """k outside 1..E (int) or (0, 1] (float), or not a number, is refused rather than clipped."""
    with pytest.raises(ValueError):
        sieve.topk_plan(PROFILE, k)


def test_coverage_plan():
    """coverage_plan takes per layer the fewest experts (by count) whose counts reach p of the layer's total."""
    # p=0.5: layer 0 needs 4 experts (13+13+13+13 = 52), layer 2 two (40+25), layer 5 two (30+30)
    assert sieve.coverage_plan(PROFILE, 0.5) == {0: [1, 3, 5, 7], 2: [0, 2], 5: [1, 3]}
    # p=0.6 ("cov60"): layer 0 needs a fifth (52 + 12 = 64, expert 0); layer 5 reaches exactly 60 with two
    assert sieve.coverage_plan(PROFILE, 0.6) == {0: [0, 1, 3, 5, 7], 2: [0, 2], 5: [1, 3]}
    assert sieve.coverage_plan(PROFILE, 1.0)[2] == [0, 2, 3, 4, 5, 6]  # the zero-count experts are not needed


def test_coverage_exact_boundary():
    """A share reached exactly counts as reached, even when p * total is not exact in floats (0.28*100 = 28.000000000000004)."""
    p = {"num_experts": 4, "layers": [0], "counts": [[28, 24, 24, 24]]}
    assert sieve.coverage_plan(p, 0.28) == {0: [0]}


def test_plan_coverage_numbers():
    """plan_coverage gives each layer's covered share of its counts and their mean, exactly."""
    cov, mean = sieve.plan_coverage(PROFILE, sieve.topk_plan(PROFILE, 2))
    assert cov == {0: 0.26, 2: 0.65, 5: 0.60}
    assert mean == pytest.approx((0.26 + 0.65 + 0.60) / 3, abs=1e-12)


def test_budget_moves_slots_to_skewed_layer():
    """budget_plan spends k*L slots; beyond k_min each slot goes to the largest next marginal coverage."""
    # k=2, k_min=1: start {0:[1], 2:[0], 5:[1]}; next gains 0.13 / 0.25 / 0.30 -> layer 5 (+3),
    # then layer 2 (+2, 0.25), then layer 2 again (+4, 0.15 > 0.13): the near-uniform layer 0 gives up a slot.
    plan = sieve.budget_plan(PROFILE, 2, k_min=1)
    assert plan == {0: [1], 2: [0, 2, 4], 5: [1, 3]}
    assert sum(map(len, plan.values())) == 2 * 3
    cov, mean = sieve.plan_coverage(PROFILE, plan)
    assert cov == {0: 0.13, 2: 0.80, 5: 0.60} and mean > sieve.plan_coverage(PROFILE, sieve.topk_plan(PROFILE, 2))[1]
    # k=3, k_min=2: 3 extra slots: layer 2 (+4, 0.15), layer 0 (+5, 0.13), layer 0 (+7, 0.13 beats 0.10 / 0.10)
    assert sieve.budget_plan(PROFILE, 3, k_min=2) == {0: [1, 3, 5, 7], 2: [0, 2, 4], 5: [1, 3]}


def test_budget_kmin_equal_k_is_topk():
    """With k_min = k there is nothing to redistribute: budget_plan equals topk_plan."""
    assert sieve.budget_plan(PROFILE, 3, k_min=3) == sieve.topk_plan(PROFILE, 3)


def test_budget_never_exceeds_E():
    """With k = E every layer gets all its experts; a full layer drops out of the heap."""
    assert sieve.budget_plan(PROFILE, 8, k_min=0) == {layer: list(range(8)) for layer in (0, 2, 5)}
    # 6 slots: layer 1's expert 0 (1.00), then layer 0 four times (0.25 each > 0) until it is full, then layer 1
    flat_and_peaked = {"num_experts": 4, "layers": [0, 1], "counts": [[25, 25, 25, 25], [100, 0, 0, 0]]}
    assert sieve.budget_plan(flat_and_peaked, 3, k_min=0) == {0: [0, 1, 2, 3], 1: [0, 1]}
    with pytest.raises(ValueError):
        sieve.budget_plan(PROFILE, 2, k_min=3)


def test_random_plan():
    """random_plan: same budget as topk, sorted distinct ids, the same plan for a seed and another for another seed."""
    a, b, c = sieve.random_plan(PROFILE, 2, seed=0), sieve.random_plan(PROFILE, 2, seed=0), sieve.random_plan(PROFILE, 2, seed=1)
    assert a == b and a != c
    for plan in (a, c):
        assert list(plan) == [0, 2, 5]
        assert all(len(v) == 2 and v == sorted(set(v)) and all(0 <= e < 8 for e in v) for v in plan.values())
    assert {len(v) for v in sieve.random_plan(PROFILE, 0.25, seed=3).values()} == {2}


def test_describe_mentions_counts_and_coverage():
    """describe() states the number of experts per layer and the mean coverage."""
    text = sieve.describe(PROFILE, sieve.topk_plan(PROFILE, 2))
    assert "6/24" in text and "2 of 8 in each of 3" in text and "mean 50.3%" in text
    assert "2:3" in sieve.describe(PROFILE, sieve.budget_plan(PROFILE, 2))


def test_bad_plan_refused():
    """plan_coverage refuses a plan whose layers or expert ids do not fit the profile."""
    with pytest.raises(ValueError):
        sieve.plan_coverage(PROFILE, {0: [1], 2: [0]})  # layer 5 missing
    with pytest.raises(ValueError):
        sieve.plan_coverage(PROFILE, {0: [1], 2: [8], 5: [0]})  # expert 8 of 8
