"""Fine-tune METER for NLVR2 (the sentence fused with each image, modality types 1 and 2, the
two pooled outputs concatenated); the best dev epoch is tested.

    # built-in shapes world, tiny model, CPU (pre-train first: python examples/meter/pretrain.py)
    python examples/meter/finetune_nlvr.py
    # NLVR2 (arrow files) from the released pre-trained weights, METER's hyperparameters
    torchrun --nproc_per_node=8 examples/meter/finetune_nlvr.py \
        --config examples/meter/configs/nlvr2.yaml --checkpoint meter_clip16_288_roberta_pretrain.ckpt

A single-image checkpoint gets the third modality row (the right image) as a copy of the image
row, as METER does; ``meter_clip16_288_roberta_nlvr2.ckpt`` loads with its head.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.checkpoints.meter import meter_nlvr_checkpoint
from torchmm_ext.models.meter import meter_model_for_nlvr
from torchmm_ext.tasks.nlvr import run_nlvr

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "nlvr_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_nlvr(argv, DEFAULT_CONFIG, meter_model_for_nlvr, __doc__, checkpoint_adapter=meter_nlvr_checkpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
