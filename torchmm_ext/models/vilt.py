"""ViLT (Kim et al. 2021, dandelin/ViLT): one transformer over [text tokens; image CLS + patches].

The text side is BERT's embeddings (word + position + BERT token type, LayerNorm), the image side
a ViT-B/32 patch embedding whose 12x12 position grid is bilinearly interpolated
(``align_corners=True``) to each image's own patch grid, so images keep their aspect ratio; a
modality embedding (0 text, 1 image, 2 NLVR2's second image) is added to every token, then
pre-norm ViT blocks run over the concatenated sequence and a pooler reads the text [CLS].

Built from torchmultimodal primitives: ``BERTTextEmbeddings``, ``PatchEmbeddings`` (as the holder
of the CLS token, position table and patch projection; its ``forward`` needs a fixed image size,
so the variable-size patch embedding is done here), pre-norm ``TransformerEncoderLayer`` blocks
(``MultiHeadSelfAttention`` runs ``F.scaled_dot_product_attention``), ``Fp32LayerNorm`` and
``MaskedPredictionHead``. The blocks are the same modules as in our
:class:`~torchmm_ext.modules.vision_transformer.VisionTransformer`, so the efficiency methods
(DAS adapters, PELA low-rank layers) apply to them unchanged; they are reached through
``model.block_groups() == {"transformer": model.vilt.blocks}``. Every block is called as
``block(x, attention_mask=mask)`` with a boolean ``[B, 1, 1, L]`` mask.

Task models (builders below): VQA (soft-target BCE over an answer vocabulary), NLVR2 (two
passes with image types 1 and 2, pooled outputs concatenated), retrieval (``rank_output``
trained with sampled negative texts, as ViLT's IRTR), and pre-training (ITM + MLM).
Checkpoints of the original code and of Hugging Face's ``dandelin/vilt-*`` load through
:mod:`torchmm_ext.checkpoints.vilt`.
"""

import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torchmultimodal.modules.layers.normalizations import Fp32LayerNorm
from torchmultimodal.modules.layers.patch_embedding import PatchEmbeddings
from torchmultimodal.modules.layers.text_embedding import BERTTextEmbeddings
from torchmultimodal.modules.layers.transformer import TransformerEncoderLayer
from torchmultimodal.modules.losses.flava import MaskedPredictionHead

from torchmm_ext.modules.mlm import masked_lm_loss
from torchmm_ext.modules.text_encoder import init_bert_weights
from torchmm_ext.modules.word_patch_alignment import word_patch_alignment_loss

__all__ = [
    "VILT_PRESETS",
    "ImageEmbeddings",
    "ViltOutput",
    "ViltModel",
    "ViltForVQA",
    "ViltForNLVR",
    "ViltForRetrieval",
    "ViltForPretraining",
    "ViltClassifierOutput",
    "ViltRetrievalOutput",
    "ViltPretrainingOutput",
    "vilt_model",
    "vilt_model_for_vqa",
    "vilt_model_for_nlvr",
    "vilt_model_for_retrieval",
    "vilt_model_for_pretraining",
    "vqa_soft_target_loss",
]

#: Size presets. ``base`` is the published ViLT-B/32 (BERT-base text embeddings, 40 tokens,
#: ViT-B/32 at 384 px); ``tiny`` is for CPU debugging on the 64 px shapes world, with the sizes
#: of ALBEF's ``tiny`` ViT (192 wide, 3 heads, MLP 768, 4 blocks), so that its transformer can
#: start from that ViT as ViLT's starts from an ImageNet ViT (``init.vision``).
VILT_PRESETS: Dict[str, Dict[str, int]] = {
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072, image_size=384, patch_size=32,
                 max_text_len=40),
    "tiny": dict(width=192, depth=4, num_heads=3, mlp_dim=768, image_size=64, patch_size=8,
                 max_text_len=40),
}


def _preset(preset: str) -> Dict[str, int]:
    if preset not in VILT_PRESETS:
        raise ValueError(f"unknown ViLT preset {preset!r}; choose one of {sorted(VILT_PRESETS)}")
    return VILT_PRESETS[preset]


def init_vilt_weights(module: nn.Module) -> None:
    """ViLT's ``objectives.init_weights`` (BERT's): normal(0, 0.02) Linear/Embedding weights,
    zero biases, unit LayerNorms."""
    init_bert_weights(module, std=0.02)


