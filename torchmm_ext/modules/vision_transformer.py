"""A ViT whose blocks can be reached, skipped, wrapped or followed by a token-reduction step.

torchmultimodal's ``ALBEFVisionEncoder`` is an FX-traced torchvision ViT: its blocks cannot be
replaced, skipped or interleaved with pruning, and its attention bypasses SDPA. We assemble the
same ViT-B/16 from torchmultimodal's lower primitives instead (``PatchEmbeddings`` for the CLS
token, position and patch embeddings; pre-norm ``TransformerEncoderLayer`` blocks, whose
``MultiHeadSelfAttention``, as :class:`~torchmm_ext.modules.attention.SelfAttention`, runs
SDPA) and expose the seams the
efficiency methods need:

* ``encoder.blocks[i]`` is a plain module ``[B, L, D] -> [B, L, D]``: replace it (DAS adapters),
  wrap it, or skip it (:meth:`VisionTransformer.skip_blocks`).
* ``encoder.token_reducers[str(i)]`` runs after block ``i`` and may change the sequence length
  (ELIP's text-guided merge); it receives a :class:`TokenReductionContext`.
* ``forward(..., return_attention_layer=i)`` also returns block ``i``'s attention probabilities.
* ``forward(..., return_hidden_states=True)`` returns the embedding output and every block's
  output (PELA's feature distillation).
"""

from typing import Callable, List, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import nn, Tensor
from torchmultimodal.modules.layers.normalizations import Fp32LayerNorm
from torchmultimodal.modules.layers.patch_embedding import PatchEmbeddings
from torchmultimodal.modules.layers.transformer import TransformerEncoderLayer

from torchmm_ext.modules.attention import self_attention_with_probs, use_self_attention


class VisionTransformerOutput(NamedTuple):
    """Output of :class:`VisionTransformer`.

    Attributes:
        last_hidden_state (Tensor): ``[B, L, D]`` after the final LayerNorm, CLS first. ``L`` is
            ``1 + num_patches`` unless token reducers shortened the sequence.
        hidden_states (Optional[List[Tensor]]): embedding output then each block's output
            (before the final norm), when requested.
        attention (Optional[Tensor]): ``[B, H, L_i, L_i]`` probabilities of the requested block.
    """

    last_hidden_state: Tensor
    hidden_states: Optional[List[Tensor]] = None
    attention: Optional[Tensor] = None


class TokenReductionContext(NamedTuple):
    """What a token reducer placed after block ``layer_idx`` may use.

    Attributes:
        encoder (VisionTransformer): the encoder being run (e.g. to look ahead at later blocks).
        layer_idx (int): index of the block that just ran.
        guidance (Optional[Tensor]): optional per-sample guidance passed to ``forward`` (ELIP
            passes the text CLS embedding ``[B, D]``).
        block_input (Optional[Tensor]): the tokens block ``layer_idx`` received (to score with
            that block's own attention, :meth:`VisionTransformer.block_attention`).
    """

    encoder: "VisionTransformer"
    layer_idx: int
    guidance: Optional[Tensor]
    block_input: Optional[Tensor] = None


