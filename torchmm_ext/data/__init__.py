"""Data: the synthetic shapes world, readers for ALBEF's JSON formats, transforms, tokenizer,
resumable loaders."""

from torchmm_ext.data.captions import pre_caption, pre_question
from torchmm_ext.data.datasets import (
    BadImageError,
    GroundingDataset,
    load_image,
    load_json_list,
    PretrainDataset,
    RetrievalCollator,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    NLVRDataset,
    SkippedSampleWarning,
    VEDataset,
    VQADataset,
)
from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.shapes_world import (
    cached_shapes_world,
    default_shapes_root,
    generate_shapes_world,
    ShapesWorld,
    swap_colours,
)
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.transforms import albef_test_transform, albef_train_transform

__all__ = [
    "BadImageError",
    "GroundingDataset",
    "NLVRDataset",
    "VEDataset",
    "VQADataset",
    "PretrainDataset",
    "RetrievalCollator",
    "RetrievalEvalDataset",
    "RetrievalTrainDataset",
    "ShapesWorld",
    "SkippedSampleWarning",
    "albef_test_transform",
    "albef_train_transform",
    "build_dataloader",
    "build_eval_dataloader",
    "build_tokenizer",
    "cached_shapes_world",
    "default_shapes_root",
    "generate_shapes_world",
    "load_image",
    "load_json_list",
    "pre_caption",
    "pre_question",
    "swap_colours",
]
