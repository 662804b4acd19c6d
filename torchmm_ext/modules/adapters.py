"""DAS (Dynamic Architecture Skipping): bottleneck adapters, parallel adapters in kept blocks,
skip adapters in place of whole blocks, and :func:`apply_das`, which puts them on any model.

As published (DoubtedSteam/DAS, ``Adapter_Layer`` / ``ParallelAdapter``):

* :class:`BottleneckAdapter` = LayerNorm (eps 1e-5) -> Linear(d, r) -> ReLU -> Linear(r, d),
  scale 1.0, BERT initialisation (weights normal(0, 0.02), biases 0, LayerNorm 1/0). The
  up-projection is *not* zero, so a fresh adapter is not an identity.
* Parallel adapters (r = 96) sit beside every sub-layer of a kept block and read that
  sub-layer's raw residual input:

  - pre-norm block (ViT, ViLT): ``h = x + attn(ln1(x)) + a0(x)``; ``y = h + mlp(ln2(h)) + a1(h)``;
  - post-norm block (BERT text layer, METER): ``h = ln1(x + attn(x) + a0(x))``;
    ``y = ln2(h + ffn(h)) + a1(h)`` (the feed-forward adapter is added *after* its LayerNorm);
  - fusion layer (self-attention, cross-attention, FFN; post-norm): the same with three
    adapters, the second inside the cross-attention's LayerNorm.

* A skipped block becomes ``x + adapter(x)`` with ``r = 96 x`` the number of parallel
  adapters the block would have had (192 for a ViT/text block, 288 for a fusion layer), so the
  trainable parameter count hardly depends on how many blocks are skipped.

Blocks are recognised by type (torchmultimodal's ``TransformerEncoderLayer``, pre- or
post-norm, and our :class:`~torchmm_ext.modules.text_encoder.FusionLayer`); other block types
are added with :func:`register_das_block`. A kept block keeps its own weights and state-dict
keys (its class becomes the adapter-aware subclass, which adds an ``adapters`` list), so
checkpoint conversions and other methods keep working on it; a skipped block is gone (its
weights are not kept: it is never run).

During the search (:mod:`torchmm_ext.modules.das_search`) every candidate is a
:class:`SkippableBlock` that runs either the adapted block or its skip adapter.
"""

import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn, Tensor
from torchmultimodal.modules.layers.transformer import TransformerEncoderLayer

from torchmm_ext.modules.efficiency import (
    GroupSpec,
    module_path,
    momentum_twin,
    record_method,
    resolve_block_groups,
)
from torchmm_ext.modules.text_encoder import FusionLayer

SkipSpec = Union[None, Mapping[str, Sequence[int]], Sequence[int]]

#: Parameters (besides adapters) that train under DAS: a parameter trains when every name it
#: has matches one of these shell patterns in one of its dotted components, and it trained
#: before (momentum copies, which are EMA-updated, never do). The published list is
#: ``classifier, pooler, token_type_embeddings, rank_output, adapter`` (ViLT's and METER's
#: modality embedding is their ``token_type_embeddings``; ours is ``modality_embeddings``);
#: ALBEF's heads are ``itm_head``, ``cls_head``, the answer decoder's ``lm_head`` and the ITC
#: projections and temperature.
DEFAULT_TRAINABLE: Tuple[str, ...] = (
    "*head",
    "*pooler*",
    "*classifier*",
    "token_type_embeddings",
    "modality_embeddings",
    "rank_output",
    "vision_proj",
    "text_proj",
    "temp",
)


