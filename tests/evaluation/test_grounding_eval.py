"""Grad-CAM grounding: IoU, box scoring, Grad-CAM maps (planted signal, brute force), targets."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.functional import to_tensor

from torchmm_ext.evaluation.grounding import (
    box_iou_xywh,
    default_block_num,
    evaluate_grounding,
    fusion_layer_index,
    grounding_accuracy,
    itm_gradcam,
    load_grounding_targets,
    refer_ground_truth,
    score_boxes,
    upsample_heatmap,
    word_maps,
    xywh_to_xyxy,
)
from torchmm_ext.models.albef import albef_model_for_retrieval
from torchmm_ext.modules.text_encoder import FusionOutput


# ----------------------------------------------------------------------------- boxes


def test_xywh_conversion_and_iou_by_hand():
    assert xywh_to_xyxy(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[1.0, 2.0, 4.0, 6.0]]
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 2.0, 2.0], [2.0, 0.0, 4.0, 2.0], [10.0, 10.0, 1.0, 1.0]])
    # [0,0,2,2] vs [1,1,2,2]: overlap 1x1, union 4 + 4 - 1 = 7; [0,0,4,2] vs [2,0,4,2]: 2x2 of 8 + 8 - 4.
    expected = torch.tensor([[1 / 7, 0.0, 0.0], [2 / 10, 4 / 12, 0.0]])
    torch.testing.assert_close(box_iou_xywh(a, b), expected)


def test_box_scores_by_hand_on_a_planted_mask():
    heat = torch.zeros(4, 6)
    heat[1, 2] = 4.0  # row (y) 1, column (x) 2
    heat[3, 5] = 1.0
    boxes = torch.tensor([
        [2.0, 1.0, 1.0, 1.0],   # exactly the hot pixel: 4 / 1
        [0.0, 0.0, 6.0, 4.0],   # everything: 5 / sqrt(24)
        [0.0, 0.0, 2.0, 2.0],   # no heat: 0
        [1.7, 0.9, 2.0, 1.2],   # ALBEF slice rows int(0.9):int(2.1) = 0:2, cols int(1.7):int(3.7) = 1:3
        [5.0, 3.0, 4.0, 4.0],   # runs off the map: only pixel (3, 5); area stays 16
    ])
    expected = torch.tensor([4.0, 5 / 24**0.5, 0.0, 4 / 2.4**0.5, 1 / 4.0])
    torch.testing.assert_close(score_boxes(heat, boxes), expected)
    # alpha 1: mean heat; a brute-force slice agrees
    for box, score in zip(boxes, score_boxes(heat, boxes, alpha=1.0)):
        x, y, w, h = box.tolist()
        assert score.item() == pytest.approx(heat[int(y):int(y + h), int(x):int(x + w)].sum().item() / (w * h))


def test_grounding_accuracy_picks_the_hot_box_in_the_original_image_frame():
    # A 2x2 map whose hot cell is the top right, on a 40 (wide) x 20 (high) image.
    cam = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    dets = torch.tensor([[0.0, 0.0, 20.0, 10.0], [20.0, 0.0, 20.0, 10.0], [20.0, 10.0, 20.0, 10.0]])
    assert grounding_accuracy(cam, (40, 20), dets, torch.tensor([21.0, 0.0, 19.0, 10.0]))
    assert not grounding_accuracy(cam, (40, 20), dets, torch.tensor([20.0, 10.0, 20.0, 10.0]))
    assert upsample_heatmap(cam, 20, 40).shape == (20, 40)


def test_block_num_follows_albef_counting():
    assert fusion_layer_index(8, text_layers=6, fusion_layers=6) == 2
    assert [default_block_num(6, 6), default_block_num(2, 2), default_block_num(2, 3), default_block_num(2, 1)] == [8, 2, 3, 2]
    with pytest.raises(ValueError, match=r"block_num 1 is not a cross-attention layer.*\[2, 3\]"):
        fusion_layer_index(1, text_layers=2, fusion_layers=2)


# ----------------------------------------------------------------------------- Grad-CAM


class _Output(SimpleNamespace):
    pass


class PlantedITM(nn.Module):
    """A model whose ITM match logit is the CLS token's attention-weighted image value.

    Image tokens: a zero CLS then each patch's mean of channel 0 (the "value"). Every head
    attends uniformly (scores ``scale * 0``), so ``logit = sum_n p_n v_n`` averaged over two
    heads, and the gradient of the logit by ``p[h, 0, n]`` is ``v_n / 2``: Grad-CAM of the
    CLS row is ``v_n / (2 N)`` (N tokens incl. CLS) and 0 for every other text token.
    """

    heads = 2

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.scale = nn.Parameter(torch.ones(()))
        self.itm_head = nn.Linear(1, 2)
        with torch.no_grad():
            self.itm_head.weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.itm_head.bias.zero_()
        self.fusion_encoder = self._Fusion(self)

    def vision_encoder(self, image):
        patches = F.adaptive_avg_pool2d(image[:, :1], self.grid).flatten(1)  # [B, g*g]
        tokens = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)[..., None]
        return _Output(last_hidden_state=tokens)

    def text_encoder(self, input_ids, attention_mask):
        return _Output(last_hidden_state=input_ids[..., None].float())

    class _Fusion:
        layer = [None]

        def __init__(self, owner):
            self.owner = owner

        def __call__(self, text, text_mask, image, return_cross_attention_layer, cls_only):
            b, length, _ = text.shape
            scores = self.owner.scale * torch.zeros(b, PlantedITM.heads, length, image.size(1))
            probs = scores.softmax(dim=-1)
            out = (probs @ image[:, None]).mean(dim=1)  # [B, L, 1]
            return FusionOutput(out, probs)


def test_gradcam_on_a_planted_signal_peaks_where_the_logit_looks():
    grid = 4
    image = torch.zeros(2, 3, 16, 16)
    image[0, 0, 4:8, 8:12] = 1.0   # patch (row 1, col 2)
    image[1, 0, 12:16, 0:4] = 0.5  # patch (row 3, col 0)
    image[1, 0, 0:4, 0:4] = -1.0   # a negative value: its gradient is clamped away
    input_ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    mask = (input_ids > 0).long()
    model = PlantedITM(grid)
    out = itm_gradcam(model, image, input_ids, mask, layer=0)
    n = grid * grid + 1
    assert out.maps.shape == (2, grid, grid) and out.token_maps.shape == (2, 4, grid, grid)
    assert (out.maps >= 0).all() and (out.token_maps >= 0).all()
    expected_cls = torch.zeros(2, grid, grid)
    expected_cls[0, 1, 2] = 1.0 / (2 * n)
    expected_cls[1, 3, 0] = 0.5 / (2 * n)
    torch.testing.assert_close(out.token_maps[:, 0], expected_cls)
    assert out.token_maps[:, 1:].abs().sum() == 0
    # averaged over the real tokens: 3 in the first text, 2 in the second
    torch.testing.assert_close(out.maps, expected_cls / torch.tensor([3.0, 2.0])[:, None, None])
    torch.testing.assert_close(out.itm_scores, torch.tensor([1.0 / n, (0.5 - 1.0) / n]))
    assert model.scale.grad is None


def _reference_gradcam(model, image, input_ids, mask, layer):
    """ALBEF's recipe, one pair at a time without padding: backward() then attention x grad."""
    maps = []
    for i in range(image.size(0)):
        ids = input_ids[i : i + 1, : int(mask[i].sum())]
        image_emb = model.vision_encoder(image[i : i + 1]).last_hidden_state
        text = model.text_encoder(ids, attention_mask=torch.ones_like(ids).bool()).last_hidden_state
        fused = model.fusion_encoder(text, torch.ones_like(ids), image_emb, return_cross_attention_layer=layer)
        fused.cross_attention.retain_grad()
        model.zero_grad()
        model.itm_head(fused.last_hidden_state[:, 0])[:, 1].sum().backward()
        probs, grad = fused.cross_attention, fused.cross_attention.grad
        cam = (probs * grad.clamp(min=0))[..., 1:].mean(dim=1).mean(dim=1)  # heads, then tokens
        side = int(cam.size(-1) ** 0.5)
        maps.append(cam.view(side, side).detach())
    return torch.stack(maps)