class ImageEmbeddingsOutput(NamedTuple):
    """Attributes:
    embeddings (Tensor): ``[B, 1 + N, D]`` CLS then the kept patches, position embeddings added.
    mask (Tensor): ``[B, 1 + N]`` long, 1 for the CLS and real patches, 0 for padding patches.
    patch_index (Tensor): ``[B, N, 2]`` (row, column) of each kept patch in the padded grid.
    """

    embeddings: Tensor
    mask: Tensor
    patch_index: Tensor


class ImageEmbeddings(nn.Module):
    """ViLT's ``visual_embed``: patches of an image at its own size, with a pixel mask.

    A batch of images zero-padded to a common size comes with ``pixel_mask`` (1 on real pixels).
    The mask is taken to the patch grid by nearest sampling; each image's grid is ``h x w`` real
    patches (counted along its first column and first row, as ViLT does); the square position
    table is interpolated to that grid (bilinear, ``align_corners=True``) and zero-padded. Each
    row then keeps ``N = max_b h_b * w_b`` patches: its real ones in raster order followed by
    padding patches (masked out). In training with ``max_image_len > 0``, ``N`` is capped at
    ``max_image_len`` and a random subset of the real patches is kept (ViLT's pre-training:
    200), the rest filled with padding patches.

    Args:
        image_size (int): side of the square grid the position table was trained for.
        patch_size (int): patch side in pixels.
        width (int): token dimension.
        dropout (float): dropout after the position embeddings.
        max_image_len (int): cap on the patches per image in training (``-1``: none).
    """

    def __init__(self, image_size: int, patch_size: int, width: int, dropout: float = 0.0,
                 max_image_len: int = -1) -> None:
        super().__init__()
        # PatchEmbeddings holds the CLS token, the position table and the projection
        # (its forward needs the fixed image size; we embed images of any size ourselves).
        self.patch_embeddings = PatchEmbeddings(
            image_size=image_size, patch_size=patch_size, hidden_size=width, hidden_dropout_prob=dropout
        )
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.max_image_len = max_image_len
        nn.init.trunc_normal_(self.patch_embeddings.position_embeddings, std=0.02)
        nn.init.trunc_normal_(self.patch_embeddings.cls_token, std=0.02)

    def _position_grid(self, heights: Tensor, widths: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """``[B, grid_h * grid_w, D]`` position embeddings of each image's own ``h x w`` grid,
        zero-padded to the batch grid (one interpolation per distinct size)."""
        table = self.patch_embeddings.position_embeddings
        d = table.shape[-1]
        spatial = table[:, 1:].transpose(1, 2).reshape(1, d, self.grid, self.grid)
        out = table.new_zeros(heights.shape[0], d, grid_h, grid_w)
        sizes = torch.stack([heights, widths], dim=1)
        for h, w in torch.unique(sizes, dim=0).tolist():
            rows = ((heights == h) & (widths == w)).nonzero(as_tuple=True)[0]
            if h == self.grid and w == self.grid:
                resized = spatial
            else:
                resized = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=True)
            out[rows, :, :h, :w] = resized.to(out.dtype)
        return out.flatten(2).transpose(1, 2)

    def forward(self, images: Tensor, pixel_mask: Optional[Tensor] = None) -> ImageEmbeddingsOutput:
        """
        Inputs:
            images (Tensor): ``[B, 3, H, W]``, zero-padded to the batch's largest image; ``H``
                and ``W`` multiples of the patch size.
            pixel_mask (Optional[Tensor]): ``[B, H, W]``, 1 on real pixels; all ones when None.

        Returns:
            ImageEmbeddingsOutput
        """
        b, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "resize (or pad) images to multiples of it"
            )
        proj = self.patch_embeddings.conv_projection
        x = proj(images.to(proj.weight.dtype))  # [B, D, H / P, W / P]
        grid_h, grid_w = x.shape[2], x.shape[3]
        if pixel_mask is None:
            patch_mask = torch.ones(b, grid_h, grid_w, dtype=torch.long, device=images.device)
        else:
            if pixel_mask.shape != (b, height, width):
                raise ValueError(f"pixel_mask has shape {tuple(pixel_mask.shape)}, expected {(b, height, width)}")
            patch_mask = F.interpolate(pixel_mask[:, None].float(), size=(grid_h, grid_w))[:, 0].long()
        heights = patch_mask[:, :, 0].sum(dim=1)
        widths = patch_mask[:, 0, :].sum(dim=1)
        if bool((heights == 0).any()):
            raise ValueError("an image of the batch has no valid pixel in its top-left patch (empty pixel_mask?)")
        pos = self._position_grid(heights, widths, grid_h, grid_w)  # [B, Hg*Wg, D]
        x = x.flatten(2).transpose(1, 2)  # [B, Hg*Wg, D]
        flat_mask = patch_mask.flatten(1)  # [B, Hg*Wg]
        valid = (heights * widths)
        num_keep = int(valid.max())
        sample = self.training and self.max_image_len > 0
        if sample:
            num_keep = min(num_keep, self.max_image_len)
            # real patches first in a random order, then padding patches in a random order
            order_key = torch.rand(flat_mask.shape, device=x.device) + (1 - flat_mask).float()
        else:
            # real patches in raster order, then padding patches in raster order
            positions = torch.arange(flat_mask.shape[1], device=x.device, dtype=torch.float)
            order_key = positions[None] + (1 - flat_mask).float() * flat_mask.shape[1]
        keep = order_key.argsort(dim=1)[:, :num_keep]  # [B, N]
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        pos = pos.gather(1, keep[..., None].expand(-1, -1, pos.shape[-1]))
        mask = flat_mask.gather(1, keep)
        patch_index = torch.stack([keep // grid_w, keep % grid_w], dim=-1)
        table = self.patch_embeddings.position_embeddings
        cls = self.patch_embeddings.cls_token.expand(b, -1, -1) + table[:, :1]
        x = torch.cat([cls.to(x.dtype), x + pos.to(x.dtype)], dim=1)
        x = self.patch_embeddings.dropout(x)
        mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        return ImageEmbeddingsOutput(x, mask, patch_index)


class ViltOutput(NamedTuple):
    """Output of :class:`ViltModel`.

    Attributes:
        last_hidden_state (Tensor): ``[B, L_t + 1 + N, D]`` after the final LayerNorm.
        pooled_output (Tensor): ``[B, D]`` ``tanh(Linear(text [CLS]))``.
        text_features (Tensor): ``[B, L_t, D]`` the text part of ``last_hidden_state``.
        image_features (Tensor): ``[B, 1 + N, D]`` the image part (CLS first).
        attention_mask (Tensor): ``[B, L_t + 1 + N]`` 1 where a token is real.
        patch_index (Tensor): ``[B, N, 2]`` grid position of each image token after the CLS.
        hidden_states (Optional[List[Tensor]]): the embeddings then every block's output
            (before the final norm), when requested.
    """

    last_hidden_state: Tensor
    pooled_output: Tensor
    text_features: Tensor
    image_features: Tensor
    attention_mask: Tensor
    patch_index: Tensor
    hidden_states: Optional[List[Tensor]] = None


class ImageEncoding(NamedTuple):
    """Embedded images that can be paired with many texts (retrieval evaluation).

    Attributes:
        embeddings (Tensor): ``[B, 1 + N, D]`` image tokens before the modality embedding.
        mask (Tensor): ``[B, 1 + N]``.
    """

    embeddings: Tensor
    mask: Tensor


class Pooler(nn.Module):
    """``tanh(dense(x[:, 0]))`` (ViLT's ``heads.Pooler``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class ViltModel(nn.Module):
    """The ViLT transformer: text and image embeddings, modality embeddings, pre-norm blocks,
    final LayerNorm and pooler.

    Args:
        vocab_size (int): text vocabulary size.
        width (int): token dimension.
        depth (int): number of transformer blocks.
        num_heads (int): attention heads.
        mlp_dim (int): MLP hidden size.
        max_text_len (int): text position table size (ViLT: 40).
        image_size (int): side of the square grid the image position table is for (384).
        patch_size (int): patch side (32).
        num_modality_types (int): rows of the modality embedding (2; 3 for NLVR2).
        dropout (float): dropout in the embeddings and blocks (ViLT: 0.1).
        max_image_len (int): patches kept per image in training (-1: all; 200 in pre-training).
        layer_norm_eps (float): LayerNorm epsilon of the blocks and final norm (1e-6, timm ViT).
        text_layer_norm_eps (float): epsilon of the text embeddings' LayerNorm (1e-12, BERT).
        pad_token_id (int): padding id of the tokenizer.

    Inputs (``forward``):
        input_ids (Tensor): ``[B, L_t]``.
        attention_mask (Tensor): ``[B, L_t]`` 1 on real tokens.
        images (Optional[Tensor]): ``[B, 3, H, W]`` (zero-padded); or ``image_encoding``.
        pixel_mask (Optional[Tensor]): ``[B, H, W]`` 1 on real pixels (all ones when None).
        image_token_type (int): modality id of the image tokens (1; 2 for NLVR2's second image).
        image_encoding (Optional[ImageEncoding]): precomputed :meth:`embed_images` output.
        return_hidden_states (bool): also return every block's output.

    Returns:
        ViltOutput
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        max_text_len: int = 40,
        image_size: int = 384,
        patch_size: int = 32,
        num_modality_types: int = 2,
        dropout: float = 0.1,
        max_image_len: int = -1,
        layer_norm_eps: float = 1e-6,
        text_layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        self.width = width
        self.image_size = image_size
        self.patch_size = patch_size
        self.max_text_len = max_text_len
        self.text_embeddings = BERTTextEmbeddings(
            hidden_size=width, vocab_size=vocab_size, pad_token_id=pad_token_id,
            max_position_embeddings=max_text_len, layer_norm_eps=text_layer_norm_eps, dropout=dropout,
        )
        self.image_embeddings = ImageEmbeddings(image_size, patch_size, width, dropout, max_image_len)
        self.modality_embeddings = nn.Embedding(num_modality_types, width)
        # torchmultimodal's MLP leaves its dropout layer out at p=0, which renumbers the second
        # Linear (model.3 -> model.2): build with a dropout layer and set p, so that every
        # model has the same keys whatever its dropout.
        self.blocks = nn.ModuleList(
            TransformerEncoderLayer(
                d_model=width, n_head=num_heads, dim_feedforward=mlp_dim, dropout=0.5,
                activation=nn.GELU, layer_norm_eps=layer_norm_eps, norm_first=True,
            )
            for _ in range(depth)
        )
        for module in self.blocks.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
        self.norm = Fp32LayerNorm(width, eps=layer_norm_eps)
        self.pooler = Pooler(width)
        init_vilt_weights(self.text_embeddings)
        init_vilt_weights(self.modality_embeddings)
        init_vilt_weights(self.pooler)
        for module in self.blocks.modules():  # timm's ViT initialisation
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def block_groups(self) -> Dict[str, nn.ModuleList]:
        return {"transformer": self.blocks}

    def embed_images(self, images: Tensor, pixel_mask: Optional[Tensor] = None) -> ImageEncoding:
        """The image tokens of ``images`` (before the modality embedding), to pair with texts."""
        out = self.image_embeddings(images, pixel_mask)
        return ImageEncoding(out.embeddings, out.mask)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        images: Optional[Tensor] = None,
        pixel_mask: Optional[Tensor] = None,
        image_token_type: int = 1,
        image_encoding: Optional[ImageEncoding] = None,
        return_hidden_states: bool = False,
    ) -> ViltOutput:
        if input_ids.shape[1] > self.max_text_len:
            raise ValueError(
                f"{input_ids.shape[1]} text tokens, but the text position table has {self.max_text_len}: "
                f"tokenize with max_length={self.max_text_len}"
            )
        if image_encoding is None:
            if images is None:
                raise ValueError("give images (or a precomputed image_encoding)")
            image = self.image_embeddings(images, pixel_mask)
            image_tokens, image_mask, patch_index = image.embeddings, image.mask, image.patch_index
        else:
            image_tokens, image_mask = image_encoding.embeddings, image_encoding.mask
            patch_index = image_mask.new_zeros(image_mask.shape[0], image_mask.shape[1] - 1, 2)
        text = self.text_embeddings(input_ids)
        types = self.modality_embeddings.weight
        text = text + types[0]
        image_tokens = image_tokens + types[image_token_type].to(image_tokens.dtype)
        x = torch.cat([text, image_tokens.to(text.dtype)], dim=1)  # [B, L_t + 1 + N, D]
        mask = torch.cat([attention_mask.long(), image_mask.long()], dim=1)
        sdpa_mask = mask.bool()[:, None, None, :]
        hidden_states = [x] if return_hidden_states else None
        for block in self.blocks:
            x = block(x, attention_mask=sdpa_mask)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x)
        num_text = input_ids.shape[1]
        return ViltOutput(
            last_hidden_state=x,
            pooled_output=self.pooler(x),
            text_features=x[:, :num_text],
            image_features=x[:, num_text:],
            attention_mask=mask,
            patch_index=patch_index,
            hidden_states=hidden_states,
        )


def _classifier(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """ViLT's task MLP: Linear -> LayerNorm -> GELU -> Linear (keys ``0``, ``1``, ``3``)."""
    head = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    init_vilt_weights(head)
    return head


def vqa_soft_target_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """ViLT's VQA loss: mean binary cross-entropy over every (question, answer) logit against the
    soft scores, times the number of answers (``BCEWithLogits(logits, targets) * A``), in fp32."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


class ViltClassifierOutput(NamedTuple):
    """Attributes:
    logits (Tensor): ``[B, C]`` class (or answer) logits.
    loss (Optional[Tensor]): the task loss when targets were given.
    pooled_output (Tensor): ``[B, D]`` (``[B, 2D]`` for NLVR2: both passes).
    """

    logits: Tensor
    loss: Optional[Tensor]
    pooled_output: Tensor


class _ViltTaskModel(nn.Module):
    """Shared parts of the task models: the backbone under ``vilt`` and ``block_groups``."""

    vilt: ViltModel

    def block_groups(self) -> Dict[str, nn.ModuleList]:
        return self.vilt.block_groups()


class ViltForVQA(_ViltTaskModel):
    """ViLT with the VQA classifier over an answer vocabulary.

    Inputs (``forward``):
        images (Tensor): ``[B, 3, H, W]``.
        input_ids (Tensor): ``[B, L]`` questions.
        attention_mask (Tensor): ``[B, L]``.
        pixel_mask (Optional[Tensor]): ``[B, H, W]``.
        targets (Optional[Tensor]): ``[B, A]`` soft answer scores (VQA's 0.3 per annotator).

    Returns:
        ViltClassifierOutput: ``logits [B, A]``; ``loss`` = :func:`vqa_soft_target_loss`.
    """

    def __init__(self, vilt: ViltModel, num_answers: int) -> None:
        super().__init__()
        self.vilt = vilt
        self.classifier = _classifier(vilt.width, 2 * vilt.width, num_answers)
        self.num_answers = num_answers

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                pixel_mask: Optional[Tensor] = None, targets: Optional[Tensor] = None) -> ViltClassifierOutput:
        pooled = self.vilt(input_ids, attention_mask, images, pixel_mask).pooled_output
        logits = self.classifier(pooled)
        loss = vqa_soft_target_loss(logits, targets) if targets is not None else None
        return ViltClassifierOutput(logits, loss, pooled)


class ViltForNLVR(_ViltTaskModel):
    """ViLT for NLVR2 ("pair" mode): the sentence is encoded with each image in its own pass
    (image modality 1 for the left image, 2 for the right one), the two pooled outputs are
    concatenated and classified.

    Inputs (``forward``):
        images (Tensor): ``[B, 2, 3, H, W]`` left then right image.
        input_ids (Tensor): ``[B, L]``.
        attention_mask (Tensor): ``[B, L]``.
        pixel_mask (Optional[Tensor]): ``[B, 2, H, W]``.
        labels (Optional[Tensor]): ``[B]`` 1 for True.

    Returns:
        ViltClassifierOutput: ``logits [B, 2]``; ``loss`` cross-entropy.
    """

    def __init__(self, vilt: ViltModel) -> None:
        super().__init__()
        if vilt.modality_embeddings.num_embeddings < 3:
            raise ValueError("ViltForNLVR needs 3 modality types (text, left image, right image)")
        self.vilt = vilt
        self.classifier = _classifier(2 * vilt.width, 2 * vilt.width, 2)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                pixel_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> ViltClassifierOutput:
        if images.dim() != 5 or images.shape[1] != 2:
            raise ValueError(f"NLVR2 takes images [B, 2, 3, H, W] (a pair per sentence), got {tuple(images.shape)}")
        pooled = []
        for i in range(2):
            mask_i = pixel_mask[:, i] if pixel_mask is not None else None
            pooled.append(self.vilt(input_ids, attention_mask, images[:, i], mask_i, image_token_type=i + 1).pooled_output)
        pooled_pair = torch.cat(pooled, dim=-1)
        logits = self.classifier(pooled_pair)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ViltClassifierOutput(logits, loss, pooled_pair)


class ViltRetrievalOutput(NamedTuple):
    """Attributes:
    scores (Tensor): ``[B, T]`` ``rank_output`` score of each image with each of its texts.
    loss (Optional[Tensor]): cross-entropy with the first text of each row as the target.
    """

    scores: Tensor
    loss: Optional[Tensor]


class ViltForRetrieval(_ViltTaskModel):
    """ViLT image-text retrieval (IRTR): ``rank_output`` scores an (image, text) pair; training
    puts each image's caption first among ``T - 1`` sampled negative texts (ViLT: 15) and
    applies cross-entropy with target 0. The ITM head is kept (frozen, as in ViLT) because
    ``rank_output`` starts from its "match" row (:meth:`init_rank_output_from_itm`).

    Inputs (``forward``):
        images (Tensor): ``[B, 3, H, W]``.
        input_ids (Tensor): ``[B, T, L]`` texts per image, the positive first.
        attention_mask (Tensor): ``[B, T, L]``.
        pixel_mask (Optional[Tensor]): ``[B, H, W]``.

    Returns:
        ViltRetrievalOutput
    """

    def __init__(self, vilt: ViltModel) -> None:
        super().__init__()
        self.vilt = vilt
        self.itm_head = nn.Linear(vilt.width, 2)
        self.rank_output = nn.Linear(vilt.width, 1)
        init_vilt_weights(self.itm_head)
        self.init_rank_output_from_itm()
        for p in self.itm_head.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def init_rank_output_from_itm(self) -> None:
        """``rank_output`` <- the ITM head's "match" row (ViLT's IRTR initialisation)."""
        self.rank_output.weight.copy_(self.itm_head.weight[1:])
        self.rank_output.bias.copy_(self.itm_head.bias[1:])

    def score_pairs(self, image_encoding: ImageEncoding, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[N]`` scores of N (image, text) pairs; ``image_encoding`` has one row per pair."""
        pooled = self.vilt(input_ids, attention_mask, image_encoding=image_encoding).pooled_output
        return self.rank_output(pooled)[:, 0]

    def embed_images(self, images: Tensor, pixel_mask: Optional[Tensor] = None) -> ImageEncoding:
        return self.vilt.embed_images(images, pixel_mask)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                pixel_mask: Optional[Tensor] = None) -> ViltRetrievalOutput:
        if input_ids.dim() != 3:
            raise ValueError(f"retrieval takes input_ids [B, T, L] (texts per image), got {tuple(input_ids.shape)}")
        b, t, length = input_ids.shape
        encoding = self.embed_images(images, pixel_mask)
        # every text of a row pairs with the same image tokens: [B*T, 1 + N, D]
        repeated = ImageEncoding(encoding.embeddings.repeat_interleave(t, dim=0),
                                 encoding.mask.repeat_interleave(t, dim=0))
        scores = self.score_pairs(repeated, input_ids.reshape(b * t, length),
                                  attention_mask.reshape(b * t, length)).view(b, t)
        loss = F.cross_entropy(scores.float(), scores.new_zeros(b, dtype=torch.long)) if t > 1 else None
        return ViltRetrievalOutput(scores, loss)


class ViltPretrainingOutput(NamedTuple):
    """Attributes:
    loss (Tensor): ``itm_weight * itm_loss + mlm_loss + wpa_loss``.
    itm_loss (Tensor): ITM cross-entropy (unweighted).
    mlm_loss (Tensor): MLM cross-entropy over the masked positions.
    itm_logits (Tensor): ``[B, 2]``.
    mlm_logits (Tensor): ``[B, L, V]``.
    wpa_loss (Optional[Tensor]): the weighted word-patch alignment term (None at weight 0).
    """

    loss: Tensor
    itm_loss: Tensor
    mlm_loss: Tensor
    itm_logits: Tensor
    mlm_logits: Tensor
    wpa_loss: Optional[Tensor] = None


class ViltForPretraining(_ViltTaskModel):
    """ViLT pre-training heads: ITM (Linear(D, 2) on the pooled output) with word-patch alignment
    (:func:`~torchmm_ext.modules.word_patch_alignment.word_patch_alignment_loss` on the ITM
    pass's final text and patch states, weight ``wpa_weight``; ViLT's ``compute_itm_wpa``) and
    MLM (BERT's transform + an untied decoder with its own bias, on the text features).

    Args:
        vilt (ViltModel): the backbone.
        vocab_size (int): MLM vocabulary.
        wpa_weight (float): weight of the word-patch alignment term (ViLT: 0.1; 0 turns it off).
        itm_weight (float): weight of the ITM loss (ViLT: 1, an unweighted sum). Near chance the
            MLM gradient on the shared transformer is tens of times the ITM one (tiny shapes
            model: 40-90x), and Adam's per-parameter normalisation then gives ITM a small
            share of each update; a weight above 1 gives it more.

    Inputs (``forward``):
        images (Tensor): ``[B, 3, H, W]`` each text's own image (the MLM pass).
        input_ids (Tensor): ``[B, L]`` unmasked texts (the ITM pass).
        attention_mask (Tensor): ``[B, L]``.
        mlm_input_ids (Tensor): ``[B, L]`` masked texts.
        mlm_labels (Tensor): ``[B, L]`` original ids at masked positions, -100 elsewhere.
        itm_images (Tensor): ``[B, 3, H', W']`` images of the ITM pass (some swapped).
        itm_labels (Tensor): ``[B]`` 1 where ``itm_images`` is the text's own image.
        pixel_mask, itm_pixel_mask (Optional[Tensor]): pixel masks of the two image batches.

    Returns:
        ViltPretrainingOutput
    """

    def __init__(self, vilt: ViltModel, vocab_size: int, wpa_weight: float = 0.1, itm_weight: float = 1.0) -> None:
        super().__init__()
        self.vilt = vilt
        self.wpa_weight = wpa_weight
        self.itm_weight = itm_weight
        self.itm_head = nn.Linear(vilt.width, 2)
        self.mlm_head = MaskedPredictionHead(hidden_size=vilt.width, vocab_size=vocab_size,
                                             transform_act_fn=F.gelu, layer_norm_eps=1e-12)
        init_vilt_weights(self.itm_head)
        init_vilt_weights(self.mlm_head)

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        mlm_input_ids: Tensor,
        mlm_labels: Tensor,
        itm_images: Tensor,
        itm_labels: Tensor,
        pixel_mask: Optional[Tensor] = None,
        itm_pixel_mask: Optional[Tensor] = None,
    ) -> ViltPretrainingOutput:
        mlm_out = self.vilt(mlm_input_ids, attention_mask, images, pixel_mask)
        mlm_logits = self.mlm_head(mlm_out.text_features)
        mlm_loss = masked_lm_loss(mlm_logits, mlm_labels)
        itm_out = self.vilt(input_ids, attention_mask, itm_images, itm_pixel_mask)
        itm_logits = self.itm_head(itm_out.pooled_output)
        itm_loss = F.cross_entropy(itm_logits.float(), itm_labels)
        loss = self.itm_weight * itm_loss + mlm_loss
        wpa_loss = None
        if self.wpa_weight:
            num_text = input_ids.shape[1]
            wpa_loss = self.wpa_weight * word_patch_alignment_loss(
                itm_out.text_features, itm_out.image_features, itm_out.attention_mask[:, :num_text],
                itm_out.attention_mask[:, num_text:], itm_labels)
            loss = loss + wpa_loss
        return ViltPretrainingOutput(loss, itm_loss, mlm_loss, itm_logits, mlm_logits, wpa_loss)


