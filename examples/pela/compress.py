"""PELA's compression step: load a full-rank ALBEF checkpoint (any layout ``--checkpoint``
accepts: ours, salesforce/ALBEF's ALBEF.pth / ALBEF_4M.pth, TorchMultimodal), factorise every
eligible Linear by truncated SVD, print the table and write a low-rank checkpoint that records
the method (so every recipe restructures its model before loading it).

    python examples/pela/compress.py --checkpoint outputs/albef_pretrain_shapes/pretrained.pth \
        --ratio 3 --output outputs/pela_compressed/low_rank.pth
    # ALBEF-4M (base preset), output also in PELA's own layout (ALBEF names) for its code
    python examples/pela/compress.py --checkpoint ALBEF_4M.pth --output low_rank.pth --format pela

The table lists parameters before/after per group (vision, text, fusion, heads, momentum
copies) and the online and momentum totals separately (the published script's printed rate
mixes them), then each factorised layer's rank and relative reconstruction error.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from torchmm_ext.checkpoints import detect_layout, load_pretrained, load_state_dict_file
from torchmm_ext.checkpoints.loading import convert_to_torchmm_ext
from torchmm_ext.checkpoints.pela import factor_pairs, infer_low_rank_ratio, torchmm_ext_to_pela_conversion
from torchmm_ext.checkpoints.primitives import load_checkpoint_metadata
from torchmm_ext.engine.checkpoint import save_checkpoint
from torchmm_ext.engine.recipe_utils import load_task_head
from torchmm_ext.models import albef
from torchmm_ext.modules.efficiency import applied_methods
from torchmm_ext.modules.low_rank import apply_low_rank, DEFAULT_EXCLUDE, LowRankReport

BUILDERS = ("pretraining", "retrieval", "ve", "vqa", "nlvr")


def _model_kwargs(checkpoint: Path, layout: str, state: Dict[str, torch.Tensor], opts: List[str]) -> Dict[str, Any]:
    """Builder kwargs: the checkpoint's own ``config.model`` (files of this library), else the
    ``base`` preset; the vocabulary size from its word embeddings; then ``--model-opts``."""
    kwargs: Dict[str, Any] = {}
    config = load_checkpoint_metadata(checkpoint).get("config")
    if layout == "torchmm_ext" and isinstance(config, dict) and isinstance(config.get("model"), dict):
        kwargs.update(config["model"])
    kwargs.setdefault("preset", "base")
    words = convert_to_torchmm_ext(state, layout=layout).state_dict.get("text_encoder.embeddings.word_embeddings.weight")
    if words is not None:
        kwargs["vocab_size"] = words.shape[0]
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise SystemExit(f"--model-opts {opt!r}: expected KEY=VALUE")
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def compress(
    checkpoint: Path,
    output: Path,
    ratio: float = 3.0,
    model: str = "pretraining",
    model_opts: Optional[List[str]] = None,
    exclude: Optional[List[str]] = None,
    output_format: str = "torchmm_ext",
) -> LowRankReport:
    """Load ``checkpoint`` into the ``albef_model_for_<model>`` it was made for, factorise it,
    save it to ``output`` and return the report (see the module docstring)."""
    state = load_state_dict_file(checkpoint)
    layout = detect_layout(state)
    if factor_pairs(state):
        raise SystemExit(f"{checkpoint} is already low-rank ({layout} layout, ratio "
                         f"{infer_low_rank_ratio(state)}): compress its full-rank source instead")
    kwargs = _model_kwargs(checkpoint, layout, state, model_opts or [])
    net = getattr(albef, f"albef_model_for_{model}")(**kwargs).eval()
    load = load_pretrained(net, state)
    load_task_head(net, state, load, ("cls_head.", "cls_head_m."))
    print(f"loaded {checkpoint}:\n{load.format()}")
    start = time.perf_counter()
    report = apply_low_rank(net, ratio=ratio, exclude=DEFAULT_EXCLUDE if exclude is None else exclude)
    seconds = time.perf_counter() - start
    weights = {k: v for k, v in net.state_dict().items() if v.numel() > 0}  # no empty (size-0) queue
    if output_format == "pela":
        weights = torchmm_ext_to_pela_conversion(weights).state_dict
    save_checkpoint(output, {"model": weights, "methods": applied_methods(net), "config": {"model": kwargs}})
    print(report.format())
    before, after = report.params["online"]
    print(f"online model: {before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters ({100 * (1 - after / before):.1f}% fewer)")
    if "momentum copies" in report.params:
        mb, ma = report.params["momentum copies"]
        print(f"momentum copies: {mb / 1e6:.2f}M -> {ma / 1e6:.2f}M")
    print(f"SVD of {len(report.layers)} layers in {seconds:.1f} s; wrote {output} ({output_format} layout)")
    return report


def main(argv: Optional[List[str]] = None) -> LowRankReport:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="full-rank checkpoint (any known layout)")
    parser.add_argument("--output", type=Path, required=True, help="low-rank checkpoint to write")
    parser.add_argument("--ratio", type=float, default=3.0, help="PELA's k: each layer keeps ~1/k of its weights (3)")
    parser.add_argument("--model", choices=BUILDERS, default="pretraining",
                        help="the albef_model_for_<model> builder the checkpoint belongs to")
    parser.add_argument("--model-opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="builder keyword arguments (default: the checkpoint's config.model, or preset=base)")
    parser.add_argument("--exclude", nargs="*", default=None, help=f"name substrings kept full rank ({DEFAULT_EXCLUDE})")
    parser.add_argument("--format", dest="output_format", choices=["torchmm_ext", "pela"], default="torchmm_ext",
                        help="output key names: ours, or PELA's (ALBEF names with .0/.1 factors)")
    args = parser.parse_args(argv)
    return compress(args.checkpoint, args.output, args.ratio, args.model, args.model_opts, args.exclude,
                    args.output_format)


if __name__ == "__main__":
    main(sys.argv[1:])
