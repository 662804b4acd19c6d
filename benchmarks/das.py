"""DAS benchmark: what skipping k blocks saves on a base-size ALBEF, measured in one run.

For the plain model, DAS with no skipped block (adapters only, k = 0) and DAS with k = 1..4 skipped
blocks of each group given with ``--groups`` (the last k blocks of the group: a block's cost does
not depend on its position), it reports

* trainable parameters (adapters + heads, from :func:`~torchmm_ext.modules.adapters.apply_das`);
* FLOPs of one inference pass (``torch.utils.flop_counter``);
* inference latency (median over rounds) and its ratio to k = 0 in the same run, next to the
  FLOP ratio (target: within 20% of it).

The inference pass is what VQA, NLVR2 and ITM re-ranking share: ViT on the images, the text
encoder on the texts, the fusion encoder on (image, text) pairs and the ITM head on the fused
CLS, on ``albef_model_for_retrieval("base")``.

    python benchmarks/das.py --device cpu
    python benchmarks/das.py --device cuda --batch-size 32 --json das.json

Configurations run round-robin (one iteration of each per round, the first ``--warmup`` rounds
untimed) so that background load on a shared machine hits them alike.
"""

import argparse
import datetime
import json
import platform
import statistics
import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from torchmm_ext.engine.flops import flop_counter
from torchmm_ext.models.albef import albef_model_for_retrieval, albef_model_for_vqa
from torchmm_ext.modules.adapters import apply_das


def inference_pass(model: nn.Module, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   answers: Any = None, k_test: int = 0) -> torch.Tensor:
    if answers is not None:  # VQA: rank the answer list
        return model.rank_answers(image, ids, mask, answers[0], answers[1], k_test)[1]
    image_emb = model.encode_image(image).embeddings
    text_emb = model.encode_text(ids, mask).embeddings
    fused = model.fusion_encoder(text_emb, mask, image_emb, cls_only=True).last_hidden_state
    return model.itm_head(fused[:, 0])


def build(skip: Dict[str, List[int]], das: bool, args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    sizes = {"image_size": args.image_size} | ({"patch_size": args.patch_size} if args.patch_size else {})
    if args.task == "vqa":
        model = albef_model_for_vqa(args.preset, distill=False, **sizes)
    else:
        model = albef_model_for_retrieval(args.preset, queue_size=0, **sizes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if das:
        trainable = apply_das(model, skip=skip).trainable_params
    return model.to(device).eval(), trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--text-length", type=int, default=30)
    parser.add_argument("--groups", nargs="+", default=["vision", "fusion"])
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json")
    parser.add_argument("--preset", default="base", choices=["base", "tiny"])
    parser.add_argument("--task", default="itm", choices=["itm", "vqa"],
                        help="itm: encoders + fusion + ITM head; vqa: answer ranking (decoder included)")
    parser.add_argument("--answers", type=int, default=3128, help="VQA answer-list size")
    parser.add_argument("--k-test", type=int, default=128, help="VQA answers re-scored per question")
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--config", action="append", default=[], metavar="NAME=SKIP",
                        help="measure these skip lists (JSON {group: [indices]}) instead of the k sweep")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
    vocab = (1000, 30522) if args.preset == "base" else (5, 512)
    ids = torch.randint(*vocab, (args.batch_size, args.text_length), generator=gen).to(device)
    mask = torch.ones_like(ids)
    answers = None
    if args.task == "vqa":
        answer_ids = torch.randint(*vocab, (args.answers, 5), generator=gen)
        answers = (answer_ids.to(device), torch.ones_like(answer_ids).to(device))

    configs: Dict[str, Dict[str, Any]] = {"plain ALBEF": dict(skip={}, das=False), "DAS k=0": dict(skip={}, das=True)}
    sizes = {"vision": 12, "text": 6, "fusion": 6} if args.preset == "base" else {"vision": 4, "text": 2, "fusion": 2}
    if args.task == "vqa":
        sizes["decoder"] = 6 if args.preset == "base" else 2
    for item in args.config:
        name, _, spec = item.partition("=")
        configs[name] = dict(skip=json.loads(spec), das=True)
    for group in [] if args.config else args.groups:
        for k in range(1, min(args.max_k, sizes[group]) + 1):
            configs[f"DAS k={k} {group}"] = dict(skip={group: list(range(sizes[group] - k, sizes[group]))}, das=True)

    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else (
        lambda: torch.autocast(device.type, enabled=False))
    rows: Dict[str, Dict[str, Any]] = {}
    models = {}
    for name, cfg in configs.items():
        model, trainable = build(cfg["skip"], cfg["das"], args, device)
        with flop_counter() as counter, torch.no_grad(), autocast():
            inference_pass(model, image, ids, mask, answers, args.k_test)
        rows[name] = {"skip": cfg["skip"], "trainable": trainable, "flops": counter.get_total_flops(), "times": []}
        models[name] = model
    for r in range(args.warmup + args.rounds):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            with torch.no_grad(), autocast():
                inference_pass(model, image, ids, mask, answers, args.k_test)
            sync()
            if r >= args.warmup:
                rows[name]["times"].append(time.perf_counter() - start)

    ref = rows["DAS k=0"]
    ref_time = statistics.median(ref["times"])
    print(f"# DAS benchmark ({args.task}): ALBEF {args.preset}, image {args.image_size}, batch {args.batch_size}, text {args.text_length} "
          f"tokens, {args.precision}, {device}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| configuration | trainable params | GFLOPs | FLOPs vs k=0 | latency (ms) | latency vs k=0 | "
          "latency ratio / FLOP ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        median = statistics.median(row["times"])
        row.update(median_s=median, flop_ratio=row["flops"] / ref["flops"], latency_ratio=median / ref_time)
        print(f"| {name} | {row['trainable']:,} | {row['flops'] / 1e9:.2f} | {row['flop_ratio']:.3f} | "
              f"{1000 * median:.1f} | {row['latency_ratio']:.3f} | {row['latency_ratio'] / row['flop_ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "machine": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "date": datetime.datetime.now().isoformat()}, f, indent=1)


if __name__ == "__main__":
    main()