# ---- builders -------------------------------------------------------------------------------

_BACKBONE_ARGS = ("preset", "vocab_size", "width", "depth", "num_heads", "mlp_dim", "image_size", "patch_size",
                  "max_text_len", "num_modality_types", "dropout", "max_image_len", "pad_token_id")


def _backbone(arguments: Dict[str, object]) -> ViltModel:
    """:func:`vilt_model` from a task builder's ``locals()``."""
    return vilt_model(**{k: arguments[k] for k in _BACKBONE_ARGS})  # type: ignore[arg-type]


def vilt_model(
    preset: str = "base",
    *,
    vocab_size: int = 30522,
    width: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_dim: Optional[int] = None,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    max_text_len: Optional[int] = None,
    num_modality_types: int = 2,
    dropout: float = 0.1,
    max_image_len: int = -1,
    pad_token_id: int = 0,
) -> ViltModel:
    """Builds the ViLT transformer (:class:`ViltModel`).

    Args:
        preset (str): ``"base"`` (ViLT-B/32: 768 wide, 12 blocks, 384 px, 32 px patches, 40
            tokens) or ``"tiny"`` (192 wide, 3 heads, 4 blocks, 64 px, 8 px patches); the size arguments
            below override it.
        vocab_size (int): tokenizer vocabulary (30522 for bert-base-uncased).
        width, depth, num_heads, mlp_dim, image_size, patch_size, max_text_len (Optional[int]):
            sizes (the preset's when None).
        num_modality_types (int): modality embedding rows (3 for NLVR2).
        dropout (float): dropout (0.1 in ViLT).
        max_image_len (int): patches kept per image in training (-1: all; 200 in pre-training).
        pad_token_id (int): the tokenizer's padding id.

    Returns:
        ViltModel
    """
    sizes = dict(_preset(preset))
    overrides = dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                     image_size=image_size, patch_size=patch_size, max_text_len=max_text_len)
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return ViltModel(vocab_size=vocab_size, num_modality_types=num_modality_types, dropout=dropout,
                     max_image_len=max_image_len, pad_token_id=pad_token_id, **sizes)


