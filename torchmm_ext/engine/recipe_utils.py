"""Small pieces several recipes share (config sections and set-up steps, no training loop)."""

import argparse
import importlib.util
import json
import sys

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn, Tensor
from torch.utils.data import Dataset, Subset

from torchmm_ext.checkpoints.loading import CheckpointShapeError, load_pretrained, LoadReport
from torchmm_ext.checkpoints.primitives import group_keys, load_state_dict_file, PathLike, unwrap_state_dict
from torchmm_ext.data.loader import build_eval_dataloader
from torchmm_ext.data.shapes_world import cached_shapes_world, ShapesWorld
from torchmm_ext.engine.config import check_kwargs, config_to_dict, ConfigError, load_config, parse_args, save_config
from torchmm_ext.engine.distributed import (
    barrier,
    DistInfo,
    init_distributed,
    is_main_process,
    seed_everything,
    use_deterministic_training,
    wrap_ddp,
)
from torchmm_ext.engine.fit import train_and_reload_best
from torchmm_ext.engine.metric_logging import get_logger
from torchmm_ext.engine.precision import autocast_context
from torchmm_ext.engine.train_loop import StepContext, StepOutput
from torchmm_ext.evaluation.classification import classification_accuracy

_logger = get_logger(__name__)


@dataclass
class InitConfig:
    """Where a recipe's weights start.

    Attributes:
        vision (str): image-encoder weights: a DeiT/ViT (timm layout, as ALBEF and ViLT start) or
            CLIP file (METER), or a whole-model checkpoint (e.g. ALBEF's) whose vision encoder
            is taken (``load_pretrained(..., part="vision")``; ViLT maps it onto its transformer).
        text (str): text-encoder weights: bert-base-uncased (Hugging Face layout; ALBEF: layers
            0-5 text, 6-11 fusion) or RoBERTa (METER), or a whole-model checkpoint whose text
            encoder is taken (ViLT: its embeddings only).
        checkpoint (str): a whole-model checkpoint in any layout (what ``--checkpoint``
            overrides), e.g. the output of ``examples/albef/pretrain.py``.
        checkpoint_hint (str): how to make ``checkpoint`` when it does not exist yet (shown in
            the error).
    """

    vision: str = ""
    text: str = ""
    checkpoint: str = ""
    checkpoint_hint: str = ""


def resolve_checkpoint(cli_checkpoint: Optional[str], init: InitConfig) -> str:
    """The checkpoint a recipe starts from: ``--checkpoint`` if given, else ``init.checkpoint``
    ("" for none).

    Raises:
        FileNotFoundError: the file does not exist; the message carries ``init.checkpoint_hint``
            and how to train from scratch instead.
    """
    path = cli_checkpoint or init.checkpoint
    if path and not Path(path).exists():
        source = "--checkpoint" if cli_checkpoint else "init.checkpoint"
        hint = f" {init.checkpoint_hint}." if init.checkpoint_hint and not cli_checkpoint else ""
        raise FileNotFoundError(
            f"{source} {path} does not exist.{hint} To train from scratch instead: --opts init.checkpoint=''"
        )
    return path or ""


@dataclass
class ShapesWorldConfig:
    """Generate the built-in shapes world (cached under ``cache_dir``) and train on it.

    The defaults are those of ``retrieval_shapes.yaml``: every task's files come from one world,
    so recipes using the same parameters share one cache."""

    cache_dir: str = "data_cache"
    seed: int = 0
    image_size: int = 64
    num_train: int = 4000
    num_val: int = 300
    num_test: int = 500
    captions_per_image: int = 5


def shapes_world_for_ranks(cfg: ShapesWorldConfig) -> ShapesWorld:
    """The cached shapes world of ``cfg``: rank 0 generates it (once), the other ranks wait at a
    barrier and then read its cache."""
    params = config_to_dict(cfg)
    if not is_main_process():
        barrier()
    world = cached_shapes_world(params.pop("cache_dir"), **params)
    if is_main_process():
        barrier()
    return world


def rank_shard(num_items: int, rank: int, world_size: int) -> range:
    """Indices ``rank, rank + world_size, ...`` of ``num_items``: disjoint shards covering every
    item once (no padding), for evaluations whose counts are summed over ranks."""
    return range(rank, num_items, world_size)


