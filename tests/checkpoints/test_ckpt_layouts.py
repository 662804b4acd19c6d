"""ALBEF / TorchMultimodal layouts: import, export, round trips, detection, errors and the CLI."""

import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from torch import nn, Tensor

from torchmm_ext.checkpoints import (
    albef_conversion,
    albef_to_torchmm_ext,
    CheckpointShapeError,
    detect_layout,
    load_pretrained,
    merge_qkv,
    split_qkv,
    torchmm_ext_to_albef,
    torchmultimodal_conversion,
    unwrap_state_dict,
)
from torchmm_ext.models.albef import albef_model_for_retrieval

D, DV, FFN, VOCAB, E, Q = 32, 32, 64, 100, 16, 8
IMAGE, PATCH, VDEPTH, TEXT_LAYERS, FUSION_LAYERS = 32, 8, 2, 2, 2
REPO = Path(__file__).resolve().parents[2]


def _ours(image_size: int = IMAGE) -> nn.Module:
    return albef_model_for_retrieval(
        "tiny", image_size=image_size, patch_size=PATCH, vision_width=DV, vision_depth=VDEPTH,
        vision_heads=2, vision_mlp_dim=FFN, text_width=D, text_layers=TEXT_LAYERS,
        fusion_layers=FUSION_LAYERS, text_heads=2, text_ffn_dim=FFN, vocab_size=VOCAB,
        embed_dim=E, queue_size=Q, dropout=0.0,
    ).eval()


def _lin(sd: Dict[str, Tensor], name: str, out_dim: int, in_dim: int) -> None:
    sd[f"{name}.weight"] = torch.randn(out_dim, in_dim)
    sd[f"{name}.bias"] = torch.randn(out_dim)


def _ln(sd: Dict[str, Tensor], name: str, dim: int) -> None:
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim)
    sd[f"{name}.bias"] = 0.1 * torch.randn(dim)


def _albef_vit(sd: Dict[str, Tensor], p: str) -> None:
    grid = IMAGE // PATCH
    sd[f"{p}.cls_token"] = torch.randn(1, 1, DV)
    sd[f"{p}.pos_embed"] = torch.randn(1, 1 + grid * grid, DV)
    sd[f"{p}.patch_embed.proj.weight"] = torch.randn(DV, 3, PATCH, PATCH)
    sd[f"{p}.patch_embed.proj.bias"] = torch.randn(DV)
    for n in range(VDEPTH):
        b = f"{p}.blocks.{n}"
        _ln(sd, f"{b}.norm1", DV)
        _lin(sd, f"{b}.attn.qkv", 3 * DV, DV)
        _lin(sd, f"{b}.attn.proj", DV, DV)
        _ln(sd, f"{b}.norm2", DV)
        _lin(sd, f"{b}.mlp.fc1", FFN, DV)
        _lin(sd, f"{b}.mlp.fc2", DV, FFN)
    _ln(sd, f"{p}.norm", DV)


