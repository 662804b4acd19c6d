"""Text-assignment (TA) pre-training of ALBEF's dual-image model, the step between pre-training
and NLVR2 fine-tuning: given a caption and two images, is the caption about image 0, image 1 or
neither? The pairs are drawn inside each batch of image-caption data (ALBEF's
``Pretrain_nlvr.py``); the checkpoint initialises ``finetune_nlvr.py``.

    # built-in shapes world, tiny model, CPU (the default config), from a single-image model as
    # in ALBEF (from random weights TA stays near chance on this world)
    python examples/albef/finetune_retrieval.py --opts train.epochs=2
    python examples/albef/pretrain_nlvr.py --checkpoint outputs/albef_retrieval_shapes/checkpoint_best.pth
    python examples/albef/finetune_nlvr.py --checkpoint outputs/albef_nlvr_ta_shapes/checkpoint_best.pth
    # ALBEF's set-up: 1 epoch at 256 px on the 4M pre-training captions, from pre-trained ALBEF
    torchrun --nproc_per_node=8 examples/albef/pretrain_nlvr.py \
        --config examples/albef/configs/nlvr_ta_4m.yaml --checkpoint ALBEF_4M.pth

A single-image checkpoint (pre-training, retrieval, ...; any layout ``load_pretrained`` knows)
is converted to the dual-image layout on loading: fusion layer i initialises layers 2i and 2i+1.
Any config key can be overridden: ``--opts train.lr=2e-5 data.max_tokens=25``.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from torchmm_ext.checkpoints import dual_image_checkpoint
from torchmm_ext.data.datasets import PretrainDataset, RetrievalCollator
from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.transforms import albef_test_transform, albef_train_transform
from torchmm_ext.engine import (
    all_reduce_sum,
    autocast_context,
    cleanup,
    config_to_dict,
    get_logger,
    is_main_process,
    StepContext,
    StepOutput,
)
from torchmm_ext.engine.fit import train_and_reload_best, TrainConfig
from torchmm_ext.engine.efficiency import MethodsConfig, prepare_model
from torchmm_ext.engine.recipe_utils import (
    InitConfig,
    rank_shard,
    resolve_checkpoint,
    shapes_world_for_ranks,
    ShapesWorldConfig,
    start_recipe,
)
from torchmm_ext.models.albef import albef_model_for_text_assignment

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "nlvr_ta_shapes.yaml"
logger = get_logger("pretrain_nlvr")


@dataclass
class DataConfig:
    shapes: Optional[ShapesWorldConfig] = None  # set: use the built-in world's files
    train_files: List[str] = field(default_factory=list)  # pre-training JSON: {image, caption: str | [str]}
    # Optional held-out {image, caption} file for a TA accuracy after each epoch (ALBEF has
    # none; the shapes config uses the retrieval val split).
    val_file: str = ""
    image_root: str = ""
    tokenizer: str = "bert-base-uncased"  # "shapes", a tokenizer directory or a hub name
    max_words: int = 30
    max_tokens: int = 25  # ALBEF's Pretrain_nlvr.py truncates captions to 25 tokens
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    randaugment: bool = True
    skip_bad_samples: bool = False


@dataclass
class EvalConfig:
    batch_size: int = 64
    seed: int = 0  # the pairing of the held-out captions is drawn with this seed


@dataclass
class TAConfig(MethodsConfig):
    model: Dict[str, Any] = field(default_factory=dict)  # albef_model_for_text_assignment kwargs
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/albef_nlvr_ta"


def resolve_data_files(cfg: DataConfig) -> Optional[Path]:
    """Point the file fields at the shapes world when ``data.shapes`` is set (generating it
    once, cached); returns the world's text corpus for the ``"shapes"`` tokenizer."""
    if cfg.shapes is None:
        return None
    world = shapes_world_for_ranks(cfg.shapes)
    cfg.train_files = [str(f) for f in world.pretrain_files]
    cfg.val_file, cfg.image_root = str(world.retrieval_val), str(world.image_root)
    return world.vocab_corpus


