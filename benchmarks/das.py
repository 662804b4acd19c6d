"""DAS benchmark: what skipping k blocks saves on a base-size ALBEF, ViLT or METER, measured in one run.

For the plain model, DAS with no skipped block (adapters only, k = 0) and DAS with k = 1..4 skipped
blocks of each group given with ``--groups`` (the last k blocks of the group: a block's cost does
not depend on its position), it reports

* trainable parameters (adapters + heads, from :func:`~torchmm_ext.modules.adapters.apply_das`);
* FLOPs of one inference pass (``torch.utils.flop_counter``);
* inference latency (median over rounds) and its ratio to k = 0 in the same run, next to the
  FLOP ratio (target: within 20% of it).

The inference pass (``--model albef``) is what VQA, NLVR2 and ITM re-ranking share: ViT on the
images, the text encoder on the texts, the fusion encoder on (image, text) pairs and the ITM head
on the fused CLS, on ``albef_model_for_retrieval("base")`` (``--task vqa``: answer ranking with
the decoder; ``--task nlvr``: ``albef_model_for_nlvr``'s prediction on image pairs, both images
through the ViT, the paired fusion layers and the NLVR2 head). ``--model vilt`` / ``--model
meter``: the VQA classifier model (``vilt_model_for_vqa`` / ``meter_model_for_vqa``,
``--answers`` answers: 3,129 published) on images and questions; their DAS groups are the published candidates (ViLT's ``transformer`` blocks; METER's
``text_fusion`` + ``image_fusion`` co-attention layers, whose flat indices 0-5 / 6-11 ``--config``
also takes). Their other tasks: ``--task nlvr`` (``vilt_model_for_nlvr`` / ``meter_model_for_nlvr``
on image pairs: ViLT's transformer once per image, METER's two fusion passes, and the NLVR2 head)
and ``--task itm`` (``vilt_model_for_retrieval`` / ``meter_model_for_retrieval``: the rank score of
each image-text pair, the retrieval evaluation's pass); ``--vision-kind``, ``--text-kind`` and
``--vocab-size`` build METER as a recipe config's ``model:`` section does (the shapes configs:
``vit``, ``bert``, the shapes tokenizer's 156 tokens).

    python benchmarks/das.py --device cpu
    python benchmarks/das.py --device cuda --batch-size 32 --json das.json
    python benchmarks/das.py --model meter --groups text_fusion image_fusion --max-k 2
    python benchmarks/das.py --model meter --task nlvr --preset tiny --image-size 64 --patch-size 16 \
        --vision-kind vit --text-kind bert --vocab-size 156 --config 'image 0=[2]'

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
from torchmm_ext.models.albef import albef_model_for_nlvr, albef_model_for_retrieval, albef_model_for_vqa, ALBEFForNLVR
from torchmm_ext.models.meter import (
    meter_model_for_nlvr,
    meter_model_for_retrieval,
    meter_model_for_vqa,
    METERForNLVR,
    METERForRetrieval,
    METERForVQA,
)
from torchmm_ext.models.vilt import (
    vilt_model_for_nlvr,
    vilt_model_for_retrieval,
    vilt_model_for_vqa,
    ViltForNLVR,
    ViltForRetrieval,
    ViltForVQA,
)
from torchmm_ext.modules.adapters import apply_das


#: The DAS block groups of each backbone (the published candidates for ViLT and METER).
DAS_GROUPS = {"albef": None, "vilt": ["transformer"], "meter": ["text_fusion", "image_fusion"]}
#: The timed pass of each backbone when ``--task`` is not given.
DEFAULT_TASK = {"albef": "itm", "vilt": "vqa", "meter": "vqa"}


def inference_pass(model: nn.Module, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   answers: Any = None, k_test: int = 0) -> torch.Tensor:
    if isinstance(model, (ViltForVQA, ViltForNLVR, METERForVQA, METERForNLVR)):  # VQA answers / NLVR2 true-false
        return model(image, ids, mask).logits
    if isinstance(model, ALBEFForNLVR):  # NLVR2 true-false logits of the online model
        return model.predict(image, ids, mask)
    if isinstance(model, METERForRetrieval):  # the rank score of each (image, text) pair
        return model.rank_scores(image, ids, mask)
    if isinstance(model, ViltForRetrieval):  # the rank score of each (image, text) pair
        return model.score_pairs(model.embed_images(image), ids, mask)
    if answers is not None:  # VQA: rank the answer list
        return model.rank_answers(image, ids, mask, answers[0], answers[1], k_test)[1]
    image_emb = model.encode_image(image).embeddings
    text_emb = model.encode_text(ids, mask).embeddings
    fused = model.fusion_encoder(text_emb, mask, image_emb, cls_only=True).last_hidden_state
    return model.itm_head(fused[:, 0])


def build(skip: Dict[str, List[int]], das: bool, args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    sizes = {"image_size": args.image_size, "vocab_size": args.vocab}
    sizes |= {"patch_size": args.patch_size} if args.patch_size else {}
    if args.model == "vilt":
        if args.task == "vqa":
            model = vilt_model_for_vqa(args.preset, num_answers=args.answers, **sizes)
        else:
            model = (vilt_model_for_nlvr if args.task == "nlvr" else vilt_model_for_retrieval)(args.preset, **sizes)
    elif args.model == "meter":
        sizes |= dict(vision_kind=args.vision_kind, text_kind=args.text_kind)
        if args.task == "vqa":
            model = meter_model_for_vqa(args.preset, num_answers=args.answers, **sizes)
        else:
            model = (meter_model_for_nlvr if args.task == "nlvr" else meter_model_for_retrieval)(args.preset, **sizes)
    elif args.task == "vqa":
        model = albef_model_for_vqa(args.preset, distill=False, **sizes)
    elif args.task == "nlvr":
        model = albef_model_for_nlvr(args.preset, distill=False, **sizes)
    else:
        model = albef_model_for_retrieval(args.preset, queue_size=0, **sizes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if das:
        trainable = apply_das(model, skip=skip, groups=DAS_GROUPS[args.model]).trainable_params
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
    parser.add_argument("--model", default="albef", choices=sorted(DAS_GROUPS),
                        help="albef (--task itm|vqa|nlvr), vilt or meter (--task vqa|nlvr|itm)")
    parser.add_argument("--task", choices=["itm", "vqa", "nlvr"],
                        help="albef: itm (default; encoders + fusion + ITM head), vqa (answer ranking, decoder "
                             "included) or nlvr (image pairs, paired fusion layers); vilt and meter: vqa (default), "
                             "nlvr or itm (retrieval rank scores)")
    parser.add_argument("--vision-kind", default="clip", help="METER's ViT: clip (published) or vit (ALBEF's)")
    parser.add_argument("--text-kind", default="roberta", help="METER's text encoder: roberta (published) or bert")
    parser.add_argument("--vocab-size", type=int,
                        help="text vocabulary (default: the preset's; the shapes tokenizer has 156 tokens)")
    parser.add_argument("--answers", type=int, default=3128, help="VQA answer-list size")
    parser.add_argument("--k-test", type=int, default=128, help="VQA answers re-scored per question")
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--config", action="append", default=[], metavar="NAME=SKIP",
                        help="measure these skip lists (JSON {group: [indices]}) instead of the k sweep")
    args = parser.parse_args()
    args.task = args.task or DEFAULT_TASK[args.model]
    if args.model != "albef" and args.groups == parser.get_default("groups"):
        args.groups = DAS_GROUPS[args.model]  # ViLT / METER: the published DAS candidates
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    pair = (2,) if args.task == "nlvr" else ()  # NLVR2: a left and a right image per sentence
    image = torch.randn(args.batch_size, *pair, 3, args.image_size, args.image_size, generator=gen).to(device)
    vocab = (1000, 30522) if args.preset == "base" else (5, 512)
    args.vocab = args.vocab_size or (50265 if args.model == "meter" and args.preset == "base" else vocab[1])
    ids = torch.randint(vocab[0], min(vocab[1], args.vocab), (args.batch_size, args.text_length), generator=gen)
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    answers = None
    if args.task == "vqa" and args.model == "albef":
        answer_ids = torch.randint(vocab[0], min(vocab[1], args.vocab), (args.answers, 5), generator=gen)
        answers = (answer_ids.to(device), torch.ones_like(answer_ids).to(device))

    plain = f"plain {dict(albef='ALBEF', vilt='ViLT', meter='METER')[args.model]}"
    configs: Dict[str, Dict[str, Any]] = {plain: dict(skip={}, das=False), "DAS k=0": dict(skip={}, das=True)}
    base = args.preset == "base"
    if args.model == "vilt":
        sizes = {"transformer": 12 if base else 4}
    elif args.model == "meter":
        sizes = {"text_fusion": 6 if base else 2, "image_fusion": 6 if base else 2}
    else:
        sizes = {"vision": 12, "text": 6, "fusion": 6} if base else {"vision": 4, "text": 2, "fusion": 2}
        if args.task == "vqa":
            sizes["decoder"] = 6 if base else 2
        if args.task == "nlvr":  # NLVR2: each fusion layer once per image of the pair
            sizes["fusion"] *= 2
    for item in args.config:
        name, _, spec = item.rpartition("=")  # names may contain "=" (k=4), JSON specs do not
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
    print(f"# DAS benchmark ({args.task}): {plain[6:]} {args.preset}, image {args.image_size}, batch {args.batch_size}, text {args.text_length} "
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