@pytest.mark.parametrize("layer", [0, 1])  # 1 is the last layer (no CLS-only shortcut there)
def test_batched_gradcam_matches_albef_per_pair_and_leaves_no_grad(layer):
    torch.manual_seed(0)
    model = albef_model_for_retrieval("tiny", image_size=32, patch_size=8, vision_depth=1, text_layers=1,
                                      fusion_layers=2, vocab_size=50, queue_size=0).eval()
    image = torch.randn(3, 3, 32, 32)
    input_ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0], [2, 14, 15, 3, 0]])
    mask = (input_ids > 0).long()
    out = itm_gradcam(model, image, input_ids, mask, layer)
    assert all(p.grad is None for p in model.parameters())
    assert out.maps.shape == (3, 4, 4) and (out.maps >= 0).all() and out.maps.sum() > 0
    torch.testing.assert_close(out.maps, _reference_gradcam(model, image, input_ids, mask, layer),
                               rtol=1e-4, atol=1e-8)
    assert out.token_maps[1, 3:].abs().sum() == 0  # padding


def test_word_maps_average_each_words_pieces():
    tokenizer = SimpleNamespace(tokenize=lambda w: ["x"] * {"big": 1, "starfish": 2, "left": 1}[w])
    token_maps = torch.arange(6.0).view(6, 1, 1).expand(6, 2, 2)  # CLS, big, star, ##fish, left, SEP
    words, maps = word_maps(token_maps, tokenizer, "big starfish left")
    assert words == ["big", "starfish", "left"]
    assert maps[:, 0, 0].tolist() == [1.0, 2.5, 4.0]
    words, _ = word_maps(token_maps[:4], tokenizer, "big starfish left")  # truncated text
    assert words == ["big"]


