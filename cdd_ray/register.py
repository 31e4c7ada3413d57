"""Register the model a researcher chooses from a sweep in the MLflow Model Registry.

    python -m cdd_ray.register --sweep mnist-minority --pick quality       # the best quality objective
    python -m cdd_ray.register --sweep mnist-minority --pick fairness      # the lowest fairness objective (tv)
    python -m cdd_ray.register --sweep mnist-minority --max-tv 0.1         # the best quality with tv <= 0.1

The chosen trial's final model becomes a version of a registered model (default ``cdd-ray-<dataset>``) with
an alias (default ``champion``) and tags naming the sweep, the trial, the rule, its metrics with their
intervals, the data source and the feature space. The version is an MLflow ``pyfunc`` model, logged from code
(cdd_ray/registered_model.py and the cdd_ray package: nothing pickled), that generates:

    import mlflow
    out = mlflow.pyfunc.load_model("models:/cdd-ray-mnist@champion").predict({"n": 16, "seed": 0})
    out["images"]  # uint8 N x S x S (N x S x S x 3 for colour); out["labels"]: the labeller's class ids

It is logged in a run of its own under the sweep (tag ``role=registered``); the trial's run is not touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cdd_ray import tracking
from cdd_ray.config import ConfigError, config_from_dict
from cdd_ray.front import feasibility
from cdd_ray.metrics import sign

PICKS = ("quality", "fairness")
DEFAULT_ALIAS = "champion"
PYFUNC_ARTIFACT = "pyfunc"  # the registered model's path in the registration run
MODEL_CODE = Path(__file__).with_name("registered_model.py")  # the model, logged as code (no pickle)


def find_sweep(client, name: str) -> Any:
    """The newest finished sweep parent run named ``name``; the error lists the sweeps the store has."""
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string="tags.role = 'sweep'", order_by=["attributes.start_time DESC"])
    chosen = [r for r in runs if r.data.tags.get("sweep") == name and r.info.status == "FINISHED"]
    if not chosen:
        names = sorted({r.data.tags.get("sweep", "?") for r in runs if r.info.status == "FINISHED"})
        raise ConfigError(f"--sweep: no finished sweep named {name!r} in {client.tracking_uri!r}; "
                          f"finished sweeps there: {names or 'none'}")
    return chosen[0]


def trial_rows(client, parent) -> list[dict[str, Any]]:
    """Every trial of the sweep that finished and was evaluated, with its objectives' values and intervals."""
    objectives = parent.data.tags["objectives"].split(",")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    rows = []
    for c in children:
        value = {k: tracking.metric(c.data.metrics, k) for o in objectives for k in (o, f"{o}_ci_lo", f"{o}_ci_hi")}
        if c.data.tags.get("role") != "trial" or c.info.status != "FINISHED" or any(value[o] is None for o in objectives):
            continue
        row = {"trial_id": c.data.tags.get("ray_trial_id", c.info.run_id), "run_id": c.info.run_id,
               "tags": c.data.tags, **{o: value[o] for o in objectives}}
        for o in objectives:
            if value[f"{o}_ci_lo"] is not None and value[f"{o}_ci_hi"] is not None:
                row[f"{o}_ci"] = [value[f"{o}_ci_lo"], value[f"{o}_ci_hi"]]
        rows.append(row)
    return rows


def choose(rows: list[dict[str, Any]], objectives: tuple[str, str], pick: str | None,
           max_fairness: float | None) -> dict[str, Any]:
    """The trial a rule picks: ``quality`` (best first objective), ``fairness`` (lowest second objective; ties
    to the better quality) or ``max_fairness`` (best quality with the second objective at most that)."""
    quality, fairness = objectives
    if not rows:
        raise ConfigError("--sweep: the sweep has no finished, evaluated trial to register")
    if max_fairness is not None:
        result = feasibility(rows, {fairness: max_fairness}, quality)
        if result["best"] is None:
            c = result["closest"]
            raise ConfigError(f"--max-tv: no trial has {fairness} <= {max_fairness}; closest: {c['trial_id']} "
                              f"({fairness} {c[fairness]:.3f})")
        return result["best"]
    if pick == "quality":
        return min(rows, key=lambda r: sign(quality) * r[quality])
    if pick == "fairness":
        return min(rows, key=lambda r: (r[fairness], sign(quality) * r[quality]))
    raise ConfigError(f"--pick: {pick!r} not allowed; allowed: {', '.join(PICKS)} (or --max-tv X)")


def default_model_name(cfg: dict[str, Any]) -> str:
    name = f"cdd-ray-{cfg['data']['dataset']}"
    return name + "-finetune" if cfg.get("finetune", {}).get("pretrained") else name


