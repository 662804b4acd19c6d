"""Fine-tune ALBEF for image-text retrieval and evaluate it (ITC + ITM re-rank, recall@k).

    # built-in shapes world, tiny model, CPU (the default config)
    python examples/albef/finetune_retrieval.py
    # the same job in 2 processes (gloo on CPU, nccl on GPUs)
    torchrun --nproc_per_node=2 examples/albef/finetune_retrieval.py
    # COCO with ALBEF's hyperparameters from a published checkpoint
    torchrun --nproc_per_node=8 examples/albef/finetune_retrieval.py \
        --config examples/albef/configs/retrieval_coco.yaml --checkpoint ALBEF.pth

Any config key can be overridden: ``--opts train.lr=2e-5 eval.k_test=64``.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from torchmm_ext.data.datasets import RetrievalCollator, RetrievalEvalDataset, RetrievalPairs, RetrievalTrainDataset
from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.transforms import albef_test_transform, albef_train_transform
from torchmm_ext.engine import (
    autocast_context,
    cleanup,
    config_to_dict,
    ConfigError,
    get_logger,
    StepContext,
    StepOutput,
    wrap_ddp,
)
from torchmm_ext.engine.fit import train_and_reload_best, TrainConfig
from torchmm_ext.engine.efficiency import method_step_hooks, MethodsConfig, prepare_model
from torchmm_ext.engine.recipe_utils import (
    InitConfig,
    ramped_alpha,
    resolve_checkpoint,
    save_results,
    shapes_world_for_ranks,
    ShapesWorldConfig,
    start_recipe,
)
from torchmm_ext.evaluation.retrieval import evaluate_retrieval, NOT_RERANKED_SCORE, recall_metrics
from torchmm_ext.models.albef import albef_model_for_retrieval

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "retrieval_shapes.yaml"
logger = get_logger("finetune_retrieval")


@dataclass
class DataConfig:
    shapes: Optional[ShapesWorldConfig] = None  # set: use the built-in world's files
    train_file: List[str] = field(default_factory=list)  # ALBEF JSON files
    val_file: str = ""
    test_file: str = ""
    image_root: str = ""
    tokenizer: str = "bert-base-uncased"  # "shapes", a tokenizer directory or a hub name
    max_words: int = 30
    max_tokens: int = 30
    crop_scale: List[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: bool = True
    randaugment: bool = True
    skip_bad_samples: bool = False
    # Batches of captions of similar length (groups of 16 batches sorted by length, batches
    # shuffled): texts are padded to a batch's longest, so this saves the padded text and fusion
    # work. Off by default: on the from-scratch shapes job it kept ITC at chance through epoch 0
    # (mean loss 4.78 vs 3.62 with plain batches; similar-length captions describe similar scenes).
    group_by_length: bool = False


@dataclass
class LossConfig:
    alpha: float = 0.4  # momentum-distillation weight
    distill: bool = True
    alpha_warmup: bool = True  # ramp alpha linearly over the first epoch


@dataclass
class EvalConfig:
    batch_size: int = 64
    k_test: int = 256
    itm_batch_size: int = 256
    add_itc: bool = False  # rank by ITM + ITC (LAVIS) instead of the ITM logit alone (ALBEF)
    # What add_itc adds to the ITM logit: "cosine" (LAVIS: the cosine similarity) or "logit"
    # (the ITC logit, similarity / learned temperature: both terms on the scale they were trained at).
    itc_scale: str = "cosine"


ITC_SCALES = ("cosine", "logit")


@dataclass
class RetrievalConfig(MethodsConfig):
    model: Dict[str, Any] = field(default_factory=dict)  # albef_model_for_retrieval kwargs
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/albef_retrieval"


def resolve_data_files(cfg: DataConfig) -> Optional[Path]:
    """Point the file fields at the shapes world when ``data.shapes`` is set (generating it
    once, cached); returns the world's text corpus for the ``"shapes"`` tokenizer."""
    if cfg.shapes is None:
        return None
    world = shapes_world_for_ranks(cfg.shapes)
    cfg.train_file = [str(world.retrieval_train)]
    cfg.val_file, cfg.test_file = str(world.retrieval_val), str(world.retrieval_test)
    cfg.image_root = str(world.image_root)
    return world.vocab_corpus


