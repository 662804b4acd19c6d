"""Fine-tune METER for image-text retrieval (METER's IRTR: each caption ranked against sampled
negative captions by ``rank_head``, plus ITM); evaluation scores every (image, text) pair.

    # built-in shapes world, tiny model, CPU (pre-train first: python examples/meter/pretrain.py)
    python examples/meter/finetune_retrieval.py
    # Flickr30K (Karpathy arrow files) from the released pre-trained weights
    torchrun --nproc_per_node=8 examples/meter/finetune_retrieval.py \
        --config examples/meter/configs/retrieval_flickr.yaml --checkpoint meter_clip16_288_roberta_pretrain.ckpt
    # evaluate the released Flickr30K weights
    python examples/meter/finetune_retrieval.py --config examples/meter/configs/retrieval_flickr.yaml \
        --checkpoint meter_clip16_288_roberta_flickr.ckpt --evaluate

A pre-training checkpoint's ITM "match" row initialises ``rank_head``, as METER does.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.checkpoints.meter import meter_retrieval_checkpoint
from torchmm_ext.models.meter import meter_model_for_retrieval
from torchmm_ext.tasks.retrieval import run_retrieval

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "retrieval_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_retrieval(argv, DEFAULT_CONFIG, meter_model_for_retrieval, __doc__,
                         checkpoint_adapter=meter_retrieval_checkpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
