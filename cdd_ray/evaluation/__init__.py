"""Evaluation of a trained model: sampling, labeller and features, quality (FIDs, precision / recall) and
fairness (class shares, tv, fd) with 95% bootstrap intervals. ``cdd_ray.evaluation.run.evaluate`` runs them all.

Nothing is imported here: ``fairness`` (numpy, scipy) is what a job's checks read before any work, and must not
bring torch and diffusers (``run``) with it."""
