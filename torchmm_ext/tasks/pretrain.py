"""MLM + ITM pre-training (ViLT, METER). Each step masks 15% of the caption tokens, or chosen
words more often (``data.mlm_focus_words``), for MLM with the caption's own image, and swaps half
the images for another one of the batch for ITM. The last weights go to
``<output_dir>/pretrained.pth`` for the fine-tuning recipes; a val split reports ITM and MLM
accuracy."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import Subset

from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.vl_tasks import CaptionDataset, MLMITMCollator
from torchmm_ext.engine import (
    autocast_context,
    barrier,
    cleanup,
    config_to_dict,
    get_logger,
    is_main_process,
    save_checkpoint,
    wrap_ddp,
)
from torchmm_ext.engine.distributed import all_reduce_sum
from torchmm_ext.engine.efficiency import prepare_model
from torchmm_ext.engine.fit import train_and_reload_best
from torchmm_ext.engine.recipe_utils import rank_shard, resolve_checkpoint, save_results, shapes_world_for_ranks, start_recipe
from torchmm_ext.engine.train_loop import StepContext, StepOutput
from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.tasks.common import build_transforms, model_inputs, TaskConfig, TaskDataConfig

__all__ = ["PretrainTaskConfig", "PretrainDataConfig", "run_pretrain", "PRETRAINED_WEIGHTS"]

logger = get_logger("pretrain")
PRETRAINED_WEIGHTS = "pretrained.pth"
INPUTS = ("images", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "itm_images", "itm_labels",
          "pixel_mask", "itm_pixel_mask")


@dataclass
class PretrainDataConfig(TaskDataConfig):
    train_files: List[str] = field(default_factory=list)  # ALBEF JSON ({image, caption}) or caption Arrow files
    val_files: List[str] = field(default_factory=list)
    mlm_probability: float = 0.15
    # Focused masking (off when empty): these words are chosen with mlm_focus_probability instead
    # of mlm_probability (MLMITMCollator, mask_tokens); each must be one token of the vocabulary.
    mlm_focus_words: List[str] = field(default_factory=list)
    mlm_focus_probability: Optional[float] = None


@dataclass
class PretrainTaskConfig(TaskConfig):
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    output_dir: str = "outputs/pretrain"


def _resolve_files(data: PretrainDataConfig) -> Optional[Path]:
    if data.shapes is None:
        return None
    world = shapes_world_for_ranks(data.shapes)
    data.train_files = [str(f) for f in world.pretrain_files]
    data.val_files = [str(world.retrieval_val)]
    data.image_root = str(world.image_root)
    return world.vocab_corpus


def run_pretrain(
    argv: Optional[List[str]],
    default_config: Path,
    builder: Callable[..., torch.nn.Module],
    description: Optional[str] = None,
) -> Dict[str, Dict[str, float]]:
    """Pre-train with MLM + ITM (the body of ``pretrain.py``); arguments as in
    :func:`~torchmm_ext.tasks.vqa.run_classifier_vqa`.

    Returns:
        Dict[str, Dict[str, float]]: ``{"val": {"itm_acc", "mlm_acc", "num_samples"}}`` when a
        val split is set.
    """
    args, cfg, output_dir, dist = start_recipe(argv, default_config, PretrainTaskConfig, builder, description)
    data = cfg.data
    corpus = _resolve_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus)
    model = builder(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **cfg.model)
    train_transform, test_transform = build_transforms(data.image)
    collate = MLMITMCollator(tokenizer, data.max_tokens, data.mlm_probability, data.mlm_focus_words,
                             data.mlm_focus_probability)
    val_set = CaptionDataset(data.val_files, test_transform, data.image_root or None, data.max_words) if data.val_files else None

    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    prepare_model(model, cfg, checkpoint, log=logger.info)
    model.to(dist.device)

    @torch.no_grad()
    def evaluate() -> Dict[str, float]:
        shard = Subset(val_set, rank_shard(len(val_set), dist.rank, dist.world_size))
        loader = build_eval_dataloader(shard, cfg.eval.batch_size, cfg.train.num_workers, collate)
        was_training = model.training
        model.eval()
        counts = torch.zeros(4, dtype=torch.float64, device=dist.device)
        for batch in loader:
            inputs = {k: v.to(dist.device) for k, v in model_inputs(batch, INPUTS).items()}
            with autocast_context(dist.device, cfg.train.precision):
                out = model(**inputs)
            counts[0] += (out.itm_logits.argmax(-1) == inputs["itm_labels"]).sum()
            counts[1] += inputs["itm_labels"].numel()
            predicted = inputs["mlm_labels"] != -100
            counts[2] += (out.mlm_logits.argmax(-1)[predicted] == inputs["mlm_labels"][predicted]).sum()
            counts[3] += predicted.sum()
        model.train(was_training)
        all_reduce_sum(counts)
        itm_ok, itm_n, mlm_ok, mlm_n = counts.tolist()
        return {"itm_acc": 100.0 * itm_ok / max(itm_n, 1.0), "mlm_acc": 100.0 * mlm_ok / max(mlm_n, 1.0),
                "num_samples": itm_n}

    if not args.evaluate:
        train_set = CaptionDataset(data.train_files, train_transform, data.image_root or None, data.max_words,
                                   data.skip_bad_samples)
        loader = build_dataloader(train_set, batch_size=cfg.train.batch_size, shuffle=True,
                                  num_workers=cfg.train.num_workers, collate_fn=collate, drop_last=True,
                                  seed=cfg.train.seed)
        train_model = wrap_ddp(model, dist, cfg.train.find_unused_parameters)

        def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
            out = model(**model_inputs(batch, INPUTS))
            itm_acc = (out.itm_logits.argmax(-1) == batch["itm_labels"]).float().mean()
            metrics = {"loss_itm": out.itm_loss, "loss_mlm": out.mlm_loss, "itm_acc": 100.0 * itm_acc}
            if getattr(out, "wpa_loss", None) is not None:  # ViLT's word-patch alignment
                metrics["loss_wpa"] = out.wpa_loss
            return StepOutput(out.loss, metrics)

        train_and_reload_best(
            model=model, train_model=train_model, loader=loader, step_fn=step_fn, train_cfg=cfg.train,
            device=dist.device, output_dir=output_dir, config_dict=config_to_dict(cfg), resume=args.resume,
        )
        if is_main_process():
            save_checkpoint(output_dir / PRETRAINED_WEIGHTS, {"model": model.state_dict(), "config": config_to_dict(cfg),
                                                              "methods": applied_methods(model)})
        barrier()

    results = {"val": evaluate()} if val_set is not None else {}
    save_results(results, output_dir,
                 lambda split, m: f"itm_acc {m['itm_acc']:.2f}  mlm_acc {m['mlm_acc']:.2f}")
    cleanup()
    return results
