"""Run configuration: Python config files returning an ``ml_collections.ConfigDict``.

A run is one file with ``get_config()`` (big_vision style), read by ``ml_collections.config_flags``::

    --config configs/finetune.py[:arg] --config.optim.lr=1e-5 --config.mesh.fsdp 4

Overrides are typed by the field they replace (fields whose default is None are typed placeholders,
``config_dict.placeholder``), unknown keys are refused, and the config is locked so a typo can never add a
silently ignored field.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

NAME = "config"
_OVERRIDE = re.compile(rf"^--?(?:no)?{NAME}\.([^=\s]+)")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file or key at fault."""


def parse_command_line(argv: Sequence[str], default: str | None = None
                       ) -> tuple[ml_collections.ConfigDict, str, list[str]]:
    """(locked config, its ``path[:arg]``, the arguments that are not ``--config`` flags).

    Without ``--config`` the ``default`` file is read (and overrides apply to it).
    """
    argv = list(argv)
    given = [i for i, a in enumerate(argv) if re.match(rf"^--?{NAME}(=|$)", a)]
    if not given:
        if default is None:
            raise ConfigError("no --config given; pass --config FILE.py")
        argv, given = [f"--{NAME}={default}", *argv], [0]
    last = argv[given[-1]]
    if "=" not in last and given[-1] + 1 == len(argv):
        raise ConfigError("--config needs a file path")
    file = (last.split("=", 1)[1] if "=" in last else argv[given[-1] + 1]).partition(":")[0]
    if not os.path.isfile(file):
        raise ConfigError(f"config file {file!r} does not exist")
    holder = _flag_values(argv)
    try:
        rest = holder(["prog", *argv], known_only=True)[1:]
        config = holder[NAME].value
    except Exception as e:  # config_flags raises many kinds; each becomes one line naming the key or file
        raise _explain(argv, file, e) from None
    path = holder[NAME].config_filename
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags defers a load failure to first use
        try:
            config.lock()
            raise ConfigError(f"config file {path!r}: get_config() must return an ml_collections.ConfigDict")
        except (OSError, AttributeError, TypeError) as e:
            raise ConfigError(f"config file {path!r} failed to load: {' '.join(str(e).split())}") from None
    return config, path, rest


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path`` (optionally ``path:arg``, passed to ``get_config(arg)``) with overrides ``"a.b=value"``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
    config, _, rest = parse_command_line([f"--{NAME}={path}", *(f"--{NAME}.{o}" for o in overrides)])
    assert not rest, rest
    return config


def _flag_values(argv: list[str]) -> flags.FlagValues:
    holder = flags.FlagValues()
    # config_flags finds the overrides to define in sys_argv
    config_flags.DEFINE_config_file(NAME, None, flag_values=holder, lock_config=True, sys_argv=["prog", *argv])
    return holder


def _explain(argv: list[str], file: str, error: Exception) -> ConfigError:
    """A one-line message for a failed parse: the unknown key, the value that is not of its field's type, or
    the config file that failed to load."""
    bare = [a for a in argv if not _OVERRIDE.match(a)]
    try:
        holder = _flag_values(bare)
        holder(["prog", *bare], known_only=True)
        config = holder[NAME].value
    except Exception as e:
        return ConfigError(f"config file {file!r} failed to load: {type(e).__name__}: {' '.join(str(e).split())}")
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match:
            key = match.group(1)
            node = config
            for depth, name in enumerate(key.split(".")):
                if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                    where = ".".join(key.split(".")[:depth])
                    known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
                    return ConfigError(f"unknown config key {key!r}; keys at {where or 'the top'}: {known}")
                node = node[name]
    text = " ".join(str(error).split())
    if type(error).__name__ == "UnsupportedOperationError":  # not exported by config_flags
        key = re.search(rf"field {NAME}\.(\S+) is not supported", text)
        if key:
            kind = config_path.get_type(key.group(1), config).__name__
            return ConfigError(f"config key {key.group(1)!r} holds a {kind}, which the command line cannot set; "
                               "set it in the config file or through its argument (FILE.py:ARG)")
    bad = re.match(rf"flag --{NAME}\.([^=]+)=(.*?): (.*)$", text)
    if bad:
        key, raw, why = bad.groups()
        kind = config_path.get_type(key, config).__name__
        return ConfigError(f"config key {key!r} is typed {kind}; cannot read {raw!r} as one ({why})")
    return ConfigError(f"config: {text}")

