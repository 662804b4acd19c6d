"""ALBEF retrieval benchmark: torchmm_ext vs. a TorchMultimodal baseline at the same size.

Measures, in one run,

* **training-step throughput** (pairs/s): forward ITC (queues + momentum distillation) and ITM
  with hard negatives, backward, AdamW step, ``zero_grad``;
* **ITM re-rank throughput** (pairs/s): fusion encoder + ITM head on (image, text) pairs where
  each of ``U`` images is paired with its ``k`` top texts, as in retrieval evaluation;

for our ``albef_model_for_retrieval("base")`` and for TorchMultimodal's ALBEF assembled the way
its ``examples/albef`` retrieval recipe does it (``ALBEFVisionEncoder`` + ``bert_text_encoder`` +
``ALBEFMultimodalEncoder`` -> ``ALBEFModel`` -> ``ALBEFModelWithSimilarity``, an ``nn.Linear``
ITM head, ``ImageTextContrastiveLoss`` + cross-entropy ITM), in fp32 and bf16 autocast.

The baseline's "best" is the fastest of its configurations (precision x AdamW fused/plain for
training; precision x batched/per-image loop for re-ranking).

Usage::

    python benchmarks/albef_step.py --device cpu
    python benchmarks/albef_step.py --device cuda --json results.json
    python benchmarks/albef_step.py --device cpu --profile   # + torch.profiler of one step of ours
    # one thread on a shared CPU, with our variants timed in the same rounds:
    OMP_NUM_THREADS=1 python benchmarks/albef_step.py --device cpu --threads 1 \
        --ours-ablations momentum-recast,padded-rerank
    # train.compile on the tiny preset (ours only; compilation shows in the warm-up rounds):
    python benchmarks/albef_step.py --device cpu --preset tiny --impls ours --tasks train \
        --batch-size 64 --image-size 64 --queue-size 4096 --compile

Configurations are run round-robin (one iteration of each in turn per round, the first
``--warmup`` rounds untimed) so that background load on a shared machine hits them alike.
Throughput is ``pairs / median iteration time`` (median over the timed rounds, which resists
load spikes); the mean-based figure is printed too and all raw times go to ``--json``.
"""

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.attention
import torch.nn.functional as F
from torch import nn, Tensor

from torchmm_ext.engine.flops import flop_counter, peak_tflops