def load_task_head(
    model: nn.Module,
    path_or_state_dict: Union[PathLike, Mapping[str, Tensor]],
    report: LoadReport,
    prefixes: Sequence[str],
) -> List[str]:
    """Loads task-head tensors that a layout conversion ignored (the ``albef`` and
    ``torchmm_ext`` conversions take ``cls_head[_m]`` / ``ta_head`` themselves; this covers
    layouts that do not), so that a fine-tuned checkpoint evaluates with its own head instead
    of a random one. Call it right after :func:`load_pretrained`.

    Args:
        model (nn.Module): the model :func:`load_pretrained` loaded into.
        path_or_state_dict (Union[PathLike, Mapping[str, Tensor]]): the same checkpoint.
        report (LoadReport): what :func:`load_pretrained` returned.
        prefixes (Sequence[str]): head key prefixes, e.g. ``("cls_head.", "cls_head_m.")``.

    Returns:
        List[str]: the keys loaded (empty when the conversion already took the head).

    Raises:
        CheckpointShapeError: a head tensor does not fit the model (e.g. another class count).
    """
    wanted = [k for k in report.ignored if k.startswith(tuple(prefixes))]
    if not wanted:
        return []
    model = getattr(model, "module", model)
    if isinstance(path_or_state_dict, (str, Path)):
        source = load_state_dict_file(path_or_state_dict)
    else:
        source = unwrap_state_dict(path_or_state_dict)
    expected = model.state_dict()
    head = {k: source[k] for k in wanted if k in expected}
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in head.items() if v.shape != expected[k].shape]
    if bad:
        raise CheckpointShapeError("task-head tensors do not fit the model:\n  " + "\n  ".join(bad))
    model.load_state_dict(head, strict=False)
    return sorted(head)


def initialize_weights(
    model: nn.Module,
    init: InitConfig,
    checkpoint: Optional[str] = None,
    head_prefixes: Sequence[str] = (),
    log: Optional[Callable[[str], None]] = None,
) -> None:
    """Load a recipe's starting weights into a freshly built model.

    In order: ``init.vision`` / ``init.text`` (ALBEF's DeiT + BERT initialisation, after which
    momentum copies take the online weights), then ``checkpoint`` in any layout
    :func:`~torchmm_ext.checkpoints.load_pretrained` knows (which converts task heads with the
    rest), then any task-head tensors under ``head_prefixes`` that a layout conversion left out
    (:func:`load_task_head`). Momentum tensors the checkpoint lacks, and only those, restart
    from their loaded online twins (:func:`reset_missing_momentum`; a pre-training checkpoint
    has no ``cls_head_m``, for example), so a fine-tuned file's momentum weights are kept.

    Args:
        model (nn.Module): the model (``copy_params_to_momentum`` is called after ``init.vision``
            / ``init.text``).
        init (InitConfig): the ``init:`` config section.
        checkpoint (Optional[str]): ``--checkpoint`` of the recipe.
        head_prefixes (Sequence[str]): task-head key prefixes, e.g. ``("cls_head.", "cls_head_m.")``.
        log (Optional[Callable[[str], None]]): where the load reports go (``logger.info``).
    """
    log = log or (lambda message: None)
    copy_params = getattr(model, "copy_params_to_momentum", None)
    for part, path in (("vision", init.vision), ("text", init.text)):
        if path and not Path(path).exists():
            raise FileNotFoundError(
                f"init.{part} {path} does not exist (the {part} encoder's starting weights); "
                f"to start that encoder from scratch instead: --opts init.{part}=''"
            )
        if path:
            log(f"{part} encoder initialised from {path}:\n{load_pretrained(model, path, part=part).format()}")
    if (init.vision or init.text) and copy_params is not None:
        copy_params()  # ALBEF's copy_params after its BERT/DeiT initialisation
    if not checkpoint:
        return
    report = load_pretrained(model, checkpoint)
    log(f"loaded {checkpoint}:\n{report.format()}")
    head: List[str] = []
    if head_prefixes:
        head = load_task_head(model, checkpoint, report, head_prefixes)
        if head:
            log(f"task head taken from {checkpoint}: {', '.join(head)}")
    lacking = [key for keys in report.missing.values() for key in keys if key not in head]
    reset = reset_missing_momentum(model, lacking)
    if reset:
        log(f"momentum tensors the checkpoint lacks, copied from their online twins: "
            + ", ".join(f"{group} ({len(keys)})" for group, keys in group_keys(reset).items()))