class BottleneckAdapter(nn.Module):
    """DAS's bottleneck adapter without residual: ``scale * up(relu(down(layer_norm(x))))``.

    Args:
        dim (int): token width ``d``.
        bottleneck (int): hidden width ``r`` (96 for a parallel adapter).
        scale (float): output scale (1.0 as published).
        layer_norm_eps (float): the input LayerNorm's epsilon (PyTorch's default 1e-5, as
            published).
        init_std (float): std of the normal initialisation of both projections (0.02).

    Inputs:
        x (Tensor): ``[..., d]``.

    Returns:
        Tensor: ``[..., d]`` (add it to a residual stream).
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 96,
        scale: float = 1.0,
        layer_norm_eps: float = 1e-5,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale = scale
        for linear in (self.down_proj, self.up_proj):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up_proj(torch.relu(self.down_proj(self.layer_norm(x)))) * self.scale


class ParallelAdapterEncoderLayer(TransformerEncoderLayer):
    """torchmultimodal's ``TransformerEncoderLayer`` with a parallel adapter beside the
    attention (``adapters[0]``) and the feed-forward block (``adapters[1]``), each reading its
    sub-layer's residual input. Made from an existing layer by :func:`apply_das`."""

    adapters: nn.ModuleList

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        a0, a1 = self.adapters
        x = hidden_states
        if self.norm_first:  # ViLT's Block: x + attn(ln(x)) + a0(x)
            h = x + self._attention_block(self.attention_layernorm(x), attention_mask) + a0(x)
            return h + self._feedforward_block(self.feedforward_layernorm(h)) + a1(h)
        # post-norm (METER's BertSelfOutput / feed_forward_chunk)
        h = self.attention_layernorm(x + self._attention_block(x, attention_mask) + a0(x))
        return self.feedforward_layernorm(h + self._feedforward_block(h)) + a1(h)


class ParallelAdapterFusionLayer(FusionLayer):
    """:class:`~torchmm_ext.modules.text_encoder.FusionLayer` with parallel adapters beside the
    self-attention, the cross-attention and the feed-forward block (METER's
    ``BertCrossLayer`` with ``ParallelAdapter`` s). Same inputs and outputs as ``FusionLayer``."""

    adapters: nn.ModuleList

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        text_mask: Tensor,
        image_embeddings: Tensor,
        image_index: Optional[Tensor] = None,
        image_mask: Optional[Tensor] = None,
        return_cross_attention: bool = False,
        first_token_only: bool = False,
        image_runs: Optional[Sequence[int]] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        a0, a1, a2 = self.adapters
        x, attended = self._self_attention_output(x, text_mask, first_token_only)
        x = self.attention_layernorm(x + attended + a0(x))
        cross, probs = self._cross_attention_output(
            x, image_embeddings, image_index, image_mask, return_cross_attention, image_runs
        )
        x = self.cross_attention_layernorm(x + cross + a1(x))
        x = self.feedforward_layernorm(x + self.feedforward_dropout(self.feedforward(x))) + a2(x)
        return x, probs


class SkipAdapter(nn.Module):
    """What replaces a skipped block: ``x + adapter(x)``, called like the block it replaces
    (extra arguments such as masks are ignored) and returning a tensor.

    Args:
        dim (int): token width.
        bottleneck (int): adapter width (96 x the block's number of parallel adapters).
    """

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.adapter = BottleneckAdapter(dim, bottleneck)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x + self.adapter(x)


class FusionSkipAdapter(SkipAdapter):
    """A skipped :class:`FusionLayer`: returns ``(x + adapter(x), None)`` like the layer, and
    only the first token when the caller asks for ``first_token_only``."""

    def forward(self, x: Tensor, *args: Any, first_token_only: bool = False,  # type: ignore[override]
                **kwargs: Any) -> Tuple[Tensor, None]:
        if first_token_only:
            x = x[:, :1]
        return x + self.adapter(x), None


class SkippableBlock(nn.Module):
    """A search candidate: runs ``block`` or, while ``skipped`` is set, ``skip`` instead (the
    block is then not executed at all).

    Args:
        block (nn.Module): the block with its parallel adapters.
        skip (nn.Module): its skip adapter.
    """

    def __init__(self, block: nn.Module, skip: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.skip = skip
        self.skipped = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.skip if self.skipped else self.block)(*args, **kwargs)


class DASBlockType(NamedTuple):
    """How DAS treats one block type.

    Attributes:
        adapted_class (Type[nn.Module]): subclass of the block type whose forward uses
            ``self.adapters``; a kept block's class becomes this one.
        num_adapters (int): parallel adapters per block (also the skip adapter's width factor).
        skip_class (Type[SkipAdapter]): what replaces a skipped block.
    """

    adapted_class: Type[nn.Module]
    num_adapters: int
    skip_class: Type[SkipAdapter]


_BLOCK_TYPES: Dict[Type[nn.Module], DASBlockType] = {}


