"""Typed recipe configs: YAML file + ``--opts a.b=value`` overrides -> nested dataclasses.

A recipe declares its schema as nested dataclasses::

    @dataclass
    class TrainConfig:
        lr: float = 1e-5
        epochs: int = 5

    @dataclass
    class RecipeConfig:
        train: TrainConfig = field(default_factory=TrainConfig)
        model: Dict[str, Any] = field(default_factory=dict)  # builder kwargs, free mapping

    cfg = load_config("configs/x.yaml", RecipeConfig, ["train.lr=2e-5"])
    check_kwargs(albef_model_for_retrieval, cfg.model, "model")

Every key is validated: unknown keys, wrong types and missing required fields raise
:class:`ConfigError` naming the key, where it came from and the valid alternatives.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Type, TypeVar, Union

import yaml

T = TypeVar("T")

_OPTS_SOURCE = "--opts"


class ConfigError(ValueError):
    """A config file or override does not fit the recipe's schema."""


# ----------------------------------------------------------------------------------------
# overrides
# ----------------------------------------------------------------------------------------


def parse_override(override: str) -> Tuple[List[str], Any]:
    """Split ``"a.b.c=value"`` into a key path and a YAML-parsed value.

    Args:
        override (str): one ``--opts`` item.

    Returns:
        Tuple[List[str], Any]: the dotted key split into parts, and the value parsed with
        ``yaml.safe_load`` (``false`` -> bool, ``[1,2]`` -> list, ``null`` -> None).

    Raises:
        ConfigError: when the item has no ``=`` or an empty key.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"malformed override {override!r}: expected the form section.key=value, "
            "e.g. train.lr=2e-5 or data.hflip=false"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # e.g. an unbalanced bracket: keep the raw text, the type check decides
    return key.split("."), value


def _apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Set[str]:
    """Write overrides into the raw mapping in place; return the dotted keys they set."""
    touched: Set[str] = set()
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {prefix!r} holds a value ({child!r}), not a section"
                )
            node = child
        node[parts[-1]] = value
        dotted = ".".join(parts)
        # sections the override created count as its own too (for "unknown key" messages)
        touched.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        # an override that sets a whole section (``train={lr: 1}``) also owns its sub-keys
        if isinstance(value, dict):
            touched.update(f"{dotted}.{k}" for k in _dotted_keys(value))
    return touched


def _dotted_keys(mapping: Mapping[str, Any], prefix: str = "") -> List[str]:
    keys = []
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, Mapping):
            keys.extend(_dotted_keys(v, key + "."))
    return keys


# ----------------------------------------------------------------------------------------
# mapping -> dataclass conversion
# ----------------------------------------------------------------------------------------


class _Ctx(typing.NamedTuple):
    """Where values come from, for error messages."""

    file: Optional[str]
    from_opts: Set[str]

    def source(self, key: str) -> str:
        if key in self.from_opts:
            return f"from {_OPTS_SOURCE}"
        return f"in {self.file}" if self.file else "in the defaults"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType)


def _type_error(key: str, tp: Any, value: Any, ctx: _Ctx, hint: str = "") -> ConfigError:
    return ConfigError(
        f"config key '{key}' ({ctx.source(key)}) expects {_type_name(tp)}, "
        f"got {type(value).__name__} {value!r}{hint}"
    )


def _convert(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where safe."""
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value, ctx, " (a mapping of its fields)")
        return _build(tp, value, key, ctx)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value, ctx)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, ctx)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise _type_error(key, tp, value, ctx)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"config key '{key}' ({ctx.source(key)}) must be one of "
                f"{', '.join(map(repr, args))}, got {value!r}"
            )
        return value
    if tp in (dict, Dict, Mapping) or origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value, ctx)
        value_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(v, value_tp, f"{key}.{k}", ctx) for k, v in value.items()}
    if tp in (list, List, Sequence) or origin in (list, typing.Sequence, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value, ctx)
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if tp in (tuple, Tuple) or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value, ctx)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            return tuple(_convert(v, item_tp, f"{key}[{i}]", ctx) for i, v in enumerate(value))
        if len(args) != len(value):
            raise _type_error(key, tp, value, ctx, f" (needs {len(args)} items)")
        return tuple(_convert(v, a, f"{key}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args)))

    # scalars; bool is an int subclass, so test it first and never let it pass as a number
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(key, tp, value, ctx, " (use true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, tp, value, ctx)
        return value
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, tp, value, ctx)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads ``2e-5`` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, tp, value, ctx)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(key, tp, value, ctx, " (quote it to keep it a string)")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise _type_error(key, tp, value, ctx)
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _type_error(key, tp, value, ctx)
    return value


def _build(cls: Type[T], raw: Mapping[str, Any], prefix: str, ctx: _Ctx) -> T:
    """Build dataclass ``cls`` from a mapping, validating keys and value types."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:  # string annotations naming a class local to a function
        raise TypeError(
            f"cannot resolve the annotations of config class {cls.__qualname__}: {err}; "
            "define config dataclasses at module level"
        ) from err
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = f"under '{prefix}'" if prefix else "at the top level"
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{full}' ({ctx.source(full)}){hint}; "
                f"valid keys {where}: {', '.join(sorted(fields))}"
            )
    kwargs: Dict[str, Any] = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints.get(name, Any), full, ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            tp = hints.get(name, Any)
            if dataclasses.is_dataclass(tp) and isinstance(tp, type):
                kwargs[name] = _build(tp, {}, full, ctx)  # a section may be all defaults
            else:
                origin = f"in {ctx.file}" if ctx.file else "no config file given"
                raise ConfigError(
                    f"missing required config key '{full}' ({_type_name(tp)}; {origin}); "
                    f"set it in the YAML file or with {_OPTS_SOURCE} {full}=..."
                )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a __post_init__ check of the schema itself
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"invalid config section '{prefix or cls.__name__}': {err}") from err


def config_from_dict(
    raw: Mapping[str, Any], schema: Type[T], source: Optional[str] = None
) -> T:
    """Build the schema dataclass from a plain mapping (e.g. the config stored in a checkpoint).

    Args:
        raw (Mapping[str, Any]): nested mapping of config values.
        schema (Type[T]): the recipe's top-level config dataclass.
        source (Optional[str]): name used in error messages. Default: None.

    Returns:
        T: the validated config.
    """
    return _build(schema, raw, "", _Ctx(source, set()))


def load_config(
    path: Union[str, Path, None], schema: Type[T], overrides: Sequence[str] = ()
) -> T:
    """Read a YAML config, apply ``--opts`` overrides and validate it against ``schema``.

    Args:
        path (Union[str, Path, None]): YAML file with a top-level mapping, or None to start
            from the schema's defaults.
        schema (Type[T]): the recipe's top-level config dataclass.
        overrides (Sequence[str]): items ``section.key=value``; the value is parsed as YAML.
            Overrides into a ``Dict[str, Any]`` section may add keys (check them with
            :func:`check_kwargs`). Default: ().

    Returns:
        T: an instance of ``schema`` with nested dataclass sections.

    Raises:
        ConfigError: unknown key, wrong value type, missing required key, malformed
            override, or unreadable file; the message names the key and its source.
    """
    raw: Dict[str, Any] = {}
    file = str(path) if path is not None else None
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {file}: {err}") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {file} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {file} must hold a mapping at the top level, "
                f"got {type(loaded).__name__}"
            )
        raw = loaded or {}
    from_opts = _apply_overrides(raw, overrides)
    return _build(schema, raw, "", _Ctx(file, from_opts))


def check_kwargs(
    fn: Callable[..., Any], kwargs: Mapping[str, Any], section: str, exclude: Sequence[str] = ()
) -> None:
    """Check that every key of a free config section is a keyword parameter of ``fn``.

    Args:
        fn (Callable[..., Any]): the builder the section's keys are passed to.
        kwargs (Mapping[str, Any]): the section, e.g. ``cfg.model``.
        section (str): the section's name for the message, e.g. ``"model"``.
        exclude (Sequence[str]): parameters the caller passes itself (not config keys).

    Raises:
        ConfigError: naming each unknown key and listing ``fn``'s keyword parameters.
    """
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return  # fn accepts anything; it has to validate by itself
    valid = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in exclude
    ]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        name = getattr(fn, "__qualname__", repr(fn))
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"'{section}.{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: "
            f"not a parameter of {name}(); valid keys under '{section}': {', '.join(sorted(valid))}"
        )


def _plain(value: Any) -> Any:
    """Make a value YAML/JSON-safe: tuples -> lists, Paths -> str."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Nested plain dict of a config dataclass (tuples as lists, paths as strings).

    Args:
        cfg (Any): a dataclass instance.

    Returns:
        Dict[str, Any]: safe for ``yaml.safe_dump``, JSON and ``torch.load(weights_only=True)``.
    """
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML (so a run can be reproduced with ``--config``).

    Args:
        cfg (Any): a config dataclass instance.
        path (Union[str, Path]): the YAML file to write; parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser, default_config: Union[str, Path, None]) -> None:
    """Add the arguments shared by every recipe.

    ``--config PATH``, ``--opts k=v ...``, ``--resume [PATH]`` (bare: ``auto``, the latest
    checkpoint in the output dir), ``--checkpoint PATH`` (initial weights),
    ``--output-dir DIR`` and ``--evaluate`` (evaluation only).

    Args:
        parser (argparse.ArgumentParser): the recipe's parser.
        default_config (Union[str, Path, None]): the recipe's default YAML file.
    """
    parser.add_argument("--config", default=str(default_config) if default_config else None,
                        help="YAML config file (default: %(default)s)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --opts train.lr=2e-5 data.hflip=false")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="resume a run from a train-state checkpoint; bare --resume uses "
                             "the latest one in the output dir")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="initial model weights (a bare state dict or a train-state file)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where checkpoints, logs and metrics go")
    parser.add_argument("--evaluate", action="store_true", help="evaluate only, no training")


def parse_args(
    argv: Optional[Sequence[str]] = None,
    default_config: Union[str, Path, None] = None,
    description: Optional[str] = None,
) -> argparse.Namespace:
    """Parse the shared recipe command line.

    Args:
        argv (Optional[Sequence[str]]): arguments; None reads ``sys.argv``. Default: None.
        default_config (Union[str, Path, None]): the recipe's default YAML. Default: None.
        description (Optional[str]): ``--help`` text. Default: None.

    Returns:
        argparse.Namespace: ``config``, ``opts``, ``resume``, ``checkpoint``, ``output_dir``,
        ``evaluate``.
    """
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser, default_config)
    return parser.parse_args(argv)
