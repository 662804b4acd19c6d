"""Tensor-level building blocks of the checkpoint converters: packed q/k/v, position-embedding
resampling, and reading / unwrapping checkpoint files."""

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

StateDict = Dict[str, Tensor]
PathLike = Union[str, Path]

__all__ = [
    "StateDict",
    "interpolate_pos_embed",
    "load_state_dict_file",
    "merge_qkv",
    "split_qkv",
    "group_keys",
    "unwrap_state_dict",
]

# Wrapper keys under which training scripts store the weights (ALBEF and ours: "model").
_WRAPPER_KEYS = ("model", "state_dict", "module")
# Prefixes added by DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def split_qkv(packed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Splits a packed ``[q; k; v]`` projection (weight ``[3D, D]`` or bias ``[3D]``) into three.

    Args:
        packed (Tensor): weight or bias whose first dimension holds q, k and v in that order
            (timm's ``attn.qkv``, torchvision's ``in_proj_weight``, our ``input_proj``).

    Returns:
        Tuple[Tensor, Tensor, Tensor]: query, key and value parts (each ``[D, ...]``).
    """
    if packed.shape[0] % 3:
        raise ValueError(f"packed q/k/v has first dimension {packed.shape[0]}, not a multiple of 3")
    q, k, v = packed.chunk(3, dim=0)
    return q.clone(), k.clone(), v.clone()


def merge_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Packs separate query / key / value weights (or biases) into one ``[3D, ...]`` tensor.

    Args:
        q (Tensor): query weight ``[D, D_in]`` or bias ``[D]``.
        k (Tensor): key, same shape.
        v (Tensor): value, same shape.

    Returns:
        Tensor: ``torch.cat([q, k, v])``, the inverse of :func:`split_qkv`.
    """
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q/k/v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return torch.cat([q, k, v], dim=0)


def interpolate_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1) -> Tensor:
    """Resamples ViT position embeddings to another patch grid, as ALBEF does when fine-tuning at
    a new image size: the patch part is reshaped to its square grid and resized bicubically
    (``align_corners=False``); the prefix (CLS) rows are kept as they are.

    Args:
        pos_embed (Tensor): ``[1, num_prefix_tokens + g * g, D]``.
        new_grid (int): side ``n`` of the target patch grid (``image_size // patch_size``).
        num_prefix_tokens (int): leading non-patch tokens (1: CLS).

    Returns:
        Tensor: ``[1, num_prefix_tokens + n * n, D]`` in the input dtype; the input itself when
        the grid is unchanged.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected pos_embed [1, prefix + g*g, D], got {tuple(pos_embed.shape)}")
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(patches.shape[1])
    if old_grid * old_grid != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch position embeddings do not form a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> StateDict:
    """The tensors of a checkpoint: unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` /
    ``{"module": ...}`` (nested too) and strips ``module.`` / ``_orig_mod.`` prefixes shared by
    every key. Non-tensor entries are dropped.

    Args:
        checkpoint (Mapping[str, Any]): a loaded checkpoint file.

    Returns:
        StateDict: name -> tensor.
    """
    found = True
    while found:
        found = False
        for key in _WRAPPER_KEYS:
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and (
                any(isinstance(v, Tensor) for v in inner.values())
                or any(k in inner for k in _WRAPPER_KEYS)
            ):
                checkpoint, found = inner, True
                break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def load_state_dict_file(path: PathLike, *, weights_only: bool = True) -> StateDict:
    """Reads a checkpoint file onto the CPU and unwraps it (:func:`unwrap_state_dict`).

    Args:
        path (PathLike): ``.safetensors``, or anything ``torch.load`` reads (``.pth``, ``.pt``,
            ``.bin``).
        weights_only (bool): ``torch.load``'s safe mode (no arbitrary code is unpickled). The
            published ALBEF checkpoints load with it; pass ``False`` only for files you trust.

    Returns:
        StateDict: name -> tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path), device="cpu"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # UnpicklingError and friends; the message says what to do
        if weights_only:
            raise RuntimeError(
                f"cannot load {path} with weights_only=True ({err}). If you trust the file, "
                "load it with weights_only=False (CLI: --unsafe-pickle)."
            ) from err
        raise
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return unwrap_state_dict(checkpoint)


def load_checkpoint_metadata(path: PathLike) -> Dict[str, Any]:
    """The non-tensor top-level entries of a checkpoint file (``config``, ``methods``, ``epoch``,
    ...); ``{}`` for a bare state dict or a ``.safetensors`` file. Tensors are memory-mapped,
    not read.

    Args:
        path (PathLike): a checkpoint file.

    Returns:
        Dict[str, Any]: entry name -> value, without ``model`` / ``state_dict`` / tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or not any(k in checkpoint for k in _WRAPPER_KEYS):
        return {}
    return {k: v for k, v in checkpoint.items()
            if k not in _WRAPPER_KEYS and not isinstance(v, (Tensor, Mapping)) or k in ("config", "methods")}


def group_keys(keys: List[str], depth: int = 2) -> Dict[str, List[str]]:
    """Groups parameter names by module: the first ``depth`` dotted components of the owning
    module's path (``vision_proj.weight`` -> ``vision_proj``, ``queue.ptr`` -> ``queue``,
    ``text_encoder.encoder.layer.0.attention...`` -> ``text_encoder.encoder``).

    Args:
        keys (List[str]): parameter names.
        depth (int): module path components forming the group name.

    Returns:
        Dict[str, List[str]]: group -> names, groups in first-seen order.
    """
    groups: Dict[str, List[str]] = {}
    for key in keys:
        parts = key.split(".")
        module = parts[:-1] or parts
        groups.setdefault(".".join(module[:depth]), []).append(key)
    return groups
