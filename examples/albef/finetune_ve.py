"""Fine-tune ALBEF for visual entailment (SNLI-VE: does the image entail, contradict or not
decide a sentence?) and evaluate accuracy on val and test.

    # built-in shapes world, tiny model from scratch, CPU (the default config)
    python examples/albef/finetune_ve.py
    # the same job in 2 processes (gloo on CPU, nccl on GPUs)
    torchrun --nproc_per_node=2 examples/albef/finetune_ve.py
    # SNLI-VE with ALBEF's hyperparameters from a pre-trained checkpoint
    torchrun --nproc_per_node=8 examples/albef/finetune_ve.py \
        --config examples/albef/configs/ve_snli.yaml --checkpoint ALBEF.pth

Any config key can be overridden: ``--opts train.lr=2e-5 loss.alpha=0.4``.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.data.datasets import RetrievalCollator, VEDataset
from torchmm_ext.data.loader import build_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.transforms import albef_test_transform, albef_train_transform
from torchmm_ext.engine import cleanup, get_logger
from torchmm_ext.engine.fit import TrainConfig
from torchmm_ext.engine.efficiency import MethodsConfig, prepare_model
from torchmm_ext.engine.recipe_utils import (
    InitConfig,
    finetune_classifier,
    resolve_checkpoint,
    shapes_world_for_ranks,
    ShapesWorldConfig,
    start_recipe,
)
from torchmm_ext.models.albef import albef_model_for_ve

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "ve_shapes.yaml"
logger = get_logger("finetune_ve")


@dataclass
class DataConfig:
    shapes: Optional[ShapesWorldConfig] = None  # set: use the built-in world's files
    train_file: str = ""  # ALBEF JSON files: {image (id without extension), sentence, label}
    val_file: str = ""
    test_file: str = ""
    image_root: str = ""
    image_ext: str = ".jpg"  # appended to image ids (Flickr30K: .jpg; the shapes world: .png)
    tokenizer: str = "bert-base-uncased"  # "shapes", a tokenizer directory or a hub name
    max_words: int = 30
    max_tokens: int = 40
    crop_scale: List[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: bool = True
    randaugment: bool = True
    skip_bad_samples: bool = False


@dataclass
class LossConfig:
    alpha: float = 0.4  # momentum-distillation weight (model.distill must be true)
    alpha_warmup: bool = True  # ramp alpha linearly over the first epoch


@dataclass
class EvalConfig:
    batch_size: int = 64


@dataclass
class VEConfig(MethodsConfig):
    model: Dict[str, Any] = field(default_factory=dict)  # albef_model_for_ve kwargs
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/albef_ve"


def resolve_data_files(cfg: DataConfig) -> Optional[Path]:
    """Point the file fields at the shapes world when ``data.shapes`` is set (generating it
    once, cached); returns the world's text corpus for the ``"shapes"`` tokenizer."""
    if cfg.shapes is None:
        return None
    world = shapes_world_for_ranks(cfg.shapes)
    cfg.train_file, cfg.val_file, cfg.test_file = str(world.ve_train), str(world.ve_val), str(world.ve_test)
    cfg.image_root, cfg.image_ext = str(world.image_root), world.ve_image_ext
    return world.vocab_corpus


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args, cfg, output_dir, dist = start_recipe(argv, DEFAULT_CONFIG, VEConfig, albef_model_for_ve, __doc__)

    # --- data (the model is built here: its image size sets the transforms) ---
    data = cfg.data
    corpus_file = resolve_data_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus_file)
    model_kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **cfg.model}
    model = albef_model_for_ve(**model_kwargs)
    image_size = model.vision_encoder.image_size
    collate = RetrievalCollator(tokenizer, data.max_tokens)
    train_set = VEDataset(
        data.train_file, data.image_root,
        albef_train_transform(image_size, tuple(data.crop_scale), data.hflip, data.randaugment),
        max_words=data.max_words, image_ext=data.image_ext, skip_bad_samples=data.skip_bad_samples,
    )
    test_transform = albef_test_transform(image_size)
    eval_sets = {
        split: VEDataset(path, data.image_root, test_transform, data.max_words, image_ext=data.image_ext)
        for split, path in (("val", data.val_file), ("test", data.test_file)) if path
    }
    train_loader = build_dataloader(
        train_set, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.train.num_workers,
        collate_fn=collate, drop_last=True, seed=cfg.train.seed,
    )

    # --- model ---
    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    prepare_model(model, cfg, checkpoint, head_prefixes=("cls_head.", "cls_head_m."),
                       log=logger.info)
    # --- train (best by val accuracy), then evaluate every split ---
    results = finetune_classifier(model, train_loader, eval_sets, collate, cfg, args, dist, output_dir,
                                  select_split="val")
    cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
