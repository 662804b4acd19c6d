"""Fine-tune ViLT for NLVR2 ("pair" mode: the sentence with each image, modality types 1 and 2,
pooled outputs concatenated); the best dev epoch is tested.

    # built-in shapes world, tiny model, CPU (pre-train first: python examples/vilt/pretrain.py)
    python examples/vilt/finetune_nlvr.py
    # NLVR2 (arrow files) from the published pre-trained weights, ViLT's hyperparameters
    torchrun --nproc_per_node=8 examples/vilt/finetune_nlvr.py \
        --config examples/vilt/configs/nlvr2.yaml --checkpoint vilt_200k_mlm_itm.ckpt

A single-image checkpoint (pre-training, VQA, retrieval) gets the third modality row (the right
image) as a copy of the image row, as ViLT does; an NLVR2 checkpoint (``vilt_nlvr2.ckpt``) loads
with its head. Any config key can be overridden: ``--opts train.lr=1e-4``.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.checkpoints.vilt import vilt_nlvr_checkpoint
from torchmm_ext.models.vilt import vilt_model_for_nlvr
from torchmm_ext.tasks.nlvr import run_nlvr

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "nlvr_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_nlvr(argv, DEFAULT_CONFIG, vilt_model_for_nlvr, __doc__, checkpoint_adapter=vilt_nlvr_checkpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
