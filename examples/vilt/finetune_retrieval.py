"""Fine-tune ViLT for image-text retrieval (IRTR: ``rank_output`` trained against 15 sampled
negative captions per image) and evaluate recall@1/5/10 by scoring every (image, text) pair.

    # built-in shapes world, tiny model, CPU (pre-train first: python examples/vilt/pretrain.py)
    python examples/vilt/finetune_retrieval.py
    # Flickr30K (arrow files) from the published pre-trained weights, ViLT's hyperparameters
    torchrun --nproc_per_node=8 examples/vilt/finetune_retrieval.py \
        --config examples/vilt/configs/retrieval_flickr.yaml --checkpoint vilt_200k_mlm_itm.ckpt

Without a ``rank_output`` in the checkpoint it starts from the ITM head's "match" row, as ViLT
does. Any config key can be overridden: ``--opts data.num_negatives=15``.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.checkpoints.vilt import vilt_retrieval_checkpoint
from torchmm_ext.models.vilt import vilt_model_for_retrieval
from torchmm_ext.tasks.retrieval import run_retrieval

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "retrieval_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_retrieval(argv, DEFAULT_CONFIG, vilt_model_for_retrieval, __doc__,
                         checkpoint_adapter=vilt_retrieval_checkpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
