"""PELA's low-rank linear layers: every ``nn.Linear`` of a model becomes a product of two thin
ones, initialised by truncated SVD (Guo et al., "PELA: Learning Parameter-Efficient Models with
Low-Rank Approximation", CVPR 2024).

``Linear(in, out)`` becomes ``Linear(in, r, bias=False)`` then ``Linear(r, out, bias)``
(:class:`LowRankLinear`, an ``nn.Sequential``: state-dict keys ``<name>.0.weight``,
``<name>.1.weight``, ``<name>.1.bias``, as in PELA's published checkpoints) with
``r = floor(in * out / (ratio * (in + out)))``, so each factorised layer keeps about ``1/ratio``
of its weights. :func:`apply_low_rank` does it to any ``nn.Module`` and reports what it did.

Packed projections. Our BERT layers pack ALBEF's separate ``query``/``key``/``value`` Linears
into one ``attention.input_proj`` (torchmultimodal's ``MultiHeadSelfAttention``). PELA
factorises BERT's three Linears separately, so :func:`apply_low_rank` factorises such a packed
layer per chunk (``packed``): the first factor stacks the chunks' first factors, the second
holds each chunk's second factor, and a PELA checkpoint converts to it exactly. The ViT's
``qkv`` is packed in ALBEF too and stays one factorisation, as in PELA.
"""

import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn, Tensor

from torchmm_ext.modules.efficiency import applied_methods, GroupSpec, record_method, resolve_block_groups

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_PACKED",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankReport",
    "apply_low_rank",
    "low_rank_layers",
    "low_rank_rank",
]

#: Module-name substrings never factorised: PELA's ``name_omit = ['cls', '_proj']`` written for
#: our module names. ``cls`` meant ALBEF's MLM head (``cls.predictions``), the SNLI-VE/NLVR2
#: ``cls_head`` and the VQA decoder's ``cls``; ``_proj`` meant the ITC projections
#: ``vision_proj``/``text_proj``. A bare ``_proj`` would here also hit every attention
#: projection (torchmultimodal's ``input_proj``/``output_proj``/``q_proj``...), which PELA does
#: factorise. Momentum copies (``vision_proj_m``...) contain the same substrings. The 2-way ITM
#: head and NLVR2's 3-way ``ta_head`` are kept by ``min_out_features``.
DEFAULT_EXCLUDE: Tuple[str, ...] = ("vision_proj", "text_proj", "mlm_head", "cls_head", "lm_head")

#: ``{regex: chunks}``: Linears whose name matches pack ``chunks`` equal projections that PELA
#: factorises separately (BERT's query/key/value in our text, fusion and answer-decoder
#: self-attention).
DEFAULT_PACKED: Dict[str, int] = {
    r"(^|\.)(text_encoder|fusion_encoder|answer_decoder)(_m)?\..*\.attention\.input_proj$": 3,
}

_INITS = ("svd", "none")
_TOTALS = ("momentum copies", "online", "total")  # last in the report table


