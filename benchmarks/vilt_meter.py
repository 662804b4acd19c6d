"""ViLT (and METER) benchmark: torchmm_ext against Hugging Face at the same size, in one run.

ViLT part: our ``vilt_model_for_vqa("base")`` against ``transformers.ViltForQuestionAnswering``
with the same configuration (ViT-B/32, 768 wide, 12 blocks, 3129 answers, 40 text tokens), on
pixel-BERT-shaped images (384 x 576 by default: 12 x 18 = 216 patches, aspect kept) with a
pixel mask. Measured, for every configuration:

* **training step** (samples/s): forward, the soft-target BCE loss, backward, AdamW step,
  ``zero_grad``;
* **inference** (samples/s): forward under ``torch.no_grad()``.

Configurations: precision (fp32, bf16 autocast), with fused AdamW for both models. Hugging
Face's ViLT has only an eager (matmul-softmax) attention, so it has no attention choice. The
baseline's "best" is its fastest configuration, and the ratio is ours (in the same precision
as that best, and our best overall) over it.

Usage::

    python benchmarks/vilt_meter.py --device cpu --precisions bf16
    python benchmarks/vilt_meter.py --device cuda --json results.json

Only one model is in memory at a time (two base models with AdamW states do not fit a small
machine): phases alternate ours / Hugging Face ``--phases`` times, and within a phase the
precisions run round-robin (the first ``--warmup`` rounds untimed), so that background load on
a shared machine hits both alike; throughput is ``batch / median iteration time`` over all
phases.
"""

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from torchmm_ext.models.vilt import vilt_model_for_vqa

NUM_ANSWERS = 3129


def vilt_inputs(batch: int, height: int, width: int, length: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Images with a pixel mask (every other sample 2/3 as wide, zero-padded), captions with
    padding, soft VQA targets."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long)
    narrow = (width * 2 // 3) // 32 * 32
    images[1::2, :, :, narrow:] = 0
    pixel_mask[1::2, :, narrow:] = 0
    ids = torch.randint(1000, 30522, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1::2, length // 2:] = 0
    targets = torch.zeros(batch, NUM_ANSWERS)
    targets[torch.arange(batch), torch.randint(0, NUM_ANSWERS, (batch,), generator=g)] = 1.0
    return {"images": images, "pixel_mask": pixel_mask, "input_ids": ids, "attention_mask": mask, "targets": targets}


def hf_vilt_vqa() -> nn.Module:
    from transformers import ViltConfig, ViltForQuestionAnswering

    config = ViltConfig(image_size=384, patch_size=32, max_position_embeddings=40, num_labels=NUM_ANSWERS,
                        layer_norm_eps=1e-6, max_image_length=-1)
    model = ViltForQuestionAnswering(config)
    model.vilt.embeddings.text_embeddings.LayerNorm.eps = 1e-12
    return model


def ours_forward(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["pixel_mask"]).logits


def hf_forward(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["images"], pixel_mask=batch["pixel_mask"]).logits


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class Config:
    """One timed configuration: a name, a function running one iteration, the batch size."""

    def __init__(self, name: str, run: Callable[[], None], batch: int) -> None:
        self.name, self.run, self.batch, self.times = name, run, batch, []  # type: str, Callable, int, List[float]


def train_config(name, model, forward, batch, device, precision, fused) -> Config:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=fused, foreach=None if fused else True)

    def step():
        with autocast(device, precision):
            loss = vqa_loss(forward(model, batch), batch["targets"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Config(name, step, batch["images"].shape[0])


def infer_config(name, model, forward, batch, device, precision) -> Config:
    @torch.no_grad()
    def run():
        with autocast(device, precision):
            forward(model, batch)

    return Config(name, run, batch["images"].shape[0])


def run_round_robin(configs: List[Config], rounds: int, warmup: int, device: torch.device) -> None:
    for r in range(warmup + rounds):
        for cfg in configs:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            cfg.run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                cfg.times.append(time.perf_counter() - start)


def throughput(cfg: Config) -> float:
    return cfg.batch / statistics.median(cfg.times)


def report(title: str, configs: List[Config]) -> Dict[str, Any]:
    print(f"\n{title}")
    print(f"{'configuration':44s} {'samples/s':>10s} {'median s':>9s}")
    for cfg in configs:
        print(f"{cfg.name:44s} {throughput(cfg):10.2f} {statistics.median(cfg.times):9.3f}")
    ours = [c for c in configs if c.name.startswith("ours")]
    theirs = [c for c in configs if c.name.startswith("hf")]
    best_theirs = max(theirs, key=throughput)
    best_ours = max(ours, key=throughput)
    precision = best_theirs.name.split()[1]
    same = max((c for c in ours if c.name.split()[1] == precision), key=throughput)
    ratios = {"best_vs_best": throughput(best_ours) / throughput(best_theirs),
              "same_precision_vs_best": throughput(same) / throughput(best_theirs)}
    print(f"HF best: {best_theirs.name}; ours best: {best_ours.name}: {ratios['best_vs_best']:.2f}x; "
          f"ours at its precision ({same.name}): {ratios['same_precision_vs_best']:.2f}x")
    return {"configs": {c.name: {"samples_per_s": throughput(c), "times": c.times} for c in configs},
            "hf_best": best_theirs.name, "ours_best": best_ours.name, **ratios}


def _build(side: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if side == "ours":
        return vilt_model_for_vqa("base", dropout=0.0).to(device)
    model = hf_vilt_vqa()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model.to(device)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--infer-batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per phase")
    parser.add_argument("--phases", type=int, default=2,
                        help="ours, then Hugging Face, repeated: one model in memory at a time")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"ViLT-B/32 VQA ({NUM_ANSWERS} answers), images {args.height}x{args.width} with a pixel mask, "
          f"{args.text_length} tokens; device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    results: Dict[str, Any] = {"args": vars(args), "date": datetime.datetime.utcnow().isoformat(),
                               "torch": torch.__version__, "threads": torch.get_num_threads()}
    train_batch = vilt_inputs(args.train_batch, args.height, args.width, args.text_length)
    infer_batch = vilt_inputs(args.infer_batch, args.height, args.width, args.text_length)
    train_configs: Dict[str, Config] = {}
    infer_configs: Dict[str, Config] = {}
    # Phases alternate between the two models (two base models training at once do not fit a
    # small machine); within a phase the precisions run round-robin.
    for _ in range(args.phases):
        for side in ("ours", "hf"):
            model = _build(side, device)
            forward = ours_forward if side == "ours" else hf_forward
            if not args.skip_train:
                model.train()
                batch = {k: v.to(device) for k, v in train_batch.items()}
                configs = [train_config(f"{side} {p} adamw-fused", model, forward, batch, device, p, True)
                           for p in args.precisions]
                run_round_robin(configs, args.rounds, args.warmup, device)
                for cfg in configs:
                    train_configs.setdefault(cfg.name, Config(cfg.name, cfg.run, cfg.batch)).times.extend(cfg.times)
                del configs
            model.eval()
            batch = {k: v.to(device) for k, v in infer_batch.items()}
            configs = [infer_config(f"{side} {p}", model, forward, batch, device, p) for p in args.precisions]
            run_round_robin(configs, args.rounds, args.warmup, device)
            for cfg in configs:
                infer_configs.setdefault(cfg.name, Config(cfg.name, cfg.run, cfg.batch)).times.extend(cfg.times)
            del model, configs
            gc.collect()
    if train_configs:
        results["train"] = report(f"training step, batch {args.train_batch}", list(train_configs.values()))
    results["inference"] = report(f"inference, batch {args.infer_batch}", list(infer_configs.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
