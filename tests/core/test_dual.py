import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdd_ray.core.dual import DualState, dual_error, dual_step, nupi_step, predicted_shares, resilient_fixed_point


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


def test_nupi_plain_hand_computed():
    # eta 0.5, kp 2, ki 1, nu 0.5, b 0.1; e_t = Lbar_t - 0.1; xi_{-1} = e_0; xi_t = 0.5 xi_{t-1} + 0.5 e_t;
    # lambda_{t+1} = max(0, lambda_t + 0.5 (e_t + 2 (xi_t - xi_{t-1}))):
    #   e 0.2:  xi 0.2,     lambda 0 + 0.5 (0.2 + 0)                 = 0.1   (the first step is the gradient step)
    #   e 0.4:  xi 0.3,     lambda 0.1 + 0.5 (0.4 + 2 (0.1))         = 0.4
    #   e 0.0:  xi 0.15,    lambda 0.4 + 0.5 (0.0 + 2 (-0.15))       = 0.25  (falls while the violation is 0)
    #   e -0.1: xi 0.025,   lambda 0.25 + 0.5 (-0.1 + 2 (-0.125))    = 0.075
    #   e -0.1: xi -0.0375, lambda 0.075 + 0.5 (-0.1 + 2 (-0.0625)) = -0.0375 -> 0 (projected)
    s = DualState.create(["a"], [0.1], "plain", 0.5, 0.0, optimizer="nupi", kp=2.0, ki=1.0, nu=0.5)
    xis = []
    for lbar in (0.3, 0.5, 0.1, 0.0, 0.0):
        s.update([lbar])
        xis.append(s.xi[0])
    assert [h[0] for h in s.lam_history] == pytest.approx([0.1, 0.4, 0.25, 0.075, 0.0], abs=1e-15)
    assert xis == pytest.approx([0.2, 0.3, 0.15, 0.025, -0.0375], abs=1e-15)


def test_nupi_resilient_hand_computed():
    # eta 0.5, kp 2, ki 1, nu 0 (xi_t = e_t), gamma 0.25, b 0, Lbar 0.2 throughout; e_t = 0.2 - 0.5 lambda_t:
    #   e 0.2:    lambda 0 + 0.5 (0.2)                           = 0.1
    #   e 0.15:   lambda 0.1 + 0.5 (0.15 + 2 (0.15 - 0.2))       = 0.125
    #   e 0.1375: lambda 0.125 + 0.5 (0.1375 + 2 (-0.0125))      = 0.18125
    s = DualState.create(["a"], [0.0], "resilient", 0.5, 0.25, optimizer="nupi", kp=2.0, ki=1.0, nu=0.0)
    for _ in range(3):
        s.update([0.2])
    assert [h[0] for h in s.lam_history] == pytest.approx([0.1, 0.125, 0.18125], abs=1e-15)
    assert s.xi == pytest.approx([0.2 - 0.5 * 0.125])


def test_nupi_integral_gain_scales_the_step_and_lengths_are_checked():
    lam, xi = nupi_step([0.0], [0.2], None, eta=0.5, kp=3.0, ki=0.4, nu=0.7)
    assert lam == pytest.approx([0.04]) and xi == pytest.approx([0.2])  # first step: eta ki e_0, xi_0 = e_0
    with pytest.raises(ValueError, match="differ in length"):
        nupi_step([0.0, 0.0], [0.2], None, 0.5, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="allowed: gradient, nupi"):
        DualState.create(["a"], [0.0], "plain", 0.1, 0.0, optimizer="adam")


@settings(max_examples=200, deadline=None)
@given(lbars=st.lists(st.lists(st.floats(0, 5), min_size=2, max_size=2), min_size=1, max_size=8),
       b=st.floats(0, 1), eta=st.floats(1e-4, 1.0), gamma=st.floats(1e-3, 5), nu=st.floats(0, 0.99),
       kind=st.sampled_from(["plain", "resilient"]))
def test_nupi_without_proportional_gain_is_the_gradient_step_bitwise(lbars, b, eta, gamma, nu, kind):
    grad = DualState.create(["a", "b"], [b, b], kind, eta, gamma)
    nupi = DualState.create(["a", "b"], [b, b], kind, eta, gamma, optimizer="nupi", kp=0.0, ki=1.0, nu=nu)
    for lbar in lbars:
        grad.update(lbar)
        nupi.update(lbar)
    assert nupi.lam_history == grad.lam_history  # exactly, whatever the EMA factor


def test_update_takes_the_scheduled_step_size():
    s = DualState.create(["a"], [0.0], "plain", 0.1, 0.0)
    s.update([0.2], eta=0.05)
    s.update([0.2])
    assert s.lam == pytest.approx([0.05 * 0.2 + 0.1 * 0.2]) and s.eta == 0.1


def test_dual_error_is_the_gradient_in_lambda():
    assert dual_error([0.5, 1.0], [0.30, 0.05], [0.10, 0.0], "resilient", 0.2) == pytest.approx([0.0, -0.35])
    assert dual_error([0.5], [0.30], [0.10]) == pytest.approx([0.2])


def test_nupi_state_round_trips_and_old_states_load_as_gradient():
    s = DualState.create(["class_4"], [0.0], "resilient", 0.1, 0.2, optimizer="nupi", kp=5.0, ki=0.5, nu=0.9)
    s.update([0.05])
    s.update([0.04])
    back = DualState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.xi == s.xi and back.xi is not None
    back.update([0.03])
    s.update([0.03])
    assert back.lam == s.lam  # the restored controller continues exactly
    old = {k: v for k, v in s.to_dict().items() if k not in ("optimizer", "kp", "ki", "nu", "xi")}
    assert DualState.from_dict(old).optimizer == "gradient"  # a checkpoint written before nuPI
    with pytest.raises(KeyError, match="lacks lam_history"):
        DualState.from_dict({k: v for k, v in old.items() if k != "lam_history"})


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
