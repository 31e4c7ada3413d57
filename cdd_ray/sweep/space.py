"""The search space: a YAML file a user copies and edits (``search_spaces/*.yaml``), checked before any work, turned
into Ray Tune's distributions, and each trial's config from its sampled parameters. Also which searched keys
would break the equal budget of the trials and references."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdd_ray.config import Config, ConfigError, allowed_keys, apply_overrides, config_from_dict, flatten, validate

DERIVED_KEYS = ("dual.b_rel", "optim.batch_ratio")

# Equal budget = the same training compute and the same optimiser for every point on the map. These keys change
# one or the other; the references keep the base config's values, so a space that searches one of them compares
# trials with references at another budget (said before training, in the front and in the parent run's tags).
# The shipped spaces search constraint thresholds and dual step sizes only.
BUDGET_KNOBS = ("optim.lr", "optim.steps", "optim.batch_size", "optim.constraint_batch_size", "optim.batch_ratio",
                "optim.warmup", "optim.weight_decay", "optim.grad_clip", "optim.precision")

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass
class SearchSpace:
    params: dict[str, dict[str, Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def max_value(self, key: str, default: float) -> float:
        """The largest value ``key`` can take in this space (``default`` when it is not searched)."""
        if key not in self.params:
            return default
        kind, args = next(iter(self.params[key].items()))
        return max(args) if kind == "choice" else args[1]


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space file; every error names the file and the entry."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space: search-space file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--space {str(p)!r}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise ConfigError(f"--space {str(p)!r}: expected a mapping with a non-empty 'params' section")
    unknown = set(data) - {"params", "fixed"}
    if unknown:
        raise ConfigError(f"--space {str(p)!r}: unknown sections {sorted(unknown)}; allowed: params, fixed")
    keys = set(allowed_keys()) | set(DERIVED_KEYS)
    for key, dist in data["params"].items():
        where = f"--space {str(p)!r}: params.{key}"
        if key not in keys:
            raise ConfigError(f"{where}: unknown key; allowed: config keys or {', '.join(DERIVED_KEYS)}")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a list, got {args!r}")
        if kind != "choice":
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
            if args[0] >= args[1]:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
    fixed = flatten(data.get("fixed") or {})
    bad = [k for k in fixed if k not in allowed_keys()]
    if bad:
        raise ConfigError(f"--space {str(p)!r}: fixed has unknown keys {bad}")
    return SearchSpace(params=dict(data["params"]), fixed=fixed, path=str(p))


def to_tune(space: SearchSpace) -> dict[str, Any]:
    """Search space -> Ray Tune distributions (OptunaSearch converts them)."""
    from ray import tune  # Ray only here: the jobs check a space file before they start (or even import) Ray

    make = {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {k: make[kind](args) for k, d in space.params.items() for kind, args in d.items()}


def trial_config(base: dict[str, Any], params: dict[str, Any], baseline_losses: dict[str, float] | None) -> Config:
    """The base config with a trial's sampled params applied (derived keys resolved), validated."""
    cfg = config_from_dict(base)
    plain = {k: v for k, v in params.items() if k not in DERIVED_KEYS}
    apply_overrides(cfg, plain)
    if "optim.batch_ratio" in params:
        cfg.optim.constraint_batch_size = max(1, cfg.optim.batch_size // int(params["optim.batch_ratio"]))
    if "dual.b_rel" in params and cfg.dual.kind == "plain":
        if not baseline_losses:
            raise ConfigError("dual.b_rel needs the unconstrained baseline's per-class losses")
        cfg.dual.b = [float(params["dual.b_rel"]) * baseline_losses[n] for n in cfg.constraint_names()]
    validate(cfg)
    return cfg


def budget_knobs(space: SearchSpace) -> list[str]:
    """The searched keys that change a trial's training compute or optimiser (BUDGET_KNOBS)."""
    return [k for k in space.params if k in BUDGET_KNOBS]


def unequal_budget_note(knobs: list[str], base: Config) -> str:
    values = flatten(base.to_dict())
    keep = ", ".join(f"{k}={values[k]}" for k in knobs if k in values)
    return (f"NOT AT EQUAL BUDGET: the search space searches {', '.join(knobs)}, which change the training compute "
            f"or the optimiser; the references keep the base config's {keep or 'batches'}. Compare the trials with "
            "each other; against the references only in the rows' steps / train_images / lr columns.")


def largest_trial_config(space: SearchSpace, cfg: Config) -> Config:
    """A copy of ``cfg`` with the costliest trial's batches ``space`` allows: the most images per primal step (objective
    batch + every constraint's)."""
    big = config_from_dict(cfg.to_dict())
    if "optim.batch_ratio" in space.params:
        kind, args = next(iter(space.params["optim.batch_ratio"].items()))
        c = max(1, cfg.optim.batch_size // int(min(args)))
    else:
        c = int(space.max_value("optim.constraint_batch_size", cfg.optim.constraint_batch_size))
    big.optim.batch_size = int(space.max_value("optim.batch_size", cfg.optim.batch_size))
    big.optim.constraint_batch_size = c
    big.unconstrained = False
    return big