class TokenReducer(Protocol):
    def __call__(self, tokens: Tensor, context: TokenReductionContext) -> Tensor: ...


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (OpenAI CLIP's ``QuickGELU``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionTransformer(nn.Module):
    """ViT encoder (CLS + patches, pre-norm blocks, final LayerNorm) with per-block seams.

    The defaults build ALBEF's ViT (timm/DeiT). CLIP's visual tower (as METER uses it) is the
    same encoder with ``activation=QuickGELU``, ``layer_norm_eps=1e-5``, ``patch_bias=False``
    and ``pre_norm=True`` (CLIP's ``ln_pre`` after the embeddings); its ``ln_post`` is the final
    norm, applied to every token.

    Args:
        image_size (int): input resolution (square).
        patch_size (int): patch side in pixels.
        width (int): token dimension.
        depth (int): number of blocks.
        num_heads (int): attention heads per block.
        mlp_dim (int): hidden size of each block's MLP.
        layer_norm_eps (float): LayerNorm epsilon (1e-6 in ViT/DeiT).
        dropout (float): dropout after the embeddings and inside blocks.
        drop_path_rate (float): stochastic-depth rate, increased linearly over the blocks.
        activation (Callable[..., nn.Module]): MLP activation (``nn.GELU``; CLIP: ``QuickGELU``).
        pre_norm (bool): LayerNorm on the embeddings before the first block (CLIP's ``ln_pre``).
        patch_bias (bool): bias in the patch projection (CLIP has none).

    Inputs:
        images (Tensor): ``[B, 3, image_size, image_size]``.
        guidance (Optional[Tensor]): forwarded to token reducers.
        return_attention_layer (Optional[int]): block whose attention probabilities to return.
        return_hidden_states (bool): also return the embedding and every block's output.

    Returns:
        VisionTransformerOutput
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        layer_norm_eps: float = 1e-6,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        activation: Callable[..., nn.Module] = nn.GELU,
        pre_norm: bool = False,
        patch_bias: bool = True,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.embeddings = PatchEmbeddings(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=width,
            hidden_dropout_prob=dropout,
        )
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # CPU even under a meta device context
        self.blocks = nn.ModuleList(
            TransformerEncoderLayer(
                d_model=width,
                n_head=num_heads,
                dim_feedforward=mlp_dim,
                dropout=dropout,
                activation=activation,
                layer_norm_eps=layer_norm_eps,
                norm_first=True,
                drop_path_rate=rate,
            )
            for rate in rates
        )
        for block in self.blocks:
            use_self_attention(block)  # SDPA through torchmm_ext.modules.attention
        self.norm = Fp32LayerNorm(width, eps=layer_norm_eps)
        self.token_reducers = nn.ModuleDict()
        if not patch_bias:
            # PatchEmbeddings always makes a biased conv; CLIP's conv1 has no bias.
            biased = self.embeddings.conv_projection
            self.embeddings.conv_projection = nn.Conv2d(
                biased.in_channels, width, kernel_size=patch_size, stride=patch_size, bias=False
            )
            self.embeddings.conv_projection.weight.data.copy_(biased.weight.data)
        self.pre_norm = Fp32LayerNorm(width, eps=layer_norm_eps) if pre_norm else None
        self._init_weights()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def _init_weights(self) -> None:
        # timm's ViT initialisation (truncated normal 0.02, zero biases, unit LayerNorm).
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=0.02)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def skip_blocks(self, indices: Sequence[int]) -> None:
        """Replace the given blocks by identities (their residual stream passes through)."""
        for i in indices:
            self.blocks[i] = nn.Identity()

    def set_token_reducer(self, layer_idx: int, reducer: Optional[nn.Module]) -> None:
        """Install (or remove, with ``None``) a token reducer after block ``layer_idx``."""
        if not 0 <= layer_idx < len(self.blocks):
            raise IndexError(f"layer_idx {layer_idx} out of range for {len(self.blocks)} blocks")
        key = str(layer_idx)
        if reducer is None:
            if key in self.token_reducers:
                del self.token_reducers[key]
        else:
            self.token_reducers[key] = reducer

    def block_attention(self, layer_idx: int, tokens: Tensor) -> Tensor:
        """Attention probabilities ``[B, H, L, L]`` of block ``layer_idx`` given its input tokens."""
        block = self.blocks[layer_idx]
        if not isinstance(block, TransformerEncoderLayer):
            raise TypeError(
                f"block {layer_idx} is a {type(block).__name__}, not a TransformerEncoderLayer; "
                "its attention cannot be read"
            )
        return self_attention_with_probs(block.attention, block.attention_layernorm(tokens)).probs

    def forward(
        self,
        images: Tensor,
        guidance: Optional[Tensor] = None,
        return_attention_layer: Optional[int] = None,
        return_hidden_states: bool = False,
    ) -> VisionTransformerOutput:
        x = self.embeddings(images).embeddings  # [B, 1 + N, D]
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        hidden_states: List[Tensor] = [x] if return_hidden_states else []
        attention = None
        for i, block in enumerate(self.blocks):
            if i == return_attention_layer:
                attention = self.block_attention(i, x)
            block_input, x = x, block(x)
            reducer = self.token_reducers[str(i)] if str(i) in self.token_reducers else None
            if reducer is not None:
                x = reducer(x, TokenReductionContext(self, i, guidance, block_input))
            if return_hidden_states:
                hidden_states.append(x)
        return VisionTransformerOutput(
            last_hidden_state=self.norm(x),
            hidden_states=hidden_states if return_hidden_states else None,
            attention=attention,
        )

