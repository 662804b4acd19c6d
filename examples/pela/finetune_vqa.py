"""PELA: fine-tune a low-rank ALBEF for VQA (VQA v2; shapes world by default).

This is examples/albef/finetune_vqa.py (torchrun, exact resume, bf16, best checkpoint,
TensorBoard) with examples/pela/configs/vqa_shapes.yaml: its ``low_rank:`` section makes the
model low-rank. A checkpoint that is already low-rank (PELA's pre-training output, a
compress.py output, a published PELA file) restructures the model before it loads; a full-rank
one is loaded and then factorised by SVD.

    # after examples/pela/pretrain.py (the default --checkpoint is its output)
    python examples/pela/finetune_vqa.py
    # PELA without the intermediate pre-training: SVD of the full shapes ALBEF
    python examples/pela/finetune_vqa.py --checkpoint outputs/albef_pretrain_shapes/pretrained.pth
    # real data with PELA's settings
    torchrun --nproc_per_node=8 examples/pela/finetune_vqa.py --config examples/pela/configs/vqa_v2.yaml

Every option of the ALBEF recipe works (``--opts low_rank.ratio=2 train.lr=1e-4``).
"""

import sys
from pathlib import Path
from typing import Any, List, Optional

from torchmm_ext.engine.recipe_utils import run_recipe

HERE = Path(__file__).resolve().parent

DEFAULT_CONFIG = "vqa_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Any:
    return run_recipe(HERE.parent / "albef" / "finetune_vqa.py", HERE / "configs" / DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
