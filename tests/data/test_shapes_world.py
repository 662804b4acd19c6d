"""The synthetic shapes world: determinism, caching, reference formats, caption quality."""

import collections
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from torchmm_ext.data import cached_shapes_world, default_shapes_root, generate_shapes_world, swap_colours
from torchmm_ext.data.shapes_world import COLOURS, POSITIONS, SHAPES

SMALL = dict(num_train=50, num_val=12, num_test=60, captions_per_image=5, image_size=48)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_shapes_world(tmp_path_factory.mktemp("shapes") / "w", seed=0, **SMALL)


def _load(path: Path):
    with open(path) as f:
        return json.load(f)


def _all_files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path) -> None:
    again = generate_shapes_world(tmp_path / "again", seed=0, num_workers=2, **SMALL)  # pool vs serial
    assert _all_files(world.root) == _all_files(again.root)
    other = generate_shapes_world(tmp_path / "other", seed=1, **SMALL)
    assert _load(other.retrieval_test) != _load(world.retrieval_test)
    img = "test/000000.png"
    a = np.asarray(Image.open(world.image_root / img))
    b = np.asarray(Image.open(other.image_root / img))
    assert a.shape == b.shape == (48, 48, 3) and not np.array_equal(a, b)


def test_cache_is_reused_and_mismatch_is_refused(world) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in world.root.rglob("*")}
    start = time.perf_counter()
    again = generate_shapes_world(world.root, seed=0, **SMALL)
    assert time.perf_counter() - start < 0.5
    assert again == world
    assert {p: p.stat().st_mtime_ns for p in world.root.rglob("*")} == mtimes
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_shapes_world(world.root, seed=5, **SMALL)


