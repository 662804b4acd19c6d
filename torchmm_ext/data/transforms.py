"""ALBEF image transforms (torchvision, PIL input)."""

from typing import Dict, Tuple

from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["CLIP_MEAN", "CLIP_STD", "AlbefRandAugment", "albef_train_transform", "albef_test_transform"]

# ALBEF normalises with CLIP's statistics, not ImageNet's.
CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# The op list of ALBEF's hand-written RandomAugment (configs: Identity, AutoContrast, Equalize,
# Brightness, Sharpness, ShearX/Y, TranslateX/Y, Rotate): geometric and brightness ops only.
_ALBEF_OPS = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)  # fmt: skip


class AlbefRandAugment(T.RandAugment):
    """torchvision's RandAugment restricted to ALBEF's op list.

    ALBEF ships its own ``RandomAugment(2, 7, augs=[...])``; we reuse torchvision's
    implementation instead and only narrow the op set. Remaining differences: torchvision's
    magnitude tables (31 bins) and sampling, not ALBEF's 0-10 scale and per-op probability.
    The full torchvision set adds Color, Contrast, Posterize and Solarize: Solarize at
    magnitude 7 inverts every pixel above ~200, turning white or yellow objects dark, which
    would make colour captions false.
    """

    def _augmentation_space(self, num_bins: int, image_size: Tuple[int, int]) -> Dict[str, Tuple[Tensor, bool]]:
        space = super()._augmentation_space(num_bins, image_size)
        return {name: space[name] for name in _ALBEF_OPS}


def albef_train_transform(
    image_size: int,
    scale: Tuple[float, float] = (0.5, 1.0),
    hflip: bool = True,
    randaugment: bool = True,
) -> T.Compose:
    """ALBEF's fine-tuning train transform.

    RandomResizedCrop (bicubic) -> optional horizontal flip -> optional RandAugment(2 ops,
    magnitude 7) -> tensor -> CLIP normalisation.

    RandAugment is torchvision's, narrowed to ALBEF's op list (see :class:`AlbefRandAugment`).

    Args:
        image_size (int): output side in pixels.
        scale (Tuple[float, float]): crop area range; ALBEF uses (0.5, 1) for fine-tuning
            and (0.2, 1) for pre-training.
        hflip (bool): random horizontal flip. Set ``False`` when captions mention left/right
            (the shapes world), since a flip makes them false.
        randaugment (bool): apply RandAugment.

    Returns:
        torchvision.transforms.Compose: PIL image -> normalised float tensor [3, S, S].
    """
    ops = [T.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if randaugment:
        ops.append(AlbefRandAugment(num_ops=2, magnitude=7))
    ops += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(ops)


def albef_test_transform(image_size: int) -> T.Compose:
    """ALBEF's evaluation transform: bicubic resize to a square, tensor, CLIP normalisation.

    Args:
        image_size (int): output side in pixels.

    Returns:
        torchvision.transforms.Compose: PIL image -> normalised float tensor [3, S, S].
    """
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
