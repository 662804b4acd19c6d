"""The convention every efficiency method follows: how it finds a model's blocks, and how a
model remembers which methods changed it.

Block groups. A model exposes its block lists with ``block_groups() -> Dict[str, nn.ModuleList]`` (ALBEF:
``vision``, ``text``, ``fusion``; ViLT: ``transformer``; METER: ``text_fusion``,
``image_fusion``). A model without that method is described by module paths instead
(``{"vision": "vision_encoder.blocks"}`` or ``["encoder.layer"]``). Every apply-function
(:func:`~torchmm_ext.modules.low_rank.apply_low_rank`,
:func:`~torchmm_ext.modules.token_pruning.apply_token_pruning`,
:func:`~torchmm_ext.modules.adapters.apply_das`) resolves its ``groups`` argument with
:func:`resolve_block_groups`, so all three accept the same forms.

The record. An apply-function ends with :func:`record_method`, which stores its name and
settings on the model (``model.efficiency_methods``, a plain attribute, not a tensor). Checkpoint
writers save that record next to the weights (``{"model": ..., "methods": ...}``), and
:func:`torchmm_ext.engine.efficiency.prepare_model` reads it back to restructure a fresh model
before it loads such a checkpoint.
"""

import copy
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from torch import nn

BlockGroups = Dict[str, nn.ModuleList]
GroupSpec = Union[None, str, Sequence[str], Mapping[str, str]]


def _module_at(model: nn.Module, path: str) -> nn.ModuleList:
    try:
        module = model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"{type(model).__name__} has no module at {path!r} ({err}); give the dotted path of "
            "an nn.ModuleList of blocks, e.g. 'vision_encoder.blocks'"
        ) from None
    if not isinstance(module, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}.{path} is a {type(module).__name__}, not an nn.ModuleList of blocks"
        )
    return module


def resolve_block_groups(model: nn.Module, groups: GroupSpec = None) -> BlockGroups:
    """The block lists a method works on.

    Args:
        model (nn.Module): any model.
        groups (GroupSpec): ``None`` for all of ``model.block_groups()``; a group name or a list
            of names to select from it; or, for models without ``block_groups()`` (or to
            override it), module paths: a mapping ``{name: "dotted.path"}``, or a list of paths
            (each path then names its group). A string or list item that is not a group name
            but contains a dot is taken as a path.

    Returns:
        BlockGroups: ``{name: nn.ModuleList}`` in the order given (or the model's order).

    Raises:
        ValueError: the model has no ``block_groups()`` and no paths were given; a name the
            model does not know (the message lists the known ones); a path that is not an
            ``nn.ModuleList``.
    """
    known: BlockGroups = dict(model.block_groups()) if hasattr(model, "block_groups") else {}
    if isinstance(groups, Mapping):
        return {name: _module_at(model, path) for name, path in groups.items()}
    if groups is None:
        if not known:
            raise ValueError(
                f"{type(model).__name__} has no block_groups() method: pass the block lists as "
                "module paths, e.g. groups={'vision': 'vision_encoder.blocks'}"
            )
        return known
    names = [groups] if isinstance(groups, str) else list(groups)
    resolved: BlockGroups = {}
    for name in names:
        if name in known:
            resolved[name] = known[name]
        elif "." in name or not known:
            resolved[name] = _module_at(model, name)
        else:
            raise ValueError(
                f"unknown block group {name!r} for {type(model).__name__}; its groups are "
                f"{sorted(known)} (or give a module path such as 'vision_encoder.blocks')"
            )
    return resolved


def module_path(model: nn.Module, module: nn.Module) -> Optional[str]:
    """The dotted name of ``module`` inside ``model`` (``None`` when it is not a submodule).

    Methods use it to find a block list's momentum twin (``vision_encoder.blocks`` ->
    ``vision_encoder_m.blocks``)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def momentum_twin(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The momentum (EMA) copy of the module at ``path``: the same path with ``_m`` appended to
    its first component (ALBEF's naming, ``text_encoder.encoder.layer`` ->
    ``text_encoder_m.encoder.layer``), or ``None`` when the model has no such copy."""
    head, _, rest = path.partition(".")
    twin = f"{head}_m" + (f".{rest}" if rest else "")
    try:
        return model.get_submodule(twin)
    except AttributeError:
        return None


METHODS_ATTRIBUTE = "efficiency_methods"


def record_method(model: nn.Module, name: str, settings: Mapping[str, Any]) -> None:
    """Remember on ``model`` that method ``name`` changed it with ``settings`` (plain values:
    they are saved in checkpoints and compared when one is loaded). Applying a method twice
    is an error: the second application would act on an already changed model."""
    record = applied_methods(model)
    if name in record:
        raise ValueError(
            f"{name} was already applied to this {type(model).__name__} (with {record[name]}); "
            "build a fresh model to apply it with other settings"
        )
    record[name] = copy.deepcopy(dict(settings))
    setattr(_unwrap(model), METHODS_ATTRIBUTE, record)


def applied_methods(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """The methods recorded on ``model`` (DDP/compile wrappers unwrapped), in the order
    applied: ``{name: settings}`` (a copy)."""
    return copy.deepcopy(dict(getattr(_unwrap(model), METHODS_ATTRIBUTE, {})))


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
