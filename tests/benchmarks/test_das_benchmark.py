"""The DAS benchmark's ViLT and METER passes: what one skipped block saves, against a hand count."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "das.py"
_spec = importlib.util.spec_from_file_location("das_benchmark", _PATH)
das_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(das_benchmark)

D, FFN, R = 192, 768, 96  # METER tiny: fusion width, feed-forward size; DAS adapter width


def fusion_layer_flops(batch: int, queries: int, keys: int) -> int:
    """A co-attention layer by hand: self-attention (4 projections, QK^T and PV over the queries),
    cross-attention (Q and output on the queries, K and V on the other side's tokens, QK^T and PV)
    and the feed-forward; 2 FLOPs per multiply-add."""
    self_attention = 4 * 2 * queries * D * D + 2 * 2 * queries * queries * D
    cross_attention = 2 * 2 * queries * D * D + 2 * 2 * keys * D * D + 2 * 2 * queries * keys * D
    feed_forward = 2 * 2 * queries * D * FFN
    return batch * (self_attention + cross_attention + feed_forward)


@pytest.mark.parametrize("task, fusion_passes", [("nlvr", 2), ("itm", 1)])
def test_meter_skipped_layer_saves_its_flops(task: str, fusion_passes: int, tmp_path, monkeypatch) -> None:
    batch, text_tokens, image_tokens = 2, 6, 5  # 32 px images of 16 px patches: 4 patches + CLS
    out = tmp_path / "das.json"
    monkeypatch.setattr(sys, "argv", [
        "das.py", "--model", "meter", "--task", task, "--preset", "tiny", "--image-size", "32", "--patch-size", "16",
        "--vision-kind", "vit", "--text-kind", "bert", "--vocab-size", "156", "--batch-size", str(batch),
        "--text-length", str(text_tokens), "--rounds", "1", "--warmup", "0",
        "--config", "text 0=[0]", "--config", "image 1=[3]", "--json", str(out)])
    das_benchmark.main()
    rows = json.loads(out.read_text())["rows"]
    # A skipped layer's skip adapter (r = 3 x 96) costs what its three parallel adapters did, so
    # skipping it saves exactly the layer: on the text side text queries over image keys, on the
    # image side the reverse; NLVR2 runs the fusion once per image of the pair.
    k0 = rows["DAS k=0"]["flops"]
    assert k0 - rows["text 0"]["flops"] == fusion_passes * fusion_layer_flops(batch, text_tokens, image_tokens)
    assert k0 - rows["image 1"]["flops"] == fusion_passes * fusion_layer_flops(batch, image_tokens, text_tokens)
    # Three parallel adapters (LayerNorm, down, up: 9d + 6dr + 3r) against one skip adapter of
    # width 3r (3d + 6dr + 3r): 6d trainable parameters fewer.
    assert rows["DAS k=0"]["trainable"] - rows["text 0"]["trainable"] == 6 * D
    assert rows["plain METER"]["trainable"] > 5 * rows["DAS k=0"]["trainable"]
    assert rows["plain METER"]["flops"] < k0


def vilt_block_flops(batch: int, tokens: int) -> int:
    """A ViLT block by hand (width D, MLP FFN): 4 attention projections, QK^T and PV over all
    tokens (text and image), the two MLP layers; 2 FLOPs per multiply-add."""
    attention = 4 * 2 * tokens * D * D + 2 * 2 * tokens * tokens * D
    return batch * (attention + 2 * 2 * tokens * D * FFN)


@pytest.mark.parametrize("task, passes", [("nlvr", 2), ("itm", 1), ("vqa", 1)])
def test_vilt_skipped_block_saves_its_flops(task: str, passes: int, tmp_path, monkeypatch) -> None:
    batch, text_tokens, image_tokens = 2, 6, 5  # 32 px images of 16 px patches: 4 patches + CLS
    out = tmp_path / "das.json"
    monkeypatch.setattr(sys, "argv", [
        "das.py", "--model", "vilt", "--task", task, "--preset", "tiny", "--image-size", "32", "--patch-size", "16",
        "--vocab-size", "156", "--answers", "29", "--batch-size", str(batch), "--text-length", str(text_tokens),
        "--rounds", "1", "--warmup", "0", "--config", "block 0=[0]", "--config", "block 3=[3]", "--json", str(out)])
    das_benchmark.main()
    rows = json.loads(out.read_text())["rows"]
    # The skip adapter (r = 2 x 96) costs what the block's two parallel adapters did, so skipping
    # a block saves exactly its attention and MLP over text + image tokens, once per image (NLVR2).
    k0 = rows["DAS k=0"]["flops"]
    for name in ("block 0", "block 3"):
        assert k0 - rows[name]["flops"] == passes * vilt_block_flops(batch, text_tokens + image_tokens)
        # two parallel adapters (LayerNorm, down, up: 6d + 4dr + 2r) against one of width 2r (3d + 4dr + 2r)
        assert rows["DAS k=0"]["trainable"] - rows[name]["trainable"] == 3 * D
    assert rows["plain ViLT"]["flops"] < k0


def albef_fusion_layer_flops(batch: int, queries: int, keys: int, width: int, ffn: int) -> int:
    """An ALBEF fusion layer by hand: self-attention over the text, cross-attention to one
    image's tokens, feed-forward (as :func:`fusion_layer_flops`, at ALBEF's sizes)."""
    self_attention = 4 * 2 * queries * width * width + 2 * 2 * queries * queries * width
    cross_attention = 2 * 2 * queries * width * width + 2 * 2 * keys * width * width + 2 * 2 * queries * keys * width
    return batch * (self_attention + cross_attention + 2 * 2 * queries * width * ffn)


def test_albef_nlvr_skipped_fusion_layer_saves_its_flops(tmp_path, monkeypatch) -> None:
    batch, text_tokens, image_tokens = 2, 6, 5  # 32 px images of 16 px patches: 4 patches + CLS
    out = tmp_path / "das.json"
    monkeypatch.setattr(sys, "argv", [
        "das.py", "--model", "albef", "--task", "nlvr", "--preset", "tiny", "--image-size", "32", "--patch-size", "16",
        "--vocab-size", "156", "--batch-size", str(batch), "--text-length", str(text_tokens), "--rounds", "1",
        "--warmup", "0", "--config", "fusion 0={\"fusion\": [0]}", "--config", "fusion 1={\"fusion\": [1]}",
        "--json", str(out)])
    das_benchmark.main()
    rows = json.loads(out.read_text())["rows"]
    # Fusion layers 0 and 1 (the first pair) attend image 0 and image 1 over every text token;
    # each one's skip adapter (3 x 96) costs what its three parallel adapters did.
    k0 = rows["DAS k=0"]["flops"]
    for name in ("fusion 0", "fusion 1"):
        assert k0 - rows[name]["flops"] == albef_fusion_layer_flops(batch, text_tokens, image_tokens, D, FFN)
        assert rows["DAS k=0"]["trainable"] - rows[name]["trainable"] == 6 * D
    assert rows["plain ALBEF"]["flops"] < k0
