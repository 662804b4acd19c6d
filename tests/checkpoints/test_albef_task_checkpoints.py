"""ALBEF checkpoints with momentum weights and task heads: what the original code keeps, we keep.

Every file here has momentum tensors that differ from their online twins (as in any file saved
during training): a momentum copy equal to its online twin would hide a conversion that takes
the wrong one.
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Set

import pytest
import timm
import torch
from torch import nn, Tensor
from transformers import BertConfig, BertForMaskedLM

from test_ckpt_layouts import (
    _albef_bert,
    _albef_vit,
    _lin,
    _ours,
    albef_state_dict,
    D,
    DV,
    E,
    FFN,
    FUSION_LAYERS,
    IMAGE,
    PATCH,
    Q,
    REPO,
    TEXT_LAYERS,
    VDEPTH,
    VOCAB,
)
from torchmm_ext.checkpoints import (
    albef_conversion,
    dual_image_checkpoint,
    init_answer_decoder,
    load_pretrained,
    torchmm_ext_to_albef,
    torchmm_ext_to_albef_conversion,
)
from torchmm_ext.engine.efficiency import prepare_model
from torchmm_ext.engine.recipe_utils import InitConfig
from torchmm_ext.models.albef import (
    albef_model_for_nlvr,
    albef_model_for_pretraining,
    albef_model_for_ve,
    albef_model_for_vqa,
)

SIZES = dict(
    image_size=IMAGE, patch_size=PATCH, vision_width=DV, vision_depth=VDEPTH, vision_heads=2,
    vision_mlp_dim=FFN, text_width=D, text_layers=TEXT_LAYERS, fusion_layers=FUSION_LAYERS,
    text_heads=2, text_ffn_dim=FFN, vocab_size=VOCAB, dropout=0.0,
)
HEADS = ("cls_head.", "cls_head_m.")


@torch.no_grad()
def _perturb_momentum(model: nn.Module, seed: int = 1) -> nn.Module:
    """Moves every momentum tensor away from its online twin (and the online task heads away
    from their initialisation), as training does."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if name.split(".")[0].endswith("_m") and tensor.is_floating_point():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=g))
    return model


def _differs(a: Tensor, b: Tensor) -> bool:
    return a.shape != b.shape or not torch.equal(a, b)


def _recipe_cfg() -> SimpleNamespace:
    """The parts of a recipe config ``prepare_model`` reads (no efficiency method)."""
    return SimpleNamespace(init=InitConfig(), low_rank=None, token_pruning=None, das=None)


# ---- (1) the pre-training export holds exactly ALBEF's pre-training keys -------------------


def albef_pretraining_keys(vision_depth: int, bert_layers: int, fusion_layer: int) -> Set[str]:
    """The state-dict keys of salesforce/ALBEF's ``models/model_pretrain.py`` ``ALBEF``, built
    from independent implementations of its parts: timm's ViT (ALBEF's ``models/vit.py`` is a
    timm ViT without classifier), Hugging Face ``BertForMaskedLM`` (ALBEF's ``xbert`` is its
    fork; its cross-attention exists only from ``fusion_layer`` on, and its embeddings register
    ``position_ids`` as a saved buffer), plus the modules ``ALBEF.__init__`` adds."""
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=DV, depth=vision_depth, num_heads=2,
        mlp_ratio=FFN / DV, qkv_bias=True, num_classes=0)
    bert = BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=bert_layers, num_attention_heads=2,
        intermediate_size=FFN, add_cross_attention=True, is_decoder=True))  # only the key names matter
    bert_keys = {k for k in bert.state_dict()
                 if not (".crossattention." in k and int(k.split(".")[3]) < fusion_layer)}
    bert_keys.add("bert.embeddings.position_ids")
    keys: Set[str] = set()
    for suffix in ("", "_m"):
        keys |= {f"visual_encoder{suffix}.{k}" for k in vit.state_dict()}
        keys |= {f"text_encoder{suffix}.{k}" for k in bert_keys}
        keys |= {f"{m}{suffix}.{p}" for m in ("vision_proj", "text_proj") for p in ("weight", "bias")}
    return keys | {"itm_head.weight", "itm_head.bias", "temp", "image_queue", "text_queue", "queue_ptr"}


def _pretraining_model() -> nn.Module:
    return _perturb_momentum(albef_model_for_pretraining("tiny", queue_size=Q, embed_dim=E, **SIZES))


def test_pretraining_export_holds_exactly_albefs_pretraining_keys() -> None:
    model = _pretraining_model()
    state = model.state_dict()
    conversion = torchmm_ext_to_albef_conversion(state)
    exported = conversion.state_dict
    expected = albef_pretraining_keys(VDEPTH, TEXT_LAYERS + FUSION_LAYERS, TEXT_LAYERS)
    assert set(exported) - expected == set(), "keys ALBEF's Pretrain.py would reject (strict load)"
    assert expected - set(exported) == set(), "keys ALBEF's pre-training model needs"
    # The image-id queue stays behind, and says so.
    assert conversion.ignored == ["queue.idx_queue"]
    assert any("idx_queue" in n for n in conversion.notes)
    # Momentum tensors come from the momentum modules, not their online twins.
    layer = f"text_encoder_m.bert.encoder.layer.{TEXT_LAYERS}."
    assert torch.equal(exported[layer + "crossattention.self.key.weight"],
                       state["fusion_encoder_m.layer.0.cross_attention.k_proj.weight"])
    assert torch.equal(exported["text_encoder_m.cls.predictions.transform.dense.weight"],
                       state["mlm_head_m.dense.weight"])
    assert _differs(exported[layer + "crossattention.self.key.weight"],
                    exported[layer.replace("_m.", ".") + "crossattention.self.key.weight"])


