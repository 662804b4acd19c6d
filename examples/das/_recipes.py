"""What the DAS entry points share: the task recipes they run (loaded by file, so that
``examples/das/finetune_vqa.py`` can run ``examples/<family>/finetune_vqa.py``), and the command
lines that turn a DAS config into a fine-tuning run or a search run.

The backbone family is the config file's prefix: ``albef_*.yaml`` runs the ALBEF recipes
(``examples/albef``), ``vilt_*.yaml`` and ``meter_*.yaml`` the ViLT and METER ones
(``examples/vilt``, ``examples/meter``, whose bodies are :mod:`torchmm_ext.tasks`). A DAS
config is that recipe's config with a ``das:`` section holding both stages::

    das:
      skip_from: outputs/das_albef_vqa_shapes_search/skip.json   # fine-tuning reads the search result
      adapter_dim: 96
      search: {skip_num: 2, groups: [vision, text, fusion, decoder], epochs: 3, ...}   # search.py only

The fine-tuning entry points drop ``das.search``; ``search.py`` drops ``das.skip``/``das.skip_from``.
"""

import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

from torchmm_ext.engine import ConfigError
from torchmm_ext.engine.recipe_utils import load_recipe, with_default_config

EXAMPLES = Path(__file__).resolve().parents[1]
FAMILIES = ("albef", "vilt", "meter")
TASK_RECIPES: Dict[str, str] = {"vqa": "finetune_vqa", "nlvr": "finetune_nlvr", "retrieval": "finetune_retrieval"}


def config_path(argv: Optional[Sequence[str]], default_config: Path) -> Path:
    """The ``--config`` of ``argv``, else ``default_config``."""
    argv = list(argv or [])
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        return Path(argv[argv.index("--config") + 1])
    return Path(default_config)


def family_of(config: Path) -> str:
    """The backbone family a DAS config is for: its file name's prefix (``vilt_vqa_shapes.yaml``
    -> ``vilt``).

    Raises:
        ConfigError: the name starts with no known family.
    """
    family = Path(config).name.split("_")[0]
    if family not in FAMILIES:
        raise ConfigError(
            f"{config}: a DAS config's file name starts with its backbone family "
            f"({', '.join(f'{f}_*.yaml' for f in FAMILIES)}); got {Path(config).name!r}"
        )
    return family


def task_recipe(family: str, task: str) -> ModuleType:
    """The recipe module of ``task`` (``vqa``, ``nlvr`` or ``retrieval``) for ``family``
    (``examples/<family>/finetune_<task>.py``)."""
    if task not in TASK_RECIPES:
        raise ValueError(f"unknown DAS task {task!r}; choose one of {sorted(TASK_RECIPES)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {list(FAMILIES)}")
    return load_recipe(EXAMPLES / family / f"{TASK_RECIPES[task]}.py")


def config_class(family: str, task: str) -> type:
    """The config dataclass the task recipe of ``family`` loads its YAML into."""
    if family == "albef":
        names = {"vqa": "VQAConfig", "nlvr": "NLVRConfig", "retrieval": "RetrievalConfig"}
        return getattr(task_recipe(family, task), names[task])
    from torchmm_ext.tasks.nlvr import NLVRTaskConfig
    from torchmm_ext.tasks.retrieval import RetrievalTaskConfig
    from torchmm_ext.tasks.vqa import ClassifierVQAConfig

    return {"vqa": ClassifierVQAConfig, "nlvr": NLVRTaskConfig, "retrieval": RetrievalTaskConfig}[task]


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
    """Fine-tune with a fixed skip list (``das.skip_from`` or ``das.skip``): the task recipe of
    the config's backbone family with the config's ``das`` section, the search switched off."""
    argv = list(sys.argv[1:] if argv is None else argv)
    family = family_of(config_path(argv, default_config))
    return task_recipe(family, task).main(with_overrides(argv, default_config, first=["das.search=null"]))
