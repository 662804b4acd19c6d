"""Image-text retrieval fine-tuning as ViLT's IRTR (also METER's): each image's caption is
scored against sampled negative captions (cross-entropy, the positive first); evaluation
scores every (image, text) pair of the split, as ViLT does (no shortlist), and reports
recall@1/5/10 both ways."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn, Tensor
from torch.utils.data import Subset

from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.vl_tasks import ImagesCollator, NegativesCollator, RetrievalEvalSet, RetrievalNegativesDataset
from torchmm_ext.engine import all_gather_object, autocast_context, cleanup, config_to_dict, get_logger, wrap_ddp
from torchmm_ext.engine.efficiency import method_step_hooks, prepare_model
from torchmm_ext.engine.fit import train_and_reload_best
from torchmm_ext.engine.recipe_utils import rank_shard, resolve_checkpoint, save_results, shapes_world_for_ranks, start_recipe
from torchmm_ext.engine.train_loop import StepContext, StepOutput
from torchmm_ext.evaluation.retrieval import recall_metrics
from torchmm_ext.tasks.common import (
    build_transforms,
    CheckpointAdapter,
    model_inputs,
    TaskConfig,
    TaskDataConfig,
)

__all__ = ["RetrievalTaskConfig", "RetrievalDataConfig", "run_retrieval", "score_all_pairs"]

logger = get_logger("finetune_retrieval")
INPUTS = ("images", "input_ids", "attention_mask", "pixel_mask")


@dataclass
class RetrievalDataConfig(TaskDataConfig):
    # ALBEF JSON ({image, caption, image_id}) or Karpathy-split Arrow files (image, caption)
    train_files: List[str] = field(default_factory=list)
    val_files: List[str] = field(default_factory=list)
    test_files: List[str] = field(default_factory=list)
    num_negatives: int = 15  # ViLT's draw_false_text


@dataclass
class RetrievalTaskConfig(TaskConfig):
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    output_dir: str = "outputs/retrieval"


def _resolve_files(data: RetrievalDataConfig) -> Optional[Path]:
    if data.shapes is None:
        return None
    world = shapes_world_for_ranks(data.shapes)
    data.train_files = [str(world.retrieval_train)]
    data.val_files, data.test_files = [str(world.retrieval_val)], [str(world.retrieval_test)]
    data.image_root = str(world.image_root)
    return world.vocab_corpus


@torch.no_grad()
def score_all_pairs(
    model: nn.Module,
    dataset: RetrievalEvalSet,
    tokenizer: Any,
    *,
    max_tokens: int,
    batch_size: int,
    text_batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast: Callable[[], Any],
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """``[N_img, N_txt]`` scores of every (image, text) pair: each image is embedded once and
    scored with every text batch (``model.embed_images`` / ``model.score_pairs``); images are
    sharded over ranks and the rows gathered.

    Returns:
        Tensor: float32 scores on the CPU (every rank gets the whole matrix).
    """
    was_training = model.training
    model.eval()
    tokens = tokenizer(dataset.text, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    shard = Subset(dataset, rank_shard(len(dataset), rank, world_size))
    loader = build_eval_dataloader(shard, batch_size, num_workers, ImagesCollator())
    rows: Dict[int, Tensor] = {}
    for batch in loader:
        with autocast():
            encoding = model.embed_images(batch["images"].to(device), batch["pixel_mask"].to(device))
        for j, index in enumerate(batch["index"].tolist()):
            row = []
            for start in range(0, ids.shape[0], text_batch_size):
                n = min(text_batch_size, ids.shape[0] - start)
                pair = type(encoding)(*(t[j: j + 1].expand(n, *t.shape[1:]) for t in encoding))
                with autocast():
                    row.append(model.score_pairs(pair, ids[start: start + n], mask[start: start + n]).float().cpu())
            rows[index] = torch.cat(row)
    model.train(was_training)
    merged: Dict[int, Tensor] = {}
    for part in all_gather_object(rows):
        merged.update(part)
    return torch.stack([merged[i] for i in range(len(dataset))])


def run_retrieval(
    argv: Optional[List[str]],
    default_config: Path,
    builder: Callable[..., torch.nn.Module],
    description: Optional[str] = None,
    checkpoint_adapter: Optional[CheckpointAdapter] = None,
) -> Dict[str, Dict[str, float]]:
    """Fine-tune and evaluate a retrieval model (the body of ``finetune_retrieval.py``);
    arguments as in :func:`~torchmm_ext.tasks.vqa.run_classifier_vqa`.

    Returns:
        Dict[str, Dict[str, float]]: recall metrics by split (``txt_r1`` ... ``r_mean``).
    """
    args, cfg, output_dir, dist = start_recipe(argv, default_config, RetrievalTaskConfig, builder, description)
    data = cfg.data
    corpus = _resolve_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus)
    model = builder(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **cfg.model)
    train_transform, test_transform = build_transforms(data.image)
    eval_sets = {}
    for split, files in (("val", data.val_files), ("test", data.test_files)):
        if files:
            dataset = RetrievalEvalSet(files, test_transform, data.image_root or None, data.max_words)
            if cfg.eval.max_images:
                dataset = _first_images(dataset, cfg.eval.max_images)
            eval_sets[split] = dataset

    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    source = checkpoint_adapter(checkpoint, model) if (checkpoint and checkpoint_adapter) else checkpoint
    prepare_model(model, cfg, source, log=logger.info)
    model.to(dist.device)

    def evaluate(split: str) -> Dict[str, float]:
        dataset = eval_sets[split]
        scores = score_all_pairs(model, dataset, tokenizer, max_tokens=data.max_tokens,
                                 batch_size=cfg.eval.batch_size, text_batch_size=cfg.eval.text_batch_size,
                                 num_workers=cfg.train.num_workers, device=dist.device,
                                 autocast=lambda: autocast_context(dist.device, cfg.train.precision),
                                 rank=dist.rank, world_size=dist.world_size)
        return recall_metrics(scores, scores.T, dataset.img2txt, dataset.txt2img)

    if not args.evaluate:
        train_set = RetrievalNegativesDataset(data.train_files, train_transform, data.image_root or None,
                                              data.num_negatives, data.max_words, data.skip_bad_samples)
        collate = NegativesCollator(tokenizer, data.max_tokens)
        loader = build_dataloader(train_set, batch_size=cfg.train.batch_size, shuffle=True,
                                  num_workers=cfg.train.num_workers, collate_fn=collate, drop_last=True,
                                  seed=cfg.train.seed)
        train_model = wrap_ddp(model, dist, cfg.train.find_unused_parameters)

        def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
            out = model(**model_inputs(batch, INPUTS))
            acc = (out.scores.argmax(dim=-1) == 0).float().mean()
            return StepOutput(out.loss, {"train_acc": 100.0 * acc})

        # methods that act during training (the DAS search) score held-out batches of the val
        # split, read like the training split (each caption with sampled negatives)
        step_hooks = method_step_hooks(
            model, lambda: RetrievalNegativesDataset(data.val_files, test_transform, data.image_root or None,
                                                     data.num_negatives, data.max_words) if data.val_files else None,
            collate, cfg.train.batch_size, f"data.val_files ({data.val_files!r})",
        )
        train_and_reload_best(
            model=model, train_model=train_model, loader=loader, step_fn=step_fn, train_cfg=cfg.train,
            device=dist.device, output_dir=output_dir, config_dict=config_to_dict(cfg),
            evaluate_fn=(lambda epoch: evaluate("val")) if "val" in eval_sets else None,
            best_metric_key="r_mean" if "val" in eval_sets else None, resume=args.resume, step_hooks=step_hooks,
        )

    results = {split: evaluate(split) for split in eval_sets}
    save_results(results, output_dir,
                 lambda split, m: f"txt_r1 {m['txt_r1']:.2f}  img_r1 {m['img_r1']:.2f}  r_mean {m['r_mean']:.2f}")
    cleanup()
    return results


def _first_images(dataset: RetrievalEvalSet, count: int) -> RetrievalEvalSet:
    """The split cut to its first ``count`` images and their texts (in place)."""
    keep = min(count, len(dataset.entries))
    num_text = sum(len(dataset.img2txt[i]) for i in range(keep))
    dataset.entries = dataset.entries[:keep]
    dataset.img2txt = dataset.img2txt[:keep]
    dataset.txt2img = dataset.txt2img[:num_text]
    dataset.text = dataset.text[:num_text]
    return dataset
