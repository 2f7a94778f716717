"""Every recipe in recipes/ loads, keeps its own values and builds its method and views at its image size."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastssl.config import load_file, merge, to_dict
from fastssl.methods import build as build_method
from fastssl.views import apply_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipe: (image size to build at, its views by role with their sides in px)
COVERED = {
    "ressl-imagenet-r50.yaml": (224, {"weak": 224, "strong": 224}),
    "ressl-imagenet-r50-5crop.yaml": (224, {"weak": 224, "strong": 224, "crop1": 192, "crop2": 160, "crop3": 128,
                                            "crop4": 96}),
    "ressl-cifar10-r18.yaml": (32, {"weak": 32, "strong": 32}),
    "isd-imagenet-r50.yaml": (224, {"weak": 224, "strong": 224}),
    "resa-imagenet-r50.yaml": (224, {"weak": 224, "strong": 224}),
    "resa-cifar10-r18.yaml": (32, {"weak": 32, "strong": 32}),
    "resa-imagenet-vits16.yaml": (224, {"weak": 224, "strong": 224}),
    "ressl-imagenet-vits16.yaml": (224, {"weak": 224, "strong": 224}),
    "mocov2-imagenet-r50.yaml": (224, {"view1": 224, "view2": 224}),
    "byol-imagenet-r50-lars.yaml": (224, {"view1": 224, "view2": 224}),
    "byol-imagenet-r50.yaml": (224, {"view1": 224, "view2": 224}),
    "fashion-mnist-ressl-r18w16.yaml": (28, {"weak": 28, "strong": 28}),
}


def test_every_recipe_is_covered():
    files = {p.name for p in RECIPES.iterdir() if p.name != "README.md"}
    assert files == set(COVERED), "add the recipe to COVERED (and recipes/README.md)"
    listed = (RECIPES / "README.md").read_text()
    assert all(name in listed for name in files)


@pytest.mark.parametrize("name", sorted(COVERED))
def test_recipe_builds_its_method_and_views(name):
    size, view_sizes = COVERED[name]
    values = load_file(str(RECIPES / name))
    assert values.get("image_size", size) == size
    assert not {"out", "device", "workers", "resume"} & values.keys(), "machine choices stay on the command line"
    cfg, method = build_method(merge(values, {"image_size": size}))
    for key, value in values.items():  # resolve fills only what the recipe leaves out
        assert to_dict(cfg)[key] == value, key
    views = apply_overrides(method.view_specs(method.opts, size, (0.5,) * 3, (0.25,) * 3), cfg.view_changes)
    assert {role: spec.size for role, spec in views.items()} == view_sizes


def test_recipe_specific_settings_land_in_the_views_and_the_method():
    def built(name):
        size = COVERED[name][0]
        cfg, method = build_method(merge(load_file(str(RECIPES / name)), {"image_size": size}))
        specs = method.view_specs(method.opts, size, (0.5,) * 3, (0.25,) * 3)
        return cfg, method, apply_overrides(specs, cfg.view_changes)

    _, _, views = built("ressl-cifar10-r18.yaml")
    assert views["strong"].blur_p == 0.5 and views["weak"].blur_p == 0  # the paper's blur on the student only
    cfg, method, views = built("fashion-mnist-ressl-r18w16.yaml")
    assert views["weak"].crop_scale == (1.0, 1.0) and method.opts.proj_bn and method.encoder_average is not None
    cfg, method, _ = built("ressl-imagenet-r50.yaml")
    assert method.queue.rows.shape == (131072, 512)