VOCAB_SIZE = 30522
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
HIDDEN = 768
EMBED = 256


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def random_captions(n: int, length: int, gen: torch.Generator, vocab_size: int = VOCAB_SIZE) -> tuple[Tensor, Tensor]:
    """Random token ids ``[n, length]`` with realistic right padding and a 1/0 LongTensor mask.

    Caption lengths are drawn uniformly in ``[length // 3, length]``; the first caption always
    uses the full length (so the padded length really is ``length``).
    """
    lengths = torch.randint(max(3, length // 3), length + 1, (n,), generator=gen)
    lengths[0] = length
    positions = torch.arange(length).view(1, -1)
    mask = (positions < lengths.view(-1, 1)).long()
    ids = torch.randint(min(1000, vocab_size // 2), vocab_size, (n, length), generator=gen)
    ids[:, 0] = CLS_ID
    ids[torch.arange(n), lengths - 1] = SEP_ID
    ids = ids.masked_fill(mask == 0, PAD_ID)
    return ids, mask


def random_images(n: int, image_size: int, gen: torch.Generator) -> Tensor:
    return torch.randn(n, 3, image_size, image_size, generator=gen)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_ours(image_size: int, queue_size: int, preset: str = "base") -> nn.Module:
    from torchmm_ext.models.albef import albef_model_for_retrieval

    return albef_model_for_retrieval(preset, image_size=image_size, queue_size=queue_size)


class TMMRetrievalBaseline(nn.Module):
    """TorchMultimodal's ALBEF for retrieval, as its ``examples/albef`` recipe builds it.

    The training forward mirrors ``ALBEFModelForRetrieval._train_forward`` of the example:
    ITC via ``ImageTextContrastiveLoss`` on ``ALBEFModelWithSimilarity``'s similarities and
    targets, ITM as cross-entropy on ``[multimodal[:, 0]; multimodal_neg[:, 0]]`` with labels
    ``[1] * B + [0] * 2B``. Re-ranking mirrors ``_image_text_matching_score``.

    Masks: ``bert_text_encoder`` (FLAVA layers) and ``ALBEFMultimodalEncoder`` both mask with
    ``masked_fill(mask == 0, -inf)``, so the tokenizer's 1/0 LongTensor mask is passed as is.
    """

    def __init__(self, image_size: int, queue_size: int) -> None:
        super().__init__()
        from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
        from torchmultimodal.models.albef.model import ALBEFModel, ALBEFModelWithSimilarity
        from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
        from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder
        from torchmultimodal.modules.losses.albef import ImageTextContrastiveLoss

        vision_encoder = ALBEFVisionEncoder(image_size=image_size)
        text_encoder = bert_text_encoder(num_hidden_layers=6)
        multimodal_encoder = ALBEFMultimodalEncoder()
        albef_model = ALBEFModel(vision_encoder, text_encoder, multimodal_encoder)
        self.model_with_similarity = ALBEFModelWithSimilarity(
            albef_model,
            vision_proj=nn.Linear(HIDDEN, EMBED),
            text_proj=nn.Linear(HIDDEN, EMBED),
            embed_size=EMBED,
            queue_size=queue_size,
        )
        self.itc_loss = ImageTextContrastiveLoss()
        self.itm_head = nn.Linear(HIDDEN, 2)

    @property
    def albef(self) -> nn.Module:
        return self.model_with_similarity.albef_model

    def forward(
        self, image: Tensor, text: Tensor, text_atts: Tensor, idx: Tensor, alpha: float
    ) -> Dict[str, Tensor]:
        out = self.model_with_similarity(image, text, text_atts, idx)
        sim = out.similarity
        loss_itc = self.itc_loss(
            sim.sim_i2t, sim.sim_t2i, sim.sim_i2t_m, sim.sim_t2i_m, out.sim_targets, alpha
        )
        pos = out.multimodal_embeddings[:, 0, :]
        neg = out.multimodal_embeddings_neg[:, 0, :]
        vl_output = self.itm_head(torch.cat([pos, neg], dim=0))
        labels = torch.cat(
            [torch.ones(pos.size(0), dtype=torch.long), torch.zeros(neg.size(0), dtype=torch.long)]
        ).to(vl_output.device)
        loss_itm = F.cross_entropy(vl_output, labels)
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}

    def encode_image(self, image: Tensor) -> Tensor:
        return self.albef.vision_encoder(image)

    def encode_text(self, text: Tensor, text_atts: Tensor) -> Tensor:
        return self.albef.text_encoder(text, text_atts).last_hidden_state

    def itm_score(self, image_embeds: Tensor, text_embeds: Tensor, text_atts: Tensor) -> Tensor:
        multimodal = self.albef.multimodal_encoder(
            hidden_states=text_embeds,
            attention_mask=text_atts,
            encoder_hidden_states=image_embeds,
        )
        return self.itm_head(multimodal[:, 0, :])[:, 1]


def build_theirs(image_size: int, queue_size: int) -> nn.Module:
    return TMMRetrievalBaseline(image_size, queue_size)


def count_params(model: nn.Module) -> Dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------


def autocast_ctx(device: torch.device, precision: str):
    if precision == "fp32":
        # Explicitly disabled, so an fp32 config stays fp32 inside the re-rank phase's outer
        # bf16 context.
        return torch.autocast(device.type, enabled=False)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def summarize(times: List[float], pairs: int, flops: Optional[int] = None) -> Dict[str, Any]:
    median = statistics.median(times)
    mean = statistics.fmean(times)
    return {
        "flops_per_iter": flops,
        "tflops_per_s": None if flops is None else flops / median / 1e12,
        "median_s": median,
        "mean_s": mean,
        "min_s": min(times),
        "max_s": max(times),
        "pairs_per_s": pairs / median,
        "pairs_per_s_mean": pairs / mean,
    }


# ---------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------


class TrainInputs:
    def __init__(self, batch: int, image_size: int, text_len: int, device: torch.device, seed: int,
                 vocab_size: int = VOCAB_SIZE):
        gen = torch.Generator().manual_seed(seed)
        self.batch = batch
        self.image = random_images(batch, image_size, gen).to(device)
        ids, mask = random_captions(batch, text_len, gen, vocab_size)
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.step = 0
        self.device = device

    def next_idx(self) -> Tensor:
        # Distinct image ids per step (fresh images every batch, as in fine-tuning).
        idx = torch.arange(self.batch, device=self.device) + self.step * self.batch
        self.step += 1
        return idx


class Config:
    """One measured configuration: ``fn()`` runs one timed iteration (a training step or a
    re-rank call) and returns its losses / scores."""

    def __init__(self, row: Dict[str, Any], fn: Callable[[], Any], cleanup: Callable[[], None] = lambda: None):
        self.row = row
        self.fn = fn
        self.cleanup = cleanup
        self.times: List[float] = []
        self.results: List[Any] = []
        self.flops: Optional[int] = None  # per iteration, counted in the first warm-up round
        self.first_call_s: Optional[float] = None  # the first (FLOP-counted) call
        self.warmup_times: List[float] = []


# Variants of ours (``--ours-ablations``): an optimisation turned off, or a candidate one
# turned on. Each names its task, the model attributes (dotted paths) it sets and optionally a
# context its iterations run in, so its effect is measured in the same run as the rest.
OURS_ABLATIONS: Dict[str, tuple] = {
    # autocast re-casts the fp32 momentum weights at each use, as before the bf16 shadows
    "momentum-recast": ("train", {"momentum_shadows": False}, None),
    # ITM re-rank on padded texts (grouped per image), as before the packed path
    "padded-rerank": ("rerank", {"fusion_encoder.pack_below": 0.0}, None),
    # candidate: SDPA's math backend (its backward is plain matmuls) instead of the CPU flash
    # kernel, whose backward is the slowest op of our bf16 step on the CPU
    "sdpa-math": ("train", {}, lambda: torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH])),
    # the CPU flash kernel's backward in bf16, as before torchmm_ext.modules.attention ran it
    # in fp32 for bf16 training
    "attn-bwd-bf16": ("train", {}, lambda: _attention_backward_in_fp32(False)),
    # ITM's cross-attention with the keys/values gathered per pair, as before the pairs were
    # grouped by image
    "gathered-itm": ("train", {"fusion_encoder.group_pairs": False}, None),
}


def _attention_backward_in_fp32(enabled: bool):
    from torchmm_ext.modules.attention import cpu_attention_backward_in_fp32

    return cpu_attention_backward_in_fp32(enabled)


@contextmanager
def ablated(model: nn.Module, ablation: Optional[str]):
    """Sets the attributes of ``ablation`` on ``model`` for the block."""
    settings = OURS_ABLATIONS[ablation][1] if ablation else {}
    context = OURS_ABLATIONS[ablation][2] if ablation else None
    saved = []
    for path, value in settings.items():
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)
    try:
        with context() if context else nullcontext():
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def train_config(
    impl: str,
    model: nn.Module,
    inputs: TrainInputs,
    precision: str,
    fused: bool,
    args: argparse.Namespace,
    device: torch.device,
    ablation: Optional[str] = None,
    compiled: bool = False,
) -> Config:
    if compiled:  # a copy whose blocks are compiled (torchmm_ext's train.compile switch)
        from torchmm_ext.engine.fit import compile_blocks

        model = copy.deepcopy(model)
        compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.02, fused=fused)

    def step() -> Dict[str, Tensor]:
        model.train()
        idx = inputs.next_idx()
        with ablated(model, ablation), autocast_ctx(device, precision):
            if impl == "ours":
                out = model(inputs.image, inputs.ids, inputs.mask, idx, alpha=args.alpha)
                losses = {"loss": out.loss, "loss_itc": out.loss_itc, "loss_itm": out.loss_itm}
            else:
                losses = model(inputs.image, inputs.ids, inputs.mask, idx, args.alpha)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in losses.items()}

    def cleanup() -> None:
        opt.state.clear()

    row = {
        "task": "train",
        "impl": impl,
        "precision": precision,
        "variant": ("AdamW fused" if fused else "AdamW plain") + (f", {ablation}" if ablation else "")
        + (", compiled blocks" if compiled else ""),
        "ablation": ablation or ("compiled" if compiled else None),
        "pairs_per_iter": inputs.batch,
    }
    return Config(row, step, cleanup)


