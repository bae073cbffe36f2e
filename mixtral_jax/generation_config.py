"""Generation defaults a checkpoint carries: `generation_config.json`, the Hugging Face convention.

Keys read (others are ignored, and so is a key whose value is null): `do_sample`, `temperature`,
`top_k`, `top_p`, `min_p`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`,
`max_new_tokens`, `eos_token_id` (an id or a list of ids: the stop tokens). As in transformers,
`do_sample` false or absent means greedy whatever the temperature says. Unlike transformers'
`GenerationConfig`, a key the file leaves out keeps this package's neutral default (for instance
top-k off rather than transformers' 50), so a file means exactly what it says.

`load` reads the file into `Model.generation_config`; `sampling_defaults` turns it into keyword
arguments for `generate`. The Python API never applies it on its own; the CLI and the server do,
below any explicit flag or request field.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

GENERATION_CONFIG = "generation_config.json"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# key -> (type check, range check, what a valid value is)
_RULES: dict[str, tuple[Callable[[Any], bool], Callable[[Any], bool], str]] = {
    "do_sample": (lambda v: isinstance(v, bool), lambda v: True, "true or false"),
    "temperature": (_number, lambda v: v >= 0, "a number >= 0"),
    "top_k": (_integer, lambda v: v >= 0, "an integer >= 0"),
    "top_p": (_number, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (_number, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (_number, lambda v: v > 0, "a number > 0"),
    "presence_penalty": (_number, lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": (_number, lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "max_new_tokens": (_integer, lambda v: v >= 1, "an integer >= 1"),
}


def validate(raw: Any, source: str, vocab_size: int | None = None) -> dict[str, Any]:
    """The known keys of a parsed generation config, checked.

    Args:
      raw: the parsed JSON.
      source: the file's name, for messages.
      vocab_size: when given, `eos_token_id` values must lie in [0, vocab_size).
    Returns:
      {key: value} for the known keys present with non-null values.
    Raises:
      ValueError "<source>: <key> must be ..., got ..." for the first bad value.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, (is_type, in_range, what) in _RULES.items():
        value = raw.get(key)
        if value is None:
            continue
        if not (is_type(value) and in_range(value)):
            raise ValueError(f"{source}: {key} must be {what}, got {value!r}")
        out[key] = value
    eos = raw.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not ids or not all(_integer(i) and i >= 0 and (vocab_size is None or i < vocab_size) for i in ids):
            bound = f" below {vocab_size}" if vocab_size is not None else ""
            raise ValueError(f"{source}: eos_token_id must be a token id or a non-empty list of token ids"
                             f" (integers >= 0{bound}), got {eos!r}")
        out["eos_token_id"] = ids
    return out


def read(folder: str, vocab_size: int | None = None) -> dict[str, Any]:
    """`folder/generation_config.json` validated (see `validate`); {} when the folder has none."""
    path = os.path.join(os.fspath(folder), GENERATION_CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return validate(raw, path, vocab_size)


def write(folder: str, config: dict[str, Any]) -> None:
    """Write `config` (validated keys) as `folder/generation_config.json`."""
    with open(os.path.join(folder, GENERATION_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def sampling_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `generate` from a validated generation config.

    Greedy (temperature 0) unless `do_sample` is true; with `do_sample`, temperature defaults to 1
    and the filters come from the file. Penalties, `max_new_tokens` and the stop tokens
    (`eos_token_id`) apply either way. An empty config gives {}.
    """
    if not config:
        return {}
    out: dict[str, Any] = {}
    if config.get("do_sample"):
        out["temperature"] = float(config.get("temperature", 1.0))
        out.update({k: config[k] for k in ("top_k", "top_p", "min_p") if k in config})
    else:
        out["temperature"] = 0.0
    out.update({k: config[k] for k in ("repetition_penalty", "presence_penalty", "frequency_penalty",
                                       "max_new_tokens") if k in config})
    if "eos_token_id" in config:
        out["stop_tokens"] = list(config["eos_token_id"])
    return out
