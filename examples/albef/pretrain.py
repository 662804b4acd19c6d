"""Pre-train ALBEF on image-caption pairs (ITC + ITM + MLM with momentum distillation) and save
weights that every fine-tuning recipe takes with ``--checkpoint``.

    # built-in shapes world, tiny model from scratch, CPU (the default config)
    python examples/albef/pretrain.py
    # the same job in 2 processes (gloo on CPU, nccl on GPUs)
    torchrun --nproc_per_node=2 examples/albef/pretrain.py
    # ALBEF's 4M-image pre-training (8 GPUs), from DeiT + BERT
    torchrun --nproc_per_node=8 examples/albef/pretrain.py \
        --config examples/albef/configs/pretrain_4m.yaml \
        --opts init.vision=deit_base_patch16_224.pth init.text=bert-base-uncased/pytorch_model.bin
    # then fine-tune from the result
    python examples/albef/finetune_retrieval.py --checkpoint outputs/albef_pretrain_shapes/pretrained.pth

Any config key can be overridden: ``--opts train.lr=2e-4 loss.alpha=0``. There is no model
selection: the weights after the last epoch go to ``<output_dir>/pretrained.pth``. With
``data.val_file`` (retrieval evaluation format) the result is also scored by zero-shot
retrieval (``--evaluate``: that score only).
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from torchmm_ext.data.datasets import PretrainDataset, RetrievalCollator, RetrievalEvalDataset
from torchmm_ext.data.loader import build_dataloader, build_eval_dataloader
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.transforms import albef_test_transform, albef_train_transform
from torchmm_ext.engine import (
    autocast_context,
    barrier,
    cleanup,
    config_to_dict,
    get_logger,
    is_main_process,
    save_checkpoint,
    StepContext,
    StepOutput,
)
from torchmm_ext.engine.fit import train_and_reload_best, TrainConfig
from torchmm_ext.engine.distillation import build_distiller, DistillConfig
from torchmm_ext.engine.efficiency import MethodsConfig, prepare_model
from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.engine.recipe_utils import (
    InitConfig,
    ramped_alpha,
    resolve_checkpoint,
    shapes_world_for_ranks,
    ShapesWorldConfig,
    start_recipe,
)
from torchmm_ext.evaluation.retrieval import evaluate_retrieval, recall_metrics
from torchmm_ext.models.albef import ALBEFForPretraining, albef_model_for_pretraining

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain_shapes.yaml"
PRETRAINED_WEIGHTS = "pretrained.pth"
logger = get_logger("pretrain")


@dataclass
class DataConfig:
    shapes: Optional[ShapesWorldConfig] = None  # set: use the built-in world's files
    train_file: List[str] = field(default_factory=list)  # {image, caption: str | [str]} JSON files
    val_file: str = ""  # optional zero-shot retrieval check: {image, caption: [str]} records
    image_root: str = ""
    tokenizer: str = "bert-base-uncased"  # "shapes", a tokenizer directory or a hub name
    max_words: int = 30
    max_tokens: int = 25  # ALBEF's pre-training truncates captions to 25 tokens
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    randaugment: bool = True
    skip_bad_samples: bool = False


@dataclass
class LossConfig:
    alpha: float = 0.4  # momentum-distillation weight (ITC and MLM targets)
    alpha_warmup: bool = True  # ramp alpha linearly over the first epoch


@dataclass
class EvalConfig:
    batch_size: int = 64
    k_test: int = 128
    itm_batch_size: int = 256


@dataclass
class PretrainConfig(MethodsConfig):
    model: Dict[str, Any] = field(default_factory=dict)  # albef_model_for_pretraining kwargs
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: Optional[DistillConfig] = None  # set: PELA's distillation from a full-rank teacher
    output_dir: str = "outputs/albef_pretrain"


def resolve_data_files(cfg: DataConfig) -> Optional[Path]:
    """Point the file fields at the shapes world when ``data.shapes`` is set (generating it
    once, cached); returns the world's text corpus for the ``"shapes"`` tokenizer."""
    if cfg.shapes is None:
        return None
    world = shapes_world_for_ranks(cfg.shapes)
    cfg.train_file = [str(f) for f in world.pretrain_files]
    cfg.val_file = str(world.retrieval_val)
    cfg.image_root = str(world.image_root)
    return world.vocab_corpus