def finish_train(cfg: Config) -> Dict[str, Any]:
    losses = {k: [float(r[k]) for r in cfg.results] for k in cfg.results[0]}
    finite = all(math.isfinite(v) for vals in losses.values() for v in vals)
    return {**cfg.row, "times_s": cfg.times, "losses": losses, "finite": finite,
            "first_call_s": cfg.first_call_s, "warmup_times_s": cfg.warmup_times,
            **summarize(cfg.times, cfg.row["pairs_per_iter"], cfg.flops)}


def first_call_seconds(cfg: "Config") -> Optional[float]:
    return cfg.first_call_s


def run_round_robin(
    configs: List[Config], warmup: int, steps: int, sync: Callable[[], None],
    on_done: Callable[[Config], None],
) -> None:
    """Run ``warmup + steps`` rounds, each running one iteration of every config in turn.

    Interleaving (rather than running each config's iterations back to back) exposes every
    configuration to the same background load, which matters on a shared machine. The FLOPs
    of one iteration are counted in the first (untimed) round, or in an extra untimed call
    when there is no warm-up.
    """
    def counted_call(cfg: Config) -> None:
        t0 = time.perf_counter()
        with flop_counter() as counter:
            cfg.fn()
        sync()
        cfg.first_call_s = time.perf_counter() - t0
        cfg.flops = counter.get_total_flops()

    if warmup == 0:
        for cfg in configs:
            counted_call(cfg)
    for r in range(warmup + steps):
        t_round = time.perf_counter()
        for cfg in configs:
            if cfg.flops is None:
                counted_call(cfg)
                continue
            sync()
            t0 = time.perf_counter()
            out = cfg.fn()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                cfg.times.append(dt)
                cfg.results.append(out)
            else:
                cfg.warmup_times.append(dt)
        tag = "warm-up" if r < warmup else "timed"
        print(f"  round {r + 1}/{warmup + steps} ({tag}) {time.perf_counter() - t_round:.1f}s  "
              f"load {load_average()}", flush=True)
    for cfg in configs:
        cfg.cleanup()
        on_done(cfg)


