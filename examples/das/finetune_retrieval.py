"""DAS fine-tuning for retrieval: the retrieval recipe of the config's backbone (``albef_*``, ``vilt_*`` or
``meter_*`` config: examples/<family>/finetune_retrieval.py) from the pre-trained weights, with the
searched blocks replaced by skip adapters, parallel adapters in the kept blocks, and only adapters
and heads trained (the config's ``das:`` section).

    # the skip list of the search (python examples/das/search.py --config <this config>)
    python examples/das/finetune_retrieval.py --config examples/das/configs/albef_retrieval_shapes.yaml
    # another skip list, or none (adapters only, k = 0)
    python examples/das/finetune_retrieval.py --opts das.skip_from=null 'das.skip={fusion: [1]}'
    python examples/das/finetune_retrieval.py --opts das.skip_from=null
    # ViLT / METER: their DAS configs (flat skip indices: ViLT's blocks; METER's 0-5 text, 6-11 image side)
    python examples/das/finetune_retrieval.py --config examples/das/configs/meter_retrieval_shapes.yaml

Any config key can be overridden with ``--opts``, as in every recipe.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _recipes import finetune_main  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "albef_retrieval_shapes.yaml"


def main(argv=None):
    return finetune_main("retrieval", argv, DEFAULT_CONFIG)


if __name__ == "__main__":
    main(sys.argv[1:])
