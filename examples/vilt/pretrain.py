"""Pre-train ViLT with MLM + ITM; the last weights go to ``<output_dir>/pretrained.pth``, the
starting point of the fine-tuning recipes.

    # built-in shapes world, tiny model, CPU
    python examples/vilt/pretrain.py
    # real data (ViLT's arrow caption files), ViLT's step200k hyperparameters
    torchrun --nnodes=8 --nproc_per_node=8 examples/vilt/pretrain.py --config examples/vilt/configs/pretrain_4m.yaml

Any config key can be overridden: ``--opts train.epochs=1``.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.models.vilt import vilt_model_for_pretraining
from torchmm_ext.tasks.pretrain import run_pretrain

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_pretrain(argv, DEFAULT_CONFIG, vilt_model_for_pretraining, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
