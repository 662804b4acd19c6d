"""ELIP pre-training: ALBEF's pre-training recipe with text-guided pruning and merging of vision
tokens (ELIP, arXiv 2309.16738). The method enters through the config's ``token_pruning:``
section (:func:`torchmm_ext.modules.token_pruning.apply_token_pruning`); the loop, data, logging
and checkpoints are ``examples/albef/pretrain.py``'s, run with an ELIP config.

    # built-in shapes world, tiny model, CPU (configs/pretrain_shapes.yaml)
    python examples/elip/pretrain.py
    # the same config without pruning (the baseline of the README's comparison)
    python examples/elip/pretrain.py --opts token_pruning=null output_dir=outputs/elip_pretrain_shapes_off
    # ELIP's 4M-image pre-training (published schedule and hyperparameters), 4 GPUs
    torchrun --nproc_per_node=4 examples/elip/pretrain.py --config examples/elip/configs/pretrain_4m.yaml \\
        --opts init.vision=deit_base_patch16_224.pth init.text=bert-base-uncased/pytorch_model.bin

The log shows the sequence length entering each ViT block ("token_pruning applied: ...").
Every option of the ALBEF recipe works (``--opts``, ``--checkpoint``, ``--resume``,
``--evaluate``); the weights go to ``<output_dir>/pretrained.pth`` with the pruning settings
recorded (they change no weight: fine-tuning prunes only if its own config says so).
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.engine.recipe_utils import run_recipe

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "pretrain_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_recipe(HERE.parent / "albef" / "pretrain.py", DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