def vilt_model_for_vqa(
    preset: str = "base",
    *,
    num_answers: int = 3129,
    vocab_size: int = 30522,
    width: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_dim: Optional[int] = None,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    max_text_len: Optional[int] = None,
    num_modality_types: int = 2,
    dropout: float = 0.1,
    max_image_len: int = -1,
    pad_token_id: int = 0,
) -> ViltForVQA:
    """ViLT for VQA: :func:`vilt_model` + the answer classifier
    (Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, num_answers)).

    Args:
        num_answers (int): answer vocabulary size (3129 for VQAv2).
        others: as in :func:`vilt_model`.

    Returns:
        ViltForVQA
    """
    return ViltForVQA(_backbone(locals()), num_answers)


def vilt_model_for_nlvr(
    preset: str = "base",
    *,
    vocab_size: int = 30522,
    width: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_dim: Optional[int] = None,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    max_text_len: Optional[int] = None,
    num_modality_types: int = 3,
    dropout: float = 0.1,
    max_image_len: int = -1,
    pad_token_id: int = 0,
) -> ViltForNLVR:
    """ViLT for NLVR2: :func:`vilt_model` with 3 modality types (text, left, right image) + the
    pair classifier (Linear(2D, 2D) -> LayerNorm -> GELU -> Linear(2D, 2)).

    Args:
        as in :func:`vilt_model` (``num_modality_types`` 3).

    Returns:
        ViltForNLVR
    """
    return ViltForNLVR(_backbone(locals()))


