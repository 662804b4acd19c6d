"""METER VQA benchmark: our ``meter_model_for_vqa("base")`` against METER as published, assembled
from the Hugging Face classes METER itself runs (``RobertaModel`` layers, a ``BertLayer`` with
cross-attention for each co-attention layer, eager attention, explicit additive masks; the CLIP
ViT as ``CLIPVisionModel`` with 11 layers and ``post_layernorm`` on every token), with the same
weights (converted through our METER layout).

Measures, in one run (rounds alternate ours / reference, one model in memory at a time):

* **training step** (samples/s): forward, VQA soft-score BCE, backward, AdamW step;
* **inference** (samples/s): forward only, ``torch.no_grad``;
* **FLOPs by part** of one forward of ours (``torch.utils.flop_counter``): image encoder, text
  encoder, text-side and image-side fusion layers, the rest (transforms, poolers, head).

Usage::

    python benchmarks/meter.py --device cpu --batch-size 4 --rounds 4
    python benchmarks/meter.py --device cuda --batch-size 32 --json meter.json

The first round runs ``--warmup`` untimed iterations of each configuration first; throughput is
``batch / median time`` over the rounds.
"""

import argparse
import datetime
import gc
import json
import platform
import re
import statistics
import time
from contextlib import nullcontext
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn, Tensor
from transformers import BertConfig, CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel
from transformers.models.bert.modeling_bert import BertLayer

from torchmm_ext.checkpoints import load_pretrained
from torchmm_ext.engine.flops import flop_counter
from torchmm_ext.checkpoints.meter import torchmm_ext_to_meter
from torchmm_ext.models.meter import meter_model_for_vqa, vqa_soft_bce

NUM_ANSWERS = 3129


