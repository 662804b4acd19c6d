"""Fine-tune ALBEF for weakly supervised visual grounding (RefCOCO+) and evaluate it by
Grad-CAM box selection on val / testA / testB.

The model is ALBEF's retrieval model, fine-tuned with ITC + ITM on (image, referring
expression) pairs; no box is seen in training. Evaluation: Grad-CAM of the ITM logit on the
cross-attention of BERT layer ``eval.block_num`` ranks the detected boxes of each image
(:mod:`torchmm_ext.evaluation.grounding`); accuracy = best box with IoU >= 0.5.

    # built-in shapes world, tiny model from scratch, CPU (the default config)
    python examples/albef/finetune_grounding.py
    # the same job in 2 processes (gloo on CPU, nccl on GPUs)
    torchrun --nproc_per_node=2 examples/albef/finetune_grounding.py
    # RefCOCO+ with ALBEF's hyperparameters from a pre-trained checkpoint
    torchrun --nproc_per_node=8 examples/albef/finetune_grounding.py \
        --config examples/albef/configs/grounding_refcoco.yaml --checkpoint ALBEF.pth

Any config key can be overridden: ``--opts train.lr=2e-5 eval.block_num=8``.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms as T
from torch.utils.data import ConcatDataset, Dataset, Subset

from torchmm_ext.data.datasets import GroundingDataset, RetrievalCollator, RetrievalTrainDataset
from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.transforms import albef_test_transform, AlbefRandAugment, CLIP_MEAN, CLIP_STD
from torchmm_ext.engine import (
    autocast_context,
    cleanup,
    config_to_dict,
    get_logger,
    StepContext,
    StepOutput,
)
from torchmm_ext.engine.fit import train_and_reload_best, TrainConfig
from torchmm_ext.engine.efficiency import MethodsConfig, prepare_model
from torchmm_ext.engine.recipe_utils import (
    InitConfig,
    ramped_alpha,
    rank_shard,
    resolve_checkpoint,
    save_results,
    shapes_world_for_ranks,
    ShapesWorldConfig,
    start_recipe,
)
from torchmm_ext.evaluation.grounding import evaluate_grounding, fusion_layer_index, load_grounding_targets
from torchmm_ext.models.albef import albef_model_for_retrieval

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "grounding_shapes.yaml"
logger = get_logger("finetune_grounding")


@dataclass
class DataConfig:
    shapes: Optional[ShapesWorldConfig] = None  # set: use the built-in world's files
    train_file: str = ""  # ALBEF JSON: {image, text, ref_id} (+ image_id, else the file name)
    # Image-caption pairs ({image, caption, image_id}, retrieval train format) trained on with
    # the expressions: the shapes config's stand-in for ALBEF's caption pre-training. With
    # data.shapes, names of the world's files (e.g. retrieval_train).
    caption_files: List[str] = field(default_factory=list)
    # Evaluation files by name; "val" picks the best epoch. A ground-truth entry with a "split"
    # is counted under that split (RefCOCO+'s one test file gives testA and testB).
    eval_files: Dict[str, str] = field(default_factory=dict)
    gt_file: str = ""  # {str(ref_id): {image: detections key, bbox: [x, y, w, h], split?}}
    dets_file: str = ""  # {image key: [[x, y, w, h], ...]} (ALBEF's dets.json)
    image_root: str = ""
    tokenizer: str = "bert-base-uncased"  # "shapes", a tokenizer directory or a hub name
    max_words: int = 30
    max_tokens: int = 30
    hflip: bool = True
    randaugment: bool = True
    skip_bad_samples: bool = False


@dataclass
class LossConfig:
    alpha: float = 0.4  # momentum-distillation weight of the ITC
    distill: bool = True
    alpha_warmup: bool = True  # ramp alpha linearly over the first epoch


@dataclass
class EvalConfig:
    batch_size: int = 32
    # ALBEF's convention: a BERT layer counted from the first text layer (8 = the third fusion
    # layer of BERT-base split at 6); converted to our fusion-layer index.
    block_num: int = 8
    box_alpha: float = 0.5  # box score = heat sum / area ** box_alpha
    iou_threshold: float = 0.5


@dataclass
class GroundingConfig(MethodsConfig):
    model: Dict[str, Any] = field(default_factory=dict)  # albef_model_for_retrieval kwargs
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/albef_grounding"


def grounding_train_transform(image_size: int, hflip: bool, randaugment: bool) -> T.Compose:
    """ALBEF's grounding train transform: a bicubic resize of the whole image (no random crop,
    which could cut the referred object out), then flip and RandAugment as in fine-tuning."""
    ops = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)]
    ops += [T.RandomHorizontalFlip()] if hflip else []
    ops += [AlbefRandAugment(num_ops=2, magnitude=7)] if randaugment else []
    return T.Compose([*ops, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


class SharedImageIndex(Dataset):
    """Caption pairs re-indexed into the grounding set's image indices (by ``image_id``), so an
    image's captions and expressions are ITC positives of each other and never ITM negatives."""

    def __init__(self, captions: RetrievalTrainDataset, image_ids: Dict[Any, int]) -> None:
        self.captions = captions
        shared = dict(image_ids)
        raw_id = {index: raw for raw, index in captions.img_ids.items()}
        self.index = [shared.setdefault(raw_id[i], len(shared)) for i in range(captions.num_images)]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        image, caption, idx = self.captions[i]
        return image, caption, self.index[idx]