def vilt_model_for_retrieval(
    preset: str = "base",
    *,
    vocab_size: int = 30522,
    width: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_dim: Optional[int] = None,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    max_text_len: Optional[int] = None,
    num_modality_types: int = 2,
    dropout: float = 0.1,
    max_image_len: int = -1,
    pad_token_id: int = 0,
) -> ViltForRetrieval:
    """ViLT for image-text retrieval: :func:`vilt_model` + ``rank_output`` (and the frozen ITM
    head it is initialised from).

    Args:
        as in :func:`vilt_model`.

    Returns:
        ViltForRetrieval
    """
    return ViltForRetrieval(_backbone(locals()))


def vilt_model_for_pretraining(
    preset: str = "base",
    *,
    vocab_size: int = 30522,
    width: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_dim: Optional[int] = None,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    max_text_len: Optional[int] = None,
    num_modality_types: int = 2,
    dropout: float = 0.1,
    max_image_len: int = 200,
    pad_token_id: int = 0,
    wpa_weight: float = 0.1,
    itm_weight: float = 1.0,
) -> ViltForPretraining:
    """ViLT for pre-training: :func:`vilt_model` + ITM (with word-patch alignment) and MLM heads.

    Args:
        max_image_len (int): patches kept per image in training (200 in ViLT's pre-training).
        wpa_weight (float): weight of the word-patch alignment term (ViLT: 0.1; 0: ITM alone).
        itm_weight (float): weight of the ITM loss (ViLT: 1; see :class:`ViltForPretraining`).
        others: as in :func:`vilt_model`.

    Returns:
        ViltForPretraining
    """
    return ViltForPretraining(_backbone(locals()), vocab_size, wpa_weight, itm_weight)
