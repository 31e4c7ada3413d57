"""The names of what a run measures and a sweep compares, in one place: which metrics a sweep may optimise and in
which direction, what every row of a front carries, what carries a 95% interval, and the key ASHA reads.
Pure data: every other module takes its lists from here."""

# The quality objective: precision (default; maximised), the share of generated samples inside the k-NN
# manifold of real held-out digits in the FID feature space. It is per sample and does not score the mix as
# such, but it is the share-weighted mean of per-class precision, so a mix shift moves it as far as classes
# differ in precision. fid_class_mean (per-class FID, averaged) weights the classes alike.
# fid (class-balanced reference, the paper's) rewards fairness too, so with tv it collapses the front;
# fid_data (reference in the training data's mix) penalises fairness itself: it measured the class mix
# (a trial with minority share 0.14 scored fid_data 109.6 against 44-52 for every other trial).
QUALITY_METRICS = ("precision", "precision_class_mean", "fid_class_mean", "fid", "fid_data", "recall")
FAIRNESS_METRICS = ("tv_to_uniform", "fd")
OBJECTIVES = ("precision", "tv_to_uniform")  # a minority sweep's defaults: --quality, --fairness
# Fine-tuning's front: learning the new data (held-out loss on new-class images the model never saw)
# vs forgetting the old classes (1 - old-class share / the pre-trained model's old-class share).
FINETUNE_OBJECTIVES = ("heldout_loss_new", "forgetting")
# Every metric a sweep may optimise; each row of the front carries all of them that the trials report.
OBJECTIVE_METRICS = (*QUALITY_METRICS, *FAIRNESS_METRICS, "heldout_loss_new", "forgetting", "old_tv_to_pretrained",
                     "distance_to_pretrained")
# The objectives a sweep maximises; every other metric is minimised.
MAXIMISED = ("precision", "precision_class_mean", "recall")
# Over-fitting (evaluation/overfitting.py), of the minority classes together: the share of samples that copy a
# training image (pixels; FID features), each beside its floor (what a model that does not memorise scores), and the
# denoising loss on held-out minus training images.
OVERFITTING_METRICS = ("copy_rate", "copy_rate_features", "generalization_gap")
# Each check beside its floor (what a perfect model scores with this many samples; evaluation/fairness.py).
SWEEP_METRICS = (*OBJECTIVE_METRICS, "tv_excess", "minority_share", "tv_floor", "new_share", "old_share",
                 "prediction_error", "prediction_error_floor", "prediction_error_baseline",
                 "prediction_error_baseline_floor", *OVERFITTING_METRICS, "copy_floor", "copy_floor_features")
# What makes a row's budget checkable: primal steps, images through the gradient step, the optimiser's settings.
BUDGET_COLUMNS = ("steps", "train_images", "lr", "batch_size", "constraint_batch_size")
# Metrics that carry a 95% interval in summary.json as <metric>_ci: [lo, hi]; in MLflow as eval/<metric>_ci_lo / _ci_hi.
INTERVAL_METRICS = ("fid", "fid_data", "fid_class_mean", "precision", "precision_class_mean", "recall",
                    "tv_to_uniform", "tv_excess", "fd", "minority_share", *OVERFITTING_METRICS)
# A fine-tuning run's measures (summary.json, eval/ in MLflow).
FINETUNE_METRICS = ("new_share", "old_share", "forgetting", "old_tv_to_pretrained", "train_loss_new",
                    "heldout_loss_new", "distance_to_pretrained", "pretrained_old_share")
# ASHA compares trials on the mean denoising loss over the objective and every constraint dataset, each
# weighted alike: it prunes trials that learn slowly or diverge (too large lr or eta) without favouring
# trials that give the constraints less weight, as the objective loss alone would. Only the metric-only reports
# every ray.report_every primal steps carry it (the window's mean of loss_mean); ASHA's time_attr is the primal
# step, so trials with different dual.primal_steps or lengths are compared at the same amount of training. ASHA
# skips results without it (checkpoints, final).
ASHA_LOSS = "asha_loss"


def sign(metric: str) -> float:
    """+1 for a minimised metric, -1 for a maximised one: ``sign(m) * value`` is always minimised."""
    return -1.0 if metric in MAXIMISED else 1.0


def direction(metric: str) -> str:
    """"higher" or "lower": which is better."""
    return "higher" if metric in MAXIMISED else "lower"
