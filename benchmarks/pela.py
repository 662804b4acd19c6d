"""PELA benchmark: ``base`` ALBEF for retrieval at full rank vs low-rank at ratio 3 and 2, one run.

Measures, per model,

* **parameters** (online model, momentum copies apart);
* **image encoding** (images/s): ``encode_image`` (ViT-B/16 + ITC projection) at ``--image-size``;
* **ITM re-rank** (pairs/s): fusion encoder + ITM head on ``U`` images x ``k`` texts (each
  image's keys/values projected once), as in retrieval evaluation;
* **training step** (pairs/s): ITC (queue, momentum distillation) + ITM with hard negatives,
  backward, AdamW step.

The low-rank models are built with ``apply_low_rank(init="none")``: speed does not depend on
the values and a full SVD of ``base`` would only add minutes (``examples/pela/compress.py``
times it). Inference phases run round-robin (one iteration of each model in turn per round,
``--warmup`` rounds untimed), so background load on a shared machine hits them alike; training
runs model after model, each built afresh with its momentum copies (three base models with
optimisers at once would not fit beside other jobs), and is therefore more exposed to load
changes; the inference models drop their momentum copies. Throughput is ``items / median iteration time``.

Usage::

    python benchmarks/pela.py --device cpu --json outputs/pela_bench.json
    python benchmarks/pela.py --device cuda
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from albef_step import random_captions, random_images  # noqa: E402  (the shared input makers)

from torchmm_ext.engine.precision import autocast_context  # noqa: E402
from torchmm_ext.engine.optim import build_optimizer  # noqa: E402
from torchmm_ext.models.albef import albef_model_for_retrieval  # noqa: E402
from torchmm_ext.modules.low_rank import apply_low_rank  # noqa: E402


def build(ratio: float, image_size: int, queue_size: int, device: torch.device):
    torch.manual_seed(0)
    model = albef_model_for_retrieval("base", image_size=image_size, queue_size=queue_size)
    report = apply_low_rank(model, ratio=ratio, init="none") if ratio else None
    online = sum(p.numel() for n, p in model.named_parameters() if not n.split(".")[0].endswith("_m"))
    momentum = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0].endswith("_m"))
    return model.to(device), online, momentum, report


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: List[str] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[3.0, 2.0])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--image-batch", type=int, default=4)
    parser.add_argument("--rerank-images", type=int, default=2)
    parser.add_argument("--rerank-k", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=30)
    parser.add_argument("--queue-size", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="inference phases only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    names = ["full"] + [f"ratio {r:g}" for r in args.ratios]
    ratios = [0.0] + list(args.ratios)
    models, params = {}, {}
    for name, ratio in zip(names, ratios):
        model, online, momentum, _ = build(ratio, args.image_size, args.queue_size, device)
        for child in [n for n, _ in model.named_children() if n.endswith("_m")]:
            delattr(model, child)  # inference needs no momentum copies: less memory on a shared machine
        models[name], params[name] = model.eval(), (online, momentum)

    images = random_images(args.image_batch, args.image_size, gen).to(device)
    u, k = args.rerank_images, args.rerank_k
    ids, mask = random_captions(u * k, args.text_length, gen)
    ids, mask = ids.to(device), mask.to(device)
    image_index = torch.arange(u, device=device).repeat_interleave(k)
    rerank_images = random_images(u, args.image_size, gen).to(device)

    def encode(model):
        return lambda: model.encode_image(images)

    def rerank(model):
        with torch.inference_mode(), autocast_context(device, args.precision):
            image_emb = model.encode_image(rerank_images).embeddings
            text_emb = model.encode_text(ids, mask).embeddings
        return lambda: model.itm_scores(image_emb, text_emb, mask, image_index=image_index)

    times: Dict[str, Dict[str, List[float]]] = {n: {"encode": [], "rerank": []} for n in names}
    phases = {"encode": {n: encode(m) for n, m in models.items()}, "rerank": {n: rerank(m) for n, m in models.items()}}
    with torch.inference_mode(), autocast_context(device, args.precision):
        for phase, fns in phases.items():
            for round_ in range(args.warmup + args.rounds):
                for name in names:
                    seconds = timed(fns[name], device)
                    if round_ >= args.warmup:
                        times[name][phase].append(seconds)

    # training, model after model
    b = args.train_batch
    train_images = random_images(b, args.image_size, gen).to(device)
    train_ids, train_mask = random_captions(b, args.text_length, gen)
    train_ids, train_mask = train_ids.to(device), train_mask.to(device)
    idx = torch.arange(b, device=device)
    models.clear()
    gc.collect()
    for name, ratio in zip(names, [] if args.no_train else ratios):
        model = build(ratio, args.image_size, args.queue_size, device)[0].train()
        optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.02)
        times[name]["train"] = []

        def step():
            with autocast_context(device, args.precision):
                out = model(train_images, train_ids, train_mask, idx, 0.4)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert torch.isfinite(out.loss)

        for round_ in range(args.warmup + args.rounds):
            seconds = timed(step, device)
            if round_ >= args.warmup:
                times[name]["train"].append(seconds)
        del optimizer, model
        gc.collect()

    items = {"encode": args.image_batch, "rerank": u * k, **({} if args.no_train else {"train": b})}
    rows = []
    full = {phase: items[phase] / statistics.median(times["full"][phase]) for phase in items}
    print(f"device {device} ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
          f"{args.precision}, image {args.image_size}px")
    print("| model | online params | vs full | momentum params | image enc. images/s | vs full | ITM re-rank pairs/s "
          "| vs full | train pairs/s | vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        rate = {phase: items[phase] / statistics.median(times[name][phase]) for phase in items}
        online, momentum = params[name]
        cells = [f"{online / 1e6:.1f}M", f"{100 * (online / params['full'][0] - 1):+.1f}%", f"{momentum / 1e6:.1f}M"]
        for phase in ("encode", "rerank", "train"):
            cells += [f"{rate[phase]:.2f}", f"{rate[phase] / full[phase]:.2f}x"] if phase in rate else ["-", "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
        rows.append({"model": name, "online_params": online, "momentum_params": momentum, "rate": rate,
                     "times": times[name]})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    return {"rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