def _albef_bert(sd: Dict[str, Tensor], p: str, mlm_head: bool) -> None:
    bert = f"{p}.bert" if mlm_head else p
    sd[f"{bert}.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    sd[f"{bert}.embeddings.word_embeddings.weight"] = torch.randn(VOCAB, D)
    sd[f"{bert}.embeddings.position_embeddings.weight"] = torch.randn(512, D)
    sd[f"{bert}.embeddings.token_type_embeddings.weight"] = torch.randn(2, D)
    _ln(sd, f"{bert}.embeddings.LayerNorm", D)
    for n in range(TEXT_LAYERS + FUSION_LAYERS):
        b = f"{bert}.encoder.layer.{n}"
        for part in ("query", "key", "value"):
            _lin(sd, f"{b}.attention.self.{part}", D, D)
        _lin(sd, f"{b}.attention.output.dense", D, D)
        _ln(sd, f"{b}.attention.output.LayerNorm", D)
        if n >= TEXT_LAYERS:
            _lin(sd, f"{b}.crossattention.self.query", D, D)
            _lin(sd, f"{b}.crossattention.self.key", D, DV)
            _lin(sd, f"{b}.crossattention.self.value", D, DV)
            _lin(sd, f"{b}.crossattention.output.dense", D, D)
            _ln(sd, f"{b}.crossattention.output.LayerNorm", D)
        _lin(sd, f"{b}.intermediate.dense", FFN, D)
        _lin(sd, f"{b}.output.dense", D, FFN)
        _ln(sd, f"{b}.output.LayerNorm", D)
    if mlm_head:
        sd[f"{p}.cls.predictions.bias"] = torch.randn(VOCAB)
        _lin(sd, f"{p}.cls.predictions.transform.dense", D, D)
        _ln(sd, f"{p}.cls.predictions.transform.LayerNorm", D)
        sd[f"{p}.cls.predictions.decoder.weight"] = torch.randn(VOCAB, D)
        # xbert's BertLMPredictionHead sets decoder.bias = bias: both names are saved.
        sd[f"{p}.cls.predictions.decoder.bias"] = sd[f"{p}.cls.predictions.bias"]


def albef_state_dict(*, pretraining: bool = False, momentum: bool = True, idx_queue: bool = True) -> Dict[str, Tensor]:
    """A state dict with salesforce/ALBEF's key names and shapes (small sizes): the retrieval
    model (``models/model_retrieval.py``) or, with ``pretraining``, the pre-training model
    (``BertForMaskedLM`` text encoders, no ``idx_queue``)."""
    torch.manual_seed(0)
    sd: Dict[str, Tensor] = {}
    _albef_vit(sd, "visual_encoder")
    _albef_bert(sd, "text_encoder", pretraining)
    _lin(sd, "vision_proj", E, DV)
    _lin(sd, "text_proj", E, D)
    _lin(sd, "itm_head", 2, D)
    sd["temp"] = torch.tensor(0.07)
    if momentum:
        _albef_vit(sd, "visual_encoder_m")
        _albef_bert(sd, "text_encoder_m", pretraining)
        _lin(sd, "vision_proj_m", E, DV)
        _lin(sd, "text_proj_m", E, D)
    sd["image_queue"] = nn.functional.normalize(torch.randn(E, Q), dim=0)
    sd["text_queue"] = nn.functional.normalize(torch.randn(E, Q), dim=0)
    if idx_queue and not pretraining:
        sd["idx_queue"] = torch.randint(0, 50, (1, Q))
    sd["queue_ptr"] = torch.tensor([3])
    return sd


def _momentum_fusion_keys(sd: Dict[str, Tensor]) -> set:
    return {k for k in sd if k.startswith("text_encoder_m.encoder.layer.") and int(k.split(".")[3]) >= TEXT_LAYERS}


def test_qkv_split_merge_inverse() -> None:
    w = torch.randn(3 * 8, 8)
    q, k, v = split_qkv(w)
    assert torch.equal(q, w[:8]) and torch.equal(v, w[16:])
    assert torch.equal(merge_qkv(q, k, v), w)
    with pytest.raises(ValueError):
        split_qkv(torch.randn(7, 8))


def test_albef_import_export_import_is_exact() -> None:
    sd = albef_state_dict()
    ours = albef_to_torchmm_ext(sd)
    # ALBEF's momentum BERT includes fusion layers: they become our fusion_encoder_m.
    assert {k for k in ours if k.startswith("fusion_encoder_m.")}
    back = torchmm_ext_to_albef(ours)
    assert set(back) == set(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype and torch.equal(back[key], sd[key]), key
    again = albef_to_torchmm_ext(back)
    assert set(again) == set(ours)
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def test_albef_retrieval_checkpoint_loads_fully_and_numerically() -> None:
    sd = albef_state_dict()
    conversion = albef_conversion(sd)
    assert set(conversion.ignored) == {"text_encoder.embeddings.position_ids",
                                       "text_encoder_m.embeddings.position_ids"}
    model = _ours()
    report = load_pretrained(model, {"model": sd, "epoch": 3})
    assert report.layout == "albef"
    # The retrieval model runs no momentum fusion encoder: those tensors are reported unused.
    assert report.missing == {} and set(report.unexpected) == {"fusion_encoder_m.layer"}
    assert len(report.unexpected["fusion_encoder_m.layer"]) == len(_momentum_fusion_keys(sd)) - FUSION_LAYERS * 4
    # Packed q/k/v really are [query; key; value] of the same layer.
    got = model.state_dict()["fusion_encoder.layer.1.attention.input_proj.weight"]
    assert torch.equal(got[D:2 * D], sd["text_encoder.encoder.layer.3.attention.self.key.weight"])
    assert torch.equal(model.queue.ptr, sd["queue_ptr"])
    # And the exported model reproduces the checkpoint; the momentum fusion layers it lacks are
    # rebuilt from the online ones.
    exported = torchmm_ext_to_albef(model.state_dict())
    assert set(exported) == set(sd)
    assert all(torch.equal(exported[k], sd[k]) for k in set(sd) - _momentum_fusion_keys(sd))
    for key in _momentum_fusion_keys(sd):
        assert torch.equal(exported[key], sd[key.replace("text_encoder_m.", "text_encoder.")])


def test_albef_pretraining_checkpoint_documented_missing(tmp_path: Path) -> None:
    sd = albef_state_dict(pretraining=True)
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": sd, "optimizer": {}, "config": {"a": 1}, "epoch": 29}, path)
    model = _ours()
    report = load_pretrained(model, path)
    # The pre-training model has no idx_queue: its queued features stay usable negatives
    # (id -1, not the model's empty marker -100, which would mask them).
    assert report.missing == {}
    # What retrieval has no place for: the MLM heads and the momentum fusion layers.
    assert {g.split(".")[0] for g in report.unexpected} == {"fusion_encoder_m", "mlm_head", "mlm_head_m"}
    assert (model.queue.idx_queue == -1).all()
    assert torch.equal(model.queue.image_queue, sd["image_queue"])
    assert any("idx_queue" in note for note in report.notes)
    assert not [k for k in report.ignored if ".cls." in k]


def test_albef_mlm_head_maps_to_masked_prediction_head() -> None:
    sd = albef_state_dict(pretraining=True)
    ours = albef_to_torchmm_ext(sd)
    head = "text_encoder.cls.predictions."
    assert torch.equal(ours["mlm_head.dense.weight"], sd[head + "transform.dense.weight"])
    assert torch.equal(ours["mlm_head.layer_norm.bias"], sd[head + "transform.LayerNorm.bias"])
    assert torch.equal(ours["mlm_head.decoder.weight"], sd[head + "decoder.weight"])
    # BERT ties decoder.bias to predictions.bias: the missing twin is filled.
    assert torch.equal(ours["mlm_head.decoder.bias"], sd[head + "bias"])
    assert torch.equal(ours["mlm_head_m.bias"], sd["text_encoder_m.cls.predictions.bias"])
    # Export goes back to the pre-training layout (BertForMaskedLM: text_encoder.bert.*), and
    # without the idx_queue the import made up (ALBEF's Pretrain.py loads strictly).
    back = torchmm_ext_to_albef(ours)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_albef_finetuned_without_momentum_fills_copies() -> None:
    sd = albef_state_dict(momentum=False)
    model = _ours()
    report = load_pretrained(model, sd)
    assert report.missing == {} and report.unexpected == {}
    assert any("vision_encoder_m" in n and "copied" in n for n in report.notes)
    state = model.state_dict()
    for key in state:
        if key.startswith(("vision_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")):
            assert torch.equal(state[key], state[key.replace("_m.", ".", 1)]), key


def test_albef_pos_embed_interpolated_to_new_image_size() -> None:
    sd = albef_state_dict()
    ours = albef_to_torchmm_ext(sd, image_size=48)
    assert ours["vision_encoder.embeddings.position_embeddings"].shape == (1, 1 + 36, DV)
    assert ours["vision_encoder_m.embeddings.position_embeddings"].shape == (1, 1 + 36, DV)
    # load_pretrained follows the model's grid by itself.
    model = _ours(image_size=48)
    report = load_pretrained(model, sd)
    assert any("interpolated" in n for n in report.notes)
    torch.testing.assert_close(model.state_dict()["vision_encoder.embeddings.position_embeddings"],
                               ours["vision_encoder.embeddings.position_embeddings"])


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    sd = albef_state_dict()
    sd["vision_proj.weight"] = torch.randn(E + 1, DV)
    with pytest.raises(CheckpointShapeError, match=r"vision_proj\.weight: checkpoint \(17, 32\) vs model \(16, 32\)"):
        load_pretrained(_ours(), sd)


def test_detection_of_each_layout_and_unknown_error() -> None:
    from transformers import BertConfig, BertForMaskedLM
    import timm

    assert detect_layout(albef_state_dict()) == "albef"
    assert detect_layout(albef_state_dict(pretraining=True)) == "albef"
    assert detect_layout(_ours().state_dict()) == "torchmm_ext"
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32))
    assert detect_layout(bert.state_dict()) == "hf_bert"
    assert detect_layout(bert.bert.state_dict()) == "hf_bert"
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    assert detect_layout(vit.state_dict()) == "timm_vit"
    assert detect_layout(_torchmultimodal_retrieval_state()[0]) == "torchmultimodal"
    with pytest.raises(ValueError) as err:
        detect_layout({"foo.weight": torch.zeros(1), "bar.bias": torch.zeros(1)})
    message = str(err.value)
    assert "foo.weight" in message
    for name in ("torchmm_ext", "albef", "torchmultimodal", "hf_bert", "timm_vit"):
        assert name in message