@torch.no_grad()
def reset_missing_momentum(model: nn.Module, missing: Iterable[str]) -> List[str]:
    """ALBEF's ``copy_params`` for exactly the momentum tensors a checkpoint did not fill:
    each missing ``<module>_m.<rest>`` key of ``model`` takes the value of ``<module>.<rest>``.
    Momentum tensors the checkpoint had (e.g. a fine-tuned file's ``cls_head_m``) are kept.

    Args:
        model (nn.Module): the model the checkpoint was loaded into.
        missing (Iterable[str]): the model keys the checkpoint did not fill.

    Returns:
        List[str]: the momentum keys copied.
    """
    model = getattr(model, "module", model)
    state = model.state_dict()
    done = []
    for key in missing:
        module, _, rest = key.partition(".")
        online = f"{module[:-2]}.{rest}"
        if module.endswith("_m") and key in state and online in state and state[online].shape == state[key].shape:
            state[key].copy_(state[online])
            done.append(key)
    return done


def ramped_alpha(alpha: float, warmup: bool, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """ALBEF's distillation weight: ramped linearly over epoch 0 when ``warmup`` is on
    (``alpha * min(1, step / steps_per_epoch)``), constant afterwards."""
    if warmup and epoch == 0:
        return alpha * min(1.0, step_in_epoch / max(steps_per_epoch, 1))
    return alpha


def save_results(
    results: Mapping[str, Mapping[str, float]],
    output_dir: Path,
    summary: Callable[[str, Mapping[str, float]], str],
) -> None:
    """The end of every recipe: log each split's metrics, then on rank 0 write
    ``output_dir/results.json`` and print one ``[split] <summary>`` line per split.

    Args:
        results (Mapping[str, Mapping[str, float]]): metrics by split.
        output_dir (Path): where ``results.json`` goes.
        summary (Callable[[str, Mapping[str, float]], str]): ``(split, metrics) -> line``.
    """
    for split, metrics in results.items():
        _logger.info(f"{split}: " + json.dumps({k: round(v, 2) for k, v in metrics.items()}))
    if is_main_process():
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        for split, metrics in results.items():
            print(f"[{split}] {summary(split, metrics)}")


def load_recipe(path: Path) -> ModuleType:
    """A recipe script (``examples/<family>/<name>.py``) as a module, loaded once under the name
    ``<family>_<name>`` (registered in ``sys.modules``: its config dataclasses resolve their module
    by name). Method entry points (``examples/pela``, ``examples/elip``, ``examples/das``) run an
    ALBEF recipe this way instead of copying its loop."""
    path = Path(path).resolve()
    name = f"{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def with_default_config(argv: Optional[Sequence[str]], default_config: Path) -> List[str]:
    """The command line ``argv`` (``sys.argv[1:]`` when None) with ``--config default_config``
    in front unless it names a config itself."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv if "--config" in argv else ["--config", str(default_config), *argv]


def run_recipe(path: Path, default_config: Path, argv: Optional[Sequence[str]] = None) -> Any:
    """Run the recipe script at ``path`` with another default config: its ``main``, called with
    :func:`with_default_config`."""
    return load_recipe(path).main(with_default_config(argv, default_config))


class RecipeStart(NamedTuple):
    """What :func:`start_recipe` returns.

    Attributes:
        args (argparse.Namespace): the parsed command line.
        cfg (Any): the loaded config dataclass.
        output_dir (Path): ``--output-dir`` or ``cfg.output_dir`` (created on rank 0).
        dist (DistInfo): rank, world size and device.
    """

    args: argparse.Namespace
    cfg: Any
    output_dir: Path
    dist: DistInfo


def start_recipe(
    argv: Optional[List[str]],
    default_config: Path,
    config_cls: type,
    builder: Callable[..., nn.Module],
    description: Optional[str] = None,
) -> RecipeStart:
    """The first steps of every recipe: parse the command line, load the config (unknown keys
    are errors), check ``cfg.model`` against the builder's keyword arguments and each enabled
    efficiency-method section against its apply-function's, switch to bitwise reproducible
    fp32 training when ``train.deterministic`` is set, join the process
    group (torchrun or a single process), seed each rank, and save the resolved config to the
    output directory.

    Args:
        argv (Optional[List[str]]): command-line arguments (``sys.argv[1:]`` when None).
        default_config (Path): the config used without ``--config``.
        config_cls (type): the recipe's config dataclass (with ``model``, ``train``, ``output_dir``).
        builder (Callable[..., nn.Module]): the model builder ``cfg.model`` is passed to.
        description (Optional[str]): ``--help`` text (the recipe's docstring).

    Returns:
        RecipeStart
    """
    args = parse_args(argv, default_config, description=description)
    cfg = load_config(args.config, config_cls, args.opts)
    check_kwargs(builder, cfg.model, "model")
    from torchmm_ext.engine.efficiency import check_method_sections  # efficiency imports this module

    check_method_sections(cfg)
    if getattr(cfg.train, "deterministic", False):
        if cfg.train.precision == "bf16":
            raise ConfigError("train.deterministic needs fp32 (bf16 kernels are not bitwise reproducible): "
                              "set train.precision=fp32 or auto")
        cfg.train.precision = "fp32"
        use_deterministic_training()
    output_dir = Path(args.output_dir or cfg.output_dir)
    dist = init_distributed()
    seed_everything(cfg.train.seed, dist.rank)
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    return RecipeStart(args, cfg, output_dir, dist)


def finetune_classifier(
    model: nn.Module,
    train_loader: Iterable,
    eval_sets: Mapping[str, Dataset],
    collate: Callable,
    cfg: Any,
    args: argparse.Namespace,
    dist: DistInfo,
    output_dir: Path,
    select_split: str,
) -> Dict[str, Dict[str, float]]:
    """The classification recipes' (SNLI-VE, NLVR2) training and evaluation.

    Trains with the model's loss (cross-entropy, distilled from the momentum copy with the
    ramped ``cfg.loss.alpha``), keeps the checkpoint best by accuracy on ``select_split``, then
    scores every split of ``eval_sets``, each rank its own shard, and saves the results.

    Args:
        model (nn.Module): a classifier called as ``model(image, input_ids, attention_mask,
            labels, alpha)`` returning ``.loss`` and ``.logits``; moved to ``dist.device`` here.
        train_loader (Iterable): training batches with ``image``, ``input_ids``,
            ``attention_mask`` and ``idx`` (the labels).
        eval_sets (Mapping[str, Dataset]): evaluation splits by name.
        collate (Callable): the evaluation batches' collate function.
        cfg (Any): the recipe config (``train``, ``eval.batch_size``, ``loss.alpha``,
            ``loss.alpha_warmup``).
        args (argparse.Namespace): the command line (``evaluate``, ``resume``).
        dist (DistInfo): the process group of :func:`start_recipe`.
        output_dir (Path): checkpoints, logs and ``results.json``.
        select_split (str): the split that picks the best checkpoint (if present).

    Returns:
        Dict[str, Dict[str, float]]: ``{split: {"acc", "num_samples"}}``.
    """
    model.to(dist.device)
    train_model = wrap_ddp(model, dist, cfg.train.find_unused_parameters)

    def evaluate(split: str) -> Dict[str, float]:
        dataset = eval_sets[split]
        shard = Subset(dataset, rank_shard(len(dataset), dist.rank, dist.world_size))
        loader = build_eval_dataloader(shard, cfg.eval.batch_size, cfg.train.num_workers, collate)
        return classification_accuracy(model, loader, dist.device,
                                       lambda: autocast_context(dist.device, cfg.train.precision))

    def step_fn(model: nn.Module, batch: Dict[str, Tensor], ctx: StepContext) -> StepOutput:
        alpha = ramped_alpha(cfg.loss.alpha, cfg.loss.alpha_warmup, ctx.epoch, ctx.step_in_epoch,
                             ctx.steps_per_epoch)
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["idx"], alpha)
        acc = (out.logits.argmax(dim=-1) == batch["idx"]).float().mean()
        return StepOutput(out.loss, {"train_acc": acc})

    if not args.evaluate:
        from torchmm_ext.engine.efficiency import method_step_hooks  # (imports this module)

        # methods acting during training (the DAS search) score batches of the selection split
        step_hooks = method_step_hooks(model, lambda: eval_sets.get(select_split), collate,
                                       cfg.train.batch_size, f"the {select_split} split")
        train_and_reload_best(
            model=model, train_model=train_model, loader=train_loader, step_fn=step_fn,
            train_cfg=cfg.train, device=dist.device, output_dir=output_dir,
            config_dict=config_to_dict(cfg),
            evaluate_fn=(lambda epoch: evaluate(select_split)) if select_split in eval_sets else None,
            best_metric_key="acc", resume=args.resume, step_hooks=step_hooks,
        )

    results = {split: evaluate(split) for split in eval_sets}
    save_results(results, output_dir, lambda split, m: f"acc {m['acc']:.2f}")
    return results
