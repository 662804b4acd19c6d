"""Per-word Grad-CAM of ALBEF's ITM on one image, written as one PNG grid: the image, then one
panel per word of the text with that word's heat map overlaid (ALBEF's visualization.ipynb).

    # a checkpoint written by finetune_grounding.py / finetune_retrieval.py (its stored config
    # gives the model sizes and the tokenizer)
    python examples/albef/visualize.py --checkpoint outputs/albef_grounding_shapes/checkpoint_best.pth \
        --image data_cache/shapes_v1_*/images/val/000003.png --text "the red circle" --output grid.png
    # a published ALBEF checkpoint (any layout --checkpoint accepts elsewhere)
    python examples/albef/visualize.py --checkpoint refcoco.pth --preset base \
        --tokenizer bert-base-uncased --image cat.jpg --text "the cat on the left" --output grid.png

The maps come from :func:`torchmm_ext.evaluation.grounding.itm_gradcam` on BERT layer
``--block-num`` (ALBEF's count; default: ALBEF's 8, or for a shallower model
:func:`~torchmm_ext.evaluation.grounding.default_block_num`, which avoids the last fusion layer:
only its CLS query reaches the ITM logit, so its word maps are zero).
"""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.functional import to_pil_image, to_tensor
from torchvision.utils import make_grid

from torchmm_ext.checkpoints import load_pretrained
from torchmm_ext.data.captions import pre_caption
from torchmm_ext.data.datasets import BadImageError
from torchmm_ext.data.shapes_world import cached_shapes_world
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.data.transforms import albef_test_transform
from torchmm_ext.engine.config import parse_override
from torchmm_ext.evaluation.grounding import (
    default_block_num,
    fusion_layer_index,
    itm_gradcam,
    upsample_heatmap,
    word_maps,
)
from torchmm_ext.models.albef import albef_model_for_retrieval

LABEL_HEIGHT = 14  # pixels under each panel for its word

# A "jet"-like colour map: (position, RGB) stops, interpolated linearly.
_STOPS = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = torch.tensor([[0, 0, 0.5], [0, 0.5, 1], [0.5, 1, 0.5], [1, 0.5, 0], [0.5, 0, 0]])


def colorize(heat: Tensor) -> Tensor:
    """``[H, W]`` values in [0, 1] -> ``[3, H, W]`` RGB through the jet-like colour map."""
    heat = heat.clamp(0, 1)
    right = torch.bucketize(heat, _STOPS[1:-1])  # segment index 0..3
    t = ((heat - _STOPS[right]) / (_STOPS[right + 1] - _STOPS[right]))[..., None]
    return ((1 - t) * _COLOURS[right] + t * _COLOURS[right + 1]).permute(2, 0, 1)


def overlay(image: Tensor, heatmap: Tensor, weight: float = 0.5) -> Tensor:
    """Blend a ``[g, g]`` map, upsampled and min-max normalised, over a ``[3, S, S]`` image in [0, 1]."""
    heat = upsample_heatmap(heatmap, image.size(1), image.size(2))
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    return (1 - weight) * image + weight * colorize(heat)


def labelled(panel: Tensor, label: str) -> Tensor:
    """``[3, S, S]`` panel -> ``[3, S + LABEL_HEIGHT, S]`` with ``label`` written underneath."""
    strip = Image.new("RGB", (panel.size(2), LABEL_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), label, fill=(0, 0, 0))
    return torch.cat([panel, to_tensor(strip)], dim=1)


def gradcam_grid(image: Image.Image, words: Sequence[str], maps: Tensor, panel_size: int = 256) -> Image.Image:
    """The PNG grid: the image, then one overlaid panel per word (``len(words) + 1`` panels).

    Args:
        image (PIL.Image.Image): the original image.
        words (Sequence[str]): the words.
        maps (Tensor): ``[W, g, g]`` one map per word.
        panel_size (int): side of each square panel.

    Returns:
        PIL.Image.Image: ``(len(words) + 1) * (panel_size + 2) + 2`` wide,
        ``panel_size + LABEL_HEIGHT + 4`` high.
    """
    shown = to_tensor(image.resize((panel_size, panel_size), Image.BICUBIC))
    panels = [labelled(shown, "image")]
    panels += [labelled(overlay(shown, m), w) for w, m in zip(words, maps)]
    grid = make_grid(torch.stack(panels), nrow=len(panels), padding=2, pad_value=1.0)
    return to_pil_image(grid)


