"""ELIP benchmark: ALBEF pre-training with text-guided token pruning vs. the same model unpruned.

One run measures, for the ``base`` ALBEF pre-training model at 256 px (ViT-B/16: 257 tokens)
and the published schedule (prune before blocks 2, 4, 10 keeping 90/65/40% of the patches),
these configurations at the same batch:

* ``unpruned``: all tokens (the baseline);
* ``elip``: ELIP as published (look-ahead scoring, momentum ViT unpruned);
* ``elip_no_lookahead``: scores from the block that just ran (no extra block forwards);
* ``elip_prune_momentum``: ELIP with the momentum ViT pruned too;

and for each

* **tokens per layer**: the sequence length entering each ViT block in the training forward;
* **step pairs/s**: forward (ITC + ITM + MLM with momentum distillation), backward, AdamW step;
* **peak memory**: on CUDA the allocator's peak; on the CPU the process's peak RSS, each
  configuration in a fresh subprocess, with the part above the model + optimizer floor (RSS
  after building, plus gradients and two AdamW moments: 3 x the trainable parameter bytes);
* **activation memory**: the bytes autograd keeps for the backward pass at the end of the
  training forward (unique storages of the saved tensors, parameters excluded), at the batch
  and at half of it; the difference gives the bytes per pair, hence the **largest batch** whose
  activations, with fp32 weights, gradients and AdamW moments, fit ``--budget-gib``. This is
  the device-independent part of the peak: on the CPU the RSS is too coarse to show it;
* **image encoding images/s**: ``encode_image`` in eval mode (pruned by the image CLS);
* **ITM re-rank pairs/s**: fusion encoder + ITM head on ``batch x k`` pairs over the encoded
  (pruned) image tokens, as in retrieval evaluation.

Ratios are against ``unpruned`` from the same run. Time = median of the timed repetitions; on
the CPU it is the process's CPU time (run with ``OMP_NUM_THREADS=1`` on a shared machine), on
CUDA wall time.

Usage::

    python benchmarks/elip.py --device cpu --batch 8 --rounds 3
    python benchmarks/elip.py --device cuda --batch 64 --precision bf16 --json elip.json
    # the shapes-world model of examples/elip/configs/pretrain_shapes.yaml (tiny, 64 px, 16 px patches)
    python benchmarks/elip.py --device cpu --preset tiny --image-size 64 --batch 64 --queue-size 0 \
        --begin-layers 1 2 3
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any, Dict, List

import torch

CONFIGS: Dict[str, Any] = {
    "unpruned": None,
    "elip": dict(lookahead=True),
    "elip_no_lookahead": dict(lookahead=False),
    "elip_prune_momentum": dict(lookahead=True, prune_momentum=True),
}
VOCAB, CLS_ID, MASK_ID, PAD_ID = 30522, 101, 103, 0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def saved_activation_mib(forward, model: torch.nn.Module) -> float:
    """MiB of activations autograd keeps for backward while ``forward()`` runs.

    Every tensor saved for backward passes through a ``saved_tensors_hooks`` pack hook; its
    storage is counted once (views share one), parameters and buffers are not counted (the
    autocast copies of weights are: they live as long as the activations). The saved tensors
    stay referenced until backward, so storages are unique while we count. The forward's
    output is dropped afterwards, which frees the graph.
    """
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in static:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(saved.values()) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, warmup: int, rounds: int) -> List[float]:
    # On the CPU: process CPU time, which a shared machine's load (or a process paused for
    # memory) does not inflate; with OMP_NUM_THREADS=1 it is the single-core compute time.
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    times = []
    for i in range(warmup + rounds):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(clock() - start)
    return times


def worker(args: argparse.Namespace) -> Dict[str, Any]:
    """One configuration, measured in this (fresh) process."""
    from torchmm_ext.models.albef import albef_model_for_pretraining
    from torchmm_ext.modules.token_pruning import apply_token_pruning

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = albef_model_for_pretraining(args.preset, image_size=args.image_size, patch_size=args.patch_size,
                                        queue_size=args.queue_size,
                                        vocab_size=VOCAB, mask_token_id=MASK_ID, cls_token_id=CLS_ID, pad_token_id=PAD_ID)
    settings = CONFIGS[args.worker]
    if settings is not None:
        apply_token_pruning(model, begin_layers=args.begin_layers, keep_ratios=args.keep_ratios,
                            guidance_weight=0.2, **settings)
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    trainable_mib = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    floor_mib = _rss_mib() + 3 * trainable_mib
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext)

    g = torch.Generator().manual_seed(0)
    b = args.batch
    images = torch.randn(b, 3, args.image_size, args.image_size, generator=g).to(device)
    ids = torch.randint(1000, VOCAB, (b, args.text_length), generator=g)
    ids[:, 0] = CLS_ID
    ids, mask = ids.to(device), torch.ones_like(ids).to(device)

    lengths: List[int] = []
    hooks = [blk.register_forward_pre_hook(
        lambda m, a: lengths.append(a[0].shape[1]) if torch.is_grad_enabled() else None)
        for blk in model.vision_encoder.blocks]

    def forward(n: int) -> torch.Tensor:
        with amp():
            return model(images[:n], ids[:n], mask[:n], alpha=0.4).loss

    model.train()
    activation_mib = saved_activation_mib(lambda: forward(b), model)
    half_activation_mib = saved_activation_mib(lambda: forward(max(b // 2, 1)), model) if b > 1 else None
    lengths.clear()

    def step() -> None:
        with amp():
            loss = model(images, ids, mask, alpha=0.4).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times = _timed(step, device, args.warmup, args.rounds)
    tokens = lengths[: len(model.vision_encoder.blocks)]
    for h in hooks:
        h.remove()
    if device.type == "cuda":
        peak_mib, floor = torch.cuda.max_memory_allocated() / 2**20, None
    else:
        peak_mib, floor = _peak_rss_mib(), floor_mib

    model.eval()
    with torch.no_grad(), amp():
        encode_times = _timed(lambda: model.encode_image(images), device, 1, args.rounds)
        image_tokens = model.encode_image(images).embeddings
        text = model.text_encoder(ids, attention_mask=mask.bool()).last_hidden_state
        k = args.k
        text_index = torch.randint(0, b, (b * k,), generator=g).to(device)
        image_index = torch.arange(b, device=device).repeat_interleave(k)
        rerank_times = _timed(lambda: model.itm_scores(image_tokens, text[text_index], mask[text_index],
                                                       image_index=image_index), device, 1, args.rounds)
    return dict(
        config=args.worker, tokens_per_layer=tokens, eval_tokens=image_tokens.shape[1],
        step_s=statistics.median(step_times), step_times=step_times,
        step_pairs_per_s=b / statistics.median(step_times),
        encode_images_per_s=b / statistics.median(encode_times),
        rerank_pairs_per_s=b * k / statistics.median(rerank_times),
        peak_mib=peak_mib, floor_mib=floor,
        above_floor_mib=None if floor is None else peak_mib - floor,
        activation_mib=activation_mib, half_batch_activation_mib=half_activation_mib,
        param_mib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        trainable_mib=trainable_mib,
    )


def largest_batch(result: Dict[str, Any], batch: int, budget_gib: float) -> int:
    """Largest batch whose activations fit ``budget_gib`` next to the fp32 weights, their
    gradients and AdamW's two moments (activations linear in the batch, from two batches)."""
    per_pair = (result["activation_mib"] - result["half_batch_activation_mib"]) / (batch - max(batch // 2, 1))
    fixed = result["activation_mib"] - per_pair * batch  # batch-independent part (e.g. the queue's use)
    states = result["param_mib"] + 3 * result["trainable_mib"]
    return int((budget_gib * 1024 - states - fixed) // per_pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-length", type=int, default=25)
    parser.add_argument("--queue-size", type=int, default=65536)
    parser.add_argument("--k", type=int, default=16, help="texts re-ranked per image")
    parser.add_argument("--begin-layers", type=int, nargs="+", default=[2, 4, 10])
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.9, 0.65, 0.4])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--budget-gib", type=float, default=80.0,
                        help="memory budget for the largest-batch column (default: one 80 GB GPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    results: Dict[str, Dict[str, Any]] = {}
    for name in args.configs:  # a fresh process each: peak RSS is a per-process figure
        argv = [sys.executable, __file__, "--worker", name]
        for key, value in vars(args).items():
            if key not in ("worker", "json", "configs"):
                argv += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: done", file=sys.stderr)

    base = results.get("unpruned")
    cpu = platform.processor() or platform.machine()
    print(f"# ELIP benchmark: {args.preset} ALBEF pre-training, {args.image_size} px, batch {args.batch}, "
          f"{args.precision}, {args.device} ({cpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), {args.rounds} timed rounds after {args.warmup} warm-up")
    memory = "peak MiB (CUDA allocator)" if args.device.startswith("cuda") else "peak RSS MiB (above floor)"
    print(f"| config | tokens per layer | step pairs/s | {memory} | activations MiB | "
          f"largest batch in {args.budget_gib:g} GiB | encode images/s | re-rank pairs/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        def ratio(key: str) -> str:
            return f" ({r[key] / base[key]:.2f}x)" if base and name != "unpruned" else ""
        mem = f"{r['peak_mib']:.0f}"
        if r["above_floor_mib"] is not None:
            mem += f" ({r['above_floor_mib']:.0f})"
        if base and name != "unpruned":
            key = "above_floor_mib" if r["above_floor_mib"] is not None else "peak_mib"
            change = 100 * (1 - r[key] / base[key])
            mem += f", {abs(change):.0f}% {'lower' if change >= 0 else 'higher'}"
        act = f"{r['activation_mib']:.0f}"
        if base and name != "unpruned":
            act += f", {100 * (1 - r['activation_mib'] / base['activation_mib']):.0f}% lower"
        fits = largest_batch(r, args.batch, args.budget_gib) if r["half_batch_activation_mib"] is not None else None
        if fits is not None and base and name != "unpruned":
            fits_str = f"{fits} ({fits / largest_batch(base, args.batch, args.budget_gib):.2f}x)"
        else:
            fits_str = str(fits)
        tokens = r["tokens_per_layer"]
        print(f"| {name} | {tokens} (mean {statistics.mean(tokens):.0f}) | {r['step_pairs_per_s']:.3f}"
              f"{ratio('step_pairs_per_s')} | {mem} | {act} | {fits_str} "
              f"| {r['encode_images_per_s']:.2f}{ratio('encode_images_per_s')}"
              f" | {r['rerank_pairs_per_s']:.1f}{ratio('rerank_pairs_per_s')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=2)


if __name__ == "__main__":
    main()
