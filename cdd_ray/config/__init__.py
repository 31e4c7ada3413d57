"""Run configuration: what a run is (``schema``), named starting points (``presets``), how files and ``--set``
build one (``overrides``), and its checks: ``validate`` the fields, reading nothing from disk (workers and trials
run it on the config the driver resolved), ``checks.check`` also what they point at on disk (the driver).

Resolution order (later wins): dataclass defaults -> preset -> YAML file -> ``--set`` overrides.
Every error is a ``ConfigError`` that names the field, the value and what is allowed, raised before any data,
model or Ray work starts."""

from cdd_ray.config.checks import check
from cdd_ray.config.disk import class_folders, vae_geometry
from cdd_ray.config.errors import ConfigError
from cdd_ray.config.overrides import (allowed_keys, apply_overrides, build_config, config_from_dict, flatten,
                                      load_yaml, parse_set)
from cdd_ray.config.presets import PRESETS
from cdd_ray.config.schema import (IMAGE_SUFFIXES, Config, DataConfig, DualConfig, EvalConfig, FaultConfig,
                                   FinetuneConfig, ModelConfig, OptimConfig, RayConfig)
from cdd_ray.config.validate import n_classes, validate

__all__ = ["IMAGE_SUFFIXES", "PRESETS", "Config", "ConfigError", "DataConfig", "DualConfig", "EvalConfig",
           "FaultConfig", "FinetuneConfig", "ModelConfig", "OptimConfig", "RayConfig", "allowed_keys",
           "apply_overrides", "build_config", "check", "class_folders", "config_from_dict", "flatten", "load_yaml",
           "n_classes", "parse_set", "vae_geometry", "validate"]
