"""VQA as classification over an answer vocabulary (ViLT, METER): fine-tune with the soft-target
BCE, keep the best val epoch, score every split and write the result JSON
(``[{"question_id", "answer"}]``, what the VQA server takes).

Metrics: ``vqa_score`` is ViLT's and METER's (``VQAScore``: the soft target of the predicted
answer, 0.3 per annotator up to 1, averaged); with ALBEF JSON files whose records keep the
annotators' answers, ``acc`` is also given (the ``min(#annotators / 3, 1)`` accuracy of
:mod:`torchmm_ext.evaluation.vqa`, the figure ALBEF's recipes report).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils.data import Subset

from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.vl_tasks import AnswerVocab, ClassifierVQACollator, ClassifierVQADataset, is_arrow
from torchmm_ext.engine import (
    all_gather_object,
    autocast_context,
    cleanup,
    config_to_dict,
    get_logger,
    is_main_process,
    wrap_ddp,
)
from torchmm_ext.engine.efficiency import method_step_hooks, prepare_model
from torchmm_ext.engine.fit import train_and_reload_best
from torchmm_ext.engine.recipe_utils import rank_shard, resolve_checkpoint, save_results, shapes_world_for_ranks, start_recipe
from torchmm_ext.engine.train_loop import StepContext, StepOutput
from torchmm_ext.engine.distributed import all_reduce_sum
from torchmm_ext.evaluation.vqa import vqa_accuracy
from torchmm_ext.tasks.common import (
    build_transforms,
    CheckpointAdapter,
    model_inputs,
    TaskConfig,
    TaskDataConfig,
)

__all__ = ["ClassifierVQAConfig", "VQADataConfig", "run_classifier_vqa", "vqa_scores"]

logger = get_logger("finetune_vqa")
INPUTS = ("images", "input_ids", "attention_mask", "pixel_mask", "targets")


@dataclass
class VQADataConfig(TaskDataConfig):
    # ALBEF JSON ({image, question, answer: [str], question_id}) or ViLT/METER Arrow files
    train_files: List[str] = field(default_factory=list)
    val_files: List[str] = field(default_factory=list)
    test_files: List[str] = field(default_factory=list)
    answer_list: str = ""  # JSON answer list; empty with Arrow files: their labels


@dataclass
class ClassifierVQAConfig(TaskConfig):
    data: VQADataConfig = field(default_factory=VQADataConfig)
    output_dir: str = "outputs/vqa"


def _resolve_files(data: VQADataConfig) -> Optional[Path]:
    if data.shapes is None:
        return None
    world = shapes_world_for_ranks(data.shapes)
    data.train_files, data.val_files, data.test_files = [str(world.vqa_train)], [str(world.vqa_val)], [str(world.vqa_test)]
    data.answer_list, data.image_root = str(world.answer_list), str(world.image_root)
    return world.vocab_corpus


def answer_vocab(data: VQADataConfig) -> AnswerVocab:
    """``data.answer_list`` when set, else the label set of the Arrow training files."""
    if data.answer_list:
        return AnswerVocab.from_answer_list(data.answer_list)
    if data.train_files and is_arrow(data.train_files):
        return AnswerVocab.from_arrow(data.train_files)
    raise ValueError("set data.answer_list (a JSON list of answers) for JSON files; Arrow files carry their own labels")


def vqa_scores(predictions: torch.Tensor, dataset: ClassifierVQADataset, indices: torch.Tensor) -> Dict[str, float]:
    """Sums over a shard: ViLT's score (target of the predicted answer) and, where the records
    keep the annotators' answers, the ``min(n / 3, 1)`` accuracy."""
    score = acc = 0.0
    with_raw = 0
    for label, index in zip(predictions.tolist(), indices.tolist()):
        question = dataset.questions[index]
        answer = dataset.vocab.answers[label]
        score += question.scores.get(answer, 0.0)
        if question.answers:
            acc += vqa_accuracy(answer, question.answers)
            with_raw += 1
    return {"score": score, "acc": acc, "with_raw": with_raw, "n": len(indices)}


