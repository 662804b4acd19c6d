"""DAS search: which blocks of a pre-trained model a task can skip.

Runs the task recipe of the config's backbone (``albef_*``, ``vilt_*`` or ``meter_*`` config:
``examples/<family>/finetune_<task>.py``; its data, model, step function and training loop) with
``das.search`` on: every step skips ``das.search.skip_num`` blocks drawn from the gates, the
adapters and heads train, and every ``das_turn`` steps after the warm-up epoch ``das_step`` skip
sets are scored on a fresh validation batch to update the gates
(:mod:`torchmm_ext.modules.das_search`). Writes ``skip.json`` (the chosen blocks, the final
gates, the gate and reward histories; ``das.skip_from`` of the fine-tuning reads it) and
``gates.png`` (the gate trajectories) to the output directory.

    python examples/das/search.py --config examples/das/configs/albef_vqa_shapes.yaml
    python examples/das/finetune_vqa.py --config examples/das/configs/albef_vqa_shapes.yaml
    python examples/das/search.py --config examples/das/configs/meter_vqa_shapes.yaml

The task (``vqa``, ``nlvr``, ``retrieval``) comes from ``--task`` or the config's file name
(``<family>_<task>[2]_*.yaml``); the output directory from ``--output-dir`` or the config's
``output_dir`` + ``_search``. ``--opts`` overrides config keys as in every recipe.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _recipes import config_class, family_of, task_recipe, TASK_RECIPES, with_overrides  # noqa: E402

from PIL import Image, ImageDraw  # noqa: E402

from torchmm_ext.engine import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "albef_vqa_shapes.yaml"


def task_of(config: Path, task: Optional[str]) -> str:
    if task:
        return task
    parts = config.stem.split("_")
    for name in TASK_RECIPES:
        if any(part == name or part.startswith(name) and part[len(name):].isdigit() for part in parts):
            return name  # albef_vqa_shapes, vilt_nlvr2, meter_retrieval_flickr
    raise ConfigError(f"cannot tell the task from {config.name}; pass --task {{{','.join(TASK_RECIPES)}}}")


def check_pretrained(config: Path, init: Any) -> None:
    """DAS searches a *pre-trained* model: fail before any work when the configured weights are
    missing (an empty ``init.checkpoint``, e.g. ``--opts init.checkpoint=`` in a quick test,
    searches the random initialisation, with a warning).

    Raises:
        ConfigError: ``init.checkpoint`` does not exist (the message says how to make it:
            ``init.checkpoint_hint``).
    """
    path = init.checkpoint
    if not path:
        print(f"[das search] warning: {config} has no init.checkpoint: searching randomly initialised weights")
        return
    if not Path(path).exists():
        hint = init.checkpoint_hint or "Run the backbone's pre-training recipe (examples/<family>/pretrain.py) first."
        raise ConfigError(
            f"{config}: the DAS search starts from pre-trained weights, but init.checkpoint {path} does not "
            f"exist. {hint} (or point --opts init.checkpoint=... at a pre-trained checkpoint)"
        )


def plot_gates(result: Dict[str, Any], path: Path, size=(900, 520)) -> None:
    """A PNG of every candidate's gate over the search rounds (PIL drawing: no plotting library
    is a dependency)."""
    history: List[List[float]] = result["gate_history"] or [result["gates"]]
    names = [f"{g}.{i}" for g, i in result["candidates"]]
    width, height = size
    left, right, top, bottom = 70, 170, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [v for row in history for v in row] + [0.0]
    low, high = min(values), max(values)
    if high - low < 1e-6:
        low, high = low - 1, high + 1
    x_of = lambda r: left + (width - left - right) * (r / max(len(history) - 1, 1))  # noqa: E731
    y_of = lambda v: top + (height - top - bottom) * (high - v) / (high - low)  # noqa: E731
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for v in (low, 0.0, high):
        draw.line([left - 4, y_of(v), left, y_of(v)], fill="black")
        draw.text((5, y_of(v) - 6), f"{v:+.3f}", fill="black")
    draw.line([left, y_of(0.0), width - right, y_of(0.0)], fill=(200, 200, 200))
    draw.text((left, height - bottom + 8), "round 0", fill="black")
    draw.text((width - right - 60, height - bottom + 8), f"round {len(history) - 1}", fill="black")
    draw.text((left, 10), f"DAS gates ({result['model']}, skip {result['skip_num']}): chosen {result['skip']}",
              fill="black")
    chosen = set(result["skip_candidates"])
    for c, name in enumerate(names):
        hue = (c * 0.61803) % 1.0
        colour = tuple(int(255 * x) for x in _hsv(hue, 0.85, 0.8 if c not in chosen else 0.55))
        points = [(x_of(r), y_of(row[c])) for r, row in enumerate(history)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3 if c in chosen else 1)
        draw.text((width - right + 10, top + 14 * c), ("* " if c in chosen else "  ") + name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _hsv(h: float, s: float, v: float):
    import colorsys

    return colorsys.hsv_to_rgb(h, s, v)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--task", choices=sorted(TASK_RECIPES))
    parser.add_argument("--output-dir")
    parser.add_argument("--opts", nargs="*", default=[])
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    task, family = task_of(args.config, args.task), family_of(args.config)
    recipe = task_recipe(family, task)
    cfg = load_config(args.config, config_class(family, task), args.opts)
    search = (cfg.das or {}).get("search")
    if not search:
        raise ConfigError(f"{args.config} has no das.search section (skip_num, groups, ...): nothing to search")
    check_pretrained(args.config, cfg.init)
    output_dir = Path(args.output_dir or f"{cfg.output_dir}_search")
    epochs = search.get("epochs") or 3
    steps = [f"train.max_steps_per_epoch={search['max_steps_per_epoch']}"] if search.get("max_steps_per_epoch") else []
    recipe.main(with_overrides(
        ["--config", str(args.config), "--output-dir", str(output_dir), "--opts", *args.opts], args.config,
        first=[f"train.eval_every={epochs}", *steps],  # an explicit --opts train.max_steps_per_epoch wins
        last=["das.skip=null", "das.skip_from=null", f"das.search.output={output_dir / 'skip.json'}",
              f"train.epochs={epochs}"],
    ))
    result = json.loads((output_dir / "skip.json").read_text())
    plot_gates(result, output_dir / "gates.png")
    print(f"[das search] skip {result['skip']} (gates {[round(g, 4) for g in result['gates']]}); "
          f"{output_dir / 'skip.json'}, {output_dir / 'gates.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
