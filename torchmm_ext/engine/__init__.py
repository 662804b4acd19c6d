"""Training engine: configs, distributed setup, optimizer/schedule, precision, checkpoints,
logging and the shared epoch loop."""

from torchmm_ext.engine.checkpoint import (
    BEST_CHECKPOINT,
    build_train_state,
    CheckpointError,
    epoch_checkpoint_name,
    extract_state_dict,
    LAST_CHECKPOINT,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    LoadReport,
    resolve_resume_path,
    restore_train_state,
    ResumeInfo,
    save_checkpoint,
    unwrap_model,
)
from torchmm_ext.engine.config import (
    add_config_args,
    check_kwargs,
    config_from_dict,
    config_to_dict,
    ConfigError,
    load_config,
    parse_args,
    save_config,
)
from torchmm_ext.engine.distributed import (
    all_gather_no_grad,
    all_gather_object,
    all_gather_with_grad,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    destroy,
    DistInfo,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    leaves_parameters_unused,
    seed_everything,
    wrap_ddp,
)
from torchmm_ext.engine.metric_logging import get_logger, MetricLogger
from torchmm_ext.engine.optim import (
    build_cosine_scheduler,
    build_optimizer,
    ParamSplit,
    split_decay_params,
)
from torchmm_ext.engine.precision import autocast_context, cpu_has_fast_bf16, resolve_precision
from torchmm_ext.engine.train_loop import (
    EpochResult,
    move_to_device,
    NonFiniteLossError,
    StepContext,
    StepOutput,
    steps_in_epoch,
    train_one_epoch,
)

__all__ = [
    # config
    "ConfigError", "load_config", "config_from_dict", "check_kwargs", "config_to_dict",
    "save_config", "add_config_args", "parse_args",
    # distributed
    "DistInfo", "init_distributed", "get_rank", "get_world_size", "is_main_process",
    "barrier", "cleanup", "destroy", "all_gather_no_grad", "all_gather_with_grad",
    "all_gather_object", "all_reduce_sum", "all_reduce_mean", "broadcast_object",
    "seed_everything", "wrap_ddp", "leaves_parameters_unused",
    # precision
    "autocast_context", "resolve_precision", "cpu_has_fast_bf16",
    # optim
    "build_optimizer", "build_cosine_scheduler", "split_decay_params", "ParamSplit",
    # checkpoint
    "save_checkpoint", "load_checkpoint", "build_train_state", "restore_train_state",
    "ResumeInfo", "load_model_weights", "LoadReport", "extract_state_dict", "unwrap_model",
    "CheckpointError", "latest_checkpoint", "resolve_resume_path", "epoch_checkpoint_name",
    "LAST_CHECKPOINT", "BEST_CHECKPOINT",
    # logging
    "MetricLogger", "get_logger",
    # loop
    "train_one_epoch", "StepContext", "StepOutput", "EpochResult", "NonFiniteLossError",
    "move_to_device", "steps_in_epoch",
]
