"""PELA: fine-tune a low-rank ALBEF for visual entailment (SNLI-VE; shapes world by default).

This is examples/albef/finetune_ve.py (torchrun, exact resume, bf16, best checkpoint,
TensorBoard) with examples/pela/configs/ve_shapes.yaml: its ``low_rank:`` section makes the
model low-rank. A checkpoint that is already low-rank (PELA's pre-training output, a
compress.py output, a published PELA file) restructures the model before it loads; a full-rank
one is loaded and then factorised by SVD.

    # after examples/pela/pretrain.py (the default --checkpoint is its output)
    python examples/pela/finetune_ve.py
    # PELA without the intermediate pre-training: SVD of the full shapes ALBEF
    python examples/pela/finetune_ve.py --checkpoint outputs/albef_pretrain_shapes/pretrained.pth
    # real data with PELA's settings
    torchrun --nproc_per_node=8 examples/pela/finetune_ve.py --config examples/pela/configs/ve_snli.yaml

Every option of the ALBEF recipe works (``--opts low_rank.ratio=2 train.lr=1e-4``).
"""

import sys
from pathlib import Path
from typing import Any, List, Optional

from torchmm_ext.engine.recipe_utils import run_recipe

HERE = Path(__file__).resolve().parent

DEFAULT_CONFIG = "ve_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Any:
    return run_recipe(HERE.parent / "albef" / "finetune_ve.py", HERE / "configs" / DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
