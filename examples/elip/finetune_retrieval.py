"""Retrieval fine-tuning and evaluation with ELIP's token pruning (beyond the published code,
which prunes in pre-training only): ALBEF's retrieval recipe run with an ELIP config, so the
ITC/ITM training, the image encoding and the ITM re-rank's cross-attention all read the pruned
tokens. The method enters through the config's ``token_pruning:`` section.

    # built-in shapes world, tiny model, CPU (configs/finetune_retrieval_shapes.yaml)
    python examples/elip/finetune_retrieval.py --checkpoint outputs/elip_pretrain_shapes/pretrained.pth
    # the same without pruning (a checkpoint pre-trained with pruning loads either way)
    python examples/elip/finetune_retrieval.py --checkpoint ... --opts token_pruning=null
    # COCO / Flickr30K with ELIP's schedule (configs/finetune_retrieval_coco.yaml / _flickr.yaml)
    torchrun --nproc_per_node=8 examples/elip/finetune_retrieval.py \\
        --config examples/elip/configs/finetune_retrieval_coco.yaml --checkpoint elip_4m.pth

At evaluation each image is encoded once, its tokens pruned by the image CLS alone (there is
no single text to guide it; the README's ELIP section explains the choice), and those tokens
serve its ITC feature and every re-ranked pair. ``token_pruning.eval_pruning=false`` evaluates
with all tokens instead.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.engine.recipe_utils import run_recipe

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "finetune_retrieval_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_recipe(HERE.parent / "albef" / "finetune_retrieval.py", DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
