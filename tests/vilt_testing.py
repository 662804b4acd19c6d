"""Shared helpers of the ViLT tests: a small configuration, the matching Hugging Face oracle
(bit-exact settings from the reference notes), random weights, inputs with a pixel mask."""

import contextlib

import torch
from transformers import ViltConfig, ViltModel as HFViltModel

from torchmm_ext.checkpoints.vilt import torchmm_ext_to_hf_vilt

SIZES = dict(width=32, depth=2, num_heads=4, mlp_dim=64, image_size=64, patch_size=8, max_text_len=12)
VOCAB = 50
ATOL = 1e-5


def hf_config(**extra) -> ViltConfig:
    config = ViltConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=12, image_size=64, patch_size=8, qkv_bias=True, max_image_length=-1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, **extra,
    )
    return config


def hf_model(cls, **extra):
    model = cls(hf_config(**extra)).eval()
    model_root = getattr(model, "vilt", model)
    model_root.embeddings.text_embeddings.LayerNorm.eps = 1e-12
    return model


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (LayerNorms not at 1/0, biases not zero), so nothing is hidden."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm.weight") or
                                                               "layer_norm.weight" in name else 0.0))


@contextlib.contextmanager
def ordered_patches():
    """HF picks patches with ``torch.multinomial``; make it take them in order."""
    original = torch.multinomial

    def first(input, num_samples, replacement=False, *, generator=None, out=None):
        return torch.arange(int(num_samples))

    torch.multinomial = first
    try:
        yield
    finally:
        torch.multinomial = original


def batch(num_images: int = 1, seed: int = 1):
    """Two samples: a 64x96 image, and a 48x64 one zero-padded to 64x96 (non-square, masked)."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, num_images, 3, 64, 96) if num_images > 1 else (2, 3, 64, 96)
    images = torch.randn(shape, generator=g)
    pixel_mask = torch.ones(shape[:-3] + shape[-2:], dtype=torch.long)
    images[1, ..., 48:, :] = 0
    images[1, ..., :, 64:] = 0
    pixel_mask[1, ..., 48:, :] = 0
    pixel_mask[1, ..., :, 64:] = 0
    input_ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    return images, pixel_mask, input_ids, attention_mask


def load_ours_into_hf(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    state = torchmm_ext_to_hf_vilt(ours.state_dict())
    if isinstance(hf, HFViltModel):
        state = {k[len("vilt."):]: v for k, v in state.items() if k.startswith("vilt.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "position_ids" not in k], missing
