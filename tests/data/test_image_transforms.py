import torch
from PIL import Image

from torchmm_ext.data import albef_test_transform, albef_train_transform
from torchmm_ext.data.transforms import AlbefRandAugment, CLIP_MEAN


def test_shapes_and_normalisation() -> None:
    image = Image.new("RGB", (50, 40), tuple(round(m * 255) for m in CLIP_MEAN))
    out = albef_test_transform(24)(image)
    assert out.shape == (3, 24, 24) and out.abs().max() < 0.01  # the mean colour maps to ~0
    torch.manual_seed(0)
    for _ in range(10):
        assert albef_train_transform(24)(image).shape == (3, 24, 24)


def test_options() -> None:
    names = lambda t: [type(op).__name__ for op in t.transforms]  # noqa: E731
    assert names(albef_train_transform(32)) == ["RandomResizedCrop", "RandomHorizontalFlip", "AlbefRandAugment", "ToTensor", "Normalize"]
    assert names(albef_train_transform(32, hflip=False, randaugment=False)) == ["RandomResizedCrop", "ToTensor", "Normalize"]
    assert albef_train_transform(32, scale=(0.2, 1.0)).transforms[0].scale == (0.2, 1.0)


def test_randaugment_has_no_colour_ops() -> None:
    space = AlbefRandAugment()._augmentation_space(31, (32, 32))
    assert "Solarize" not in space and "Color" not in space and "Rotate" in space and len(space) == 10
