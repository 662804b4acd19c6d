"""Task-specific starting points ALBEF's fine-tuning scripts build from a checkpoint: the VQA
answer decoder from the fusion layers, the NLVR2 dual-image fusion from single-image layers."""

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from torch import nn, Tensor

from torchmm_ext.checkpoints.loading import convert_to_torchmm_ext
from torchmm_ext.checkpoints.primitives import load_state_dict_file
from torchmm_ext.models.albef.nlvr import nlvr_state_dict_from_single_image

__all__ = ["dual_image_checkpoint", "init_answer_decoder"]


def init_answer_decoder(model: nn.Module, source: str) -> Optional[List[str]]:
    """ALBEF's VQA decoder initialisation (``VQA.py``: decoder layers from fusion layers 6-11,
    embeddings from the text encoder's, LM head from the pre-training MLM head; the momentum
    decoder likewise from the momentum encoder and momentum MLM head) when the weights the model
    started from, ``source``, have no answer decoder. Call it after the model has loaded
    ``source`` (its momentum encoder then holds the file's momentum weights, or copies of the
    online ones when the file has none).

    Args:
        model (nn.Module): an :class:`~torchmm_ext.models.albef.ALBEFForVQA`.
        source (str): the checkpoint the model was initialised from (any layout); empty: none.

    Returns:
        Optional[List[str]]: what ``init_answer_decoder_from_encoder`` initialised, or None
        when ``source`` is empty or carries its own decoder.
    """
    if not source:
        return None
    state = convert_to_torchmm_ext(load_state_dict_file(source)).state_dict
    if any(key.startswith("answer_decoder.") for key in state):
        return None
    heads = [{k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
             for prefix in ("mlm_head.", "mlm_head_m.")]
    return model.init_answer_decoder_from_encoder(heads[0] or None, heads[1] or None)


class _ConvertedStateDict(dict):
    """A state dict converted in memory; load reports name it by its source file."""

    def __init__(self, state_dict: Mapping[str, Tensor], description: str) -> None:
        super().__init__(state_dict)
        self.description = description

    def __repr__(self) -> str:
        return self.description


def dual_image_checkpoint(path: Union[str, Path], num_layer_pairs: int) -> Union[str, Dict[str, Tensor]]:
    """What to load into a dual-image model (TA or NLVR2) for ``--checkpoint path``.

    A single-image ALBEF checkpoint (``num_layer_pairs`` fusion layers, any layout
    :func:`~torchmm_ext.checkpoints.load_pretrained` knows) becomes an in-memory state dict in
    the dual layout, as ALBEF's ``Pretrain_nlvr.py`` does (:func:`nlvr_state_dict_from_single_image`).
    A dual-image checkpoint is returned as the path itself, so that loading it keeps everything
    the normal path does (e.g. the ``cls_head`` of a fine-tuned original-ALBEF NLVR2 file).

    Raises:
        ValueError: the checkpoint's fusion layers fit neither layout (the message names the file).
    """
    state = convert_to_torchmm_ext(load_state_dict_file(path)).state_dict
    try:
        dual = nlvr_state_dict_from_single_image(state, num_layer_pairs)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if len(dual) == len(state):  # already dual-image: nothing was duplicated
        return path
    return _ConvertedStateDict(dual, f"{path} (single-image, fusion layers duplicated for two images)")