def register_das_block(block_class: Type[nn.Module], spec: DASBlockType) -> None:
    """Teach :func:`apply_das` a block type of your own model: ``spec.adapted_class`` must
    subclass ``block_class`` and read its adapters from ``self.adapters``."""
    if not issubclass(spec.adapted_class, block_class):
        raise TypeError(f"{spec.adapted_class.__name__} must subclass {block_class.__name__}")
    _BLOCK_TYPES[block_class] = spec


register_das_block(TransformerEncoderLayer, DASBlockType(ParallelAdapterEncoderLayer, 2, SkipAdapter))
register_das_block(FusionLayer, DASBlockType(ParallelAdapterFusionLayer, 3, FusionSkipAdapter))


def das_block_type(block: nn.Module) -> DASBlockType:
    """The registered :class:`DASBlockType` of ``block`` (its most specific registered base).

    Raises:
        TypeError: the block type is unknown (the message says how to register it).
    """
    for cls in type(block).__mro__:
        if cls in _BLOCK_TYPES:
            return _BLOCK_TYPES[cls]
    raise TypeError(
        f"DAS does not know blocks of type {type(block).__name__}; known: "
        f"{', '.join(c.__name__ for c in _BLOCK_TYPES)}. Register it with "
        "torchmm_ext.modules.adapters.register_das_block"
    )


def _block_width(block: nn.Module) -> int:
    for module in block.modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
    raise TypeError(f"cannot infer the width of a {type(block).__name__}: it has no LayerNorm")


def _placed_like(module: nn.Module, reference: nn.Module) -> nn.Module:
    param = next(reference.parameters(), None)
    return module if param is None else module.to(device=param.device, dtype=param.dtype)


def add_parallel_adapters(block: nn.Module, bottleneck: int = 96) -> nn.Module:
    """Give ``block`` (in place) its parallel adapters; returns it. Its weights and state-dict
    keys stay; ``adapters.{i}.*`` keys are added."""
    spec = das_block_type(block)
    if isinstance(block, spec.adapted_class):
        raise ValueError(f"this {type(block).__name__} already has parallel adapters")
    width = _block_width(block)
    adapters = nn.ModuleList(BottleneckAdapter(width, bottleneck) for _ in range(spec.num_adapters))
    block.__class__ = spec.adapted_class
    block.adapters = _placed_like(adapters, block)
    return block


def make_skip_adapter(block: nn.Module, adapter_dim: int = 96) -> SkipAdapter:
    """The skip adapter for ``block``: width ``adapter_dim x`` its number of parallel adapters."""
    spec = das_block_type(block)
    return _placed_like(spec.skip_class(_block_width(block), adapter_dim * spec.num_adapters), block)


# --- which blocks to skip ---------------------------------------------------------------------


def normalize_skip(skip: SkipSpec, group_sizes: Mapping[str, int], key: str = "das.skip") -> Dict[str, List[int]]:
    """``{group: sorted indices}`` from a skip spec, checked against the groups.

    Args:
        skip (SkipSpec): ``{group: [indices]}``; or a flat list of indices into the groups
            concatenated in order (ViLT's ``skip_module=[...]``; METER's 0-5 text side, 6-11
            image side when the groups are ``[text, image]``); ``None``: skip nothing.
        group_sizes (Mapping[str, int]): block count of each group, in order.
        key (str): the config key, for messages.

    Raises:
        ValueError: an unknown group, an index out of range, or a repeated index.
    """
    if skip is None:
        return {}
    if isinstance(skip, Mapping):
        grouped = {str(g): list(v) for g, v in skip.items()}
    else:
        offsets, flat_groups = [], []
        for name, size in group_sizes.items():
            offsets.append((name, len(flat_groups)))
            flat_groups += [name] * size
        grouped = {}
        for i in skip:
            if not isinstance(i, int) or not 0 <= i < len(flat_groups):
                raise ValueError(f"{key}: index {i!r} is outside 0..{len(flat_groups) - 1} (the "
                                 f"{len(flat_groups)} blocks of {dict(group_sizes)} in order)")
            name = flat_groups[i]
            grouped.setdefault(name, []).append(i - dict(offsets)[name])
    result: Dict[str, List[int]] = {}
    for name, indices in grouped.items():
        if name not in group_sizes:
            raise ValueError(f"{key}: unknown block group {name!r}; the groups DAS works on are "
                             f"{list(group_sizes)}")
        size = group_sizes[name]
        for i in indices:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size:
                raise ValueError(f"{key}.{name}: index {i!r} is outside 0..{size - 1} ({name} has {size} blocks)")
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise ValueError(f"{key}.{name}: index {repeated[0]} is given more than once ({indices})")
        if indices:
            result[name] = sorted(indices)
    return result


