"""Config sections and evaluation helpers the task recipes share."""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn, Tensor

from torchmm_ext.data.vl_tasks import image_transform
from torchmm_ext.engine.distributed import all_reduce_sum
from torchmm_ext.engine.efficiency import MethodsConfig
from torchmm_ext.engine.fit import TrainConfig
from torchmm_ext.engine.recipe_utils import InitConfig, ShapesWorldConfig

__all__ = ["ImageConfig", "EvalConfig", "TaskDataConfig", "TaskConfig", "InitConfig", "ShapesWorldConfig", "build_transforms", "model_inputs",
           "classification_metrics", "CheckpointAdapter"]

#: ``(checkpoint path, model) -> what to load`` (the path itself, or a converted state dict):
#: backbone-specific task starting points (e.g. ViLT's third modality row for NLVR2).
CheckpointAdapter = Callable[[str, nn.Module], Union[str, Dict[str, Tensor]]]


@dataclass
class ImageConfig:
    """Image transform of a recipe (the ``data.image`` section).

    Attributes:
        kind (str): ``pixelbert`` (ViLT: aspect kept, shorter side ``size``, mean/std 0.5) or
            ``clip`` (METER: resize + centre crop, CLIP mean/std).
        size (int): shorter side (``pixelbert``) or square side (``clip``).
        multiple (int): ``pixelbert``: sides floored to multiples of it (ViLT: 32, the patch size).
        randaugment (bool): RandAugment(2, 9) in training (ViLT's and METER's ``_randaug``).
    """

    kind: str = "pixelbert"
    size: int = 384
    multiple: int = 32
    randaugment: bool = False


@dataclass
class EvalConfig:
    """Attributes:
    batch_size (int): evaluation batch size (images, or image pairs).
    text_batch_size (int): retrieval: texts scored with one image per forward pass.
    max_images (int): retrieval: score only the first images of a split (0: all), to keep
        the all-pairs evaluation short on a CPU.
    """

    batch_size: int = 64
    text_batch_size: int = 64
    max_images: int = 0


@dataclass
class TaskDataConfig:
    """The ``data:`` fields every task shares (each task's section adds its files).

    Attributes:
        shapes (Optional[ShapesWorldConfig]): set: the built-in world's files.
        image_root (str): root of JSON image paths.
        tokenizer (str): ``"shapes"``, a tokenizer directory or a hub name.
        max_tokens (int): text length after tokenisation.
        max_words (int): words kept by caption cleaning.
        image (ImageConfig): the image transform.
        skip_bad_samples (bool): skip (and count) unreadable records instead of failing.
    """

    shapes: Optional[ShapesWorldConfig] = None
    image_root: str = ""
    tokenizer: str = "bert-base-uncased"
    max_tokens: int = 40
    max_words: int = 40
    image: ImageConfig = field(default_factory=ImageConfig)
    skip_bad_samples: bool = False


@dataclass
class TaskConfig(MethodsConfig):
    """The sections every task recipe's config has; a task adds its ``data:`` section."""

    model: Dict[str, Any] = field(default_factory=dict)  # the builder's kwargs
    init: InitConfig = field(default_factory=InitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/task"


def build_transforms(cfg: ImageConfig):
    """``(train transform, test transform)`` of the ``data.image`` section."""
    return (image_transform(cfg.kind, cfg.size, True, cfg.randaugment, cfg.multiple),
            image_transform(cfg.kind, cfg.size, False, False, cfg.multiple))


def model_inputs(batch: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """The entries of ``batch`` the model's ``forward`` takes."""
    return {name: batch[name] for name in names if name in batch}


@torch.no_grad()
def classification_metrics(
    model: nn.Module,
    loader: Iterable[Mapping[str, Tensor]],
    input_names: Sequence[str],
    device: torch.device,
    autocast: Callable[[], Any],
) -> Dict[str, float]:
    """Accuracy (%) of ``model(**inputs).logits.argmax(-1)`` against ``batch["labels"]``, summed
    over ranks (each passes its own shard)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        inputs = {k: v.to(device) for k, v in model_inputs(batch, input_names).items()}
        with autocast():
            logits = model(**inputs).logits
        labels = batch["labels"].to(device)
        counts[0] += (logits.argmax(dim=-1) == labels).sum()
        counts[1] += labels.numel()
    model.train(was_training)
    all_reduce_sum(counts)
    correct, total = counts.tolist()
    return {"acc": 100.0 * correct / max(total, 1.0), "num_samples": total}