@torch.no_grad()
def ta_accuracy(model, loader, device: torch.device, precision_ctx, seed: int) -> Dict[str, float]:
    """Text-assignment accuracy (%) over ``loader`` with pairs drawn from a fixed ``seed``,
    summed over ranks. Batches of fewer than 3 samples cannot form pairs and are left out."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    for batch in loader:
        if batch["image"].size(0) < 3:
            continue
        with precision_ctx():
            out = model(batch["image"].to(device), batch["input_ids"].to(device),
                        batch["attention_mask"].to(device), generator=generator)
        counts[0] += (out.logits.argmax(dim=-1) == out.labels).sum()
        counts[1] += out.labels.numel()
    model.train(was_training)
    all_reduce_sum(counts)
    correct, total = counts.tolist()
    return {"ta_acc": 100.0 * correct / max(total, 1.0), "num_samples": total}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args, cfg, output_dir, dist = start_recipe(argv, DEFAULT_CONFIG, TAConfig, albef_model_for_text_assignment, __doc__)
    if cfg.train.batch_size < 3:
        raise ValueError(f"train.batch_size={cfg.train.batch_size}: text assignment pairs each caption "
                         "with two other images of its batch, so a batch needs at least 3 samples")

    # --- data (the model is built here: its image size sets the transforms) ---
    data = cfg.data
    corpus_file = resolve_data_files(data)
    if not data.train_files:
        raise ValueError("data.train_files is empty: give the pre-training caption files (or data.shapes)")
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus_file)
    model_kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **cfg.model}
    model = albef_model_for_text_assignment(**model_kwargs)
    image_size = model.vision_encoder.image_size
    collate = RetrievalCollator(tokenizer, data.max_tokens)
    train_set = PretrainDataset(
        data.train_files, data.image_root,
        albef_train_transform(image_size, tuple(data.crop_scale), data.hflip, data.randaugment),
        max_words=data.max_words, skip_bad_samples=data.skip_bad_samples,
    )
    val_set = (PretrainDataset(data.val_file, data.image_root, albef_test_transform(image_size), data.max_words)
               if data.val_file else None)
    train_loader = build_dataloader(
        train_set, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.train.num_workers,
        collate_fn=collate, drop_last=True, seed=cfg.train.seed,
    )

    # --- model ---
    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    if checkpoint:
        checkpoint = dual_image_checkpoint(checkpoint, model.fusion_encoder.num_layer_pairs)
    prepare_model(model, cfg, checkpoint, log=logger.info)
    model.to(dist.device)
    ddp_model = DistributedDataParallel(model) if dist.is_distributed else model

    def evaluate() -> Dict[str, float]:
        shard = Subset(val_set, rank_shard(len(val_set), dist.rank, dist.world_size))
        loader = build_eval_dataloader(shard, cfg.eval.batch_size, cfg.train.num_workers, collate)
        return ta_accuracy(model, loader, dist.device,
                           lambda: autocast_context(dist.device, cfg.train.precision), cfg.eval.seed)

    # --- train ---
    def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        acc = (out.logits.argmax(dim=-1) == out.labels).float().mean()
        return StepOutput(out.loss, {"loss_ta": out.loss_ta, "loss_itc": out.loss_itc, "train_ta_acc": acc})

    if not args.evaluate:
        train_and_reload_best(
            model=model, train_model=ddp_model, loader=train_loader, step_fn=step_fn,
            train_cfg=cfg.train, device=dist.device, output_dir=output_dir,
            config_dict=config_to_dict(cfg),
            evaluate_fn=(lambda epoch: evaluate()) if val_set is not None else None,
            best_metric_key="ta_acc", resume=args.resume,
        )

    # --- evaluate ---
    results: Dict[str, Any] = {}
    if val_set is not None:
        results["val"] = evaluate()
        logger.info("val: " + json.dumps({k: round(v, 2) for k, v in results["val"].items()}))
    if is_main_process():
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        if "val" in results:
            print(f"[val] ta_acc {results['val']['ta_acc']:.2f} (chance 33.3)")
    cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