# ---------------------------------------------------------------------------------------------
# ITM re-rank
# ---------------------------------------------------------------------------------------------


class RerankPools:
    """``U`` distinct images and a pool of texts; each image is paired with ``k`` of the texts
    (the "top-k" of the ITC similarities in a real evaluation; random here)."""

    def __init__(
        self, images: int, k: int, text_pool: int, image_size: int, text_len: int,
        device: torch.device, seed: int, vocab_size: int = VOCAB_SIZE,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.U, self.k = images, k
        self.pairs = images * k
        self.images = random_images(images, image_size, gen).to(device)
        ids, mask = random_captions(text_pool, text_len, gen, vocab_size)
        self.ids, self.mask = ids.to(device), mask.to(device)
        # [U, k] distinct text indices per image.
        topk = torch.stack([torch.randperm(text_pool, generator=gen)[:k] for _ in range(images)])
        self.topk = topk.to(device)
        self.image_index = torch.arange(images, device=device).repeat_interleave(k)


def rerank_config(
    impl: str,
    model: nn.Module,
    pools: RerankPools,
    precision: str,
    variant: str,
    device: torch.device,
    ablation: Optional[str] = None,
) -> Config:
    U, k = pools.U, pools.k
    flat_topk = pools.topk.reshape(-1)
    model.eval()
    with torch.inference_mode(), autocast_ctx(device, precision):
        # Embeddings are computed once per evaluation (not timed), in the same precision.
        if impl == "ours":
            image_embeds = model.encode_image(pools.images).embeddings
            text_embeds = model.encode_text(pools.ids, pools.mask).embeddings
        else:
            image_embeds = model.encode_image(pools.images)
            text_embeds = model.encode_text(pools.ids, pools.mask)

    if impl == "ours":

        def score() -> Tensor:
            # Our evaluation's call: U distinct images, P = U * k pairs, image_index [P].
            return model.itm_scores(
                image_embeds,
                text_embeds[flat_topk],
                pools.mask[flat_topk],
                image_index=pools.image_index,
            )

    elif variant == "batched":

        def score() -> Tensor:
            # All P pairs in one multimodal-encoder call, image tokens repeated per pair.
            return model.itm_score(
                image_embeds[pools.image_index], text_embeds[flat_topk], pools.mask[flat_topk]
            )

    elif variant == "per-image loop":

        def score() -> Tensor:
            # Literally the example's image_to_text loop: one call of k pairs per image.
            scores = []
            for i in range(U):
                topk_idx = pools.topk[i]
                scores.append(
                    model.itm_score(
                        image_embeds[i].repeat(k, 1, 1), text_embeds[topk_idx], pools.mask[topk_idx]
                    )
                )
            return torch.cat(scores)

    else:
        raise ValueError(variant)

    def call() -> Tensor:
        model.eval()
        with ablated(model, ablation), torch.inference_mode(), autocast_ctx(device, precision):
            return score()

    row = {
        "task": "rerank",
        "impl": impl,
        "precision": precision,
        "variant": variant + (f", {ablation}" if ablation else ""),
        "ablation": ablation,
        "pairs_per_iter": pools.pairs,
    }
    return Config(row, call)


def finish_rerank(cfg: Config) -> Dict[str, Any]:
    scores = cfg.results[-1].float()
    return {**cfg.row, "times_s": cfg.times, "finite": bool(torch.isfinite(scores).all()),
            "score_shape": list(scores.shape), **summarize(cfg.times, cfg.row["pairs_per_iter"], cfg.flops)}


# ---------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------


def profile_train_step(
    impl: str, model: nn.Module, inputs: TrainInputs, precision: str, args, device, top: int = 15
) -> str:
    from torch.profiler import ProfilerActivity, profile

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.02, fused=True)

    def step() -> None:
        idx = inputs.next_idx()
        with autocast_ctx(device, precision):
            if impl == "ours":
                loss = model(inputs.image, inputs.ids, inputs.mask, idx, alpha=args.alpha).loss
            else:
                loss = model(inputs.image, inputs.ids, inputs.mask, idx, args.alpha)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        make_sync(device)()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=50)
    del opt, params
    gc.collect()
    return table


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def best(rows: List[Dict[str, Any]], task: str, impl: str) -> Optional[Dict[str, Any]]:
    # Ablated variants of ours are comparisons, not our configuration.
    cands = [r for r in rows if r["task"] == task and r["impl"] == impl and not r.get("ablation")]
    return max(cands, key=lambda r: r["pairs_per_s"]) if cands else None


