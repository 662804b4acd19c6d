"""The one library call through which efficiency methods enter a recipe.

A recipe config that inherits :class:`MethodsConfig` gains three optional sections whose keys
are the keyword arguments of the method's apply-function::

    low_rank: {ratio: 3, init: svd}                          # PELA   -> apply_low_rank
    token_pruning: {begin_layers: [1, 2], keep_ratios: [0.75, 0.5]}   # ELIP -> apply_token_pruning
    das: {skip: {fusion: [1]}, adapter_dim: 96}               # DAS    -> apply_das

and calls :func:`prepare_model` where it used to call
:func:`~torchmm_ext.engine.recipe_utils.initialize_weights`, always before the optimizer is
made. The order of weights and methods is automatic: a checkpoint records the methods that made
it (``"methods"``, written by every checkpoint writer from the model's record), so

* methods the checkpoint already has restructure the fresh model first (PELA without SVD,
  DAS adapters in place), then the checkpoint loads into that structure;
* methods only the config asks for are applied after the load, to the loaded weights (PELA's
  SVD of the loaded full-rank weights).

The same sections work in every recipe, so the methods compose (applied in
:data:`METHOD_ORDER`).
"""

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from torch import nn

from torchmm_ext.checkpoints.primitives import PathLike
from torchmm_ext.engine.checkpoint import unwrap_model
from torchmm_ext.engine.config import check_kwargs, ConfigError
from torchmm_ext.engine.recipe_utils import initialize_weights, InitConfig
from torchmm_ext.modules.efficiency import applied_methods

# name -> (module, apply-function, overrides that only restructure, keys that need not match
# between a checkpoint's record and the config)
_METHODS: Dict[str, tuple] = {
    "low_rank": ("torchmm_ext.modules.low_rank", "apply_low_rank", {"init": "none"}, ("init",)),
    "das": ("torchmm_ext.modules.adapters", "apply_das", {}, ()),
    "token_pruning": ("torchmm_ext.modules.token_pruning", "apply_token_pruning", {}, ()),
}
METHOD_ORDER: Sequence[str] = tuple(_METHODS)
# Methods that change no weight or parameter name (ELIP only installs token reducers): a
# checkpoint's record of one does not restructure the model, the config alone decides whether
# the run uses it (ELIP pre-trains with pruning and fine-tunes without).
WEIGHTLESS_METHODS: Sequence[str] = ("token_pruning",)


@dataclass
class MethodsConfig:
    """The efficiency-method sections every recipe config has (inherit it). Each is ``None``
    (method off) or the keyword arguments of the method's apply-function.

    Attributes:
        low_rank: :func:`torchmm_ext.modules.low_rank.apply_low_rank` kwargs (PELA).
        token_pruning: :func:`torchmm_ext.modules.token_pruning.apply_token_pruning` kwargs (ELIP).
        das: :func:`torchmm_ext.modules.adapters.apply_das` kwargs (DAS).
    """

    low_rank: Optional[Dict[str, Any]] = None
    token_pruning: Optional[Dict[str, Any]] = None
    das: Optional[Dict[str, Any]] = None


def apply_function(name: str) -> Callable[..., Any]:
    """The apply-function of method ``name`` (imported on first use)."""
    if name not in _METHODS:
        raise ConfigError(f"unknown efficiency method {name!r}; known: {', '.join(METHOD_ORDER)}")
    module, function, _, _ = _METHODS[name]
    return getattr(importlib.import_module(module), function)


def method_sections(cfg: Any) -> Dict[str, Dict[str, Any]]:
    """The enabled method sections of a recipe config, in :data:`METHOD_ORDER`."""
    return {name: dict(getattr(cfg, name)) for name in METHOD_ORDER if getattr(cfg, name, None) is not None}


def check_method_sections(cfg: Any) -> None:
    """Every key of every enabled section must be a keyword of its apply-function.

    Raises:
        ConfigError: naming the unknown key and listing the valid ones.
    """
    for name, kwargs in method_sections(cfg).items():
        check_kwargs(apply_function(name), kwargs, name, exclude=("model",))


def apply_methods(
    model: nn.Module,
    sections: Mapping[str, Mapping[str, Any]],
    *,
    restructure_only: bool = False,
) -> Dict[str, Any]:
    """Apply the given methods to ``model`` in :data:`METHOD_ORDER`.

    Args:
        model (nn.Module): the model (changed in place).
        sections (Mapping[str, Mapping[str, Any]]): ``{method: apply kwargs}``.
        restructure_only (bool): change only the structure, for a checkpoint of the changed
            model to load into (e.g. PELA with ``init="none"``).

    Returns:
        Dict[str, Any]: each method's report, by name.
    """
    reports = {}
    for name in METHOD_ORDER:
        if name not in sections:
            continue
        kwargs = dict(sections[name])
        if restructure_only:
            kwargs.update(_METHODS[name][2])
        reports[name] = apply_function(name)(model, **kwargs)
    return reports