def test_albef_pretraining_file_round_trips_exactly() -> None:
    sd = albef_state_dict(pretraining=True)
    assert set(sd) == albef_pretraining_keys(VDEPTH, TEXT_LAYERS + FUSION_LAYERS, TEXT_LAYERS)
    back = torchmm_ext_to_albef(albef_conversion(sd).state_dict)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# ---- (4) task heads convert wherever a conversion runs ---------------------------------------


def _ve_model() -> nn.Module:
    return albef_model_for_ve("tiny", **SIZES).eval()


def albef_ve_state_dict() -> Dict[str, Tensor]:
    """A file saved by ALBEF's ``VE.py`` during training (``models/model_ve.py`` with distill:
    ``visual_encoder[_m]``, ``text_encoder[_m]`` = ``BertModel`` with fusion layers,
    ``cls_head[_m]``), every momentum tensor different from its online twin."""
    torch.manual_seed(5)
    sd: Dict[str, Tensor] = {}
    for suffix in ("", "_m"):
        _albef_vit(sd, f"visual_encoder{suffix}")
        _albef_bert(sd, f"text_encoder{suffix}", mlm_head=False)
        _lin(sd, f"cls_head{suffix}.0", D, D)
        _lin(sd, f"cls_head{suffix}.2", 3, D)
    return sd


def test_ve_file_task_heads_load_and_are_reported() -> None:
    sd = albef_ve_state_dict()
    conversion = albef_conversion(sd)
    assert not [k for k in conversion.ignored if "position_ids" not in k]
    assert torch.equal(conversion.state_dict["cls_head_m.2.weight"], sd["cls_head_m.2.weight"])
    model = _ve_model()
    report = load_pretrained(model, sd)
    assert report.missing == {} and report.unexpected == {}
    state = model.state_dict()
    for key in [k for k in sd if k.startswith("cls_head")]:
        assert torch.equal(state[key], sd[key]), key
    # A file without the head: the report names exactly the head as missing.
    report = load_pretrained(_ve_model(), {k: v for k, v in sd.items() if not k.startswith("cls_head")})
    assert set(report.missing) == {"cls_head.0", "cls_head.2", "cls_head_m.0", "cls_head_m.2"}


