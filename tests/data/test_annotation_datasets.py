"""Readers of ALBEF's JSON formats: outputs, error messages, skipping bad samples, collation."""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from torchmm_ext.data import (
    BadImageError,
    build_tokenizer,
    generate_shapes_world,
    load_json_list,
    PretrainDataset,
    RetrievalCollator,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    SkippedSampleWarning,
    albef_test_transform,
    albef_train_transform,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_shapes_world(tmp_path_factory.mktemp("shapes") / "w", num_train=20, num_val=5, num_test=8)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer("shapes", corpus_file=world.vocab_corpus)


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ------------------------------------------------------------------ load_json_list errors


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.json"))):
        load_json_list(tmp_path / "nope.json", ["image"])


def test_invalid_json(tmp_path) -> None:
    f = _write(tmp_path / "bad.json", '[{"image": "a.png",\n "caption": }]')
    with pytest.raises(ValueError, match=re.escape(str(f)) + r": invalid JSON at line 2 column"):
        load_json_list(f, ["image"])


def test_not_a_list(tmp_path) -> None:
    f = _write(tmp_path / "d.json", {"image": "a.png"})
    with pytest.raises(ValueError, match=re.escape(f"{f}: expected a JSON list of records, got dict")):
        load_json_list(f, ["image"])


def test_empty_list(tmp_path) -> None:
    f = _write(tmp_path / "e.json", [])
    with pytest.raises(ValueError, match=re.escape(f"{f}: empty split (no records)")):
        load_json_list(f, ["image"])


def test_record_missing_key(tmp_path) -> None:
    records = [{"image": "a.png", "caption": "x", "image_id": 0}] * 17 + [{"image": "b.png", "image_id": 1}]
    f = _write(tmp_path / "r.json", records)
    with pytest.raises(ValueError, match=re.escape(f"{f}: record 17 has no 'caption' key (keys: image, image_id)")):
        load_json_list(f, ["image", "caption", "image_id"])


def test_record_not_a_dict(tmp_path) -> None:
    f = _write(tmp_path / "r.json", [{"image": "a.png"}, "b.png"])
    with pytest.raises(ValueError, match=re.escape(f"{f}: record 1 is a str")):
        load_json_list(f, ["image"])


def test_caption_of_wrong_type(tmp_path, world) -> None:
    f = _write(tmp_path / "r.json", [{"image": "a.png", "caption": "ok", "image_id": 0}, {"image": "a.png", "caption": 5, "image_id": 0}])
    with pytest.raises(ValueError, match=re.escape(f"{f}: record 1 key 'caption' must be")):
        RetrievalTrainDataset([f], world.image_root, albef_test_transform(32))
    g = _write(tmp_path / "g.json", [{"image": "a.png", "caption": ["ok", 3]}])
    with pytest.raises(ValueError, match=re.escape(f"{g}: record 0 key 'caption' must be")):
        RetrievalEvalDataset(g, world.image_root, albef_test_transform(32))


# ------------------------------------------------------------------ datasets


def test_retrieval_train_dataset(world) -> None:
    ds = RetrievalTrainDataset([world.retrieval_train], world.image_root, albef_train_transform(32, hflip=False))
    assert len(ds) == 20 * 5 and ds.num_images == 20
    image, caption, idx = ds[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(caption, str) and "," not in caption and idx == 1
    assert sorted({ds.samples[i][2] for i in range(len(ds))}) == list(range(20))
    # words per cleaned caption, in sample order (what length-grouped batching sorts by)
    lengths = ds.caption_lengths()
    assert len(lengths) == len(ds) and lengths[7] == len(caption.split())
    short = RetrievalTrainDataset([world.retrieval_train], world.image_root, albef_test_transform(32), max_words=4)
    assert max(short.caption_lengths()) == 4 and max(lengths) > 4


def test_retrieval_eval_dataset(world) -> None:
    ds = RetrievalEvalDataset(world.retrieval_test, world.image_root, albef_test_transform(32))
    assert len(ds) == 8 and len(ds.text) == 40 and len(ds.image) == 8
    assert ds.txt2img[:6] == [0, 0, 0, 0, 0, 1] and ds.img2txt[1] == [5, 6, 7, 8, 9]
    assert all(ds.txt2img[t] == i for i, texts in enumerate(ds.img2txt) for t in texts)
    image, index = ds[3]
    assert image.shape == (3, 32, 32) and index == 3


def test_pretrain_dataset_mixes_formats(world) -> None:
    ds = PretrainDataset(world.pretrain_files, world.image_root, albef_test_transform(32))
    assert len(ds) == 40
    seen = {ds[0][1] for _ in range(30)}
    assert len(seen) > 1  # a list caption is sampled per access
    image, caption = ds[25]  # from the str-caption file
    assert image.shape == (3, 32, 32) and caption


# ------------------------------------------------------------------ bad images


def _world_copy_with_bad_images(world, tmp_path: Path) -> Path:
    root = tmp_path / "images"
    shutil.copytree(world.image_root, root)
    (root / "train/000001.png").unlink()  # records 5-9
    (root / "train/000002.png").write_bytes(b"not a png at all")  # records 10-14
    data = (root / "train/000003.png").read_bytes()
    (root / "train/000003.png").write_bytes(data[: len(data) // 2])  # truncated
    return root


def test_missing_and_corrupt_images_name_file_and_record(world, tmp_path) -> None:
    root = _world_copy_with_bad_images(world, tmp_path)
    ds = RetrievalTrainDataset([world.retrieval_train], root, albef_test_transform(32))
    ann = str(world.retrieval_train)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root / 'train/000001.png'} (record 6 of {ann})")):
        ds[6]
    with pytest.raises(BadImageError, match=re.escape(f"{root / 'train/000002.png'} (record 12 of {ann})")):
        ds[12]
    with pytest.raises(BadImageError, match=re.escape(f"{root / 'train/000003.png'} (record 15 of {ann})")):
        ds[15]


def test_skip_bad_samples_counts_and_warns(world, tmp_path) -> None:
    root = _world_copy_with_bad_images(world, tmp_path)
    ds = RetrievalTrainDataset([world.retrieval_train], root, albef_test_transform(32), skip_bad_samples=True)
    with pytest.warns(SkippedSampleWarning) as record:
        outputs = [ds[i] for i in (5, 10, 15)]
    assert all(image.shape == (3, 32, 32) for image, _, _ in outputs)
    assert all(idx not in (1, 2, 3) for _, _, idx in outputs)  # replaced by good samples
    assert ds.num_skipped >= 3
    messages = [str(w.message) for w in record]
    assert len(messages) == ds.num_skipped
    assert all(m.startswith(f"skipped {k + 1} bad samples so far; last: ") for k, m in enumerate(messages))
    assert f"train/000001.png (record 5 of {world.retrieval_train}): file not found" in messages[0]
    assert any(f"train/000002.png (record 10 of {world.retrieval_train}): UnidentifiedImageError" in m for m in messages)

    ev = RetrievalEvalDataset(world.retrieval_train.with_name("retrieval_val.json"), root, albef_test_transform(32), skip_bad_samples=True)
    assert ev.num_skipped == 0 and ev[0][0].shape == (3, 32, 32)


def test_eval_skip_keeps_the_slot(world, tmp_path) -> None:
    root = tmp_path / "images"
    shutil.copytree(world.image_root, root)
    (root / "test/000002.png").unlink()
    ds = RetrievalEvalDataset(world.retrieval_test, root, albef_test_transform(32), skip_bad_samples=True)
    with pytest.warns(SkippedSampleWarning, match="record 2 of"):
        image, index = ds[2]
    assert index == 2 and image.shape == (3, 32, 32) and ds.num_skipped == 1


# ------------------------------------------------------------------ collation


def test_collator_pads_to_longest(world, tokenizer) -> None:
    ds = RetrievalTrainDataset([world.retrieval_train], world.image_root, albef_test_transform(32))
    collate = pickle.loads(pickle.dumps(RetrievalCollator(tokenizer, max_length=30)))
    batch = collate([ds[i] for i in range(6)])
    assert batch["image"].shape == (6, 3, 32, 32) and batch["image"].dtype == torch.float32
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == batch["idx"].dtype == torch.long
    assert ids.shape == mask.shape and ids.shape[0] == 6 and ids.shape[1] <= 30
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert mask.sum(1).max() == ids.shape[1]  # padded to the longest, not to max_length
    assert ((ids == tokenizer.pad_token_id) == (mask == 0)).all()
    assert batch["idx"].tolist() == [0, 0, 0, 0, 0, 1]

    short = collate([(torch.zeros(3, 8, 8), "red " * 50)])
    assert short["input_ids"].shape == (1, 30) and "idx" not in short


# ------------------------------------------------------------------ other tasks


def test_vqa_dataset(world) -> None:
    from torchmm_ext.data import VQADataset

    train = VQADataset([world.vqa_train], world.image_root, albef_test_transform(32))
    image, question, answers, weights = train[0]
    assert image.shape == (3, 32, 32) and question and all(a.endswith("[SEP]") for a in answers)
    assert abs(sum(weights) - 1.0) < 1e-6
    test = VQADataset([world.vqa_test], world.image_root, albef_test_transform(32), split="test")
    assert isinstance(test[1][2], int) and len(test) == 3 * 8


def test_ve_nlvr_grounding_datasets(world, tmp_path) -> None:
    from torchmm_ext.data import GroundingDataset, NLVRDataset, VEDataset

    ve = VEDataset(world.ve_test, world.image_root, albef_test_transform(32), image_ext=world.ve_image_ext)
    assert sorted(ve[i][2] for i in range(3)) == [0, 1, 2]  # one of each label per image
    nlvr = NLVRDataset(world.nlvr_test, world.image_root, albef_test_transform(32))
    left, right, sentence, label = nlvr[0]
    assert left.shape == right.shape == (3, 32, 32) and label in (0, 1) and sentence
    g_train = GroundingDataset(world.grounding_train, world.image_root, albef_test_transform(32))
    assert max(g_train.indices) + 1 == len(g_train.img_ids) == 20
    g_test = GroundingDataset(world.grounding_testA, world.image_root, albef_test_transform(32), split="test")
    assert g_test[0][2] == g_test.records[0]["ref_id"]

    bad = _write(tmp_path / "ve.json", [{"image": "x", "sentence": "s", "label": "maybe"}])
    with pytest.raises(ValueError, match=re.escape(f"{bad}: record 0 key 'label'")):
        VEDataset(bad, world.image_root, albef_test_transform(32))
    with pytest.raises(FileNotFoundError, match=r"test/000000\.jpg \(record 0 of"):
        VEDataset(world.ve_test, world.image_root, albef_test_transform(32))[0]  # ALBEF's default .jpg


def test_retrieval_batches_through_worker_processes(world, tokenizer) -> None:
    from torchmm_ext.data import build_dataloader

    ds = RetrievalTrainDataset([world.retrieval_train], world.image_root, albef_train_transform(32, hflip=False))
    loader = build_dataloader(ds, batch_size=8, shuffle=True, num_workers=2, collate_fn=RetrievalCollator(tokenizer), drop_last=True)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(ds) // 8
    assert batches[0]["image"].shape == (8, 3, 32, 32) and batches[0]["idx"].shape == (8,)
