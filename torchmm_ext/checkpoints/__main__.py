"""Command line: convert checkpoints between layouts, or inspect one.

Examples::

    python -m torchmm_ext.checkpoints convert --from albef --to torchmm_ext ALBEF.pth out.pt --image-size 384
    python -m torchmm_ext.checkpoints convert --from torchmm_ext --to albef ours.pt albef_layout.pth
    python -m torchmm_ext.checkpoints inspect ALBEF.pth
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from torchmm_ext.checkpoints.layouts import detect_layout, KNOWN_LAYOUTS
from torchmm_ext.checkpoints.loading import convert_to_torchmm_ext
from torchmm_ext.checkpoints.convert import torchmm_ext_to_albef_conversion
from torchmm_ext.checkpoints.primitives import group_keys, load_state_dict_file, StateDict


def _save(state: StateDict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state}, path)


def _convert(args: argparse.Namespace) -> int:
    state = load_state_dict_file(args.input, weights_only=not args.unsafe_pickle)
    source = args.source or detect_layout(state)
    if args.target == "torchmm_ext":
        conversion = convert_to_torchmm_ext(state, layout=source, image_size=args.image_size,
                                            fusion_layer=args.fusion_layer)
    else:  # albef
        if source != "torchmm_ext":
            state = convert_to_torchmm_ext(state, layout=source, image_size=args.image_size).state_dict
        elif args.image_size is not None:
            state = convert_to_torchmm_ext(state, layout=source, image_size=args.image_size).state_dict
        from torchmm_ext.checkpoints.pela import factor_pairs, torchmm_ext_to_pela_conversion

        # a low-rank model exports to PELA's layout (ALBEF names with factor pairs)
        conversion = (torchmm_ext_to_pela_conversion if factor_pairs(state) else torchmm_ext_to_albef_conversion)(state)
    _save(conversion.state_dict, args.output)
    print(f"{args.input} ({source}) -> {args.output} ({args.target}): "
          f"{len(conversion.state_dict)} tensors")
    if conversion.ignored:
        print(f"ignored {len(conversion.ignored)} source tensors:")
        for group, keys in group_keys(conversion.ignored).items():
            print(f"  {group}: {len(keys)}")
    for note in conversion.notes:
        print(f"note: {note}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    state = load_state_dict_file(args.file, weights_only=not args.unsafe_pickle)
    layout = detect_layout(state)
    print(f"layout: {layout}")
    from torchmm_ext.checkpoints.pela import describe_low_rank

    low_rank = describe_low_rank(state)
    if low_rank:
        print(low_rank)
    total = 0
    for group, keys in group_keys(list(state), depth=args.depth).items():
        count = sum(state[k].numel() for k in keys)
        total += count
        print(f"  {group}: {len(keys)} tensors, {count:,} values")
    print(f"total: {len(state)} tensors, {total:,} values")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m torchmm_ext.checkpoints`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m torchmm_ext.checkpoints",
        description="Convert ALBEF-family checkpoints between layouts, or inspect one. Known "
        "layouts: " + "; ".join(f"{k}: {v}" for k, v in KNOWN_LAYOUTS.items()),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert a checkpoint to another layout")
    convert.add_argument("--from", dest="source", choices=sorted(KNOWN_LAYOUTS), default=None,
                         help="source layout (detected when omitted)")
    convert.add_argument("--to", dest="target", choices=["torchmm_ext", "albef"], required=True,
                         help="target layout")
    convert.add_argument("input", type=Path, help="checkpoint to read (.pth/.pt/.bin/.safetensors)")
    convert.add_argument("output", type=Path, help="file to write ({'model': state_dict}, or .safetensors)")
    convert.add_argument("--image-size", type=int, default=None,
                         help="interpolate ViT position embeddings for this image size")
    convert.add_argument("--fusion-layer", type=int, default=6,
                         help="hf_bert source: first BERT layer of the fusion encoder (default 6)")
    convert.add_argument("--unsafe-pickle", action="store_true",
                         help="torch.load with weights_only=False (only for files you trust)")
    convert.set_defaults(func=_convert)
    inspect = sub.add_parser("inspect", help="print the layout and parameter counts per group")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--depth", type=int, default=2, help="dotted components per group (default 2)")
    inspect.add_argument("--unsafe-pickle", action="store_true",
                         help="torch.load with weights_only=False (only for files you trust)")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
