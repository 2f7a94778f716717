"""`fastssl.data`: every layout of --data loads with the right labels and classes, and the kNN monitor finds its
labelled evaluation split beside it, or says in a few words why there is none; the image size comes from the
data; imagenet is found like the other named sets; an unreadable file raises UnreadableImage."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from pipeline_checks import unique_set

from fastssl import data
from fastssl.errors import UserError
from fastssl.pipelines import eval_split, load_images
from fastssl.pipelines.beton import BetonSet, write_beton


def images(folder, names, side=20):
    """One small JPEG per name (a path under folder; its folders are made)."""
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side, side), (10 * i, 100, 200)).save(folder / name)


def test_an_imagefolder_root_with_train_and_val(tmp_path):
    images(tmp_path, ["train/cat/0.jpg", "train/cat/1.jpg", "train/dog/0.jpg", "val/cat/0.jpg", "val/dog/0.jpg"])
    train = data.load(str(tmp_path))
    assert (train.classes, train.labels.tolist(), train.labelled) == (["cat", "dog"], [0, 0, 1], True)
    queries, why = data.eval_split(str(tmp_path))
    assert (queries.labels.tolist(), queries.files[0], why) == ([0, 1], str(tmp_path / "val/cat/0.jpg"), "")
    queries, _ = data.eval_split(str(tmp_path / "train"))  # the train/ folder itself: the val/ beside it
    assert queries.files == data.load(str(tmp_path), "test").files


def test_a_root_with_train_only_has_no_monitor_split(tmp_path):
    images(tmp_path, ["train/cat/0.jpg", "train/dog/0.jpg"])
    assert data.load(str(tmp_path)).labels.tolist() == [0, 1]
    assert data.eval_split(str(tmp_path)) == (None, f"no val/ or test/ folder in {tmp_path}")
    with pytest.raises(UserError, match="has no val/ or test/ folder"):
        data.load(str(tmp_path), "test")


def test_a_folder_of_class_folders_is_the_labelled_train_split(tmp_path):
    images(tmp_path / "set", ["cat/0.jpg", "cat/1.png", "dog/a/0.jpg"])
    (tmp_path / "set" / "cat" / "notes.txt").write_text("not an image")
    train = data.load(str(tmp_path / "set"))
    assert (train.classes, train.labels.tolist(), train.split) == (["cat", "dog"], [0, 0, 1], "train")
    assert data.eval_split(str(tmp_path / "set")) == (None, f"no val/ or test/ folder in {tmp_path / 'set'}")
    images(tmp_path / "held_out", ["cat/0.jpg", "dog/0.jpg"])  # --data-val: another folder of class folders, whole
    queries, _ = data.eval_split(str(tmp_path / "set"), str(tmp_path / "held_out"))
    assert queries.labels.tolist() == [0, 1] and queries.classes == ["cat", "dog"]


def test_a_folder_of_images_is_unlabelled_and_searched_at_any_depth(tmp_path):
    images(tmp_path / "photos", ["b.jpg", "a.png", "2021/x.jpg", "2021/05/y.JPG"])
    (tmp_path / "photos" / "2021" / "notes.txt").write_text("not an image")
    train = data.load(str(tmp_path / "photos"))
    assert [f.split("photos/")[1] for f in train.files] == ["2021/05/y.JPG", "2021/x.jpg", "a.png", "b.jpg"]
    assert (train.labels.tolist(), train.classes, train.labelled) == ([-1] * 4, [], False)
    assert data.eval_split(str(tmp_path / "photos"))[0] is None
    # an unlabelled evaluation split turns the monitor off, with the reason
    images(tmp_path / "root", ["train/cat/0.jpg", "val/0.jpg"])
    assert data.eval_split(str(tmp_path / "root")) == (None,
                                                       f"no labels in the evaluation split of {tmp_path / 'root'}")


def test_a_beton_with_and_without_its_val_split(tmp_path):
    write_beton(unique_set(16), tmp_path / "u_train.beton")
    train = load_images(str(tmp_path / "u_train.beton"))
    assert isinstance(train, BetonSet) and train.labels.tolist() == list(range(16)) and train.native_size == 8
    assert eval_split(str(tmp_path / "u_train.beton")) == (
        None, f"no u_val.beton or u_test.beton beside {tmp_path / 'u_train.beton'}")
    shutil.copy(tmp_path / "u_train.beton", tmp_path / "u_test.beton")
    queries, _ = eval_split(str(tmp_path / "u_train.beton"))
    assert queries.root == str(tmp_path / "u_test.beton") and len(queries) == 16
    queries, _ = eval_split(str(tmp_path / "u_train.beton"), str(tmp_path / "u_train.beton"))  # that file
    assert queries.root == str(tmp_path / "u_train.beton")
    (tmp_path / "junk.beton").write_text("not a beton")
    with pytest.raises(UserError, match="junk.beton is not a readable FFCV file"):
        eval_split(str(tmp_path / "u_train.beton"), str(tmp_path / "junk.beton"))


def test_named_sets_and_the_data_val_choices():
    queries, why = data.eval_split("fashion-mnist")
    assert len(queries) == 10000 and queries.split == "test" and why == ""
    assert data.eval_split("fashion-mnist", "none") == (None, "--data-val none")
    with pytest.raises(UserError, match="--data-val /nonexistent/val does not exist"):
        data.eval_split("fashion-mnist", "/nonexistent/val")


def test_the_native_size_comes_from_the_images(tmp_path):
    images(tmp_path / "small", [f"c/{i}.jpg" for i in range(80)], side=32)
    small = data.load(str(tmp_path / "small"))
    assert small.native_size == 32 and small.size_note == "the largest side of 64 sampled images"
    assert small.subset(10).sample == small.sample  # a subset keeps its set's size
    images(tmp_path / "large", [f"c/{i}.jpg" for i in range(3)], side=100)
    large = data.load(str(tmp_path / "large"))
    assert large.native_size is None and large.size_note == "the default: sampled images exceed 64 px"
    assert data.load("fashion-mnist").native_size == 28


def test_imagenet_is_found_like_the_other_named_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data/imagenet
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTSSL_DATA", str(tmp_path / "sets"))
    with pytest.raises(UserError) as err:
        data.load("imagenet")
    assert str(err.value).startswith(f"imagenet not found in {tmp_path / 'sets/imagenet'}, data/imagenet, "
                                     f"{tmp_path / 'home/data/imagenet'}; ")
    images(tmp_path / "sets/imagenet", ["train/n01/0.jpg", "train/n02/0.jpg", "val/n01/0.jpg", "val/n02/0.jpg"])
    train = data.load("imagenet")
    assert train.root == str(tmp_path / "sets/imagenet") and train.classes == ["n01", "n02"]
    assert train.mean_std == data.STATS["imagefolder"]
    assert len(data.eval_split("imagenet")[0]) == 2


def test_bad_input_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_class" / "train" / "cat").mkdir(parents=True)
    for path, message in [("/nonexistent/set", "data path /nonexistent/set does not exist"),
                          (tmp_path / "empty", "empty has no train/ folder"),
                          (tmp_path / "empty_class", "no images found under")]:
        with pytest.raises(UserError, match=message) as err:
            data.load(str(path))
        assert "\n" not in str(err.value)


def test_an_unreadable_file_raises_unreadable_image(tmp_path):
    images(tmp_path, ["train/cat/0.jpg"])
    (tmp_path / "train/cat/1.jpg").write_bytes(b"not a jpeg")
    train = data.load(str(tmp_path))
    assert train.read(0).shape == (3, 20, 20)
    with pytest.raises(data.UnreadableImage) as err:
        train.read(1)
    assert isinstance(err.value, UserError) and err.value.path == str(tmp_path / "train/cat/1.jpg")
    assert str(err.value).startswith(f"cannot decode image {err.value.path} (") and f"fastssl check {tmp_path}" in \
        str(err.value)
    again = pickle.loads(pickle.dumps(err.value))  # as it crosses to another process
    assert (str(again), again.path) == (str(err.value), err.value.path)
    assert str(data.UnreadableImage("message only")) == "message only"  # as torch re-raises a worker's exception


def test_data_is_a_lower_layer_than_the_pipelines():
    code = ("import sys, fastssl.data; "
            "assert not [m for m in sys.modules if m.startswith('fastssl.pipelines')]")
    subprocess.run([sys.executable, "-c", code], check=True)