def _model_name(model: nn.Module) -> str:
    inner = getattr(model, "module", None)
    return type(inner if isinstance(inner, nn.Module) else model).__name__


def read_skip_file(path: Union[str, Path], model: nn.Module, group_sizes: Mapping[str, int]) -> Dict[str, List[int]]:
    """The skip list of a search output (``skip.json`` of ``examples/das/search.py``),
    checked against ``model``.

    Raises:
        FileNotFoundError: no such file (the message says how to make one).
        ValueError: not a DAS search output, or searched on another model class or other
            block groups.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"das.skip_from: {path} does not exist; run the search first "
            "(python examples/das/search.py --config ...) or give the list with das.skip"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"das.skip_from: {path} is not JSON ({err})") from None
    if not isinstance(record, dict) or "skip" not in record or "model" not in record:
        raise ValueError(f"das.skip_from: {path} is not a DAS search output (no 'skip'/'model' fields)")
    if record["model"] != _model_name(model):
        raise ValueError(
            f"das.skip_from: {path} was searched on {record['model']}, but this model is "
            f"{_model_name(model)}; search on this model (DAS skip lists are per backbone and task)"
        )
    searched = {g: n for g, n in record.get("group_sizes", {}).items() if g in record["skip"]}
    for name, size in searched.items():
        if group_sizes.get(name) != size:
            raise ValueError(
                f"das.skip_from: {path} was searched with {size} blocks in group {name!r}, but "
                f"this model has {group_sizes.get(name)}; field 'group_sizes' = {record['group_sizes']}"
            )
    return normalize_skip(record["skip"], group_sizes, key=f"{path}: skip")


# --- apply_das ----------------------------------------------------------------------------------


class DASReport(NamedTuple):
    """What :func:`apply_das` did.

    Attributes:
        skipped (Dict[str, List[int]]): skipped block indices by group.
        adapted (Dict[str, int]): blocks given parallel adapters, by group.
        candidates (List[Tuple[str, int]]): search candidates (empty without search).
        adapter_params (int): parameters of the online model's adapters.
        trainable_params (int): parameters that will receive gradients.
        total_params (int): all parameters of the model (momentum copies included).
        trainable_names (List[str]): the trainable parameters that are not adapters.
        momentum_mirrored (List[str]): momentum block lists given the same changes.
    """

    skipped: Dict[str, List[int]]
    adapted: Dict[str, int]
    candidates: List[Tuple[str, int]]
    adapter_params: int
    trainable_params: int
    total_params: int
    trainable_names: List[str]
    momentum_mirrored: List[str]

    def format(self) -> str:
        skipped = ", ".join(f"{g} {v}" for g, v in self.skipped.items()) or "none"
        lines = [
            f"DAS: skipped blocks: {skipped}; parallel adapters in {dict(self.adapted)}",
            f"  trainable {self.trainable_params:,} of {self.total_params:,} parameters "
            f"({100 * self.trainable_params / max(self.total_params, 1):.2f}%), adapters {self.adapter_params:,}",
            f"  other trainable: {', '.join(self.trainable_names) or 'none'}",
        ]
        if self.candidates:
            lines.append(f"  search candidates: {len(self.candidates)} ({self.candidates[0]} .. {self.candidates[-1]})")
        if self.momentum_mirrored:
            lines.append(f"  mirrored in the momentum copies: {', '.join(self.momentum_mirrored)}")
        return "\n".join(lines)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a DAS adapter (parallel or skip)."""
    parts = name.split(".")
    return "adapters" in parts or "adapter" in parts


