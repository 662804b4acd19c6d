"""NLVR2 fine-tuning (ViLT, METER): the sentence with each image of the pair, a 2-way
classifier; the best dev epoch is tested."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import Subset

from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.vl_tasks import PairCollator, PairDataset
from torchmm_ext.engine import autocast_context, cleanup, config_to_dict, get_logger, wrap_ddp
from torchmm_ext.engine.efficiency import method_step_hooks, prepare_model
from torchmm_ext.engine.fit import train_and_reload_best
from torchmm_ext.engine.recipe_utils import rank_shard, resolve_checkpoint, save_results, shapes_world_for_ranks, start_recipe
from torchmm_ext.engine.train_loop import StepContext, StepOutput
from torchmm_ext.tasks.common import (
    build_transforms,
    CheckpointAdapter,
    classification_metrics,
    model_inputs,
    TaskConfig,
    TaskDataConfig,
)

__all__ = ["NLVRTaskConfig", "NLVRDataConfig", "run_nlvr"]

logger = get_logger("finetune_nlvr")
INPUTS = ("images", "input_ids", "attention_mask", "pixel_mask", "labels")


@dataclass
class NLVRDataConfig(TaskDataConfig):
    # ALBEF JSON ({images: [a, b], sentence, label}) or NLVR2 Arrow files (image_0, image_1, ...)
    train_files: List[str] = field(default_factory=list)
    dev_files: List[str] = field(default_factory=list)
    test_files: List[str] = field(default_factory=list)


@dataclass
class NLVRTaskConfig(TaskConfig):
    data: NLVRDataConfig = field(default_factory=NLVRDataConfig)
    output_dir: str = "outputs/nlvr"


def _resolve_files(data: NLVRDataConfig) -> Optional[Path]:
    if data.shapes is None:
        return None
    world = shapes_world_for_ranks(data.shapes)
    data.train_files, data.dev_files, data.test_files = [str(world.nlvr_train)], [str(world.nlvr_dev)], [str(world.nlvr_test)]
    data.image_root = str(world.image_root)
    return world.vocab_corpus


def run_nlvr(
    argv: Optional[List[str]],
    default_config: Path,
    builder: Callable[..., torch.nn.Module],
    description: Optional[str] = None,
    checkpoint_adapter: Optional[CheckpointAdapter] = None,
) -> Dict[str, Dict[str, float]]:
    """Fine-tune and evaluate an NLVR2 model (the body of ``finetune_nlvr.py``); arguments as in
    :func:`~torchmm_ext.tasks.vqa.run_classifier_vqa`.

    Returns:
        Dict[str, Dict[str, float]]: ``{"dev"|"test": {"acc", "num_samples"}}``.
    """
    args, cfg, output_dir, dist = start_recipe(argv, default_config, NLVRTaskConfig, builder, description)
    data = cfg.data
    corpus = _resolve_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus)
    model = builder(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **cfg.model)
    train_transform, test_transform = build_transforms(data.image)
    collate = PairCollator(tokenizer, data.max_tokens)
    eval_sets = {split: PairDataset(files, test_transform, data.image_root or None, data.max_words)
                 for split, files in (("dev", data.dev_files), ("test", data.test_files)) if files}

    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    source = checkpoint_adapter(checkpoint, model) if (checkpoint and checkpoint_adapter) else checkpoint
    prepare_model(model, cfg, source, log=logger.info)
    model.to(dist.device)

    def evaluate(split: str) -> Dict[str, float]:
        dataset = eval_sets[split]
        shard = Subset(dataset, rank_shard(len(dataset), dist.rank, dist.world_size))
        loader = build_eval_dataloader(shard, cfg.eval.batch_size, cfg.train.num_workers, collate)
        return classification_metrics(model, loader, INPUTS[:-1], dist.device,
                                      lambda: autocast_context(dist.device, cfg.train.precision))

    if not args.evaluate:
        train_set = PairDataset(data.train_files, train_transform, data.image_root or None, data.max_words,
                                data.skip_bad_samples)
        loader = build_dataloader(train_set, batch_size=cfg.train.batch_size, shuffle=True,
                                  num_workers=cfg.train.num_workers, collate_fn=collate, drop_last=True,
                                  seed=cfg.train.seed)
        train_model = wrap_ddp(model, dist, cfg.train.find_unused_parameters)

        def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
            out = model(**model_inputs(batch, INPUTS))
            acc = (out.logits.argmax(dim=-1) == batch["labels"]).float().mean()
            return StepOutput(out.loss, {"train_acc": 100.0 * acc})

        # methods that act during training (the DAS search) score held-out batches of the dev split
        step_hooks = method_step_hooks(
            model, lambda: PairDataset(data.dev_files, test_transform, data.image_root or None, data.max_words)
            if data.dev_files else None,
            collate, cfg.train.batch_size, f"data.dev_files ({data.dev_files!r})",
        )
        train_and_reload_best(
            model=model, train_model=train_model, loader=loader, step_fn=step_fn, train_cfg=cfg.train,
            device=dist.device, output_dir=output_dir, config_dict=config_to_dict(cfg),
            evaluate_fn=(lambda epoch: evaluate("dev")) if "dev" in eval_sets else None,
            best_metric_key="acc" if "dev" in eval_sets else None, resume=args.resume, step_hooks=step_hooks,
        )

    results = {split: evaluate(split) for split in eval_sets}
    save_results(results, output_dir, lambda split, m: f"acc {m['acc']:.2f}")
    cleanup()
    return results