class HFMeterVQA(nn.Module):
    """METER's ``infer`` + ``vqa_classifier`` on Hugging Face modules, as METER's code runs them
    (the baseline). Weights come from a METER-layout state dict."""

    def __init__(self, meter_state: Dict[str, Tensor], image_size: int, attn: str = "eager") -> None:
        super().__init__()
        vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                  num_hidden_layers=11, patch_size=16, image_size=image_size,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
        vision._attn_implementation = attn
        self.vit = CLIPVisionModel(vision)
        text = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                             pad_token_id=1, layer_norm_eps=1e-5)
        text._attn_implementation = attn
        self.text = RobertaModel(text, add_pooling_layer=False)
        cross = BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, is_decoder=True,
                           add_cross_attention=True, layer_norm_eps=1e-12)
        cross._attn_implementation = "eager"  # METER's BertCrossLayer (transformers 4.6) is eager
        self.text_layers = nn.ModuleList(BertLayer(cross) for _ in range(6))
        self.image_layers = nn.ModuleList(BertLayer(cross) for _ in range(6))
        self.text_transform, self.image_transform = nn.Linear(768, 768), nn.Linear(768, 768)
        self.token_type = nn.Embedding(2, 768)
        self.text_pooler, self.image_pooler = nn.Linear(768, 768), nn.Linear(768, 768)
        self.head = nn.Sequential(nn.Linear(1536, 1536), nn.LayerNorm(1536), nn.GELU(), nn.Linear(1536, NUM_ANSWERS))
        self._load(meter_state)

    def _load(self, s: Dict[str, Tensor]) -> None:
        v = "vit_model.visual."
        vit = {"embeddings.patch_embedding.weight": s[f"{v}conv1.weight"],
               "embeddings.class_embedding": s[f"{v}class_embedding"],
               "embeddings.position_embedding.weight": s[f"{v}positional_embedding"]}
        for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
            for p in ("weight", "bias"):
                vit[f"{ours}.{p}"] = s[f"{v}{theirs}.{p}"]
        for i in range(11):
            b, h = f"{v}transformer.resblocks.{i}.", f"encoder.layers.{i}."
            for p in ("weight", "bias"):
                for name, part in zip("qkv", s[f"{b}attn.in_proj_{p}"].chunk(3)):
                    vit[f"{h}self_attn.{name}_proj.{p}"] = part
                for a, c in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    vit[f"{h}{a}.{p}"] = s[f"{b}{c}.{p}"]
        self.vit.load_state_dict(vit, strict=False)
        self.text.load_state_dict({k[len("text_transformer."):]: t for k, t in s.items()
                                   if k.startswith("text_transformer.") and "position_ids" not in k}, strict=False)
        for side, layers in (("text", self.text_layers), ("image", self.image_layers)):
            prefix = f"cross_modal_{side}_layers."
            for i, layer in enumerate(layers):
                layer.load_state_dict({k[len(f"{prefix}{i}."):]: t for k, t in s.items()
                                       if k.startswith(f"{prefix}{i}.")})
        for module, key in ((self.text_transform, "cross_modal_text_transform"),
                            (self.image_transform, "cross_modal_image_transform"),
                            (self.text_pooler, "cross_modal_text_pooler.dense"),
                            (self.image_pooler, "cross_modal_image_pooler.dense"),
                            (self.token_type, "token_type_embeddings")):
            module.load_state_dict({k[len(key) + 1:]: t for k, t in s.items() if k.startswith(key + ".")})
        self.head.load_state_dict({k[len("vqa_classifier."):]: t for k, t in s.items()
                                   if k.startswith("vqa_classifier.")})

    @staticmethod
    def _extended(mask: Tensor, dtype: torch.dtype) -> Tensor:
        return (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.text.embeddings(input_ids=ids)
        text_mask = self._extended(mask, x.dtype)
        for layer in self.text.encoder.layer:
            out = layer(x, text_mask)
            x = out[0] if isinstance(out, tuple) else out
        x = self.text_transform(x) + self.token_type.weight[0]
        y = self.vit.post_layernorm(self.vit(pixel_values=images).last_hidden_state)
        y = self.image_transform(y) + self.token_type.weight[1]
        image_mask = self._extended(torch.ones(y.shape[:2], device=y.device), y.dtype)
        for tl, il in zip(self.text_layers, self.image_layers):
            x1 = tl(x, attention_mask=text_mask, encoder_hidden_states=y, encoder_attention_mask=image_mask)
            y1 = il(y, attention_mask=image_mask, encoder_hidden_states=x, encoder_attention_mask=text_mask)
            x, y = (x1[0] if isinstance(x1, tuple) else x1), (y1[0] if isinstance(y1, tuple) else y1)
        pooled = torch.cat([torch.tanh(self.text_pooler(x[:, 0])), torch.tanh(self.image_pooler(y[:, 0]))], -1)
        return self.head(pooled)


def inputs(batch: int, image_size: int, length: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.randint(3, 50000, (batch, length), generator=g)
    lengths = torch.randint(length // 3, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 1)
    ids[:, 0] = 0
    targets = torch.zeros(batch, NUM_ANSWERS)
    targets[torch.arange(batch), torch.randint(NUM_ANSWERS, (batch,), generator=g)] = 1.0
    return [t.to(device) for t in (images, ids, mask, targets)]


def flops_by_part(model: nn.Module, batch: List[Tensor]) -> Dict[str, float]:
    """GFLOPs of one forward of ours, by module."""
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(*batch[:3])
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())

    def part(name: str) -> float:
        # A module list is not called itself: sum its members (``...text_fusion.0``, ``.1``, ...).
        pattern = re.compile(rf"(.*\.)?{name}(\.\d+)?")
        return sum(sum(v.values()) for k, v in counts.items() if pattern.fullmatch(k))

    parts = {name: part(name) for name in ("vision_encoder", "text_encoder", "text_fusion", "image_fusion")}
    parts["other (transforms, poolers, head)"] = total - sum(parts.values())
    parts["total"] = total
    return {k: v / 1e9 for k, v in parts.items()}


def _print_flops(flops: Dict[str, float], batch_size: int) -> None:
    print("\n| part | GFLOPs per sample (forward) | share |")
    print("|---|---|---|")
    for part, value in flops.items():
        print(f"| {part} | {value / batch_size:.1f} | {100 * value / flops['total']:.1f}% |")


def measure(model: nn.Module, batch: List[Tensor], precisions: List[str], device: torch.device,
            warmup: int, steps: List[str]) -> Dict[str, float]:
    """Seconds of one training step and one inference pass per precision (after ``warmup``
    untimed iterations of each)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98)) if "train" in steps else None
    out: Dict[str, float] = {}
    for precision in precisions:
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

        def train() -> None:
            model.train()
            with ctx():
                logits = model(*batch[:3])
                loss = vqa_soft_bce(getattr(logits, "logits", logits), batch[3])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def infer() -> None:
            model.eval()
            with torch.no_grad(), ctx():
                model(*batch[:3])

        for step, fn in (("train", train), ("infer", infer)):
            if step not in steps:
                continue
            for i in range(warmup + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            out[f"{step} {precision}"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=288)
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--json", default="")
    parser.add_argument("--flops-only", action="store_true", help="only count FLOPs by part (no timing)")
    parser.add_argument("--steps", default="train,infer", help="what to time: train, infer or both")
    args = parser.parse_args()
    device = torch.device(args.device)
    precisions = args.precisions.split(",")
    torch.manual_seed(0)
    if args.flops_only:
        batch = inputs(args.batch_size, args.image_size, args.text_length, device)
        flops = flops_by_part(meter_model_for_vqa("base", image_size=args.image_size).to(device).eval(), batch)
        _print_flops(flops, args.batch_size)
        return
    # One model in memory at a time (a base METER with AdamW states is ~5 GB): the rounds
    # alternate ours / reference, each rebuilt from the same METER-layout weights.
    meter_state = torchmm_ext_to_meter(meter_model_for_vqa("base", image_size=args.image_size).state_dict())
    batch = inputs(args.batch_size, args.image_size, args.text_length, device)

    def build(name: str) -> nn.Module:
        if name == "reference":
            return HFMeterVQA(meter_state, args.image_size).to(device)
        model = meter_model_for_vqa("base", image_size=args.image_size)
        load_pretrained(model, meter_state)
        return model.to(device)

    times: Dict[str, List[float]] = {}
    logits: Dict[str, Tensor] = {}
    flops: Dict[str, float] = {}
    for r in range(args.rounds):
        for name in ("ours", "reference"):
            model = build(name)
            if r == 0:
                with torch.no_grad():
                    out = model.eval()(*batch[:3])
                logits[name] = getattr(out, "logits", out).float().cpu()
                if name == "ours":
                    flops = flops_by_part(model, batch)
            for key, seconds in measure(model, batch, precisions, device, args.warmup if r == 0 else 0,
                                        args.steps.split(",")).items():
                times.setdefault(f"{key} {name}", []).append(seconds)
            del model
            gc.collect()
    diff = (logits["ours"] - logits["reference"]).abs().max().item()
    throughput = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    print(f"max |ours - reference| VQA logits, fp32 eval, same weights: {diff:.2e}")
    print(f"\nbatch {args.batch_size}, image {args.image_size} px, text {args.text_length} tokens, "
          f"{args.rounds} rounds, device {device} ({platform.processor() or platform.machine()}), "
          f"{torch.get_num_threads()} threads")
    print("| step | precision | ours (samples/s) | reference (samples/s) | ours / reference |")
    print("|---|---|---|---|---|")
    for step in args.steps.split(","):
        for precision in precisions:
            a, b = throughput[f"{step} {precision} ours"], throughput[f"{step} {precision} reference"]
            print(f"| {step} | {precision} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    _print_flops(flops, args.batch_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(), "args": vars(args), "times": times,
                       "throughput": throughput, "gflops": flops, "max_abs_diff": diff}, f, indent=2)


if __name__ == "__main__":
    main()