def test_unwrap_state_dict() -> None:
    t = torch.zeros(1)
    assert unwrap_state_dict({"state_dict": {"module.a": t, "module.b": t}, "epoch": 1}) == {"a": t, "b": t}
    assert unwrap_state_dict({"model": {"model": {"x": t}}}) == {"x": t}


def _torchmultimodal_retrieval_state():
    from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
    from torchmultimodal.models.albef.model import ALBEFModel, ALBEFModelWithSimilarity
    from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
    from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder

    torch.manual_seed(1)
    vision = ALBEFVisionEncoder(image_size=IMAGE, patch_size=PATCH, num_hidden_layers=VDEPTH,
                                num_attention_heads=2, hidden_size=DV, mlp_dim=FFN)
    text = bert_text_encoder(hidden_size=D, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
                             intermediate_size=FFN, vocab_size=VOCAB, dropout=0.0)
    fusion = ALBEFMultimodalEncoder(hidden_size=D, num_hidden_layers=FUSION_LAYERS,
                                    num_attention_heads=2, intermediate_size=FFN)
    similarity = ALBEFModelWithSimilarity(ALBEFModel(vision, text, fusion), nn.Linear(DV, E),
                                          nn.Linear(D, E), embed_size=E, queue_size=Q)
    with torch.no_grad():  # non-trivial LayerNorms
        for name, p in similarity.named_parameters():
            if "ln" in name or "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    # examples/albef's ALBEFModelForRetrieval: model_with_similarity + itm_head.
    state = {f"model_with_similarity.{k}": v for k, v in similarity.state_dict().items()}
    state["itm_head.weight"], state["itm_head.bias"] = torch.randn(2, D), torch.randn(2)
    return state, similarity.albef_model.eval()


