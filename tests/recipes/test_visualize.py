"""The Grad-CAM visualiser: one PNG grid with the image plus one panel per word."""

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

import visualize
from torchmm_ext.checkpoints import torchmm_ext_to_albef
from torchmm_ext.data.datasets import BadImageError
from torchmm_ext.data.tokenizer import build_tokenizer
from torchmm_ext.models.albef import albef_model_for_retrieval

TINY = ["image_size=32", "patch_size=8", "vision_depth=1", "text_layers=1", "fusion_layers=2", "queue_size=0"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    corpus = root / "corpus.txt"
    corpus.write_text("the small red circle on the left\nthe large blue square at the top right\n" * 20)
    build_tokenizer("shapes", corpus_file=corpus, vocab_size=64)
    return next(root.glob("wordpiece_*"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """A bare state dict in ALBEF's layout (no stored config: sizes come from the command line)."""
    tokenizer = build_tokenizer(str(tokenizer_dir))
    kwargs = dict(item.split("=") for item in TINY)
    model = albef_model_for_retrieval("tiny", vocab_size=len(tokenizer), **{k: int(v) for k, v in kwargs.items()})
    path = tmp_path_factory.mktemp("ckpt") / "albef.pth"
    torch.save(torchmm_ext_to_albef(model.state_dict()), path)
    return path


def _args(checkpoint, tokenizer_dir, image, output, text="the small red circle on the left"):
    return ["--checkpoint", str(checkpoint), "--image", str(image), "--text", text, "--output", str(output),
            "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--panel-size", "48", "--model", *TINY]


def test_writes_one_panel_per_word_plus_the_image(tmp_path, checkpoint, tokenizer_dir):
    image = tmp_path / "img.png"
    Image.new("RGB", (50, 30), (200, 40, 40)).save(image)
    out = visualize.main(_args(checkpoint, tokenizer_dir, image, tmp_path / "sub" / "grid.png",
                               text="The small red circle, on the left!"))
    grid = Image.open(out)
    panels = 7 + 1  # "the small red circle on the left" + the image
    assert grid.size == (panels * (48 + 2) + 2, 48 + visualize.LABEL_HEIGHT + 4)
    # each word panel differs from the plain image panel (an overlay was drawn)
    pixels = to_tensor(grid).permute(1, 2, 0) * 255  # [H, W, 3]
    first, second = pixels[2:50, 2:50], pixels[2:50, 52:100]
    assert (first - second).abs().mean() > 1.0


def test_colour_map_ends():
    heat = torch.tensor([[0.0, 1.0]])
    rgb = visualize.colorize(heat)
    torch.testing.assert_close(rgb[:, 0, 0], torch.tensor([0.0, 0.0, 0.5]))
    torch.testing.assert_close(rgb[:, 0, 1], torch.tensor([0.5, 0.0, 0.0]))


def test_missing_and_corrupt_images_are_clear_errors(tmp_path, checkpoint, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match=r"image not found: .*nope\.png"):
        visualize.main(_args(checkpoint, tokenizer_dir, tmp_path / "nope.png", tmp_path / "g.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadImageError, match=r"cannot read image .*bad\.png"):
        visualize.main(_args(checkpoint, tokenizer_dir, bad, tmp_path / "g.png"))