# Targets (ours / theirs-best) per device type: issue 14.
TARGETS = {"cpu": {"train": 3.0, "rerank": 2.0}, "cuda": {"train": 2.5, "rerank": 3.0}}


def markdown_report(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [
        "| task | impl | precision | variant | pairs/iter | median ms/iter | pairs/s (median) "
        "| pairs/s (mean) | GFLOP/iter | TFLOP/s | MFU | finite | ours / theirs-best |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|---:|",
    ]
    for r in rows:
        ref = best(rows, r["task"], "theirs")
        ratio = (
            f"{r['pairs_per_s'] / ref['pairs_per_s']:.2f}x"
            if ref is not None and r["impl"] == "ours"
            else ""
        )
        peak = meta["peak_tflops"].get(r["precision"])
        mfu = f"{100 * r['tflops_per_s'] / peak:.1f}%" if peak and r["tflops_per_s"] else "-"
        flops = f"{r['flops_per_iter'] / 1e9:.1f}" if r["flops_per_iter"] else "-"
        tflops = f"{r['tflops_per_s']:.3f}" if r["tflops_per_s"] else "-"
        lines.append(
            f"| {r['task']} | {r['impl']} | {r['precision']} | {r['variant']} | "
            f"{r['pairs_per_iter']} | {1000 * r['median_s']:.0f} | {r['pairs_per_s']:.3f} | "
            f"{r['pairs_per_s_mean']:.3f} | {flops} | {tflops} | {mfu} | "
            f"{'yes' if r['finite'] else 'NO'} | {ratio} |"
        )
    lines.append("")
    for r in rows:
        if r.get("ablation") == "compiled":
            # Dynamo does not compile under the FLOP counter's dispatch mode, so compilation
            # happens in the first warm-up step that follows it.
            slowest = max(r["warmup_times_s"] + [r["first_call_s"]])
            lines.append(f"Compiled blocks ({r['precision']}): slowest warm-up step {slowest:.1f} s "
                         f"(compilation) against a median step of {r['median_s']:.2f} s.")
            lines.append("")
    if not any(meta["peak_tflops"].values()):
        lines.append("MFU: no peak known for this device (CPUs are not in the table of "
                     "`torchmm_ext.engine.flops.peak_tflops`); TFLOP/s are absolute.")
        lines.append("")
    targets = TARGETS["cuda" if meta["device"].startswith("cuda") else "cpu"]
    for task, target in targets.items():
        ob, tb = best(rows, task, "ours"), best(rows, task, "theirs")
        if ob is None or tb is None:
            continue
        ratio = ob["pairs_per_s"] / tb["pairs_per_s"]
        lines.append(
            f"- **{task}: ours best vs theirs best** = {ob['pairs_per_s']:.3f} "
            f"({ob['precision']}, {ob['variant']}) / {tb['pairs_per_s']:.3f} "
            f"({tb['precision']}, {tb['variant']}) = **{ratio:.2f}x** "
            f"(target >= {target:.0f}x: {'met' if ratio >= target else 'NOT met'})"
        )
        for prec in meta["precisions"]:
            o = [r for r in rows if r["task"] == task and r["impl"] == "ours" and r["precision"] == prec
                 and not r.get("ablation")]
            t = [r for r in rows if r["task"] == task and r["impl"] == "theirs" and r["precision"] == prec]
            if o and t:
                tbest = max(t, key=lambda r: r["pairs_per_s"])
                lines.append(
                    f"  - {prec}: ours {o[0]['pairs_per_s']:.3f} / theirs best-in-{prec} "
                    f"{tbest['pairs_per_s']:.3f} ({tbest['variant']}) = "
                    f"{o[0]['pairs_per_s'] / tbest['pairs_per_s']:.2f}x"
                )
    return "\n".join(lines)


def load_average() -> Optional[List[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="timed training rounds (CPU 5, GPU 20)")
    p.add_argument("--rerank-steps", type=int, default=None, help="timed re-rank calls (CPU 5, GPU 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations per config")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32,bf16")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (CPU 4, GPU 32)")
    p.add_argument("--image-size", type=int, default=None, help="image side (CPU 224, GPU 384)")
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument("--rerank-images", type=int, default=None, help="U images per call (CPU 2, GPU 8)")
    p.add_argument("--rerank-k", type=int, default=None, help="k texts per image (CPU 16, GPU 32)")
    p.add_argument("--queue-size", type=int, default=65536)
    p.add_argument("--alpha", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impls", default="ours,theirs", help="comma list of ours,theirs")
    p.add_argument("--tasks", default="train,rerank", help="comma list of train,rerank")
    p.add_argument("--their-optimizers", default="plain,fused", help="AdamW variants for theirs")
    p.add_argument(
        "--ours-ablations", default="",
        help=f"comma list of ablated variants of ours, timed too: {sorted(OURS_ABLATIONS)}",
    )
    p.add_argument("--preset", default="base", choices=["base", "tiny"],
                   help="size of ours (theirs exists at base size only)")
    p.add_argument("--compile", action="store_true",
                   help="also time our training step with compiled blocks (train.compile: true)")
    p.add_argument("--json", default=None, metavar="OUT", help="write raw numbers here")
    p.add_argument(
        "--profile", action="store_true",
        help="also profile one training step of ours (and theirs) in the last precision",
    )
    p.add_argument("--profile-top", type=int, default=15)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.steps = args.steps if args.steps is not None else (20 if gpu else 5)
    args.rerank_steps = args.rerank_steps if args.rerank_steps is not None else (20 if gpu else 5)
    args.batch_size = args.batch_size or (32 if gpu else 4)
    if args.preset != "base" and "theirs" in args.impls:
        p.error("TorchMultimodal's ALBEF exists at base size only: use --impls ours with --preset tiny")
    args.image_size = args.image_size or (384 if gpu else 224)
    args.rerank_images = args.rerank_images or (8 if gpu else 2)
    args.rerank_k = args.rerank_k or (32 if gpu else 16)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    args.tasks = [s.strip() for s in args.tasks.split(",") if s.strip()]
    args.their_optimizers = [s.strip() for s in args.their_optimizers.split(",") if s.strip()]
    args.ours_ablations = [s.strip() for s in args.ours_ablations.split(",") if s.strip()]
    unknown = sorted(set(args.ours_ablations) - set(OURS_ABLATIONS))
    if unknown:
        p.error(f"unknown --ours-ablations {unknown}; choose from {sorted(OURS_ABLATIONS)}")
    if args.queue_size % args.batch_size:
        p.error("ALBEFModelWithSimilarity asserts queue_size % batch_size == 0")
    if args.batch_size < 2:
        p.error("hard negatives need a batch of at least 2")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    meta: Dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "preset": args.preset,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "text_len": args.text_len,
        "rerank": {"images": args.rerank_images, "k": args.rerank_k,
                   "pairs": args.rerank_images * args.rerank_k},
        "queue_size": args.queue_size,
        "alpha": args.alpha,
        "steps": args.steps,
        "rerank_steps": args.rerank_steps,
        "warmup": args.warmup,
        "precisions": args.precisions,
        "loadavg_before": load_average(),
        # dense peaks for the MFU column; fp32 on a GPU may run as TF32 when matmul precision allows
        "peak_tflops": {prec: peak_tflops(device, "tf32" if prec == "fp32" and
                                          torch.backends.cuda.matmul.allow_tf32 else prec)
                        for prec in args.precisions},
    }
    try:
        import torchmultimodal  # noqa: F401
        from importlib.metadata import version

        meta["torchmultimodal"] = version("torchmultimodal-nightly")
    except Exception:  # pragma: no cover - informational only
        pass
    print(f"# ALBEF benchmark  {meta['date']}  {meta['device_name']}  threads={meta['threads']}  "
          f"torch {meta['torch']}  load {meta['loadavg_before']}", flush=True)

    t_start = time.perf_counter()
    builders = {"ours": build_ours, "theirs": build_theirs}
    models: Dict[str, nn.Module] = {}
    for impl in args.impls:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        kwargs = {"preset": args.preset} if impl == "ours" else {}
        models[impl] = builders[impl](args.image_size, args.queue_size, **kwargs).to(device)
        meta[f"params_{impl}"] = count_params(models[impl])
        print(f"built {impl}: {meta[f'params_{impl}']} in {time.perf_counter() - t0:.1f}s", flush=True)

    vocab_size = VOCAB_SIZE
    if "ours" in models:
        vocab_size = models["ours"].text_encoder.embeddings.word_embeddings.num_embeddings
    train_inputs = TrainInputs(args.batch_size, args.image_size, args.text_len, device, args.seed + 1,
                               vocab_size)
    pools = RerankPools(
        args.rerank_images, args.rerank_k, max(64, args.rerank_k * 2), args.image_size,
        args.text_len, device, args.seed + 2, vocab_size,
    )

    rows: List[Dict[str, Any]] = []

    def record(row: Dict[str, Any]) -> None:
        rows.append(row)
        extra = ""
        if "losses" in row:
            extra = "  loss=" + ", ".join(f"{k}={v[-1]:.4f}" for k, v in row["losses"].items())
        flops = "" if row["flops_per_iter"] is None else (
            f"  {row['flops_per_iter'] / 1e9:.1f} GFLOP  {row['tflops_per_s']:.3f} TFLOP/s")
        if row.get("first_call_s") is not None:
            extra += f"  first call {row['first_call_s']:.1f}s"
        print(f"  {row['task']:6s} {row['impl']:6s} {row['precision']:4s} {row['variant']:15s} "
              f"median {1000 * row['median_s']:8.1f} ms  {row['pairs_per_s']:8.3f} pairs/s{flops}  "
              f"finite={row['finite']}{extra}", flush=True)

    def ablations_of(task: str) -> List[str]:
        return [a for a in args.ours_ablations if OURS_ABLATIONS[a][0] == task]

    sync = make_sync(device)
    if "train" in args.tasks:
        configs = []
        for prec in args.precisions:
            for impl in args.impls:
                variants = [True] if impl == "ours" else [v == "fused" for v in args.their_optimizers]
                for fused in variants:
                    configs.append(train_config(impl, models[impl], train_inputs, prec, fused, args, device))
                if impl == "ours":
                    for ablation in ablations_of("train"):
                        if ablation in ("momentum-recast", "attn-bwd-bf16") and prec == "fp32":
                            continue  # no autocast / bf16 attention: the same step as ours
                        configs.append(train_config(impl, models[impl], train_inputs, prec, True, args,
                                                    device, ablation))
                    if args.compile:
                        configs.append(train_config(impl, models[impl], train_inputs, prec, True, args,
                                                    device, compiled=True))
        print(f"training: {len(configs)} configs x ({args.warmup} warm-up + {args.steps} timed) rounds", flush=True)
        run_round_robin(configs, args.warmup, args.steps, sync, lambda c: record(finish_train(c)))
        del configs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "rerank" in args.tasks:
        configs = []
        for prec in args.precisions:
            for impl in args.impls:
                variants = ["shared K/V, packed texts"] if impl == "ours" else ["batched", "per-image loop"]
                for variant in variants:
                    configs.append(rerank_config(impl, models[impl], pools, prec, variant, device))
                if impl == "ours":
                    for ablation in ablations_of("rerank"):
                        configs.append(rerank_config(impl, models[impl], pools, prec, variants[0], device,
                                                     ablation))
        print(f"re-rank: {len(configs)} configs x ({args.warmup} warm-up + {args.rerank_steps} timed) rounds", flush=True)
        # An evaluation runs all its re-rank calls inside one autocast context (as
        # torchmm_ext.evaluation does), so bf16 weight casts are made once and reused; give
        # both implementations that same outer context.
        with torch.autocast(device.type, dtype=torch.bfloat16):
            run_round_robin(configs, args.warmup, args.rerank_steps, sync, lambda c: record(finish_rerank(c)))
        del configs

    meta["loadavg_after"] = load_average()
    meta["wall_s"] = time.perf_counter() - t_start
    report = markdown_report(rows, meta)
    print()
    print(report)
    print(f"\nload average before {meta['loadavg_before']} after {meta['loadavg_after']}; "
          f"wall {meta['wall_s']:.0f}s")

    profiles = {}
    if args.profile and "train" in args.tasks:
        prec = args.precisions[-1]
        for impl in args.impls:
            table = profile_train_step(impl, models[impl], train_inputs, prec, args, device,
                                       top=args.profile_top)
            profiles[f"{impl}_{prec}"] = table
            print(f"\n## torch.profiler: one training step of {impl} ({prec}), "
                  f"top {args.profile_top} ops by self time\n")
            print(table)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "profiles": profiles, "report": report}, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