def add_similarity(itm_scores: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
    """LAVIS's ranking score: the ITC similarity added to every re-ranked ITM entry (entries
    outside the top ``k_test`` keep ``NOT_RERANKED_SCORE``). Pass ``sims / temp`` to add the
    ITC logit instead of the cosine similarity."""
    reranked = itm_scores > NOT_RERANKED_SCORE
    return torch.where(reranked, itm_scores + sims, itm_scores)


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args, cfg, output_dir, dist = start_recipe(argv, DEFAULT_CONFIG, RetrievalConfig, albef_model_for_retrieval, __doc__)
    if cfg.eval.itc_scale not in ITC_SCALES:
        raise ConfigError(f"eval.itc_scale must be one of {ITC_SCALES}, got {cfg.eval.itc_scale!r}")

    # --- data (the model is built here: its image size sets the transforms) ---
    data = cfg.data
    corpus_file = resolve_data_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus_file)
    model_kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **cfg.model}
    model = albef_model_for_retrieval(**model_kwargs)
    image_size = model.vision_encoder.image_size
    train_set = RetrievalTrainDataset(
        data.train_file, data.image_root,
        albef_train_transform(image_size, tuple(data.crop_scale), data.hflip, data.randaugment),
        max_words=data.max_words, skip_bad_samples=data.skip_bad_samples,
    )
    test_transform = albef_test_transform(image_size)
    eval_sets = {
        split: RetrievalEvalDataset(path, data.image_root, test_transform, data.max_words,
                                    skip_bad_samples=data.skip_bad_samples)
        for split, path in (("val", data.val_file), ("test", data.test_file)) if path
    }
    train_loader = build_dataloader(
        train_set, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.train.num_workers,
        collate_fn=RetrievalCollator(tokenizer, data.max_tokens), drop_last=True, seed=cfg.train.seed,
        lengths=train_set.caption_lengths() if data.group_by_length else None,
    )

    # --- model ---
    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    prepare_model(model, cfg, checkpoint, log=logger.info)
    model.to(dist.device)
    ddp_model = wrap_ddp(model, dist, cfg.train.find_unused_parameters)

    def evaluate(split: str) -> Dict[str, float]:
        """Recalls of the configured ranking, plus the ``r_mean`` of every ranking from the
        same ITM pass: ITC alone (``itc_r_mean``), the ITM logit alone (ALBEF,
        ``itm_r_mean``), ITM + ITC cosine similarity (LAVIS, ``itm_itc_r_mean``) and ITM + ITC
        logit (``itm_itc_logit_r_mean``)."""
        dataset = eval_sets[split]
        loader = build_eval_dataloader(dataset, cfg.eval.batch_size, cfg.train.num_workers)
        start = time.perf_counter()
        scores = evaluate_retrieval(
            model, loader, dataset, tokenizer, device=dist.device, k_test=cfg.eval.k_test,
            itm_batch_size=cfg.eval.itm_batch_size, max_length=data.max_tokens, add_itc=False,
            precision_ctx=lambda: autocast_context(dist.device, cfg.train.precision),
        )
        eval_seconds = time.perf_counter() - start
        itc_logits = scores.sims / model.temp.detach().float().cpu()
        rankings = {
            "itc": (scores.sims, scores.sims.T),
            "itm": (scores.scores_i2t, scores.scores_t2i),
            # LAVIS: the ITC similarity added to the re-ranked entries (the others stay -100).
            "itm_itc": (add_similarity(scores.scores_i2t, scores.sims),
                        add_similarity(scores.scores_t2i, scores.sims.T)),
            "itm_itc_logit": (add_similarity(scores.scores_i2t, itc_logits),
                              add_similarity(scores.scores_t2i, itc_logits.T)),
        }
        recalls = {name: recall_metrics(i2t, t2i, dataset.img2txt, dataset.txt2img)
                   for name, (i2t, t2i) in rankings.items()}
        ranking = {"cosine": "itm_itc", "logit": "itm_itc_logit"}[cfg.eval.itc_scale] if cfg.eval.add_itc else "itm"
        metrics = dict(recalls[ranking])
        metrics.update({f"{name}_r_mean": r["r_mean"] for name, r in recalls.items()})
        metrics["eval_seconds"] = eval_seconds  # encoding, ITC and the ITM re-rank (wall time)
        return metrics

    # --- train ---
    def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
        alpha = cfg.loss.alpha if cfg.loss.distill else 0.0
        alpha = ramped_alpha(alpha, cfg.loss.alpha_warmup, ctx.epoch, ctx.step_in_epoch, ctx.steps_per_epoch)
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["idx"], alpha)
        return StepOutput(out.loss, {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm})

    # methods acting during training (the DAS search) score held-out batches of the val split
    step_hooks = method_step_hooks(
        model, lambda: RetrievalPairs(eval_sets["val"]) if "val" in eval_sets else None,
        RetrievalCollator(tokenizer, data.max_tokens), cfg.train.batch_size, f"data.val_file ({data.val_file!r})",
    )
    best = None
    if not args.evaluate:
        best = train_and_reload_best(
            model=model, train_model=ddp_model, loader=train_loader, step_fn=step_fn,
            train_cfg=cfg.train, device=dist.device, output_dir=output_dir,
            config_dict=config_to_dict(cfg),
            evaluate_fn=(lambda epoch: evaluate("val")) if "val" in eval_sets else None,
            best_metric_key="r_mean", resume=args.resume, step_hooks=step_hooks,
        )

    # --- evaluate ---
    # The best epoch's val scores are already in metrics.jsonl: test only, as ALBEF does.
    results = {split: evaluate(split) for split in eval_sets if not (split == "val" and best is not None)}
    save_results(results, output_dir, lambda split, m: (
        f"txt_r1 {m['txt_r1']:.2f}  txt_r5 {m['txt_r5']:.2f}  txt_r10 {m['txt_r10']:.2f}  "
        f"img_r1 {m['img_r1']:.2f}  img_r5 {m['img_r5']:.2f}  img_r10 {m['img_r10']:.2f}  r_mean {m['r_mean']:.2f}  "
        f"(r_mean by ITC alone {m['itc_r_mean']:.2f}, ITM alone {m['itm_r_mean']:.2f}, "
        f"ITM + ITC cosine {m['itm_itc_r_mean']:.2f}, ITM + ITC logit {m['itm_itc_logit_r_mean']:.2f})"))
    cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
