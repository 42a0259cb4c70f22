"""Run configuration: Python config files returning an ``ml_collections.ConfigDict``.

A run is one file with ``get_config()`` (big_vision style). On the command line::

    --config configs/finetune.py --config.optim.lr=1e-5 --config.mesh.fsdp=4

Overrides are typed by the field they replace, unknown keys are refused, and the config is
locked so a typo can never add a silently ignored field.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file or key at fault."""


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path`` (optionally ``path:arg``, passed to ``get_config(arg)``) and applies overrides.

    Each override is ``"a.b=value"``.
    """
    file_path, _, arg = path.partition(":")
    if not os.path.isfile(file_path):
        raise ConfigError(f"config file {file_path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_wings_config_{abs(hash(file_path))}", file_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # surface the config file's own error with its name
        raise ConfigError(f"config file {file_path!r} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {file_path!r} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{file_path}: get_config() must return an ml_collections.ConfigDict")
    config = ml_collections.ConfigDict(config)  # own copy, so overrides never leak into the module
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value")
        apply_override(config, key.strip(), value)
    config.lock()
    return config


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, raw: str) -> None:
    """Sets ``config.<dotted_key>`` from the string ``raw``, typed after the existing value."""
    *parents, leaf = dotted_key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} (in override {dotted_key!r})")
        node = node[name]
    if leaf not in node:
        known = ", ".join(sorted(node.keys()))
        raise ConfigError(f"unknown config key {dotted_key!r}; keys at that level: {known}")
    current = node[leaf]
    try:
        value = _parse_like(current, raw)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(
            f"config key {dotted_key!r} holds a {type(current).__name__}; cannot read {raw!r} as one ({e})"
        ) from None
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"config key {dotted_key!r}: {e}") from None


def _parse_like(current: Any, raw: str) -> Any:
    if isinstance(current, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, str):
        return raw
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError("a whole section cannot be replaced from the command line; set its keys")
    # None, tuples, lists: a Python literal; a bare word stays a string.
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(current, (tuple, list)) and not isinstance(value, (tuple, list)):
        value = (value,)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def parse_command_line(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Splits ``argv`` into (config path, config overrides, remaining arguments).

    Accepts ``--config PATH``, ``--config=PATH``, ``--config.k=v`` and ``--config.k v``.
    """
    path, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file path")
            path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path, i = arg[len("--config="):], i + 1
            continue
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                overrides.append(body)
                i += 1
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"{arg} needs a value")
                overrides.append(f"{body}={args[i + 1]}")
                i += 2
            continue
        rest.append(arg)
        i += 1
    return path, overrides, rest