def run_classifier_vqa(
    argv: Optional[List[str]],
    default_config: Path,
    builder: Callable[..., torch.nn.Module],
    description: Optional[str] = None,
    checkpoint_adapter: Optional[CheckpointAdapter] = None,
) -> Dict[str, Dict[str, float]]:
    """Fine-tune and evaluate a classifier-VQA model (the recipe body of ``finetune_vqa.py``).

    Args:
        argv (Optional[List[str]]): the command line.
        default_config (Path): the recipe's default YAML.
        builder (Callable[..., nn.Module]): e.g. ``vilt_model_for_vqa`` (``vocab_size``,
            ``pad_token_id``, ``num_answers`` and ``cfg.model`` are passed).
        description (Optional[str]): ``--help`` text.
        checkpoint_adapter (Optional[CheckpointAdapter]): backbone-specific checkpoint fix-up.

    Returns:
        Dict[str, Dict[str, float]]: metrics by split (``vqa_score``, ``acc`` where known,
        ``num_questions``).
    """
    args, cfg, output_dir, dist = start_recipe(argv, default_config, ClassifierVQAConfig, builder, description)
    data = cfg.data
    corpus = _resolve_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus)
    vocab = answer_vocab(data)
    model = builder(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_answers=len(vocab), **cfg.model)
    train_transform, test_transform = build_transforms(data.image)
    collate = ClassifierVQACollator(tokenizer, len(vocab), data.max_tokens)
    eval_sets = {split: ClassifierVQADataset(files, vocab, test_transform, data.image_root or None, "test", data.max_words)
                 for split, files in (("val", data.val_files), ("test", data.test_files)) if files}

    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    source = checkpoint_adapter(checkpoint, model) if (checkpoint and checkpoint_adapter) else checkpoint
    prepare_model(model, cfg, source, log=logger.info)
    model.to(dist.device)

    def autocast():
        return autocast_context(dist.device, cfg.train.precision)

    def evaluate(split: str, result_name: str) -> Dict[str, float]:
        dataset = eval_sets[split]
        shard = Subset(dataset, rank_shard(len(dataset), dist.rank, dist.world_size))
        loader = build_eval_dataloader(shard, cfg.eval.batch_size, cfg.train.num_workers, collate)
        was_training = model.training
        model.eval()
        sums = {"score": 0.0, "acc": 0.0, "with_raw": 0, "n": 0}
        predictions: List[Dict[str, Any]] = []
        with torch.no_grad():
            for batch in loader:
                inputs = {k: v.to(dist.device) for k, v in model_inputs(batch, INPUTS[:-1]).items()}
                with autocast():
                    labels = model(**inputs).logits.argmax(dim=-1).cpu()
                for key, value in vqa_scores(labels, dataset, batch["index"]).items():
                    sums[key] += value
                predictions += [{"question_id": dataset.questions[i].question_id, "answer": vocab.answers[p]}
                                for i, p in zip(batch["index"].tolist(), labels.tolist())]
        model.train(was_training)
        totals = torch.tensor([sums["score"], sums["acc"], sums["with_raw"], sums["n"]], dtype=torch.float64,
                              device=dist.device)
        all_reduce_sum(totals)
        score, acc, with_raw, n = totals.tolist()
        parts = all_gather_object(predictions)
        if is_main_process():
            (output_dir / f"{result_name}.json").write_text(json.dumps([p for part in parts for p in part]))
        if not dataset.has_answers:
            return {"num_questions": n}
        metrics = {"vqa_score": 100.0 * score / max(n, 1.0), "num_questions": n}
        if with_raw == n:
            metrics["acc"] = 100.0 * acc / max(n, 1.0)
        return metrics

    validate = "val" in eval_sets and eval_sets["val"].has_answers
    if not args.evaluate:
        train_set = ClassifierVQADataset(data.train_files, vocab, train_transform, data.image_root or None, "train",
                                         data.max_words, data.skip_bad_samples)
        if train_set.num_dropped:
            logger.info(f"{train_set.num_dropped} training questions have no answer in the vocabulary: dropped")
        loader = build_dataloader(train_set, batch_size=cfg.train.batch_size, shuffle=True,
                                  num_workers=cfg.train.num_workers, collate_fn=collate, drop_last=True,
                                  seed=cfg.train.seed)
        train_model = wrap_ddp(model, dist, cfg.train.find_unused_parameters)

        def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
            out = model(**model_inputs(batch, INPUTS))
            best = out.logits.argmax(dim=-1)
            score = batch["targets"].gather(1, best[:, None]).mean()
            return StepOutput(out.loss, {"train_vqa_score": 100.0 * score})

        # methods that act during training (the DAS search) score held-out batches of the val split
        step_hooks = method_step_hooks(
            model, lambda: ClassifierVQADataset(data.val_files, vocab, test_transform, data.image_root or None,
                                                "train", data.max_words) if data.val_files else None,
            collate, cfg.train.batch_size, f"data.val_files ({data.val_files!r})",
        )
        train_and_reload_best(
            model=model, train_model=train_model, loader=loader, step_fn=step_fn, train_cfg=cfg.train,
            device=dist.device, output_dir=output_dir, config_dict=config_to_dict(cfg),
            evaluate_fn=(lambda epoch: evaluate("val", f"vqa_result_val_epoch{epoch}")) if validate else None,
            best_metric_key="vqa_score" if validate else None, resume=args.resume, step_hooks=step_hooks,
        )

    results = {split: evaluate(split, f"vqa_result_{split}") for split in eval_sets}

    def summary(split: str, m: Dict[str, float]) -> str:
        if "vqa_score" not in m:
            return f"no answers: result JSON only ({output_dir / f'vqa_result_{split}.json'})"
        acc = f", acc {m['acc']:.2f}" if "acc" in m else ""
        return f"vqa_score {m['vqa_score']:.2f}{acc}"

    save_results(results, output_dir, summary)
    cleanup()
    return results
