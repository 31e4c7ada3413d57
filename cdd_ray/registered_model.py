"""The registered model's code: MLflow loads it from this file (models from code), not from a pickle.

``cdd_ray.register`` logs this file as the pyfunc model (``python_model=<this file's path>``) with the cdd_ray package
as its code; ``mlflow.pyfunc.load_model`` runs the file, which sets the model with ``mlflow.models.set_model``. No
Python object is pickled, so loading a registered model runs the project's source, and registering works however
``cdd_ray.register`` was started (``python -m`` put the class in ``__main__``, which cloudpickle could not pickle).
Nothing else imports this module.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch

from cdd_ray import checkpoint
from cdd_ray.config import config_from_dict
from cdd_ray.data import to_uint8
from cdd_ray.evaluation.labeller import DigitClassifier, external_classifier, predict
from cdd_ray.model import load_vae
from cdd_ray.sample import draw


class DiffusionModel(mlflow.pyfunc.PythonModel):
    """Generates ``n`` images from a seed with the trained EMA UNet and labels them with the labeller the
    sweep's evaluation used. Input: a dict ``{"n": int, "seed": int, "steps": int (optional)}``."""

    def load_context(self, context) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        unet, _, cfg = checkpoint.load_model(context.artifacts["checkpoint"])
        self.unet, self.cfg = unet.to(self.device).eval(), config_from_dict(cfg)
        blob = torch.load(context.artifacts["labeller"], map_location="cpu", weights_only=True)
        self.classes = list(blob["classes"])
        if "torchscript" in context.artifacts:  # the run's eval.classifier_path
            self.labeller = external_classifier(context.artifacts["torchscript"], len(self.classes))
        else:
            self.labeller = DigitClassifier(len(self.classes), int(blob["in_channels"]))
            self.labeller.load_state_dict(blob["state_dict"])
        self.vae = None
        if "vae" in context.artifacts:
            self.vae = load_vae(context.artifacts["vae"], self.device)

    def predict(self, context, model_input, params=None):  # untyped: MLflow would read hints as a schema
        """``{"images": uint8 N x S x S (x 3), "labels": int64 N}`` for ``{"n", "seed", "steps"}``."""
        n, seed, steps = _request(model_input)
        x = draw(self.unet, self.cfg, n, steps, seed, self.device, self.vae)  # as cdd_ray.sample --run-id does
        pos = predict(self.labeller, x.cpu()).numpy()
        return {"images": to_uint8(x), "labels": np.array([self.classes[i] for i in pos], dtype=np.int64)}


def _request(model_input: Any) -> tuple[int, int, int | None]:
    """``{"n", "seed", "steps"}`` from a dict (or a one-row DataFrame); a clear error otherwise."""
    if hasattr(model_input, "to_dict") and not isinstance(model_input, dict):  # pandas, one row
        model_input = {k: v[0] for k, v in model_input.to_dict(orient="list").items()}
    if not isinstance(model_input, dict) or "n" not in model_input:
        raise ValueError(f"input: expected {{'n': int, 'seed': int, 'steps': int (optional)}}, got {model_input!r}")
    n, seed = int(model_input["n"]), int(model_input.get("seed", 0))
    steps = model_input.get("steps")
    if n <= 0:
        raise ValueError(f"input n: {n} must be > 0")
    return n, seed, int(steps) if steps else None


mlflow.models.set_model(DiffusionModel())