def pretrained_state_dict(model: ALBEFForPretraining) -> Dict[str, torch.Tensor]:
    """The weights to hand to fine-tuning: the whole model (MLM head and momentum copies
    included, as ALBEF's checkpoints), less the tensors of a disabled (size-0) queue, which hold
    nothing and would clash with a fine-tuning model's queue of another size."""
    state = model.state_dict()
    if model.queue.size == 0:
        state = {k: v for k, v in state.items() if not k.startswith("queue.")}
    return state


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args, cfg, output_dir, dist = start_recipe(argv, DEFAULT_CONFIG, PretrainConfig, albef_model_for_pretraining, __doc__)

    # --- data (the model is built here: its image size sets the transforms) ---
    data = cfg.data
    corpus_file = resolve_data_files(data)
    tokenizer = build_tokenizer(data.tokenizer, corpus_file=corpus_file)
    model_kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                    "mask_token_id": tokenizer.mask_token_id, "cls_token_id": tokenizer.cls_token_id,
                    **cfg.model}
    model = albef_model_for_pretraining(**model_kwargs)
    image_size = model.vision_encoder.image_size
    train_set = PretrainDataset(
        data.train_file, data.image_root,
        albef_train_transform(image_size, tuple(data.crop_scale), data.hflip, data.randaugment),
        max_words=data.max_words, skip_bad_samples=data.skip_bad_samples,
    )
    val_set = None
    if data.val_file:
        val_set = RetrievalEvalDataset(data.val_file, data.image_root, albef_test_transform(image_size),
                                       data.max_words, skip_bad_samples=data.skip_bad_samples)
    train_loader = build_dataloader(
        train_set, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.train.num_workers,
        collate_fn=RetrievalCollator(tokenizer, data.max_tokens), drop_last=True, seed=cfg.train.seed,
    )

    # --- model ---
    checkpoint = resolve_checkpoint(args.checkpoint, cfg.init)
    prepare_model(model, cfg, checkpoint, log=logger.info)
    model.to(dist.device)
    ddp_model = DistributedDataParallel(model) if dist.is_distributed else model
    distiller = None
    if cfg.distill is not None:
        distiller = build_distiller(cfg.distill, lambda: albef_model_for_pretraining(**model_kwargs),
                                    dist.device, logger.info)

    def zero_shot_retrieval() -> Dict[str, float]:
        loader = build_eval_dataloader(val_set, cfg.eval.batch_size, cfg.train.num_workers)
        scores = evaluate_retrieval(
            model, loader, val_set, tokenizer, device=dist.device, k_test=cfg.eval.k_test,
            itm_batch_size=cfg.eval.itm_batch_size, max_length=data.max_tokens,
            precision_ctx=lambda: autocast_context(dist.device, cfg.train.precision),
        )
        metrics = recall_metrics(scores.scores_i2t, scores.scores_t2i, val_set.img2txt, val_set.txt2img)
        metrics["itc_r_mean"] = recall_metrics(scores.sims, scores.sims.T, val_set.img2txt,
                                               val_set.txt2img)["r_mean"]
        return metrics

    # --- train ---
    def step_fn(model, batch: Dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
        alpha = ramped_alpha(cfg.loss.alpha, cfg.loss.alpha_warmup, ctx.epoch, ctx.step_in_epoch,
                             ctx.steps_per_epoch)
        inputs = (batch["image"], batch["input_ids"], batch["attention_mask"], alpha)
        out = model(*inputs) if distiller is None else distiller(model, *inputs)
        extra = {} if distiller is None else {"loss_kd": out.loss_kd, "loss_reg": out.loss_reg}
        return StepOutput(out.loss, {"loss_itc": out.loss_itc, "loss_mlm": out.loss_mlm,
                                     "loss_itm": out.loss_itm, **extra})

    weights_path = output_dir / PRETRAINED_WEIGHTS
    if not args.evaluate:
        train_and_reload_best(
            model=model, train_model=ddp_model, loader=train_loader, step_fn=step_fn,
            train_cfg=cfg.train, device=dist.device, output_dir=output_dir,
            config_dict=config_to_dict(cfg), resume=args.resume,
        )
        if is_main_process():
            save_checkpoint(weights_path, {"model": pretrained_state_dict(model),
                                           "config": config_to_dict(cfg),
                                           "methods": applied_methods(model)})
        barrier()

    # --- evaluate ---
    results: Dict[str, Any] = {}
    if val_set is not None:
        results["val_zero_shot"] = zero_shot_retrieval()
        logger.info("zero-shot val: " + json.dumps({k: round(v, 2) for k, v in results["val_zero_shot"].items()}))
    if is_main_process():
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        if results:
            m = results["val_zero_shot"]
            print(f"[val, zero-shot] txt_r1 {m['txt_r1']:.2f}  img_r1 {m['img_r1']:.2f}  "
                  f"r_mean {m['r_mean']:.2f}  itc_r_mean {m['itc_r_mean']:.2f}")
        if not args.evaluate:
            print(f"pre-trained weights: {weights_path}")
    cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