def test_torchmultimodal_checkpoint_loads_and_matches_numerically() -> None:
    state, reference = _torchmultimodal_retrieval_state()
    conversion = torchmultimodal_conversion(state)
    assert conversion.ignored == []
    model = _ours()
    report = load_pretrained(model, state)
    assert report.layout == "torchmultimodal"
    # The momentum multimodal encoder converts to fusion_encoder_m, which retrieval lacks.
    assert report.missing == {} and {g.split(".")[0] for g in report.unexpected} == {"fusion_encoder_m"}
    images = torch.randn(2, 3, IMAGE, IMAGE)
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        image_ref = reference.vision_encoder(images)
        text_ref = reference.text_encoder(ids, mask).last_hidden_state
        fused_ref = reference.multimodal_encoder(text_ref, mask, image_ref)
        image_ours = model.vision_encoder(images).last_hidden_state
        text_ours = model.text_encoder(ids, attention_mask=mask.bool()).last_hidden_state
        fused_ours = model.fusion_encoder(text_ours, mask, image_ours).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(image_ours, image_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_ours[valid], text_ref[valid], atol=1e-5, rtol=1e-5)
    # The fusion layers (self-attention, cross-attention, FFN) compute what torchmultimodal's do.
    torch.testing.assert_close(fused_ours[valid], fused_ref[valid], atol=1e-5, rtol=1e-5)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchmm_ext.checkpoints", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_convert_round_trip_and_inspect(tmp_path: Path) -> None:
    sd = albef_state_dict()
    src, ours_path, back_path = tmp_path / "albef.pth", tmp_path / "ours.pt", tmp_path / "back.pth"
    torch.save({"model": sd, "epoch": 0}, src)
    run = _cli("convert", "--from", "albef", "--to", "torchmm_ext", str(src), str(ours_path))
    assert run.returncode == 0, run.stderr
    run = _cli("convert", "--from", "torchmm_ext", "--to", "albef", str(ours_path), str(back_path))
    assert run.returncode == 0, run.stderr
    back = torch.load(back_path, map_location="cpu", weights_only=True)["model"]
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in set(sd) - _momentum_fusion_keys(sd))
    run = _cli("inspect", str(ours_path))
    assert run.returncode == 0, run.stderr
    assert "layout: torchmm_ext" in run.stdout
    count = sum(v.numel() for k, v in sd.items() if k.startswith("vision_proj."))
    assert f"vision_proj: 2 tensors, {count:,} values" in run.stdout
    run = _cli("inspect", str(src))
    assert "layout: albef" in run.stdout and "visual_encoder" in run.stdout
    big = tmp_path / "ours384.pt"
    run = _cli("convert", "--from", "albef", "--to", "torchmm_ext", str(src), str(big), "--image-size", "48")
    assert run.returncode == 0 and "interpolated" in run.stdout
    assert torch.load(big, map_location="cpu", weights_only=True)["model"]["vision_encoder.embeddings.position_embeddings"].shape[1] == 37
    bad = tmp_path / "bad.pt"
    torch.save({"x.weight": torch.zeros(1)}, bad)
    run = _cli("inspect", str(bad))
    assert run.returncode == 2 and "Known layouts" in run.stderr
    assert _cli("--help").returncode == 0