def recorded_methods(path: Optional[PathLike]) -> Dict[str, Dict[str, Any]]:
    """The methods a checkpoint file says made it (its ``"methods"`` entry); ``{}`` for a plain
    checkpoint or no path. A file without the entry but with low-rank factor pairs (a published
    PELA checkpoint) gets the record :func:`torchmm_ext.checkpoints.pela.infer_methods` infers."""
    from torchmm_ext.checkpoints.pela import infer_methods  # a published PELA file: no record

    if isinstance(path, Mapping):  # an in-memory state dict (NLVR2's dual-image conversion)
        return infer_methods(path) if path else {}
    if not path:
        return {}
    from torchmm_ext.checkpoints.primitives import load_checkpoint_metadata

    recorded = load_checkpoint_metadata(Path(path)).get("methods")
    if recorded:
        return dict(recorded)

    return infer_methods(path)


def _check_record_matches(name: str, recorded: Mapping[str, Any], configured: Mapping[str, Any],
                          checkpoint: PathLike) -> None:
    ignore = set(_METHODS[name][3])
    for key in sorted((set(recorded) | set(configured)) - ignore):
        if key in configured and key in recorded and configured[key] != recorded[key]:
            raise ConfigError(
                f"{checkpoint} was made with {name}.{key}={recorded[key]!r} but the config sets "
                f"{name}.{key}={configured[key]!r}: set --opts {name}.{key}={recorded[key]!r} to "
                f"load it (or start from a checkpoint without {name})"
            )


def prepare_model(
    model: nn.Module,
    cfg: Any,
    checkpoint: Optional[str] = None,
    head_prefixes: Sequence[str] = (),
    log: Optional[Callable[[str], None]] = None,
    after_load: Optional[Callable[[], Any]] = None,
) -> Dict[str, Any]:
    """Load a recipe's starting weights and apply its efficiency methods, in the right order.

    Methods recorded in ``checkpoint`` restructure the model first (with the recorded settings;
    a config section for the same method must agree with them; a method of
    :data:`WEIGHTLESS_METHODS` is only logged, its config section alone decides), then
    :func:`~torchmm_ext.engine.recipe_utils.initialize_weights` loads ``cfg.init`` and the
    checkpoint, then the methods only the config enables are applied to the loaded weights.
    Call it before building the optimizer.

    Args:
        model (nn.Module): the freshly built model.
        cfg (Any): the recipe config (``init`` and the :class:`MethodsConfig` sections).
        checkpoint (Optional[str]): the resolved ``--checkpoint`` / ``init.checkpoint``.
        head_prefixes (Sequence[str]): task-head key prefixes for
            :func:`~torchmm_ext.engine.recipe_utils.load_task_head`.
        log (Optional[Callable[[str], None]]): where reports go (``logger.info``).
        after_load (Optional[Callable[[], Any]]): what the recipe does to the loaded weights
            before the config-only methods change the model (VQA: the answer decoder copied
            from the fusion layers).

    Returns:
        Dict[str, Any]: the reports of the methods applied after the load, by name.

    Raises:
        ConfigError: a config section disagrees with the checkpoint's record.
    """
    log = log or (lambda message: None)
    configured = method_sections(cfg)
    recorded = recorded_methods(checkpoint)
    for name in [n for n in recorded if n in WEIGHTLESS_METHODS]:
        log(f"{checkpoint} was made with {name} {recorded.pop(name)}; it changes no weights, so this "
            f"run uses it only if its config has a {name} section")
    for name in recorded:
        if name in configured:
            _check_record_matches(name, recorded[name], configured[name], checkpoint)
    if recorded:
        apply_methods(model, recorded, restructure_only=True)
        log(f"{checkpoint} was made with {', '.join(recorded)}: the model is restructured before loading")
    init: InitConfig = getattr(cfg, "init", InitConfig())
    initialize_weights(model, init, checkpoint, head_prefixes=head_prefixes, log=log)
    if after_load is not None:
        after_load()
    after = {name: kwargs for name, kwargs in configured.items() if name not in recorded}
    reports = apply_methods(model, after)
    for name, report in reports.items():
        log(f"{name} applied:\n{report.format() if hasattr(report, 'format') else report}")
    return reports


def checkpoint_methods(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """The ``"methods"`` entry a checkpoint writer stores for ``model`` (its record)."""
    return applied_methods(model)


def method_step_hooks(
    model: nn.Module,
    heldout_set: Callable[[], Any],
    collate_fn: Callable,
    batch_size: int,
    name: str,
) -> List[Any]:
    """The training-loop hooks of the methods installed on ``model`` (the DAS search: any
    submodule with ``make_step_hook``), each given the recipe's held-out data; pass them to
    :func:`~torchmm_ext.engine.fit.train_and_reload_best` as ``step_hooks``. Empty (and
    ``heldout_set`` never called) when no method needs one.

    Args:
        model (nn.Module): the model (DDP wrappers unwrapped here).
        heldout_set (Callable[[], Any]): builds the validation split read like the training
            split (a dataset of training records).
        collate_fn (Callable): the training collator.
        batch_size (int): records per held-out batch.
        name (str): what the held-out data is (file), for messages.

    Raises:
        ConfigError: a method needs held-out data and the recipe has none.
    """
    makers = [m.make_step_hook for m in unwrap_model(model).modules() if callable(getattr(m, "make_step_hook", None))]
    if not makers:
        return []
    dataset = heldout_set()
    if dataset is None:
        raise ConfigError(f"{', '.join(applied_methods(model))} needs held-out batches during training, "
                          f"but the recipe has no validation split ({name})")
    return [make(dataset, collate_fn, batch_size, name) for make in makers]
