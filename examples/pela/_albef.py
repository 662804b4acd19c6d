"""PELA's fine-tuning and pre-training entry points are the ALBEF recipes with PELA's default
configs: the method enters through the configs' ``low_rank:`` (and, for pre-training,
``distill:``) sections, so no training loop is copied here."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, List, Optional

ALBEF_RECIPES = Path(__file__).resolve().parents[1] / "albef"
CONFIGS = Path(__file__).resolve().parent / "configs"


def albef_recipe(name: str) -> ModuleType:
    """``examples/albef/<name>.py`` as a module (``albef_<name>``, loaded once)."""
    module_name = f"albef_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ALBEF_RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses resolve their module by name
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_albef_recipe(name: str, default_config: str, argv: Optional[List[str]] = None) -> Any:
    """Run ``examples/albef/<name>.py``'s ``main`` with ``configs/<default_config>`` unless the
    command line gives ``--config``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(CONFIGS / default_config), *argv]
    return albef_recipe(name).main(argv)