def _transform_group(
    blocks: nn.ModuleList,
    skip: Sequence[int],
    candidates: Sequence[int],
    adapter_dim: int,
) -> List[Optional[SkippableBlock]]:
    """Adapters in place in one block list; returns the SkippableBlock of each candidate."""
    searchable: List[Optional[SkippableBlock]] = []
    for i in range(len(blocks)):
        block = blocks[i]
        if i in skip:
            blocks[i] = make_skip_adapter(block, adapter_dim)
            continue
        skip_adapter = make_skip_adapter(block, adapter_dim) if i in candidates else None
        add_parallel_adapters(block, adapter_dim)
        if skip_adapter is not None:
            blocks[i] = SkippableBlock(block, skip_adapter)
            searchable.append(blocks[i])
    return searchable


def apply_das(
    model: nn.Module,
    skip: SkipSpec = None,
    adapter_dim: int = 96,
    groups: GroupSpec = None,
    trainable: Sequence[str] = DEFAULT_TRAINABLE,
    mirror_momentum: bool = True,
    skip_from: Optional[str] = None,
    search: Optional[Mapping[str, Any]] = None,
    classifier_token: Optional[int] = None,
) -> DASReport:
    """Put DAS on ``model`` (in place): skipped blocks become skip adapters, the other blocks of
    ``groups`` get parallel adapters, and only adapters and heads train.

    Args:
        model (nn.Module): any model whose blocks are torchmultimodal
            ``TransformerEncoderLayer`` s, :class:`FusionLayer` s or registered types
            (:func:`register_das_block`).
        skip (SkipSpec): blocks to skip: ``{group: [indices]}`` or a flat index list over the
            groups in order.
        adapter_dim (int): parallel-adapter width (96); a skip adapter is this times the
            block's number of parallel adapters.
        groups (GroupSpec): the block lists DAS works on (:func:`resolve_block_groups`): group
            names of ``model.block_groups()``, module paths, or ``None`` for all groups.
        trainable (Sequence[str]): shell patterns of the non-adapter parameters that train
            (:data:`DEFAULT_TRAINABLE`); matched against each dotted component of a
            parameter's names. Parameters that were frozen before stay frozen.
        mirror_momentum (bool): give the momentum (``_m``) copies of the block lists the same
            skips and adapters (copied from the online ones), so that EMA updates pair the right
            parameters. Must be true when such copies exist (else: build the model without
            distillation).
        skip_from (Optional[str]): a ``skip.json`` of the search (instead of ``skip``).
        search (Optional[Mapping[str, Any]]): run the search instead of a fixed skip list:
            :class:`~torchmm_ext.modules.das_search.DASSearchConfig` keys (``skip_num``,
            ``groups`` of the candidates, ``das_step``, ``das_turn``, ...). The searcher is
            installed as ``model.das_search``; the recipe's training loop drives it.
        classifier_token (Optional[int]): METER-DAS's trainable classifier token
            (``token4classifier``): the id of the token whose embedding starts it (METER's
            RoBERTa ``<s>``: 0); the model must have ``add_classifier_token``
            (:meth:`~torchmm_ext.models.meter.METERModel.add_classifier_token`). It trains
            (``*classifier*``). ``None``: no such token (ALBEF, ViLT, METER without it).

    Returns:
        DASReport

    Raises:
        ValueError: bad skip indices or groups, ``skip`` together with ``skip_from`` or
            ``search``, momentum copies without ``mirror_momentum``.
        FileNotFoundError: ``skip_from`` does not exist.
        TypeError: a block type DAS does not know.
    """
    settings = {"skip": skip, "adapter_dim": adapter_dim, "groups": groups,
                "trainable": list(trainable), "mirror_momentum": mirror_momentum, "search": search,
                "classifier_token": classifier_token}
    resolved = resolve_block_groups(model, groups)
    sizes = {name: len(blocks) for name, blocks in resolved.items()}
    if skip_from is not None and skip is not None:
        raise ValueError("das: give the skip list either with das.skip or with das.skip_from, not both")
    if search is not None and (skip is not None or skip_from is not None):
        raise ValueError("das: das.search finds the skip list; do not also give das.skip/das.skip_from")
    skip_lists = read_skip_file(skip_from, model, sizes) if skip_from is not None else normalize_skip(skip, sizes)
    settings["skip"] = skip_lists  # recorded resolved: a checkpoint does not depend on the file

    search_cfg = None
    candidates: Dict[str, List[int]] = {}
    if search is not None:
        from torchmm_ext.modules.das_search import DASSearchConfig

        search_cfg = DASSearchConfig.from_mapping(search)
        for name in search_cfg.groups or list(resolved):
            if name not in resolved:
                raise ValueError(f"das.search.groups: {name!r} is not one of the DAS groups {list(resolved)}")
            candidates[name] = list(range(sizes[name]))

    paths = {name: module_path(model, blocks) for name, blocks in resolved.items()}
    twins = {name: momentum_twin(model, path) for name, path in paths.items() if path}
    twins = {name: twin for name, twin in twins.items() if isinstance(twin, nn.ModuleList)}
    if twins and not mirror_momentum:
        raise ValueError(
            f"{_model_name(model)} has momentum copies of {sorted(twins)}; DAS must mirror its skips "
            "and adapters there (das.mirror_momentum=true) or the model must be built without "
            "them (model.distill=false)"
        )

    if classifier_token is not None:
        if not callable(getattr(model, "add_classifier_token", None)):
            raise ValueError(f"das.classifier_token={classifier_token!r}: {_model_name(model)} has no "
                             "classifier token to add (METER-DAS's token4classifier; a model needs an "
                             "add_classifier_token method)")
        model.add_classifier_token(classifier_token)

    frozen_before = {id(p) for p in model.parameters() if not p.requires_grad}
    searchable: Dict[str, List[List[SkippableBlock]]] = {}
    for name, blocks in resolved.items():
        found = _transform_group(blocks, skip_lists.get(name, []), candidates.get(name, []), adapter_dim)
        searchable[name] = [[b] for b in found]
    mirrored = []
    for name, twin in twins.items():
        found = _transform_group(twin, skip_lists.get(name, []), candidates.get(name, []), adapter_dim)
        for pair, twin_block in zip(searchable[name], found):
            pair.append(twin_block)
        # the momentum copy's adapters start as the online ones (its own weights stay: they
        # may differ from the online model's)
        adapters = {k: v for k, v in resolved[name].state_dict().items() if is_adapter_parameter(k)}
        missing, unexpected = twin.load_state_dict(adapters, strict=False)
        if unexpected or any(is_adapter_parameter(k) for k in missing):
            raise RuntimeError(f"the momentum copy of {name} does not mirror its adapters: "
                               f"missing {missing}, unexpected {unexpected}")
        for p in twin.parameters():
            p.requires_grad_(False)
            frozen_before.add(id(p))
        mirrored.append(f"{paths[name].split('.')[0]}_m")

    trainable_ids, trainable_names = _select_trainable(model, trainable, frozen_before)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)

    if search_cfg is not None:
        from torchmm_ext.modules.das_search import DASSearch

        flat = [(name, i) for name in candidates for i in candidates[name]]
        blocks = [block for name in candidates for block in searchable[name]]
        model.das_search = DASSearch(flat, blocks, search_cfg, model_name=_model_name(model), group_sizes=sizes)

    adapter_params = sum(p.numel() for n, p in model.named_parameters()
                         if is_adapter_parameter(n) and id(p) not in frozen_before)
    report = DASReport(
        skipped=skip_lists,
        adapted={name: sum(1 for b in blocks if not isinstance(b, SkipAdapter)) for name, blocks in resolved.items()},
        candidates=[(name, i) for name in candidates for i in candidates[name]],
        adapter_params=adapter_params,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_names=trainable_names,
        momentum_mirrored=mirrored,
    )
    record_method(model, "das", settings)
    return report


def _select_trainable(model: nn.Module, patterns: Sequence[str], frozen_before: set) -> Tuple[set, List[str]]:
    """Ids of the parameters that train (adapters, and those all of whose names match a
    pattern), and the non-adapter names among them."""
    names_of: Dict[int, List[str]] = {}
    params: Dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        params[id(p)] = p

    def matches(name: str) -> bool:
        return is_adapter_parameter(name) or any(fnmatch(part, pat) for part in name.split(".") for pat in patterns)

    ids, other = set(), []
    for pid, names in names_of.items():
        # a tensor shared with a frozen part (a tied embedding) stays frozen
        if pid in frozen_before or not all(matches(n) for n in names):
            continue
        ids.add(pid)
        if not is_adapter_parameter(names[0]):
            other.append(names[0])
    return ids, other
