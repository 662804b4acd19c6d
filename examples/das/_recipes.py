"""What the DAS entry points share: the ALBEF task recipes they run (loaded by file, so that
``examples/das/finetune_vqa.py`` can run ``examples/albef/finetune_vqa.py``), and the command
lines that turn a DAS config into a fine-tuning run or a search run.

A DAS config is the task recipe's config with a ``das:`` section holding both stages::

    das:
      skip_from: outputs/das_albef_vqa_shapes_search/skip.json   # fine-tuning reads the search result
      adapter_dim: 96
      search: {skip_num: 2, groups: [vision, text, fusion, decoder], epochs: 3, ...}   # search.py only

The fine-tuning entry points drop ``das.search``; ``search.py`` drops ``das.skip``/``das.skip_from``.
"""

from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

from torchmm_ext.engine.recipe_utils import load_recipe, with_default_config

ALBEF_RECIPES = Path(__file__).resolve().parents[1] / "albef"
TASK_RECIPES: Dict[str, str] = {"vqa": "finetune_vqa", "nlvr": "finetune_nlvr", "retrieval": "finetune_retrieval"}


def albef_recipe(task: str) -> ModuleType:
    """The ALBEF recipe module of ``task`` (``vqa``, ``nlvr`` or ``retrieval``)."""
    if task not in TASK_RECIPES:
        raise ValueError(f"unknown DAS task {task!r}; choose one of {sorted(TASK_RECIPES)}")
    return load_recipe(ALBEF_RECIPES / f"{TASK_RECIPES[task]}.py")


def with_overrides(argv: Optional[Sequence[str]], default_config: Path, first: Sequence[str] = (),
                   last: Sequence[str] = ()) -> List[str]:
    """``argv`` with ``--config default_config`` when it has none, and ``first`` overrides before
    the user's ``--opts`` (which may change them) and ``last`` after them (which may not)."""
    argv = with_default_config(argv, default_config)
    if "--opts" in argv:
        at = argv.index("--opts") + 1
        end = next((i for i in range(at, len(argv)) if argv[i].startswith("--")), len(argv))
        return [*argv[:at], *first, *argv[at:end], *last, *argv[end:]]
    return [*argv, "--opts", *first, *last]


def finetune_main(task: str, argv: Optional[Sequence[str]], default_config: Path):
    """Fine-tune with a fixed skip list (``das.skip_from`` or ``das.skip``): the task's ALBEF
    recipe with the config's ``das`` section, the search switched off."""
    return albef_recipe(task).main(with_overrides(argv, default_config, first=["das.search=null"]))
