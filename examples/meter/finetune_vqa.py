"""Fine-tune METER for VQA (classification over an answer vocabulary, soft-target BCE x the
number of answers) and write the result JSON of every split, scored where answers are known.

    # built-in shapes world, tiny model, CPU (pre-train first: python examples/meter/pretrain.py)
    python examples/meter/finetune_vqa.py
    # VQAv2 (METER's arrow files) from the released pre-trained weights, METER's hyperparameters
    torchrun --nproc_per_node=8 examples/meter/finetune_vqa.py \
        --config examples/meter/configs/vqa_v2.yaml --checkpoint meter_clip16_288_roberta_pretrain.ckpt
    # evaluate the released VQA weights (fine-tuned at 576 px)
    python examples/meter/finetune_vqa.py --config examples/meter/configs/vqa_v2.yaml \
        --checkpoint meter_clip16_288_roberta_vqa.ckpt --evaluate --opts model.image_size=576 data.image.size=576

Released METER checkpoints (Lightning ``.ckpt``) load directly: their layout is detected and
every key without a place in the model is reported. Any config key can be overridden.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.models.meter import meter_model_for_vqa
from torchmm_ext.tasks.vqa import run_classifier_vqa

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "vqa_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_classifier_vqa(argv, DEFAULT_CONFIG, meter_model_for_vqa, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