def test_hf_bert_initialises_text_and_fusion(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(2)
    config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=TEXT_LAYERS + FUSION_LAYERS,
                        num_attention_heads=2, intermediate_size=FFN, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    bert = BertForMaskedLM(config).eval()
    path = tmp_path / "model.safetensors"
    # MLM-head tensors tied to others are left out (safetensors refuses shared storage).
    save_file({k: v.clone() for k, v in bert.state_dict().items() if not k.startswith("cls.")}, str(path))
    model = _ours()
    report = load_pretrained(model, path, fusion_layer=TEXT_LAYERS)
    assert report.layout == "hf_bert"
    # Fresh: the fusion layers' cross-attention, and what BERT has no counterpart of.
    fusion_missing = report.missing.pop("fusion_encoder.layer")
    assert fusion_missing and all(".cross_attention" in k for k in fusion_missing)
    assert set(report.missing) == {"temp", "vision_encoder.embeddings", "vision_encoder.blocks",
                                   "vision_encoder.norm", "vision_proj", "text_proj", "itm_head",
                                   "vision_encoder_m.embeddings", "vision_encoder_m.blocks",
                                   "vision_encoder_m.norm", "vision_proj_m", "text_proj_m", "queue"}
    assert report.unexpected == {}
    assert any("text_encoder_m" in n for n in report.notes)  # momentum text copy filled
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with torch.no_grad():
        hidden = bert.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = model.text_encoder(ids, attention_mask=mask.bool()).last_hidden_state
        ours_m = model.text_encoder_m(ids, attention_mask=mask.bool()).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], hidden[TEXT_LAYERS][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_m, ours)
    state = model.state_dict()
    assert torch.equal(state["fusion_encoder.layer.0.feedforward.model.0.weight"],
                       bert.state_dict()[f"bert.encoder.layer.{TEXT_LAYERS}.intermediate.dense.weight"])


def _albef_vqa_state_dict() -> tuple:
    """A bare fine-tuned ALBEF VQA state dict (``models/model_vqa.py``: ``text_encoder`` =
    ``BertModel`` without prefix, ``text_decoder`` = ``BertLMHeadModel``) whose decoder is a
    real Hugging Face ``BertLMHeadModel`` (the class ALBEF's decoder derives from), returned too."""
    from transformers import BertConfig, BertLMHeadModel

    sd = {k: v for k, v in albef_state_dict(momentum=False).items()
          if not k.startswith(("image_queue", "text_queue", "idx_queue", "queue_ptr", "vision_proj",
                                "text_proj", "itm_head", "temp"))}
    torch.manual_seed(3)
    config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=FUSION_LAYERS, num_attention_heads=2,
                        intermediate_size=FFN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        is_decoder=True, add_cross_attention=True)
    decoder = BertLMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in decoder.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    sd.update({f"text_decoder.{k}": v.clone() for k, v in decoder.state_dict().items()})
    return sd, decoder


def _ours_vqa() -> nn.Module:
    from torchmm_ext.models.albef import albef_model_for_vqa

    return albef_model_for_vqa(
        "tiny", image_size=IMAGE, patch_size=PATCH, vision_width=DV, vision_depth=VDEPTH,
        vision_heads=2, vision_mlp_dim=FFN, text_width=D, text_layers=TEXT_LAYERS,
        fusion_layers=FUSION_LAYERS, text_heads=2, text_ffn_dim=FFN, vocab_size=VOCAB, dropout=0.0,
    ).eval()