def read_image(path: str) -> Image.Image:
    """The ``--image`` as RGB, or an error that says what is wrong with the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() decodes the whole file inside the try
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def resolve_model_config(args: argparse.Namespace, stored: Dict[str, Any]) -> tuple[Dict[str, Any], str, Optional[Path]]:
    """Model kwargs, tokenizer name and shapes corpus from the checkpoint's stored recipe config
    (when there is one) overridden by the command line."""
    model_kwargs = dict(stored.get("model") or {})
    if args.preset:
        model_kwargs["preset"] = args.preset
    for item in args.model:
        keys, value = parse_override(item)
        model_kwargs[keys[-1]] = value
    data = stored.get("data") or {}
    tokenizer = args.tokenizer or data.get("tokenizer") or "bert-base-uncased"
    corpus = None
    if tokenizer == "shapes":
        if not data.get("shapes"):
            raise SystemExit("--tokenizer shapes needs a checkpoint written by a shapes-world recipe "
                             "(its config names the world); otherwise pass a tokenizer directory")
        params = dict(data["shapes"])
        corpus = cached_shapes_world(params.pop("cache_dir"), **params).vocab_corpus
    return model_kwargs, tokenizer, corpus


def main(argv: Optional[List[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="retrieval or grounding weights, any layout")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--text", required=True, help="the text whose words are explained")
    parser.add_argument("--output", default="gradcam.png", help="PNG grid to write")
    parser.add_argument("--preset", default=None, choices=["base", "tiny"], help="model preset")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="albef_model_for_retrieval keyword overrides, e.g. image_size=384")
    parser.add_argument("--tokenizer", default=None, help="'shapes', a tokenizer directory or a hub name")
    parser.add_argument("--block-num", type=int, default=None, help="BERT layer (ALBEF's count)")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--panel-size", type=int, default=256)
    args = parser.parse_args(argv)

    image = read_image(args.image)  # first: a bad path fails before the model is built
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    stored = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    stored = stored if isinstance(stored, dict) else {}
    model_kwargs, tokenizer_name, corpus = resolve_model_config(args, stored)
    tokenizer = build_tokenizer(tokenizer_name, corpus_file=corpus)
    model = albef_model_for_retrieval(
        **{"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **model_kwargs})
    print(load_pretrained(model, checkpoint).format())
    model.eval()

    text_layers, fusion_layers = len(model.text_encoder.encoder.layer), len(model.fusion_encoder.layer)
    block_num = default_block_num(text_layers, fusion_layers) if args.block_num is None else args.block_num
    layer = fusion_layer_index(block_num, text_layers, fusion_layers)
    if layer == fusion_layers - 1 and fusion_layers > 1:
        print(f"note: BERT layer {block_num} is the last fusion layer; only the CLS query reaches the "
              "ITM logit there, so the word maps are zero")

    text = pre_caption(args.text, max_words=args.max_tokens)
    tokens = tokenizer([text], truncation=True, max_length=args.max_tokens, return_tensors="pt")
    pixels = albef_test_transform(model.vision_encoder.image_size)(image)[None]
    cam = itm_gradcam(model, pixels, tokens["input_ids"], tokens["attention_mask"], layer)
    words, maps = word_maps(cam.token_maps[0], tokenizer, text)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    gradcam_grid(image, words, maps, args.panel_size).save(output)
    print(f"ITM match logit {cam.itm_scores[0]:.3f}; {len(words)} words on BERT layer {block_num}; wrote {output}")
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