# ----------------------------------------------------------------------------- targets


def _grounding_files(tmp_path, gt, dets, records):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (40, 20)).save(tmp_path / "img" / "a.png")
    for name, data in (("gt.json", gt), ("dets.json", dets), ("val.json", records)):
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path / "val.json", tmp_path / "gt.json", tmp_path / "dets.json", tmp_path / "img"


def test_targets_join_records_and_name_bad_input(tmp_path):
    records = [{"image": "a.png", "text": "the left one", "ref_id": 7}]
    gt = {"7": {"image": "a.png", "bbox": [0, 0, 20, 10]}}
    dets = {"a.png": [[0, 0, 20, 10], [20, 0, 20, 10, 0.9]]}
    ann, gt_file, dets_file, root = _grounding_files(tmp_path, gt, dets, records)
    targets = load_grounding_targets(ann, records, gt_file, dets_file, root, "val")
    assert targets.image_sizes[7] == (40, 20) and targets.detections[7].shape == (2, 4)
    assert targets.group_names == ["val"]

    missing = [*records, {"image": "a.png", "text": "x", "ref_id": 8}]
    with pytest.raises(ValueError, match=r"val\.json: record 1 \(ref_id 8\) has no ground truth"):
        load_grounding_targets(ann, missing, gt_file, dets_file, root, "val")
    _grounding_files(tmp_path, gt, {"b.png": [[0, 0, 1, 1]]}, records)
    with pytest.raises(ValueError, match=r"record 0 \(ref_id 7\): image 'a.png' has no detections"):
        load_grounding_targets(ann, records, gt_file, dets_file, root, "val")
    _grounding_files(tmp_path, {"7": {"image": "a.png", "bbox": [30, 0, 20, 10]}}, dets, records)
    with pytest.raises(ValueError, match=r"ref_id 7 \(image a\.png\): box .*30\.0, 0\.0, 20\.0, 10\.0.* inside its 40x20 image"):
        load_grounding_targets(ann, records, gt_file, dets_file, root, "val")
    _grounding_files(tmp_path, gt, {"a.png": [[0, 15, 20, 10]]}, records)
    with pytest.raises(ValueError, match=r"dets\.json: image 'a\.png' box 0 .*inside its 40x20 image"):
        load_grounding_targets(ann, records, gt_file, dets_file, root, "val")


def test_evaluation_counts_per_split_with_the_planted_model(tmp_path):
    # Two images; the planted model's map is the image's brightness, so the box over the
    # bright quarter wins. The ground truth of ref 2 is elsewhere (a miss) and carries its own
    # split, as RefCOCO+'s combined test file does.
    (tmp_path / "img").mkdir()
    for name, corner in (("a.png", (20, 0)), ("b.png", (0, 10))):
        img = Image.new("RGB", (40, 20))
        img.paste((255, 255, 255), (*corner, corner[0] + 20, corner[1] + 10))
        img.save(tmp_path / "img" / name)
    quarters = [[0, 0, 20, 10], [20, 0, 20, 10], [0, 10, 20, 10], [20, 10, 20, 10]]
    gt = {"1": {"image": "a.png", "bbox": [20, 0, 20, 10]},
          "2": {"image": "b.png", "bbox": [20, 10, 20, 10], "split": "testB"},
          "3": {"image": "b.png", "bbox": [0, 10, 20, 10]}}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps({"a.png": quarters, "b.png": quarters}))
    records = [{"image": "a.png", "text": "t", "ref_id": 1}, {"image": "b.png", "text": "t", "ref_id": 2},
               {"image": "b.png", "text": "t", "ref_id": 3}]
    targets = load_grounding_targets(tmp_path / "test.json", records, tmp_path / "gt.json",
                                     tmp_path / "dets.json", tmp_path / "img", "test")
    images = {name: to_tensor(Image.open(tmp_path / "img" / name).resize((16, 16))) for name in ("a.png", "b.png")}
    batch = {"image": torch.stack([images[r["image"]] for r in records]),
             "input_ids": torch.tensor([[1, 2], [1, 2], [1, 0]]),
             "attention_mask": torch.tensor([[1, 1], [1, 1], [1, 0]]),
             "idx": torch.tensor([1, 2, 3])}
    result = evaluate_grounding(PlantedITM(4), [batch], targets, layer=0, device=torch.device("cpu"))
    assert result == {"test": {"acc": 100.0, "num_refs": 2.0}, "testB": {"acc": 0.0, "num_refs": 1.0}}


def test_refer_ground_truth(tmp_path):
    import pickle

    refs = [{"ref_id": 5, "ann_id": 50, "image_id": 9, "split": "testA"}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps({"annotations": [{"id": 50, "bbox": [1, 2, 3, 4]}]}))
    gt = refer_ground_truth(tmp_path / "refs(unc).p", tmp_path / "instances.json")
    assert gt == {"5": {"image": "9", "bbox": [1, 2, 3, 4], "split": "testA"}}