def _labeller_artifacts(cfg_dict: dict[str, Any], dst: Path) -> dict[str, str]:
    """The labeller the evaluation used, saved beside the model: the run's TorchScript classifier, or the
    classifier cdd_ray trains for this data (from its cache, else trained again, deterministically)."""
    from cdd_ray.data import prepare_split  # torch: after the rule picked a trial (fast errors before)
    from cdd_ray.evaluation.labeller import get_classifier

    cfg = config_from_dict(cfg_dict)
    split = prepare_split(cfg, evaluation=True)
    out = {"labeller": str(dst / "labeller.pt")}
    blob: dict[str, Any] = {"classes": list(split.classes), "in_channels": int(split.clf_train.shape[1])}
    if cfg.eval.classifier_path:
        shutil.copy(Path(cfg.eval.classifier_path).expanduser(), dst / "classifier.ts")
        out["torchscript"] = str(dst / "classifier.ts")
    else:
        clf, acc = get_classifier(split, cfg)
        blob.update(state_dict=clf.state_dict(), accuracy=acc)
    torch.save(blob, dst / "labeller.pt")
    return out


def register(sweep: str, pick: str | None = None, max_fairness: float | None = None, name: str | None = None,
             alias: str = DEFAULT_ALIAS, uri: str | None = None) -> dict[str, Any]:
    """Choose a trial of ``sweep`` by the rule, log it as a pyfunc model and register it; returns what was
    registered (model name, version, alias, the chosen trial and its run)."""
    import mlflow

    import cdd_ray  # the package's source is logged with the model
    from cdd_ray.sample import download_model  # torch, MLflow: when registering

    if (pick is None) == (max_fairness is None):
        raise ConfigError("give one rule: --pick quality | fairness, or --max-tv X")
    if max_fairness is not None and not 0 < max_fairness < 1:
        raise ConfigError(f"--max-tv: {max_fairness} must be in (0, 1)")
    uri = uri or tracking.tracking_uri()
    client = tracking.client(uri)
    parent = find_sweep(client, sweep)
    objectives = tuple(parent.data.tags["objectives"].split(","))
    best = choose(trial_rows(client, parent), objectives, pick, max_fairness)  # type: ignore[arg-type]
    rule = f"pick={pick}" if pick else f"max_{objectives[1]}={max_fairness}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = download_model(best["run_id"], uri, tmp)
        cfg_dict = json.loads((ckpt / "config.json").read_text())
        name = name or default_model_name(cfg_dict)
        artifacts = {"checkpoint": str(ckpt), **_labeller_artifacts(cfg_dict, Path(tmp))}
        if cfg_dict["model"].get("vae"):
            artifacts["vae"] = str(Path(cfg_dict["model"]["vae"]).expanduser())
        tags = {"sweep": sweep, "sweep_run_id": parent.info.run_id, "trial": str(best["trial_id"]),
                "trial_run_id": best["run_id"], "rule": rule, "data_source": best["tags"].get("data_source", ""),
                "fid_features": best["tags"].get("fid_features", "")}
        for o in objectives:
            ci = best.get(f"{o}_ci")
            tags[o] = f"{best[o]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
        mlflow.set_tracking_uri(uri)
        run_id = tracking.create_run(uri, parent.info.experiment_id, f"register {name} ({rule})",
                                     {**tags, "role": "registered", "mlflow.parentRunId": parent.info.run_id})
        with mlflow.start_run(run_id=run_id):  # FINISHED at the end, FAILED on an error
            info = mlflow.pyfunc.log_model(
                name=PYFUNC_ARTIFACT, python_model=str(MODEL_CODE), artifacts=artifacts,
                code_paths=[str(Path(cdd_ray.__file__).parent)], pip_requirements=_requirements())
    version = tracking.with_retries(lambda: mlflow.register_model(info.model_uri, name, tags=tags),
                                    f"register {name}", uri)
    tracking.with_retries(lambda: client.set_registered_model_alias(name, alias, version.version),
                          f"alias {name}@{alias}", uri)
    return {"name": name, "version": version.version, "alias": alias, "trial": best["trial_id"],
            "trial_run_id": best["run_id"], "run_id": run_id, "rule": rule, "model_uri": f"models:/{name}@{alias}",
            **{o: best[o] for o in objectives}}


def _requirements() -> list[str]:
    """What the model needs to load elsewhere (cdd_ray itself travels with it as code)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "diffusers", "numpy", "safetensors", "mlflow")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="the sweep's --name")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--pick", choices=PICKS, help="the best quality, or the fairest, trial")
    rule.add_argument("--max-tv", type=float, default=None, help="the best quality with tv_to_uniform <= this")
    p.add_argument("--model-name", default=None, help="registered model (default: cdd-ray-<dataset>)")
    p.add_argument("--alias", default=DEFAULT_ALIAS)
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    args = p.parse_args(argv)
    try:
        out = register(args.sweep, args.pick, args.max_tv, args.model_name, args.alias, args.tracking_uri)
    except ConfigError as e:  # input errors: before anything is downloaded or registered
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    metrics = ", ".join(f"{k} {out[k]:.3f}" for k in out if isinstance(out[k], float))
    print(f"registered {out['name']} version {out['version']} as @{out['alias']}: trial {out['trial']} of sweep "
          f"{args.sweep} ({out['rule']}; {metrics})\n"
          f"load: mlflow.pyfunc.load_model({out['model_uri']!r}).predict({{'n': 16, 'seed': 0}})\n"
          f"sample: python -m cdd_ray.sample --model {out['model_uri']} --n 64 --out grid.png", file=sys.stdout)


if __name__ == "__main__":
    main()