def test_overwrite_replaces_and_no_temp_dirs_left(tmp_path) -> None:
    root = tmp_path / "w"
    generate_shapes_world(root, seed=0, **SMALL)
    w = generate_shapes_world(root, seed=2, overwrite=True, **SMALL)
    assert _load(w.manifest)["params"]["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


def test_default_root_depends_on_params(tmp_path) -> None:
    a = default_shapes_root(tmp_path, seed=0, **SMALL)
    assert a == default_shapes_root(tmp_path, seed=0, **SMALL)
    assert a != default_shapes_root(tmp_path, seed=1, **SMALL)
    w = cached_shapes_world(tmp_path, seed=0, **SMALL)
    assert w.root == a and w.manifest.is_file()


def test_manifest_and_reference_keys(world) -> None:
    manifest = _load(world.manifest)
    assert manifest["params"] == dict(seed=0, **SMALL) and manifest["format_version"] >= 1
    keys = {
        "retrieval_train": {"image", "caption", "image_id"},
        "retrieval_val": {"image", "caption"},
        "retrieval_test": {"image", "caption"},
        "pretrain": {"image", "caption"},
        "pretrain_objects": {"image", "caption"},
        "vqa_train": {"image", "question", "answer", "dataset"},
        "vqa_val": {"image", "question", "answer", "dataset", "question_id"},
        "vqa_test": {"image", "question", "answer", "dataset", "question_id"},
        "ve_train": {"image", "sentence", "label"},
        "ve_val": {"image", "sentence", "label"},
        "ve_test": {"image", "sentence", "label"},
        "nlvr_train": {"images", "sentence", "label"},
        "nlvr_dev": {"images", "sentence", "label"},
        "nlvr_test": {"images", "sentence", "label"},
        "grounding_train": {"image", "text", "ref_id", "image_id"},
        "grounding_val": {"image", "text", "ref_id"},
        "grounding_testA": {"image", "text", "ref_id"},
        "grounding_testB": {"image", "text", "ref_id"},
        "hard_negatives_test": {"image", "caption", "negative"},
    }
    for field, expected in keys.items():
        records = _load(getattr(world, field))
        assert isinstance(records, list) and records, field
        for rec in records:
            assert set(rec) == expected, (field, rec)
        assert manifest["counts"][getattr(world, field).name] == len(records)

    train = _load(world.retrieval_train)
    assert len(train) == 50 * 5 and len({r["image_id"] for r in train}) == 50
    assert all(isinstance(r["caption"], str) for r in train)
    for rec in _load(world.retrieval_test):
        assert len(rec["caption"]) == 5 and len(set(rec["caption"])) == 5
        assert (world.image_root / rec["image"]).is_file()
    answers = set(_load(world.answer_list))
    assert {"yes", "no", "1", "2", "3"} | set(COLOURS) | set(SHAPES) | set(POSITIONS) <= answers
    for rec in _load(world.vqa_test):
        assert len(rec["answer"]) == 10 and set(rec["answer"]) <= answers and rec["dataset"] == "vqa"
        assert collections.Counter(rec["answer"]).most_common(1)[0][1] >= 5
    for rec in _load(world.ve_test):
        assert rec["label"] in ("entailment", "neutral", "contradiction")
        assert (world.image_root / (rec["image"] + ".png")).is_file()  # id without extension
    for rec in _load(world.nlvr_dev):
        assert rec["label"] in ("True", "False") and len(rec["images"]) == 2 and rec["images"][0] != rec["images"][1]
        assert all((world.image_root / im).is_file() for im in rec["images"])

    gt, dets = _load(world.grounding_gt), _load(world.grounding_dets)
    for field in ("grounding_val", "grounding_testA", "grounding_testB"):
        for rec in _load(getattr(world, field)):
            assert gt[str(rec["ref_id"])]["image"] == rec["image"]
            assert gt[str(rec["ref_id"])]["bbox"] in dets[rec["image"]]  # the true box is a candidate
            assert len(dets[rec["image"]]) > len(_load(world.scenes)[rec["image"]]["objects"])


def test_splits_use_disjoint_images(world) -> None:
    train = {r["image"] for r in _load(world.retrieval_train)}
    val = {r["image"] for r in _load(world.retrieval_val)}
    test = {r["image"] for r in _load(world.retrieval_test)}
    assert len(val) == 12 and len(test) == 60 and not (train & val or train & test or val & test)


def test_captions_identify_images(world) -> None:
    owners = collections.defaultdict(set)
    records = _load(world.retrieval_test)
    for rec in records:
        for c in rec["caption"]:
            owners[c].add(rec["image"])
    captions = [c for rec in records for c in rec["caption"]]
    shared = sum(len(owners[c]) > 1 for c in captions) / len(captions)
    assert shared < 0.05


def test_captions_name_every_object(world) -> None:
    scenes = _load(world.scenes)
    for rec in _load(world.retrieval_test):
        for caption in rec["caption"]:
            for obj in scenes[rec["image"]]["objects"]:
                assert obj["colour"] in caption and obj["shape"] in caption, (caption, obj)


def test_labels_are_balanced(world) -> None:
    ve = collections.Counter(r["label"] for r in _load(world.ve_train))
    assert ve["entailment"] == ve["neutral"] == ve["contradiction"] == 50
    nlvr = collections.Counter(r["label"] for r in _load(world.nlvr_train))
    assert min(nlvr.values()) >= 15


def test_swap_colours() -> None:
    caption = "a large red circle at the top left and a small blue square in the center"
    assert swap_colours(caption) == "a large blue circle at the top left and a small red square in the center"
    assert swap_colours("a red circle above a blue square") == "a blue circle above a red square"
    assert swap_colours("a red star above an orange cross") == "an orange star above a red cross"
    assert swap_colours("one small green triangle on the right") is None
    rng = random.Random(0)
    three = "a red circle, a blue square and a green star"
    for _ in range(10):
        neg = swap_colours(three, rng)
        assert neg != three and sorted(neg.split()) == sorted(three.split())


def test_hard_negatives_differ_from_positives(world) -> None:
    captions = {rec["image"]: rec["caption"] for rec in _load(world.retrieval_test)}
    negs = _load(world.hard_negatives_test)
    assert len(negs) >= 30
    for rec in negs:
        assert rec["caption"] in captions[rec["image"]]
        assert rec["negative"] not in captions[rec["image"]]
        assert sorted(rec["negative"].replace("an ", "a ").split()) == sorted(rec["caption"].replace("an ", "a ").split())
