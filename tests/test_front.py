"""The front's figure and tables (cdd_ray.front) with the over-fitting measure beside the objectives."""

from matplotlib.image import imread

from cdd_ray.front import format_differences, plot_front


def row(role, precision, tv, copy, number=None, **extra):
    return {"role": role, "trial_id": f"t{number}" if number else None, "number": number, "fid_features": "classifier",
            "precision": precision, "precision_ci": [precision - 0.02, precision + 0.02],
            "tv_to_uniform": tv, "tv_to_uniform_ci": [tv - 0.03, tv + 0.03],
            "copy_rate": copy, "copy_rate_ci": None if copy is None else [max(0.0, copy - 0.01), copy + 0.01], **extra}


def test_tradeoff_has_an_overfitting_panel_beside_the_front(tmp_path):
    refs = [row("baseline-continued", 0.70, 0.30, 0.01), row("baseline-rebalanced", 0.65, 0.15, 0.06)]
    trials = [row("trial", 0.68, 0.20, 0.02, 1), row("trial", 0.60, 0.12, 0.03, 2)]
    labels = plot_front(tmp_path / "two.png", trials, trials, refs, ("precision", "tv_to_uniform"), "copy_rate")
    assert [x.split(":")[0].split(" (")[0] for x, _ in labels] == ["precision", "copy rate"]
    assert all(y.startswith("TV to uniform") for _, y in labels)
    one = plot_front(tmp_path / "one.png", trials, trials, refs, ("precision", "tv_to_uniform"))
    assert len(one) == 1
    # nothing measured the over-fitting (latent diffusion, old runs): no empty panel
    unmeasured = [row("trial", 0.68, 0.20, None, 1)]
    assert len(plot_front(tmp_path / "none.png", unmeasured, unmeasured, [], ("precision", "tv_to_uniform"),
                          "copy_rate")) == 1
    wide, narrow = imread(tmp_path / "two.png"), imread(tmp_path / "one.png")
    assert wide.shape[1] > 1.8 * narrow.shape[1]


def test_the_printed_differences_include_the_overfitting_measure():
    refs = [row("baseline-continued", 0.70, 0.30, 0.01), row("baseline-rebalanced", 0.65, 0.15, 0.06)]
    point = row("trial", 0.68, 0.20, 0.02, 1, differences={
        "baseline-rebalanced": {"copy_rate": [-0.04, -0.07, -0.01], "precision": [0.03, -0.01, 0.07]}})
    text = format_differences([point], refs, ("precision", "tv_to_uniform", "copy_rate"))
    assert "copy_rate - baseline-rebalanced" in text
    assert "-0.040 [-0.070, -0.010] better" in text and "+0.030 [-0.010, +0.070] |" in text
