import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdd_ray.dual import DualState, dual_step, predicted_shares, resilient_fixed_point


def test_plain_step_hand_computed():
    # lambda + eta (L - b): 0.5 + 0.1 (0.30 - 0.10) = 0.52 ; 0 + 0.1 (0.05 - 0.10) -> max(0, -0.005) = 0
    assert dual_step([0.5, 0.0], [0.30, 0.05], [0.10, 0.10], eta=0.1) == pytest.approx([0.52, 0.0], abs=1e-15)


def test_resilient_step_hand_computed():
    # 0.5 + 0.1 (0.30 - 0.10 - 2 * 0.2 * 0.5) = 0.5 + 0.1 * 0.0 = 0.5
    # 1.0 + 0.1 (0.05 - 0.00 - 2 * 0.2 * 1.0) = 1.0 + 0.1 * (-0.35) = 0.965
    out = dual_step([0.5, 1.0], [0.30, 0.05], [0.10, 0.0], eta=0.1, kind="resilient", gamma=0.2)
    assert out == pytest.approx([0.5, 0.965], abs=1e-15)


def test_resilient_fixed_point_is_reached():
    lam = [0.0]
    for _ in range(2000):
        lam = dual_step(lam, [0.04], [0.0], eta=0.1, kind="resilient", gamma=0.2)
    assert lam[0] == pytest.approx(0.04 / (2 * 0.2), rel=1e-9)
    assert resilient_fixed_point(0.04, 0.0, 0.2) == pytest.approx(0.1)


def test_nan_loss_never_updates_lambda():
    with pytest.raises(FloatingPointError, match="not finite"):
        dual_step([0.3], [math.nan], [0.0], eta=0.1)
    state = DualState.create(["a"], [0.0], "plain", 0.1, 0.0, lambda_init=0.3)
    with pytest.raises(FloatingPointError):
        state.update([math.inf])
    assert state.lam == [0.3] and state.step == 0 and state.lam_history == []


def test_bad_kind_and_lengths():
    with pytest.raises(ValueError, match="allowed: plain, resilient"):
        dual_step([0.0], [0.1], [0.0], 0.1, kind="augmented")
    with pytest.raises(ValueError, match="differ in length"):
        dual_step([0.0, 0.0], [0.1], [0.0], 0.1)


def test_predicted_shares_mixture_formula():
    priors = [0.4, 0.4, 0.2]
    shares = predicted_shares(priors, {2: 0.5})
    assert shares == pytest.approx([0.4 / 1.5, 0.4 / 1.5, 0.7 / 1.5])
    assert sum(shares) == pytest.approx(1.0)


def test_state_round_trips_through_json():
    s = DualState.create(["class_4", "class_5"], [0.0, 0.01], "resilient", 0.1, 0.2)
    s.update([0.05, 0.06])
    s.update([0.04, 0.05])
    back = DualState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert len(back.lam_history) == 2 and back.step == 2


finite = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(lam=finite, loss=st.floats(-5, 5), b=finite, eta=st.floats(1e-4, 1.0), gamma=st.floats(0, 5),
       kind=st.sampled_from(["plain", "resilient"]))
def test_lambda_never_negative(lam, loss, b, eta, gamma, kind):
    assert dual_step([lam], [loss], [b], eta, kind, gamma)[0] >= 0.0


@settings(max_examples=200, deadline=None)
@given(lam=finite, l1=st.floats(0, 5), l2=st.floats(0, 5), b=finite, eta=st.floats(1e-4, 1.0),
       gamma=st.floats(0, 5), kind=st.sampled_from(["plain", "resilient"]))
def test_monotone_in_violation(lam, l1, l2, b, eta, gamma, kind):
    lo, hi = sorted([l1, l2])
    assert dual_step([lam], [lo], [b], eta, kind, gamma)[0] <= dual_step([lam], [hi], [b], eta, kind, gamma)[0]


@settings(max_examples=100, deadline=None)
@given(lam=finite, b=finite, eta=st.floats(1e-4, 1.0))
def test_plain_zero_violation_keeps_lambda(lam, b, eta):
    assert dual_step([lam], [b], [b], eta)[0] == lam


@settings(max_examples=200, deadline=None)
@given(lam=finite, loss=st.floats(0, 5), eta=st.floats(1e-3, 1.0), gamma=st.floats(1e-2, 0.45))
def test_resilient_contracts_towards_fixed_point(lam, loss, eta, gamma):
    star = resilient_fixed_point(loss, 0.0, gamma)
    new = dual_step([lam], [loss], [0.0], eta, "resilient", gamma)[0]
    assert abs(new - star) <= abs(lam - star) + 1e-12
