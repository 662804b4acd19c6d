"""VQA accuracy by hand, the metrics' checks, evaluate_vqa with a stub model, and the VQA data
pieces the evaluation relies on (answer list, collator, question ids)."""

import json

import pytest
import torch
from PIL import Image

from torchmm_ext.data.datasets import load_answer_list, VQACollator, VQADataset
from torchmm_ext.evaluation import evaluate_vqa, ground_truth_answers, vqa_accuracy, vqa_metrics


def test_vqa_accuracy_by_hand():
    gt = ["red"] * 2 + ["blue"] * 7 + ["green"]
    assert vqa_accuracy("yellow", gt) == 0.0
    assert vqa_accuracy("green", gt) == pytest.approx(1 / 3)
    assert vqa_accuracy("red", gt) == pytest.approx(2 / 3)
    assert vqa_accuracy("blue", gt) == 1.0
    assert vqa_accuracy("red", ["red"] * 3) == 1.0
    assert vqa_accuracy("Red", gt) == 0.0  # exact comparison, no normalisation


def test_vqa_metrics_mean_and_ceiling():
    gt = {1: ["a"] * 10, 2: ["b", "c", "c", "x"], 3: ["x"] * 10}
    predictions = [{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "b"},
                   {"question_id": 3, "answer": "a"}]
    m = vqa_metrics(predictions, gt, answer_list=["a", "b", "c"])
    assert m["acc"] == pytest.approx(100 * (1 + 1 / 3 + 0) / 3)
    # best reachable with the list: q1 "a" 1, q2 "c" 2/3, q3 0 ("x" is not in the list)
    assert m["max_acc"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert m["num_questions"] == 3
    assert "max_acc" not in vqa_metrics(predictions, gt)


@pytest.mark.parametrize("predictions, message", [
    ([{"question_id": 9, "answer": "a"}], "question_id 9, which has no ground-truth"),
    ([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "a"}], "question_id 1 predicted twice"),
    ([{"question_id": 1, "answer": "a"}], r"1 questions have no prediction \(e.g. question_id 2\)"),
    ([{"question_id": 1, "answer": "zzz"}], "question_id 1: predicted answer 'zzz' is not in the answer list"),
])
def test_vqa_metrics_errors(predictions, message):
    with pytest.raises(ValueError, match=message):
        vqa_metrics(predictions, {1: ["a"], 2: ["b"]}, answer_list=["a", "b"])