def low_rank_rank(in_features: int, out_features: int, ratio: float) -> int:
    """PELA's rank rule ``floor(in * out / (ratio * (in + out)))``: the factor pair then holds
    about ``1/ratio`` of the layer's weights."""
    return int(in_features * out_features // (ratio * (in_features + out_features)))


class LowRankLinear(nn.Sequential):
    """``Linear(in, chunks * rank, bias=False)`` then a ``[out, rank]`` second factor with the
    original bias: ``y = B (A x) + b``, state-dict keys ``0.weight``, ``1.weight``, ``1.bias``.

    With ``chunks > 1`` the output is ``chunks`` independent low-rank projections (PELA's
    separate BERT query/key/value packed into one layer): chunk ``c`` of the output is
    ``B_c (A_c x)`` with ``A_c`` rows ``c*rank:(c+1)*rank`` of ``0.weight`` and ``B_c`` rows
    ``c*out/chunks:(c+1)*out/chunks`` of ``1.weight``.

    Args:
        in_features (int): input size.
        out_features (int): output size (divisible by ``chunks``).
        rank (int): rank of each chunk's factorisation.
        bias (bool): whether the second factor has a bias.
        chunks (int): independent projections packed along the output.
        device, dtype: of the new parameters.

    Inputs:
        x (Tensor): ``[..., in_features]``.

    Returns:
        Tensor: ``[..., out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        chunks: int = 1,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if out_features % chunks:
            raise ValueError(f"out_features {out_features} is not divisible by chunks {chunks}")
        kw = {"device": device, "dtype": dtype}
        super().__init__(nn.Linear(in_features, chunks * rank, bias=False, **kw),
                         nn.Linear(rank, out_features, bias=bias, **kw))
        self.in_features, self.out_features, self.rank, self.chunks = in_features, out_features, rank, chunks

    def forward(self, x: Tensor) -> Tensor:
        if self.chunks == 1:
            return super().forward(x)
        h = self[0](x).unflatten(-1, (self.chunks, self.rank))  # [..., C, r]
        b = self[1].weight.view(self.chunks, -1, self.rank)  # [C, out/C, r]
        y = torch.einsum("...cr,cor->...co", h, b.to(h.dtype)).flatten(-2)  # [..., out]
        return y if self[1].bias is None else y + self[1].bias.to(y.dtype)

    def effective_weight(self) -> Tensor:
        """The ``[out, in]`` weight the pair computes (``B A``, chunk by chunk)."""
        a = self[0].weight.view(self.chunks, self.rank, -1)  # [C, r, in]
        b = self[1].weight.view(self.chunks, -1, self.rank)  # [C, out/C, r]
        return torch.bmm(b, a).reshape(self.out_features, self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, chunks: int = 1, init: str = "svd") -> Tuple["LowRankLinear", Optional[float]]:
        """A low-rank copy of ``linear`` (same device and dtype).

        Args:
            linear (nn.Linear): the layer to factorise (not changed).
            rank (int): rank per chunk, at least 1.
            chunks (int): equal output chunks factorised separately.
            init (str): ``"svd"``: truncated SVD of each chunk's weight, computed in float32
                on the weight's device, first factor ``sqrt(S) V^T``, second ``U sqrt(S)``, bias
                copied; ``"none"``: fresh parameters (for a low-rank checkpoint to load into).

        Returns:
            Tuple of the new layer and, with ``"svd"``, the relative reconstruction error
            ``||W - B A||_F / ||W||_F`` (``None`` otherwise).
        """
        weight = linear.weight
        new = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, chunks,
                  device=weight.device, dtype=weight.dtype)
        if init == "none":
            return new, None
        with torch.no_grad():
            w = weight.detach().float().view(chunks, -1, linear.in_features)  # [C, out/C, in]
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = s[:, :rank].sqrt()  # [C, r]
            first = root.unsqueeze(-1) * vh[:, :rank]  # [C, r, in]
            second = u[:, :, :rank] * root.unsqueeze(1)  # [C, out/C, r]
            new[0].weight.copy_(first.reshape(chunks * rank, -1))
            new[1].weight.copy_(second.reshape(linear.out_features, rank))
            if linear.bias is not None:
                new[1].bias.copy_(linear.bias.detach())
            error = torch.linalg.matrix_norm(torch.bmm(second, first) - w).square().sum().sqrt()
            relative = (error / w.square().sum().sqrt().clamp_min(1e-30)).item()
        return new, relative


class LowRankLayer(NamedTuple):
    """One factorised layer of a :class:`LowRankReport`.

    Attributes:
        name (str): module path.
        group (str): report group (``vision``, ``text``, ..., ``momentum copies``).
        in_features, out_features (int): shape of the original weight.
        rank (int): rank per chunk.
        chunks (int): separately factorised output chunks (3 for packed q/k/v).
        relative_error (Optional[float]): ``||W - B A||_F / ||W||_F`` (SVD init only).
    """

    name: str
    group: str
    in_features: int
    out_features: int
    rank: int
    chunks: int
    relative_error: Optional[float]


class LowRankReport(NamedTuple):
    """What :func:`apply_low_rank` did.

    Attributes:
        layers (List[LowRankLayer]): every factorised layer.
        skipped (List[Tuple[str, str]]): ``(name, why)`` for every Linear left full rank.
        params (Dict[str, Tuple[int, int]]): parameters before/after by group (shared tensors
            counted once); ``online`` and ``momentum copies`` totals are included.
        settings (Dict[str, Any]): the recorded settings.
    """

    layers: List[LowRankLayer]
    skipped: List[Tuple[str, str]]
    params: Dict[str, Tuple[int, int]]
    settings: Dict[str, Any]

    @property
    def total(self) -> Tuple[int, int]:
        """Whole-model parameters before and after."""
        return self.params["total"]

    def format(self, layers: bool = True) -> str:
        """The per-group table and, with ``layers``, each layer's rank and relative error."""
        lines = [f"{'group':<18} {'before':>14} {'after':>14} {'kept':>7}"]
        for group, (before, after) in self.params.items():
            kept = f"{100 * after / before:.1f}%" if before else "-"
            lines.append(f"{group:<18} {before:>14,} {after:>14,} {kept:>7}")
        lines.append(f"factorised {len(self.layers)} Linear layers, kept {len(self.skipped)} full rank")
        if layers:
            for layer in self.layers:
                err = "" if layer.relative_error is None else f"  rel. error {layer.relative_error:.4f}"
                chunks = f" x{layer.chunks}" if layer.chunks > 1 else ""
                lines.append(f"  {layer.name}: {layer.in_features}->{layer.out_features} rank {layer.rank}{chunks}{err}")
            for name, why in self.skipped:
                lines.append(f"  kept {name}: {why}")
        return "\n".join(lines)


def _group_names(model: nn.Module) -> Dict[str, str]:
    """First path component -> report group name (block groups by their own name)."""
    names: Dict[str, str] = {}
    if hasattr(model, "block_groups"):
        for group, blocks in model.block_groups().items():
            for path, module in model.named_modules():
                if module is blocks:
                    names.setdefault(path.split(".")[0], group)
    return names


def _report_group(path: str, names: Mapping[str, str]) -> str:
    head = path.split(".")[0]
    if head.endswith("_m"):
        return "momentum copies"
    return names.get(head, "heads and other" if names else head or "(root)")


def _param_counts(model: nn.Module, names: Mapping[str, str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for path, p in model.named_parameters():  # shared tensors once
        group = _report_group(path, names)
        counts[group] = counts.get(group, 0) + p.numel()
        if group != "momentum copies":
            counts["online"] = counts.get("online", 0) + p.numel()
        counts["total"] = counts.get("total", 0) + p.numel()
    return counts


def low_rank_layers(model: nn.Module) -> Dict[str, LowRankLinear]:
    """The :class:`LowRankLinear` layers of ``model`` by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def apply_low_rank(
    model: nn.Module,
    ratio: float = 3.0,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    min_out_features: int = 10,
    init: str = "svd",
    groups: GroupSpec = None,
    packed: Optional[Mapping[str, int]] = None,
    rank: Optional[int] = None,
) -> LowRankReport:
    """Replace the model's ``nn.Linear`` layers by :class:`LowRankLinear` pairs (PELA), in place.

    Momentum copies are factorised like the online layers, each from its own weights. Shared
    Linears (the same module under two names) become one shared pair. Call it before the
    optimizer is made.

    Args:
        model (nn.Module): any model (ours, TorchMultimodal's ``ALBEFModel``, a timm ViT, a
            Hugging Face ``BertModel``...).
        ratio (float): PELA's ``k`` (> 1): rank ``floor(in*out / (ratio*(in+out)))``; 3 for
            ALBEF, 2 for DeiT in the paper.
        exclude (Sequence[str]): module-name substrings left full rank (:data:`DEFAULT_EXCLUDE`).
        min_out_features (int): Linears with fewer outputs stay full rank (the ITM head).
        init (str): ``"svd"`` (truncated SVD of the current weights) or ``"none"`` (only
            restructure, for a low-rank checkpoint to load into).
        groups (GroupSpec): limit the change to these block groups or module paths (their
            momentum twins included), as :func:`~torchmm_ext.modules.efficiency.resolve_block_groups`
            reads it; ``None``: the whole model.
        packed (Optional[Mapping[str, int]]): ``{name regex: chunks}`` of packed projections
            factorised per chunk; ``None`` is :data:`DEFAULT_PACKED`, ``{}`` packs nothing.
        rank (Optional[int]): one rank for every layer instead of the ratio rule (capped at
            each chunk's ``min(in, out)``: a full-rank factorisation reproduces the layer).

    Returns:
        LowRankReport: layers, skipped layers, parameter counts by group.

    Raises:
        ValueError: ``ratio <= 1``; a rank below 1 (naming the layer and how to fix it); an
            unknown ``init``; nothing left to factorise (naming ``exclude``).
    """
    if init not in _INITS:
        raise ValueError(f"apply_low_rank init={init!r}: use one of {_INITS}")
    if rank is None and not ratio > 1:
        raise ValueError(f"apply_low_rank ratio={ratio}: the ratio must be > 1 (a factor pair "
                         "keeps about 1/ratio of a layer's weights; PELA uses 3 for ALBEF)")
    if rank is not None and rank < 1:
        raise ValueError(f"apply_low_rank rank={rank}: must be >= 1")
    if "low_rank" in applied_methods(model):
        raise ValueError(f"low_rank was already applied to this {type(model).__name__} (with "
                         f"{applied_methods(model)['low_rank']}); build a fresh model to apply it with other settings")
    packed_rules = [(re.compile(p), int(c)) for p, c in (DEFAULT_PACKED if packed is None else packed).items()]
    scope: Optional[List[str]] = None
    if groups is not None:
        scope = []
        for blocks in resolve_block_groups(model, groups).values():
            path = next(n for n, m in model.named_modules() if m is blocks)
            scope += [path, re.sub(r"^([^.]+)", r"\1_m", path)]

    names = _group_names(model)
    before = _param_counts(model, names)
    layers: List[LowRankLayer] = []
    skipped: List[Tuple[str, str]] = []
    done: Dict[int, Optional[nn.Module]] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or id(module) in done:
            continue
        done[id(module)] = None
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, LowRankLinear):
            continue
        if isinstance(parent, nn.MultiheadAttention):  # reads out_proj.weight directly
            skipped.append((name, "inside nn.MultiheadAttention, which reads its weights directly"))
            continue
        if scope is not None and not any(name == p or name.startswith(p + ".") for p in scope):
            continue
        hit = next((s for s in exclude if s in name), None)
        if hit is not None:
            skipped.append((name, f"name contains {hit!r} (exclude)"))
            continue
        if module.out_features < min_out_features:
            skipped.append((name, f"{module.out_features} outputs < min_out_features={min_out_features}"))
            continue
        chunks = next((c for rule, c in packed_rules if rule.search(name)), 1)
        if module.out_features % chunks:
            chunks = 1
        chunk_out = module.out_features // chunks
        if rank is not None:
            r = min(rank, module.in_features, chunk_out)
        else:
            r = low_rank_rank(module.in_features, chunk_out, ratio)
            if r < 1:
                raise ValueError(
                    f"apply_low_rank: {name} ({module.in_features}->{module.out_features}) gets rank "
                    f"{r} at ratio={ratio}; lower the ratio, raise min_out_features above "
                    f"{module.out_features}, or add {name!r} to exclude"
                )
        new, error = LowRankLinear.from_linear(module, r, chunks, init)
        new.train(module.training)
        done[id(module)] = new
        layers.append(LowRankLayer(name, _report_group(name, names), module.in_features,
                                   module.out_features, r, chunks, error))
    if not layers:
        raise ValueError(
            f"apply_low_rank left nothing to factorise in {type(model).__name__}: exclude={list(exclude)}, "
            f"min_out_features={min_out_features}, groups={groups!r} keep every nn.Linear full rank "
            f"({len(skipped)} kept); shorten exclude or widen groups"
        )
    # Swap under every parent that holds a replaced Linear (shared modules included).
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            replacement = done.get(id(child)) if isinstance(child, nn.Linear) else None
            if replacement is not None:
                setattr(parent, child_name, replacement)
    after = _param_counts(model, names)
    order = [*dict.fromkeys(names.values()), *sorted(set(before) - set(names.values()) - set(_TOTALS)), *_TOTALS]
    params = {g: (before[g], after.get(g, 0)) for g in order if g in before}
    settings = {"ratio": float(ratio) if rank is None else None, "exclude": list(exclude),
                "min_out_features": int(min_out_features), "init": init,
                "groups": groups if groups is None or isinstance(groups, str) else
                (dict(groups) if isinstance(groups, Mapping) else list(groups)),
                "packed": None if packed is None else dict(packed), "rank": rank}
    record_method(model, "low_rank", settings)
    return LowRankReport(layers, skipped, params, settings)