def test_albef_vqa_checkpoint_decoder_matches_bert_lm_head_model() -> None:
    sd, reference = _albef_vqa_state_dict()
    model = _ours_vqa()
    report = load_pretrained(model, sd)
    assert report.missing == {} and report.unexpected == {}
    # Released fine-tuned files have no momentum weights: every copy comes from the online one.
    assert any(n.startswith("answer_decoder_m") for n in report.notes)
    assert not [k for k in report.ignored if "position_ids" not in k]
    questions = torch.randn(2, 5, D)
    question_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    answers = torch.randint(1, VOCAB, (2, 4))
    answer_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        ours = model.answer_decoder(answers, answer_mask, questions, question_mask)
        theirs = reference(input_ids=answers, attention_mask=answer_mask, encoder_hidden_states=questions,
                           encoder_attention_mask=question_mask).logits
    valid = answer_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)


def test_albef_vqa_import_export_import_is_exact() -> None:
    sd, _ = _albef_vqa_state_dict()
    ours = albef_to_torchmm_ext(sd)
    assert {k.split(".")[0] for k in ours} >= {"answer_decoder", "vision_encoder", "fusion_encoder"}
    back = torchmm_ext_to_albef(ours)
    # Every tensor ALBEF's VQA model holds comes back bit-exact (plus its momentum copies,
    # which the conversion fills from the online weights).
    assert all(torch.equal(back[k], sd[k]) for k in sd if k in back)
    assert not [k for k in sd if k not in back and "position_ids" not in k]
    again = albef_to_torchmm_ext(back)
    assert set(ours) <= set(again) and all(torch.equal(again[k], ours[k]) for k in ours)


def test_torchmultimodal_vqa_checkpoint_decoder_converts_and_matches() -> None:
    """examples/albef's ALBEFModelForVQA: ``model.*`` (ALBEFModel) + ``answer_decoder[_m].{
    text_embeddings, multimodal_encoder, prediction_head}``, built from torchmultimodal's modules."""
    from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
    from torchmultimodal.modules.layers.text_embedding import BERTTextEmbeddings

    state, _ = _torchmultimodal_retrieval_state()
    state = {f"model.{k[len('model_with_similarity.albef_model.'):]}": v for k, v in state.items()
             if k.startswith("model_with_similarity.albef_model.")}
    torch.manual_seed(4)
    embeddings = BERTTextEmbeddings(hidden_size=D, vocab_size=VOCAB).eval()
    layers = ALBEFMultimodalEncoder(hidden_size=D, num_hidden_layers=FUSION_LAYERS, num_attention_heads=2,
                                    intermediate_size=FFN).eval()
    dense, layer_norm = nn.Linear(D, D), nn.LayerNorm(D, eps=1e-12)
    head_out = nn.Linear(D, VOCAB)
    with torch.no_grad():
        head_out.weight.copy_(embeddings.word_embeddings.weight)  # ALBEF's (tied) weights
        for p in list(layers.parameters()) + list(layer_norm.parameters()) + list(embeddings.layer_norm.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    for prefix in ("answer_decoder.", "answer_decoder_m."):
        state.update({f"{prefix}text_embeddings.{k}": v for k, v in embeddings.state_dict().items()})
        state.update({f"{prefix}multimodal_encoder.{k}": v for k, v in layers.state_dict().items()})
        for name, module in (("dense", dense), ("layer_norm", layer_norm), ("decoder", head_out)):
            state.update({f"{prefix}prediction_head.{name}.{k}": v for k, v in module.state_dict().items()})
    model = _ours_vqa()
    report = load_pretrained(model, state)
    assert report.layout == "torchmultimodal"
    assert report.missing == {} and report.unexpected == {}, report.format()
    questions = torch.randn(2, 5, D)
    question_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    answers = torch.randint(1, VOCAB, (2, 4))
    answer_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    causal = torch.ones(4, 4).tril()[None] * answer_mask[:, None, :]  # [B, L, L], as ALBEFDecoder builds
    with torch.no_grad():
        hidden = layers(embeddings(answers), causal, questions, question_mask)
        theirs = head_out(layer_norm(nn.functional.gelu(dense(hidden))))
        ours = model.answer_decoder(answers, answer_mask, questions, question_mask)
        ours_m = model.answer_decoder_m(answers, answer_mask, questions, question_mask)
    valid = answer_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_m[valid], theirs[valid], atol=1e-4, rtol=1e-4)
