"""`launch.py --print_config`: every knob of a config with its value and its configs/base.py
comment (the one-line comment after `c.<key> = <default>`)."""

import os
import re

import ml_collections as mlc

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "base.py")
_ASSIGNMENT = re.compile(r"^\s*c\.([\w.]+)\s*=\s*(.*?)(?:\s+#\s*(.*))?$")


def base_comments(path: str = BASE) -> dict[str, str]:
  """key -> the comment on its line in configs/base.py ("" when it has none)."""
  comments = {}
  with open(path) as f:
    for line in f:
      m = _ASSIGNMENT.match(line)
      if m and not m.group(2).startswith("mlc.ConfigDict("):
        comments[m.group(1)] = m.group(3) or ""
  return comments


def flatten(cfg: mlc.ConfigDict | dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}, in the config's own order."""
  flat = {}
  for key, value in cfg.items():
    if isinstance(value, (mlc.ConfigDict, dict)):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def describe(cfg: mlc.ConfigDict) -> str:
  """One line per knob: `key = value  # comment`, with a value an override can spell."""
  comments = base_comments()
  flat = flatten(cfg)
  width = max(len(f"{k} = {v!r}") for k, v in flat.items())
  lines = []
  for key, value in flat.items():
    text = f"{key} = {value!r}"
    comment = comments.get(key, "(not in configs/base.py: set by the experiment config)")
    lines.append(f"{text:<{width}}  # {comment}" if comment else text)
  return "\n".join(lines)
