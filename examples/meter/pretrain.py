"""Pre-train METER with MLM + ITM (METER's ``task_mlm_itm_clip_bert``) and save weights every
METER fine-tuning recipe takes with ``--checkpoint``.

    # built-in shapes world, tiny model from scratch, CPU (the default config)
    python examples/meter/pretrain.py
    # METER's pre-training from CLIP ViT-B/16 + roberta-base (4M images, arrow files)
    torchrun --nproc_per_node=8 examples/meter/pretrain.py --config examples/meter/configs/pretrain_4m.yaml \
        --opts init.vision=ViT-B-16.pt init.text=roberta-base/pytorch_model.bin

``init.vision`` takes OpenAI's CLIP file (``ViT-B-16.pt``, a TorchScript archive: convert it once
with ``torch.jit.load(...).state_dict()``) or a Hugging Face CLIP / CLIPVision state dict; its 12th
block is reported and not loaded (METER uses 11). ``init.text`` takes a Hugging Face RoBERTa state
dict. Any config key can be overridden: ``--opts train.lr=1e-5``.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.models.meter import meter_model_for_pretraining
from torchmm_ext.tasks.pretrain import run_pretrain

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_pretrain(argv, DEFAULT_CONFIG, meter_model_for_pretraining, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
