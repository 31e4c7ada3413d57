"""Presets: model size, resolution and budgets by name (``--preset``); anything can still be overridden."""

from __future__ import annotations

from typing import Any

# Presets set model size, resolution and budgets; anything can still be overridden.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data.image_size": 8,
        "data.per_class": 24,
        "data.minority_count": 8,
        "data.classifier_test_per_class": 10,
        "data.reference_per_class": 20,
        "model.channels": [16, 32],
        "model.layers_per_block": 1,
        "model.attention_levels": [],
        "model.norm_groups": 8,
        "model.train_timesteps": 1000,
        "optim.lr": 1e-3,
        "optim.warmup": 2,
        "optim.batch_size": 16,
        "optim.constraint_batch_size": 4,
        "optim.steps": 8,
        "eval.n_samples": 32,
        "eval.sampler_steps": 4,
        "eval.batch_size": 32,
        "eval.classifier_epochs": 1,
        "eval.bootstrap": 50,
        "eval.class_fid_samples": 3,
    },
    "cpu": {
        "data.image_size": 16,
        "model.channels": [32, 64, 64],
        "model.layers_per_block": 1,
        "model.attention_levels": [],
        "model.norm_groups": 8,
        "optim.lr": 1e-3,
        "optim.warmup": 100,
        "optim.batch_size": 128,
        "optim.constraint_batch_size": 16,
        "optim.steps": 1500,
        "eval.n_samples": 1000,
        "eval.sampler_steps": 50,
    },
    # The authors' settings (paper.md section 5; docs/CONFIGURATION.md "The paper preset" lists what differs and
    # why). Tasks set their own data sizes on top; fine-tuning its own dual settings (cdd_ray/finetune.py).
    "paper": {
        "data.image_size": 32,
        "data.per_class": 256,
        "data.minority_count": 64,
        "model.channels": [128, 128, 256, 256, 512, 512],
        "model.layers_per_block": 2,
        "model.attention_levels": [4],
        "model.norm_groups": 32,
        "model.train_timesteps": 1000,
        "dual.kind": "resilient",
        "dual.gamma": 0.085,
        "dual.b": [0.0],
        "dual.eta": 0.1,  # with follow_lr: 1000 x the current primal learning rate
        "dual.eta_schedule": "follow_lr",
        "dual.primal_steps": 2,
        "optim.lr": 1e-4,
        "optim.warmup": 500,
        "optim.grad_clip": 1.0,
        "optim.precision": "fp16",
        "optim.batch_size": 128,
        "optim.constraint_batch_size": 64,
        "optim.steps": 40000,
        "eval.n_samples": 15000,
        "eval.sampler_steps": 100,
        "eval.fid_features": "auto",
    },
}
