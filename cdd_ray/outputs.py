"""The files a finished run leaves: summary.json, samples.npz, evaluation.npz (what a sweep compares runs with),
PNGs, history (see docs/TRAINING.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cdd_ray.config import Config
from cdd_ray.core.loop import LoopResult
from cdd_ray.data import Split
from cdd_ray.evaluation.run import Evaluation
from cdd_ray.model import n_params
from cdd_ray.plots import save_grid, save_histogram, save_lambda_plot


def build_summary(cfg: Config, result: LoopResult, ev: Evaluation, split: Split, wall_s: float,
                  workers: int = 1) -> dict[str, Any]:
    s = dict(ev.summary)
    s.update({
        "name": cfg.name,
        "constrained": not cfg.unconstrained,
        "preset": cfg.model.preset,
        "data_source": split.source,
        "lambda": result.dual.by_name() if not cfg.unconstrained else {},
        "dual_kind": cfg.dual.kind,
        "steps": result.step,
        # the training budget, so runs compare at equal compute and optimiser: images through the gradient step
        # (objective batch, plus one batch per constraint when constrained, on every worker) and the optimiser
        "train_images": result.step * workers * (cfg.optim.batch_size + (0 if cfg.unconstrained else len(
            cfg.constraint_names()) * cfg.optim.constraint_batch_size)),
        "lr": cfg.optim.lr,
        "batch_size": cfg.optim.batch_size,
        "constraint_batch_size": 0 if cfg.unconstrained else cfg.optim.constraint_batch_size,
        "resumed_from_step": result.start_step,
        "dual_steps": result.dual.step,
        "workers": workers,
        "unet_params": n_params(result.ema_unet),
        "train_s": result.train_s,
        "wall_s": wall_s,
    })
    if cfg.unconstrained:
        s["predicted_shares"] = None
    return s


def write_outputs(out: str | Path, cfg: Config, result: LoopResult, ev: Evaluation, summary: dict[str, Any]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples.npz", images=ev.images, labels=ev.labels)
    np.savez_compressed(out / "evaluation.npz", **ev.record)
    save_grid(ev.images, out / "samples.png")
    if cfg.is_finetune:
        title = f"{cfg.name}: new share {summary['new_share']:.3f}, old share {summary['old_share']:.3f}"
        others = {"pre-trained model": summary["pretrained_shares"]}
    else:
        title = (f"{cfg.name}: tv to uniform {summary['tv_to_uniform']:.3f} "
                 f"(uniform generator: {summary['tv_floor']:.3f})")
        others = ({"predicted from the baseline": summary["predicted_shares_from_baseline"]}
                  if summary.get("predicted_shares_from_baseline") else None)
    save_histogram(summary["class_ids"], summary["class_shares"], out / "class_histogram.png",
                   summary["predicted_shares"], summary["objective_shares"], title=title, others=others,
                   measured_ci=summary.get("class_shares_ci"))
    if result.dual.names:
        save_lambda_plot(result.dual.names, result.dual.lam_history, out / "lambda.png")
    (out / "history.json").write_text(json.dumps(result.history))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out