def test_cli_convert_carries_task_heads_both_ways(tmp_path: Path) -> None:
    sd = albef_ve_state_dict()
    src, ours, back = tmp_path / "ve.pth", tmp_path / "ours.pt", tmp_path / "back.pth"
    torch.save({"model": sd}, src)
    for a, b, direction in ((src, ours, ("--from", "albef", "--to", "torchmm_ext")),
                            (ours, back, ("--from", "torchmm_ext", "--to", "albef"))):
        run = subprocess.run([sys.executable, "-m", "torchmm_ext.checkpoints", "convert", *direction,
                              str(a), str(b)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "ignored" not in run.stdout or "cls_head" not in run.stdout, run.stdout
    converted = torch.load(ours, map_location="cpu", weights_only=True)["model"]
    assert {k for k in converted if k.startswith("cls_head")} == {k for k in sd if k.startswith("cls_head")}
    # A VE file has a momentum fusion encoder in both layouts: the round trip is exact.
    restored = torch.load(back, map_location="cpu", weights_only=True)["model"]
    assert set(restored) == set(sd)
    assert all(torch.equal(restored[k], sd[k]) for k in sd)


# ---- (2) SNLI-VE / NLVR2 keep a file's momentum head -----------------------------------------


def test_ve_recipe_keeps_the_files_momentum_weights(tmp_path: Path) -> None:
    sd = albef_ve_state_dict()
    path = tmp_path / "ve_checkpoint.pth"
    torch.save({"model": sd, "epoch": 2}, path)
    model = _ve_model()
    logs = []
    prepare_model(model, _recipe_cfg(), str(path), head_prefixes=HEADS, log=logs.append)
    state = model.state_dict()
    for key in ("cls_head_m.0.weight", "cls_head_m.2.bias"):
        assert torch.equal(state[key], sd[key]) and _differs(state[key], state[key.replace("_m", "")])
    # The momentum fusion layers come from text_encoder_m's fusion layers, not the online ones.
    first_fusion = f"text_encoder_m.encoder.layer.{TEXT_LAYERS}.crossattention.self.key.weight"
    assert torch.equal(state["fusion_encoder_m.layer.0.cross_attention.k_proj.weight"], sd[first_fusion])
    assert not [line for line in logs if "copied from their online twins" in line]


def test_ve_recipe_fills_only_what_the_file_lacks(tmp_path: Path) -> None:
    """A pre-training file has no head: the momentum head starts as the (fresh) online head,
    while the file's momentum encoders are kept."""
    pretrained = _pretraining_model()
    path = tmp_path / "pretrained.pth"
    torch.save({"model": pretrained.state_dict()}, path)
    model = _ve_model()
    logs = []
    prepare_model(model, _recipe_cfg(), str(path), head_prefixes=HEADS, log=logs.append)
    state, source = model.state_dict(), pretrained.state_dict()
    assert all(torch.equal(state[k], state[k.replace("cls_head_m", "cls_head")])
               for k in state if k.startswith("cls_head_m."))
    assert any("cls_head_m" in line and "online twins" in line for line in logs)
    for key in ("fusion_encoder_m.layer.1.attention.input_proj.weight", "text_encoder_m.embeddings.word_embeddings.weight",
                "vision_encoder_m.blocks.0.attention.input_proj.weight"):
        assert torch.equal(state[key], source[key]) and _differs(state[key], source[key.replace("_m.", ".", 1)])


def test_nlvr_recipe_keeps_the_files_momentum_head(tmp_path: Path) -> None:
    trained = _perturb_momentum(albef_model_for_nlvr("tiny", **SIZES))
    with torch.no_grad():
        for p in trained.cls_head.parameters():
            p.add_(1.0)  # a trained head, far from the momentum one
    sd = torchmm_ext_to_albef(trained.state_dict())  # ALBEF's NLVR.py layout: 18-layer BERT, cls_head[_m]
    assert {"cls_head.0.weight", "cls_head_m.0.weight"} <= set(sd)
    path = tmp_path / "nlvr.pth"
    torch.save({"model": sd}, path)
    model = albef_model_for_nlvr("tiny", **SIZES)
    checkpoint = dual_image_checkpoint(path, model.fusion_encoder.num_layer_pairs)
    prepare_model(model, _recipe_cfg(), checkpoint, head_prefixes=HEADS)
    state, source = model.state_dict(), trained.state_dict()
    assert set(state) == set(source)
    for key in state:
        assert torch.equal(state[key], source[key]), key


# ---- (3) VQA from a pre-training file: momentum decoder from the momentum encoder ------------


@pytest.mark.parametrize("layout", ["torchmm_ext", "albef"])
def test_vqa_momentum_decoder_built_from_momentum_encoder(tmp_path: Path, layout: str) -> None:
    pretrained = _pretraining_model()
    source = pretrained.state_dict()
    file_state = source if layout == "torchmm_ext" else torchmm_ext_to_albef(source)
    path = tmp_path / "pretrained.pth"
    torch.save({"model": file_state}, path)
    model = albef_model_for_vqa("tiny", **SIZES)
    prepare_model(model, _recipe_cfg(), str(path))
    done = init_answer_decoder(model, str(path))
    assert "answer_decoder_m.lm_head" in done and "lm_head" in done
    state = model.state_dict()
    # ALBEF's VQA.py: text_decoder_m <- text_encoder_m (fusion layers, embeddings, cls head).
    for i in range(FUSION_LAYERS):
        for ours in ("attention.input_proj.weight", "cross_attention.v_proj.weight", "feedforward.model.0.bias"):
            for suffix in ("", "_m"):
                got = state[f"answer_decoder{suffix}.layers.layer.{i}.{ours}"]
                assert torch.equal(got, source[f"fusion_encoder{suffix}.layer.{i}.{ours}"]), (suffix, i, ours)
    for suffix in ("", "_m"):
        assert torch.equal(state[f"answer_decoder{suffix}.embeddings.word_embeddings.weight"],
                           source[f"text_encoder{suffix}.embeddings.word_embeddings.weight"])
        assert torch.equal(state[f"answer_decoder{suffix}.lm_head.dense.weight"], source[f"mlm_head{suffix}.dense.weight"])
        assert torch.equal(state[f"answer_decoder{suffix}.lm_head.bias"], source[f"mlm_head{suffix}.bias"])
    assert _differs(state["answer_decoder_m.layers.layer.0.attention.input_proj.weight"],
                    state["answer_decoder.layers.layer.0.attention.input_proj.weight"])


# ---- (5) retrieval files: the dropped momentum fusion layers are explained --------------------


def test_retrieval_report_explains_dropped_momentum_fusion_layers() -> None:
    sd = albef_state_dict()
    report = load_pretrained(_ours(), sd)
    dropped = len(report.unexpected["fusion_encoder_m.layer"])
    note = [n for n in report.notes if n.startswith("fusion_encoder_m")]
    assert len(note) == 1, report.notes
    assert f"{dropped} tensors dropped" in note[0] and "text_encoder_m's fusion layers" in note[0]
    assert "copies of the online fusion_encoder" in note[0]
    assert note[0] in report.format()
    # A model that has a momentum fusion encoder (VE) takes them: no such note.
    ve_report = load_pretrained(_ve_model(), albef_ve_state_dict())
    assert not [n for n in ve_report.notes if "dropped" in n]
