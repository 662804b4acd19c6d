"""A/B of our ALBEF training step in ONE process: steps alternate between ours and ours with
one ``--ours-ablations`` variant of ``albef_step.py`` (order on, off, off, on, ...), each under
``torch.profiler``; prints the step wall-time medians and the per-op self-time medians side by
side (with ``--shapes``, also the copies / fills by input shape). For changes whose effect is
smaller than the spread between separate benchmark runs on a shared machine.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/albef_train_ab.py --ablation gathered-itm --pairs 4
"""

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import albef_step  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ablation", required=True, choices=sorted(k for k, v in albef_step.OURS_ABLATIONS.items()
                                                               if v[0] == "train"))
    p.add_argument("--pairs", type=int, default=4, help="timed steps of each side")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--preset", default="base")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--queue-size", type=int, default=65536)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", action="store_true", help="also copy_/fill_ self time by input shape")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = albef_step.build_ours(args.image_size, args.queue_size, args.preset)
    inputs = albef_step.TrainInputs(args.batch_size, args.image_size, 30, device, 0,
                                    model.text_encoder.embeddings.word_embeddings.num_embeddings)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5,
                            weight_decay=0.02, fused=True)

    def step(ablated: bool) -> float:
        model.train()
        idx = inputs.next_idx()
        with albef_step.ablated(model, args.ablation if ablated else None), \
                albef_step.autocast_ctx(device, args.precision):
            out = model(inputs.image, inputs.ids, inputs.mask, idx, alpha=0.4)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    step(False), step(True)  # warm-up
    walls = {False: [], True: []}
    selfs = {False: collections.defaultdict(list), True: collections.defaultdict(list)}
    for ablated in ([False, True, True, False] * args.pairs)[: 2 * args.pairs]:
        with profile(record_shapes=args.shapes) as prof:
            start = time.perf_counter()
            loss = step(ablated)
            wall = time.perf_counter() - start
        walls[ablated].append(wall)
        events = prof.key_averages()
        selfs[ablated]["TOTAL self"].append(sum(e.self_cpu_time_total for e in events) / 1e3)
        for e in events:
            selfs[ablated][e.key].append(e.self_cpu_time_total / 1e3)
        if args.shapes:
            for e in prof.key_averages(group_by_input_shape=True):
                if e.key in ("aten::copy_", "aten::fill_"):
                    selfs[ablated][f"{e.key} {str(e.input_shapes)[:40]} x{e.count}"].append(
                        e.self_cpu_time_total / 1e3)
        print(f"{'ablated' if ablated else 'ours   '} wall {wall:6.2f} s  loss {loss:.4f}", flush=True)

    med = lambda v: statistics.median(v) if v else 0.0  # noqa: E731
    print(f"\nstep wall median: ours {med(walls[False]):.2f} s, {args.ablation} {med(walls[True]):.2f} s "
          f"({med(walls[True]) / med(walls[False]):.3f}x)")
    keys = sorted(set(selfs[False]) | set(selfs[True]),
                  key=lambda k: -max(med(selfs[False][k]), med(selfs[True][k])))
    print(f"{'self time, median ms':62s} {'ours':>9s} {'ablated':>9s} {'diff':>8s}")
    for k in keys[: args.top]:
        a, b = med(selfs[False][k]), med(selfs[True][k])
        print(f"{k[:62]:62s} {a:9.1f} {b:9.1f} {b - a:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
