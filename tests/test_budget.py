import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdd_ray.budget import MARGIN, Throughput, parse_duration, plan
from cdd_ray.config import ConfigError

DEFAULT = dict(steps=300, trials=8, min_steps=100, trial_images=224, reference_images=128, references=2)


@pytest.mark.parametrize("text, seconds", [("45m", 2700), ("1h30m", 5400), ("1.5h", 5400), ("90s", 90),
                                           ("2700", 2700), ("off", None), ("0", None), ("2H", 7200)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, message", [("45 minutes", "not a duration; allowed: e.g. 45m"),
                                           ("m", "not a duration"), ("30s", "under a minute")])
def test_bad_durations_name_the_flag(text, message):
    with pytest.raises(ConfigError, match=f"--time-budget: '{text}' .*{message}"):
        parse_duration(text)


def test_throughput_from_the_baseline():
    # 1,200 steps of 176 images in 600 s of training; 700 s on the driver, 30 s of it training the classifier
    tp = Throughput.from_baseline({"steps": 1200, "train_s": 600.0, "eval_s": {"classifier": 30.0}}, 700.0, 176)
    assert tp.s_per_image == pytest.approx(600 / 1200 / 176)
    assert tp.fixed_s == pytest.approx(70.0)


def test_steps_are_cut_to_fit():
    # 2,100 s left x 0.92 = 1,932 s. All 300 steps would cost 2 x (40 + 300 x 128 / 250) + 8 x (40 + 300 x 224 / 250)
    # = 2,857.6 s; per step 2 x 128 + 8 x 224 = 2,048 images = 8.192 s, fixed 10 x 40 s: (1932 - 400) / 8.192 = 187.
    p = plan(2700, 600, Throughput(1 / 250, 40.0), **DEFAULT)
    assert (p.trial_steps, p.num_trials) == (187, 8)
    assert p.estimate_s == pytest.approx(400 + 187 * 8.192)
    assert p.cut == "cut: trials and references train 187 steps instead of 300."
    assert "8 trials of 187 steps" in p.describe() and "250 training images/s" in p.describe()


def test_time_left_buys_more_trials():
    # 2,400 s x 0.92 = 2,208 s; references 2 x (20 + 38.4) = 116.8 s, a trial 20 + 67.2 = 87.2 s: 23 trials fit.
    p = plan(2700, 300, Throughput(0.001, 20.0), **DEFAULT)
    assert (p.trial_steps, p.num_trials) == (300, 23)
    assert p.cut == "nothing cut; the time left buys 15 more trials than --num-samples 8."


def test_a_budget_too_small_says_by_how_much():
    # 100 s left; at the 100-step floor: 2 x (40 + 51.2) + 8 x (40 + 89.6) = 1,219.2 s, 1,119.2 s (18.7 min) over
    p = plan(1200, 1100, Throughput(1 / 250, 40.0), **DEFAULT)
    assert (p.trial_steps, p.num_trials) == (100, 8)
    assert "exceeded by about 18.7 min" in p.cut


def test_trials_from_scratch_keep_their_steps():
    p = plan(2700, 600, Throughput(1 / 250, 40.0), **DEFAULT | {"references": 1}, cut_steps=False)
    assert p.trial_steps == 300 and "keep their steps" in p.cut


def test_gpu_trials_in_parallel_count_once_per_wave():
    # 4 trials at a time: 8 trials are 2 waves of 308.8 s, plus the references' 387.2 s = 1,004.8 s
    p = plan(2700, 600, Throughput(1 / 250, 40.0), **DEFAULT, parallel=4)
    assert p.trial_steps == 300 and p.num_trials >= 8
    assert plan(2700, 600, Throughput(1 / 250, 40.0), **DEFAULT | {"trials": 8}, parallel=4).estimate_s >= 1004.8 - 1e-6


@settings(max_examples=300, deadline=None)
@given(s_per_image=st.floats(1e-5, 0.05), fixed=st.floats(0, 120), budget=st.floats(600, 20000),
       used_share=st.floats(0, 0.9), trials=st.integers(1, 16), steps=st.integers(10, 2000))
def test_simulated_sweeps_end_within_the_budget(s_per_image, fixed, budget, used_share, trials, steps):
    """Run the planned sweep on a simulated machine whose runs cost what the baseline measured: it ends within the
    budget unless the plan says by how much it will not, never trains more steps or fewer trials than asked."""
    tp, used = Throughput(s_per_image, fixed), budget * used_share
    p = plan(budget, used, tp, steps=steps, trials=trials, min_steps=steps // 3, trial_images=224,
             reference_images=128, references=2)
    clock = used
    for _ in range(2):
        clock += fixed + p.trial_steps * 128 * s_per_image
    for _ in range(p.num_trials):
        clock += fixed + p.trial_steps * 224 * s_per_image
    assert p.trial_steps <= steps and p.num_trials >= trials and p.trial_steps >= steps // 3
    if "exceeded" in p.cut:  # only at the floor of steps
        assert p.trial_steps == steps // 3 and clock > budget
    else:
        assert clock <= budget + 1e-6
        if p.trial_steps > steps // 3:  # above the floor the plan keeps its safety margin
            assert clock <= used + (budget - used) * MARGIN + 1e-6
        if p.trial_steps < steps:  # a cut is as small as it can be: one more step would not fit
            assert clock + (2 * 128 + p.num_trials * 224) * s_per_image > used + (budget - used) * MARGIN - 1e-6
        elif p.num_trials > trials:  # extra trials only as many as fit
            assert clock + fixed + steps * 224 * s_per_image > used + (budget - used) * MARGIN - 1e-6
    assert math.isfinite(p.estimate_s)


def test_jobs_refuse_a_bad_budget_or_sampler_before_any_work(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parents[1] / "jobs" / "tune_mnist.py"
    for args, message in ((["--time-budget", "5x"], "error: --time-budget: '5x' is not a duration"),
                          (["--sampler", "cma"], "argument --sampler: invalid choice: 'cma'")):
        p = subprocess.run([sys.executable, str(job), *args, "--storage", str(tmp_path / "ray")], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not (tmp_path / "ray").exists()  # nothing started


def test_unknown_sampler_is_named():
    from cdd_ray.samplers import make_sampler

    with pytest.raises(ConfigError, match="--sampler: 'cma' not allowed; allowed: tpe, gp, tpe-startup10, random"):
        make_sampler("cma", 0)