def resolve_data_files(cfg: DataConfig) -> Optional[Path]:
    """Point the file fields at the shapes world when ``data.shapes`` is set (generating it
    once, cached); returns the world's text corpus for the ``"shapes"`` tokenizer."""
    if cfg.shapes is None:
        return None
    world = shapes_world_for_ranks(cfg.shapes)
    cfg.train_file = str(world.grounding_train)
    cfg.caption_files = [str(getattr(world, name)) for name in cfg.caption_files]
    cfg.eval_files = {"val": str(world.grounding_val), "testA": str(world.grounding_testA),
                      "testB": str(world.grounding_testB)}
    cfg.gt_file, cfg.dets_file = str(world.grounding_gt), str(world.grounding_dets)
    cfg.image_root = str(world.image_root)
    return world.vocab_corpus


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    args, cfg, output_dir, dist = start_recipe(argv, DEFAULT_CONFIG, GroundingConfig, albef_model_for_retrieval, __doc__)

    # --- data (the model is built here: its image size sets the transforms) ---
    data = cfg.data
    corpus_file = resolve_data_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus_file)
    model_kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **cfg.model}
    model = albef_model_for_retrieval(**model_kwargs)
    text_layers, fusion_layers = len(model.text_encoder.encoder.layer), len(model.fusion_encoder.layer)
    cam_layer = fusion_layer_index(cfg.eval.block_num, text_layers, fusion_layers)
    image_size = model.vision_encoder.image_size
    # Train mode yields each expression's image index: ITC positives, ITM negatives by image.
    train_set = GroundingDataset(
        data.train_file, data.image_root,
        grounding_train_transform(image_size, data.hflip, data.randaugment),
        max_words=data.max_words, skip_bad_samples=data.skip_bad_samples,
    )
    if data.caption_files:
        captions = RetrievalTrainDataset(data.caption_files, data.image_root, train_set.transform,
                                         data.max_words, data.skip_bad_samples)
        train_set = ConcatDataset([train_set, SharedImageIndex(captions, train_set.img_ids)])
    test_transform = albef_test_transform(image_size)
    eval_sets = {name: GroundingDataset(path, data.image_root, test_transform, split="test",
                                        max_words=data.max_words)
                 for name, path in data.eval_files.items()}
    # Checked before training: every ref has ground truth, its image has detections, and every
    # box lies inside its image.
    targets = {name: load_grounding_targets(data.eval_files[name], ds.records, data.gt_file,
                                            data.dets_file, data.image_root, name)
               for name, ds in eval_sets.items()}
    collate = RetrievalCollator(tokenizer, data.max_tokens)
    train_loader = build_dataloader(
        train_set, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.train.num_workers,
        collate_fn=collate, drop_last=True, seed=cfg.train.seed,
    )

    # --- model ---
    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    prepare_model(model, cfg, checkpoint, log=logger.info)
    model.to(dist.device)
    ddp_model = DistributedDataParallel(model) if dist.is_distributed else model

    def evaluate(name: str) -> Dict[str, Dict[str, float]]:
        dataset = eval_sets[name]
        shard = Subset(dataset, rank_shard(len(dataset), dist.rank, dist.world_size))
        loader = build_eval_dataloader(shard, cfg.eval.batch_size, cfg.train.num_workers, collate)
        return evaluate_grounding(
            model, loader, targets[name], layer=cam_layer, device=dist.device,
            alpha=cfg.eval.box_alpha, iou_threshold=cfg.eval.iou_threshold,
            precision_ctx=lambda: autocast_context(dist.device, cfg.train.precision),
        )

    # --- train ---
    def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
        alpha = cfg.loss.alpha if cfg.loss.distill else 0.0
        alpha = ramped_alpha(alpha, cfg.loss.alpha_warmup, ctx.epoch, ctx.step_in_epoch, ctx.steps_per_epoch)
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["idx"], alpha)
        return StepOutput(out.loss, {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm})

    if not args.evaluate:
        train_and_reload_best(
            model=model, train_model=ddp_model, loader=train_loader, step_fn=step_fn,
            train_cfg=cfg.train, device=dist.device, output_dir=output_dir,
            config_dict=config_to_dict(cfg),
            evaluate_fn=(lambda epoch: evaluate("val")["val"]) if "val" in eval_sets else None,
            best_metric_key="acc", resume=args.resume,
        )

    # --- evaluate ---
    results: Dict[str, Dict[str, float]] = {}
    for name in eval_sets:
        results.update(evaluate(name))
    save_results(results, output_dir, lambda split, m: f"acc {m['acc']:.2f} ({int(m['num_refs'])} expressions)")
    cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
