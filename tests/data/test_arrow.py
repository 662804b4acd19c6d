"""ViLT/METER Arrow files and the shared task data: small generated tables (with a bad record),
VQA soft scores, NLVR2 pairs, retrieval negatives, pre-training batches, transforms, errors."""

import io
import json
import warnings

import pyarrow as pa
import pytest
import torch
from PIL import Image

from torchmm_ext.data.arrow import ArrowColumnError, ArrowTables
from torchmm_ext.data.datasets import BadImageError, SkippedSampleWarning
from torchmm_ext.data.vl_tasks import (
    AnswerVocab,
    CaptionDataset,
    ClassifierVQACollator,
    ClassifierVQADataset,
    MLMITMCollator,
    NegativesCollator,
    pad_images,
    PairCollator,
    PairDataset,
    pixelbert_transform,
    RetrievalEvalSet,
    RetrievalNegativesDataset,
    vqa_soft_score,
)

TRANSFORM = pixelbert_transform(32, multiple=8)


def png(colour, size=(40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_arrow(path, columns: dict, stream: bool = False):
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        writer.write_table(table)
        writer.close()
    return path


class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per word (hash), [CLS]=1, [SEP]=2, pad 0."""

    pad_token_id, cls_token_id, mask_token_id = 0, 1, 3

    def __len__(self):
        return 100

    def __call__(self, texts, padding="longest", truncation=True, max_length=40, return_tensors="pt"):
        rows = [[1] + [4 + sum(map(ord, w)) % 90 for w in t.split()][: max_length - 2] + [2] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def vqa_table(tmp_path, bad_row=None):
    images = [png("red"), png("blue"), png("green")]
    if bad_row is not None:
        images[bad_row] = b"not an image at all"
    return write_arrow(tmp_path / "vqav2_train.arrow", {
        "image": images,
        "questions": [["what colour"], ["what colour", "is it blue"], ["what colour"]],
        "answers": [[["red"]], [["blue"], ["yes", "no"]], [["green", "red"]]],
        "answer_labels": [[[0]], [[1], [2, 3]], [[4, 0]]],
        "answer_scores": [[[1.0]], [[1.0], [0.9, 0.3]], [[0.6, 0.3]]],
        "image_id": [0, 1, 2],
        "question_id": [[10], [11, 12], [13]],
        "split": ["train"] * 3,
    })


def test_vqa_arrow_reads_every_question_with_vilt_labels_and_scores(tmp_path):
    path = vqa_table(tmp_path)
    vocab = AnswerVocab.from_arrow(path)
    assert vocab.answers == ["red", "blue", "yes", "no", "green"]
    ds = ClassifierVQADataset(path, vocab, TRANSFORM, split="train")
    assert len(ds) == 4 and ds.has_answers
    image, question, targets, index = ds[2]
    assert question == "is it blue" and targets == {2: 0.9, 3: 0.3} and image.shape[0] == 3
    assert ds.questions[2].question_id == 12
    batch = ClassifierVQACollator(CharTokenizer(), len(vocab))([ds[i] for i in range(4)])
    assert batch["targets"].shape == (4, 5)
    assert batch["targets"][3].tolist() == pytest.approx([0.3, 0, 0, 0, 0.6])
    assert batch["images"].shape == (4, 3, 32, 40) and batch["pixel_mask"].all()


def test_bad_image_names_file_row_and_column_or_is_a_counted_skip(tmp_path):
    path = vqa_table(tmp_path, bad_row=1)
    vocab = AnswerVocab.from_arrow(path)
    ds = ClassifierVQADataset(path, vocab, TRANSFORM, split="train")
    with pytest.raises(BadImageError, match=r"vqav2_train\.arrow: row 1 column 'image': cannot decode image"):
        ds[1]
    skipping = ClassifierVQADataset(path, vocab, TRANSFORM, split="train", skip_bad_samples=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [skipping[i] for i in range(len(skipping))]
    assert len(samples) == 4 and skipping.num_skipped >= 2
    assert any(issubclass(w.category, SkippedSampleWarning) and "row 1 column 'image'" in str(w.message)
               for w in caught)


def test_missing_column_and_out_of_vocabulary_label_are_clear_errors(tmp_path):
    path = write_arrow(tmp_path / "no_answers.arrow", {"image": [png("red")], "questions": [["q"]]})
    with pytest.raises(ArrowColumnError, match=r"no_answers\.arrow: no column 'question_id', 'answers'"):
        ClassifierVQADataset(path, AnswerVocab(["a"]), TRANSFORM)
    good = vqa_table(tmp_path)
    with pytest.raises(ValueError, match=r"row 1 column 'answer_labels': question 1 has label 2, outside the 2-answer"):
        ClassifierVQADataset(good, AnswerVocab(["red", "blue"]), TRANSFORM, split="test")
    with pytest.raises(FileNotFoundError, match="missing.arrow"):
        ArrowTables(tmp_path / "missing.arrow", ["image"])


def test_vqa_soft_scores_from_json_annotator_answers(tmp_path):
    assert [vqa_soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    records = [{"image": "a.png", "question": "what colour", "question_id": 5,
                "answer": ["red"] * 6 + ["pink"] * 2 + ["rose", "maroon"]},
               {"image": "a.png", "question": "how many", "question_id": 6, "answer": ["lots"] * 10}]
    (tmp_path / "vqa.json").write_text(json.dumps(records))
    vocab = AnswerVocab(["red", "pink", "rose", "two"])
    ds = ClassifierVQADataset(tmp_path / "vqa.json", vocab, TRANSFORM, tmp_path, split="train")
    assert ds.num_dropped == 1 and len(ds) == 1  # "lots" is not in the vocabulary: dropped (ViLT)
    assert ds[0][2] == {0: 1.0, 1: 0.6, 2: 0.3}
    test = ClassifierVQADataset(tmp_path / "vqa.json", vocab, TRANSFORM, tmp_path, split="test")
    assert len(test) == 2 and test.questions[1].answers == ["lots"] * 10


def test_nlvr2_pairs_from_arrow_and_json_and_a_record_with_one_image(tmp_path):
    path = write_arrow(tmp_path / "nlvr2_dev.arrow", {
        "image_0": [png("red"), png("blue")], "image_1": [png("green", (48, 32)), png("white")],
        "questions": [["left is red", "right is red"], ["both white"]],
        "answers": [["True", "False"], ["False"]], "identifier": ["a", "b"],
    }, stream=True)
    ds = PairDataset(path, TRANSFORM)
    assert len(ds) == 3 and [ds[i][3] for i in range(3)] == [1, 0, 0]
    left, right, sentence, _ = ds[1]
    assert sentence == "right is red" and left[0, 0, 0] > 0.9 and right[1, 0, 0] > 0.0  # red, green
    batch = PairCollator(CharTokenizer())([ds[0], ds[2]])
    assert batch["images"].shape == (2, 2, 3, 32, 48) and batch["pixel_mask"].shape == (2, 2, 32, 48)
    assert batch["pixel_mask"][0, 1].all() and not batch["pixel_mask"][0, 0].all()  # 40 px wide left image
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))
    (tmp_path / "one.json").write_text(json.dumps([{"images": ["a.png"], "sentence": "s", "label": "True"}]))
    with pytest.raises(ValueError, match=r"one\.json: record 0 key 'images' must be a list of two image paths"):
        PairDataset(tmp_path / "one.json", TRANSFORM, tmp_path)
    no_right = write_arrow(tmp_path / "nlvr2_bad.arrow", {"image_0": [png("red")], "questions": [["s"]],
                                                         "answers": [["True"]]})
    with pytest.raises(ArrowColumnError, match="no column 'image_1'"):
        PairDataset(no_right, TRANSFORM)


def test_retrieval_negatives_come_from_other_images_and_eval_sets_index_texts(tmp_path):
    captions = [["red one", "a red"], ["blue one"], ["green one", "a green", "green"]]
    path = write_arrow(tmp_path / "f30k_caption_karpathy_train.arrow", {
        "image": [png("red"), png("blue"), png("green")], "caption": captions, "image_id": ["r", "b", "g"],
        "split": ["train"] * 3})
    ds = RetrievalNegativesDataset(path, TRANSFORM, num_negatives=5)
    assert len(ds) == 6
    image, texts = ds[0]
    assert texts[0] == "red one" and len(texts) == 6 and not set(texts[1:]) & {"red one", "a red"}
    batch = NegativesCollator(CharTokenizer())([ds[0], ds[3]])
    assert batch["input_ids"].shape[:2] == (2, 6) and batch["attention_mask"].shape == batch["input_ids"].shape
    ev = RetrievalEvalSet(path, TRANSFORM)
    assert ev.img2txt == [[0, 1], [2], [3, 4, 5]] and ev.txt2img == [0, 0, 1, 2, 2, 2] and len(ev) == 3


def test_pretraining_batch_masks_text_and_swaps_half_the_images(tmp_path):
    path = write_arrow(tmp_path / "coco.arrow", {"image": [png((15 * i, 0, 0)) for i in range(16)],
                                                 "caption": [["a b c d e f g h"]] * 16})
    ds = CaptionDataset(path, TRANSFORM)
    torch.manual_seed(0)
    batch = MLMITMCollator(CharTokenizer(), mlm_probability=0.5)([ds[i] for i in range(16)])
    swapped = batch["itm_labels"] == 0
    assert 0 < swapped.sum() < 16
    for i in swapped.nonzero().flatten().tolist():  # a swapped row takes another row's image
        sources = [j for j in range(16) if torch.equal(batch["itm_images"][i], batch["images"][j])]
        assert len(sources) == 1 and sources[0] != i
    own = ~swapped
    assert torch.equal(batch["itm_images"][own], batch["images"][own])
    masked = batch["mlm_labels"] != -100
    assert masked.any() and torch.equal(batch["mlm_labels"][masked], batch["input_ids"][masked])
    assert (batch["input_ids"][:, 0] == 1).all() and not masked[:, 0].any()  # [CLS] never masked


def test_pixelbert_resize_keeps_aspect_and_multiples_and_padding_masks():
    wide = pixelbert_transform(384)(Image.new("RGB", (500, 375)))
    assert wide.shape == (3, 384, 512)  # shorter side 384, 512 = round(500 * 384 / 375) floored to 32
    long = pixelbert_transform(384)(Image.new("RGB", (2000, 400)))
    assert long.shape == (3, 128, 608)  # longer side capped at int(1333 / 800 * 384) = 639 -> 608
    assert torch.allclose(pixelbert_transform(32)(Image.new("RGB", (32, 32), (255, 0, 0)))[:, 0, 0],
                          torch.tensor([1.0, -1.0, -1.0]))  # mean / std 0.5
    images, mask = pad_images([torch.ones(3, 32, 64), torch.ones(3, 64, 32)])
    assert images.shape == (2, 3, 64, 64) and mask[0, :32].all() and not mask[0, 32:].any()
    assert mask[1, :, :32].all() and not mask[1, :, 32:].any() and images[1, :, :, 32:].abs().sum() == 0
