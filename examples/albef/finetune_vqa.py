"""Fine-tune ALBEF for visual question answering (VQA v2 + Visual Genome) and answer the
evaluation questions by ranking a fixed answer list; writes the result JSON the official VQA
server takes (``[{"question_id", "answer"}]``) and, where a split has answers, its accuracy.

    # built-in shapes world, tiny model from scratch, CPU (the default config)
    python examples/albef/finetune_vqa.py
    # the same job in 2 processes (gloo on CPU, nccl on GPUs)
    torchrun --nproc_per_node=2 examples/albef/finetune_vqa.py
    # VQA v2 with ALBEF's hyperparameters from a pre-trained checkpoint
    torchrun --nproc_per_node=8 examples/albef/finetune_vqa.py \
        --config examples/albef/configs/vqa_v2.yaml --checkpoint ALBEF.pth

Any config key can be overridden: ``--opts train.lr=2e-5 eval.k_test=64``.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import Subset

from torchmm_ext.checkpoints import init_answer_decoder
from torchmm_ext.data.datasets import load_answer_list, VQACollator, VQADataset
from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.transforms import albef_test_transform, albef_train_transform
from torchmm_ext.engine import (
    autocast_context,
    cleanup,
    config_to_dict,
    get_logger,
    is_main_process,
    StepContext,
    StepOutput,
    wrap_ddp,
)
from torchmm_ext.engine.fit import train_and_reload_best, TrainConfig
from torchmm_ext.engine.efficiency import method_step_hooks, MethodsConfig, prepare_model
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
from torchmm_ext.evaluation.vqa import evaluate_vqa, ground_truth_answers, vqa_metrics
from torchmm_ext.models.albef import albef_model_for_vqa

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "vqa_shapes.yaml"
logger = get_logger("finetune_vqa")


@dataclass
class DataConfig:
    shapes: Optional[ShapesWorldConfig] = None  # set: use the built-in world's files
    # ALBEF JSON lists {image, question, answer: [str] | str, dataset: vqa | vg}; evaluation
    # files add question_id (answers optional: without them only the result JSON is written).
    train_files: List[str] = field(default_factory=list)
    val_file: str = ""
    test_file: str = ""
    answer_list: str = ""  # JSON list of the candidate answers
    image_root: str = ""  # images of "dataset": "vqa" records (ALBEF's vqa_root)
    vg_image_root: str = ""  # images of "dataset": "vg" records (ALBEF's vg_root); image_root if empty
    tokenizer: str = "bert-base-uncased"  # "shapes", a tokenizer directory or a hub name
    eos: str = "[SEP]"  # end token appended to every answer
    max_words: int = 30  # training question word limit (ALBEF: 30; evaluation: 50)
    max_question_tokens: int = 25  # training question token limit (ALBEF: 25; evaluation: none)
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
    batch_size: int = 16
    k_test: int = 128  # answers re-scored by full-sequence likelihood per question


@dataclass
class VQAConfig(MethodsConfig):
    model: Dict[str, Any] = field(default_factory=dict)  # albef_model_for_vqa kwargs
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/albef_vqa"


def resolve_data_files(cfg: DataConfig) -> Optional[Path]:
    """Point the file fields at the shapes world when ``data.shapes`` is set (generating it
    once, cached); returns the world's text corpus for the ``"shapes"`` tokenizer."""
    if cfg.shapes is None:
        return None
    world = shapes_world_for_ranks(cfg.shapes)
    cfg.train_files = [str(world.vqa_train)]
    cfg.val_file, cfg.test_file = str(world.vqa_val), str(world.vqa_test)
    cfg.answer_list, cfg.image_root = str(world.answer_list), str(world.image_root)
    return world.vocab_corpus


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args, cfg, output_dir, dist = start_recipe(argv, DEFAULT_CONFIG, VQAConfig, albef_model_for_vqa, __doc__)

    # --- data (the model is built here: its image size sets the transforms) ---
    data = cfg.data
    corpus_file = resolve_data_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus_file)
    model_kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **cfg.model}
    model = albef_model_for_vqa(**model_kwargs)
    image_size = model.vision_encoder.image_size
    train_set = VQADataset(
        data.train_files, data.image_root,
        albef_train_transform(image_size, tuple(data.crop_scale), data.hflip, data.randaugment),
        split="train", max_words=data.max_words, eos=data.eos, skip_bad_samples=data.skip_bad_samples,
        vg_image_root=data.vg_image_root or None,
    )
    test_transform = albef_test_transform(image_size)
    eval_sets = {
        split: VQADataset(path, data.image_root, test_transform, split="test", max_words=50,
                          vg_image_root=data.vg_image_root or None)
        for split, path in (("val", data.val_file), ("test", data.test_file)) if path
    }
    gt_answers = {split: ground_truth_answers(ds.records, str(getattr(data, f"{split}_file")))
                  for split, ds in eval_sets.items()}
    answer_list = load_answer_list(data.answer_list)
    answers = tokenizer([a + data.eos for a in answer_list], padding="longest", return_tensors="pt")
    train_loader = build_dataloader(
        train_set, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.train.num_workers,
        collate_fn=VQACollator(tokenizer, data.max_question_tokens), drop_last=True, seed=cfg.train.seed,
    )

    # --- model ---
    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    def init_decoder() -> None:
        decoder_init = init_answer_decoder(model, checkpoint or cfg.init.text)
        if decoder_init:
            logger.info(f"answer decoder initialised from the encoder: {', '.join(decoder_init)}")

    prepare_model(model, cfg, checkpoint, log=logger.info, after_load=init_decoder)
    model.to(dist.device)
    ddp_model = wrap_ddp(model, dist, cfg.train.find_unused_parameters)

    def evaluate(split: str, result_name: str) -> Dict[str, float]:
        """Answer the split's questions (sharded over ranks), write the result JSON, and score
        it when the split has answers."""
        dataset = eval_sets[split]
        shard = Subset(dataset, rank_shard(len(dataset), dist.rank, dist.world_size))
        loader = build_eval_dataloader(shard, cfg.eval.batch_size, cfg.train.num_workers, VQACollator(tokenizer))
        predictions = evaluate_vqa(
            model, loader, answer_list, answers["input_ids"], answers["attention_mask"], cfg.eval.k_test,
            dist.device, lambda: autocast_context(dist.device, cfg.train.precision),
        )
        if is_main_process():
            (output_dir / f"{result_name}.json").write_text(json.dumps(predictions))
        if gt_answers[split] is None:
            return {"num_questions": float(len(predictions))}
        return vqa_metrics(predictions, gt_answers[split], answer_list)

    # --- train ---
    def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
        alpha = ramped_alpha(cfg.loss.alpha, cfg.loss.alpha_warmup, ctx.epoch, ctx.step_in_epoch,
                             ctx.steps_per_epoch)
        out = model(batch["image"], batch["question_ids"], batch["question_mask"], batch["answer_ids"],
                    batch["answer_mask"], batch["weights"], batch["question_index"], alpha)
        return StepOutput(out.loss, {})

    # The best epoch is chosen by val accuracy when the val split has answers (ALBEF's VQA has
    # no val split: it trains on train + val and scores test on the server).
    validate = "val" in eval_sets and gt_answers["val"] is not None
    # methods acting during training (the DAS search) score held-out batches of the val split
    step_hooks = method_step_hooks(
        model, lambda: VQADataset(data.val_file, data.image_root, test_transform, split="train",
                                  max_words=data.max_words, eos=data.eos) if data.val_file else None,
        VQACollator(tokenizer, data.max_question_tokens), cfg.train.batch_size, f"data.val_file ({data.val_file!r})",
    )
    if not args.evaluate:
        train_and_reload_best(
            model=model, train_model=ddp_model, loader=train_loader, step_fn=step_fn,
            train_cfg=cfg.train, device=dist.device, output_dir=output_dir,
            config_dict=config_to_dict(cfg),
            evaluate_fn=(lambda epoch: evaluate("val", f"vqa_result_val_epoch{epoch}")) if validate else None,
            best_metric_key="acc" if validate else None, resume=args.resume, step_hooks=step_hooks,
        )

    # --- evaluate ---
    results = {split: evaluate(split, f"vqa_result_{split}") for split in eval_sets}

    def summary(split: str, m: Dict[str, float]) -> str:
        score = f"acc {m['acc']:.2f}" if "acc" in m else "no answers: result JSON only"
        return f"{score} ({output_dir / f'vqa_result_{split}.json'})"

    save_results(results, output_dir, summary)
    cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