def test_ground_truth_answers():
    assert ground_truth_answers([{"question_id": 1}, {"question_id": 2}]) is None
    assert ground_truth_answers([{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": ["b", "c"]}]) == {
        1: ["a"], 2: ["b", "c"]}
    with pytest.raises(ValueError, match="val.json: record 1 has no 'answer'"):
        ground_truth_answers([{"question_id": 1, "answer": "a"}, {"question_id": 2}], "val.json")
    with pytest.raises(ValueError, match="val.json: record 0 key 'answer' must be"):
        ground_truth_answers([{"question_id": 1, "answer": []}], "val.json")


class _StubModel:
    """rank_answers returns a fixed ranking per question (its first question-token id)."""

    def __init__(self):
        self.training = True
        self.calls = []

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def rank_answers(self, image, question_ids, question_mask, answer_ids, answer_mask, k):
        self.calls.append((self.training, k, answer_ids.shape[0]))
        best = question_ids[:, 0]
        return torch.stack([best, (best + 1) % answer_ids.shape[0]], dim=1), torch.zeros(len(best), 2)


def test_evaluate_vqa_maps_the_best_answer_to_each_question_id():
    answer_list = ["no", "yes", "red"]
    answer_ids, answer_mask = torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)
    loader = [
        {"image": torch.zeros(2, 3, 4, 4), "question_ids": torch.tensor([[2, 5], [0, 5]]),
         "question_mask": torch.ones(2, 2), "question_id": [10, "q11"]},
        {"image": torch.zeros(1, 3, 4, 4), "question_ids": torch.tensor([[1, 5]]),
         "question_mask": torch.ones(1, 2), "question_id": [12]},
    ]
    model = _StubModel()
    predictions = evaluate_vqa(model, loader, answer_list, answer_ids, answer_mask, k=7, device=torch.device("cpu"))
    assert predictions == [{"question_id": 10, "answer": "red"}, {"question_id": "q11", "answer": "no"},
                           {"question_id": 12, "answer": "yes"}]
    assert model.calls == [(False, 7, 3), (False, 7, 3)] and model.training  # eval mode, then restored
    with pytest.raises(ValueError, match="answer_ids has 3 rows for 2 answers"):
        evaluate_vqa(model, loader, answer_list[:2], answer_ids, answer_mask, 2, torch.device("cpu"))


def test_answer_list_errors_name_file_and_entry(tmp_path):
    path = tmp_path / "answer_list.json"
    path.write_text(json.dumps(["yes", "no", "yes"]))
    with pytest.raises(ValueError, match=r"answer_list.json: entry 2 'yes' repeats entry 0"):
        load_answer_list(path)
    path.write_text(json.dumps(["yes", " "]))
    with pytest.raises(ValueError, match="entry 1 must be a non-empty string"):
        load_answer_list(path)
    path.write_text(json.dumps({"yes": 1}))
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load_answer_list(path)
    with pytest.raises(FileNotFoundError, match="answer list not found"):
        load_answer_list(tmp_path / "missing.json")
    path.write_text(json.dumps(["yes", "top left"]))
    assert load_answer_list(path) == ["yes", "top left"]


def _write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_vqa_test_records_need_unique_question_ids(tmp_path):
    rec = {"image": "a.png", "question": "what color is it"}
    with pytest.raises(ValueError, match=r"test.json: record 1 has no 'question_id' key"):
        VQADataset(_write(tmp_path, "test.json", [{**rec, "question_id": 1}, rec]), tmp_path, None, split="test")
    with pytest.raises(ValueError, match=r"test.json: record 1 repeats question_id 7 of record 0 of .*test.json"):
        VQADataset(_write(tmp_path, "test.json", [{**rec, "question_id": 7}, {**rec, "question_id": 7}]),
                   tmp_path, None, split="test")
    with pytest.raises(ValueError, match=r"record 0 key 'dataset' must be 'vqa' or 'vg'"):
        VQADataset(_write(tmp_path, "train.json", [{**rec, "answer": "red", "dataset": "coco"}]), tmp_path, None)


def test_collator_flattens_answers_and_vg_images_come_from_their_root(tmp_path):
    from torchmm_ext.data.tokenizer import build_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("what color is the circle\nred blue top left\nhow many\n" * 5)
    tokenizer = build_tokenizer("shapes", corpus_file=corpus)
    (tmp_path / "coco").mkdir()
    (tmp_path / "vg").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "coco" / "a.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "vg" / "a.png")
    records = [{"image": "a.png", "question": "what color is the circle", "answer": ["red"] * 3 + ["blue"],
                "dataset": "vqa"},
               {"image": "a.png", "question": "how many", "answer": "top left", "dataset": "vg"}]
    to_tensor = lambda im: torch.tensor(im.getpixel((0, 0)), dtype=torch.float).view(3, 1, 1)
    dataset = VQADataset(_write(tmp_path, "train.json", records), tmp_path / "coco", to_tensor,
                         vg_image_root=tmp_path / "vg")
    samples = [dataset[0], dataset[1]]
    assert samples[0][2:] == (["red[SEP]", "blue[SEP]"], [0.75, 0.25])
    assert samples[1][2:] == (["top left[SEP]"], [0.5])
    assert samples[0][0].flatten().tolist() == [255, 0, 0] and samples[1][0].flatten().tolist() == [0, 0, 255]
    batch = VQACollator(tokenizer, max_question_tokens=4)(samples)
    assert batch["question_ids"].shape == (2, 4)  # truncated to 4 tokens
    assert batch["question_index"].tolist() == [0, 0, 1]
    assert batch["weights"].tolist() == [0.75, 0.25, 0.5]
    sep, cls = tokenizer.sep_token_id, tokenizer.cls_token_id
    red, top, left = (tokenizer.convert_tokens_to_ids(t) for t in ("red", "top", "left"))
    assert batch["answer_ids"].tolist()[0][:4] == [cls, red, sep, sep]
    assert batch["answer_ids"].tolist()[2] == [cls, top, left, sep, sep]
    assert batch["answer_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    test = VQACollator(tokenizer)([(samples[0][0], "how many", 31), (samples[1][0], "what color", "x")])
    assert test["question_id"] == [31, "x"] and set(test) == {"image", "question_ids", "question_mask", "question_id"}
