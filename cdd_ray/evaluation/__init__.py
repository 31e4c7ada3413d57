"""Evaluation of a trained model: sampling, labeller and features, quality (FIDs, precision / recall) and
fairness (class shares, tv, fd) with 95% bootstrap intervals. ``evaluate`` runs them all."""

from cdd_ray.evaluation.run import Evaluation, evaluate, finetune_metrics

__all__ = ["Evaluation", "evaluate", "finetune_metrics"]
