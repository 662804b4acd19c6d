"""Fine-tune ViLT for VQA (classification over an answer vocabulary, soft-target BCE) and write
the result JSON (``[{"question_id", "answer"}]``) of every split, scored where answers are known.

    # built-in shapes world, tiny model, CPU (pre-train first: python examples/vilt/pretrain.py)
    python examples/vilt/finetune_vqa.py
    # VQAv2 (ViLT's arrow files) from the published pre-trained weights, ViLT's hyperparameters
    torchrun --nproc_per_node=8 examples/vilt/finetune_vqa.py \
        --config examples/vilt/configs/vqa_v2.yaml --checkpoint vilt_200k_mlm_itm.ckpt
    # evaluate the published VQA weights (original .ckpt or a Hugging Face dandelin/vilt-b32-finetuned-vqa dir)
    python examples/vilt/finetune_vqa.py --config examples/vilt/configs/vqa_v2.yaml \
        --checkpoint vilt_vqa.ckpt --evaluate

Any config key can be overridden: ``--opts train.lr=1e-4 data.image.size=384``.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchmm_ext.checkpoints.vilt import vilt_checkpoint
from torchmm_ext.models.vilt import vilt_model_for_vqa
from torchmm_ext.tasks.vqa import run_classifier_vqa

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "vqa_shapes.yaml"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_classifier_vqa(argv, DEFAULT_CONFIG, vilt_model_for_vqa, __doc__, checkpoint_adapter=vilt_checkpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
