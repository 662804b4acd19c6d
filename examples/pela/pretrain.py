"""PELA's intermediate pre-training: the low-rank student (the full model compressed by SVD)
learns ALBEF's ITC + ITM + MLM plus 0.1 x hidden-state distillation from the frozen full model
and 1.0 x the weight-perturbation regulariser.

This is examples/albef/pretrain.py with examples/pela/configs/pretrain_shapes.yaml: its
``low_rank:`` section factorises the loaded full model (``init.checkpoint``) and its
``distill:`` section (:class:`torchmm_ext.engine.distillation.DistillConfig`) adds the teacher.

    # the teacher first: the full shapes ALBEF (about 5 minutes on 2 CPU cores)
    python examples/albef/pretrain.py
    python examples/pela/pretrain.py
    # then fine-tune the low-rank model
    python examples/pela/finetune_retrieval.py
    # published setting: ALBEF-4M teacher and student, 4M pairs
    torchrun --nproc_per_node=4 examples/pela/pretrain.py --config examples/pela/configs/pretrain_4m.yaml

The weights go to ``<output_dir>/pretrained.pth`` with the ``low_rank`` record, so every
fine-tuning recipe restructures its model before loading them.
"""

import sys
from pathlib import Path
from typing import Any, List, Optional

from torchmm_ext.engine.recipe_utils import run_recipe

HERE = Path(__file__).resolve().parent

DEFAULT_CONFIG = "pretrain_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Any:
    return run_recipe(HERE.parent / "albef" / "pretrain.py", HERE / "configs" / DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
