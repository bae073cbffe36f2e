"""Convert PyTorch checkpoints (HF, Mistral) to project checkpoints and export them back.

Every operation validates the whole source from headers before writing anything, streams one
layer at a time (peak memory about one layer), and writes into `OUT.partial-PID` which is renamed
to OUT only when complete: an interrupted or failed run never leaves an OUT that looks valid, and an
existing OUT is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np

from mixtral_jax.checkpoint import (MANIFEST, TOKENIZER_FILE, atomic_folder, item_names, read_manifest,
                                    release_freed_memory, resolve_dtype, restore_item, save_item,
                                    write_manifest)
from mixtral_jax.config import MixtralConfig
from mixtral_jax.generation_config import GENERATION_CONFIG, read as read_generation_config
from mixtral_jax.model import count_params
from mixtral_jax.quant import quantize_layer

from .errors import CheckpointError
from .formats import export_keys, export_tensor
from .safetensors_io import SafetensorsWriter, write_safetensors
from .sources import detect_format, item_nbytes, open_source, plan, read_item

log = logging.getLogger(__name__)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                disable=not sys.stderr.isatty())


def read_source_config(src: str, fmt: str) -> MixtralConfig:
    """The config of an HF or Mistral folder; a bad file is a CheckpointError naming it."""
    name = "config.json" if fmt == "hf" else "params.json"
    try:
        return (MixtralConfig.from_hf if fmt == "hf" else MixtralConfig.from_mistral)(src)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(src, name)}: {e}") from None


def convert(src: str, out: str, *, dtype=None, allow_pickle: bool = False,
            quantize: str | None = None) -> dict[str, Any]:
    """HF or Mistral folder -> project checkpoint (see mixtral_jax.checkpoint for the layout).

    Args:
      src: the source folder (detected by config.json or params.json).
      out: the new checkpoint folder; must not exist.
      dtype: None keeps the source dtype; else "float32", "bfloat16" or "float16".
      allow_pickle: accept `.pth`/`.bin` pickles (loaded with weights_only=True).
      quantize: None, or "int8" to store expert and attention matrices as int8 with per-output-
        channel float32 scales (mixtral_jax.quant); other leaves keep `dtype`.
    Returns:
      A summary: format, config, dtype, bytes read.
    """
    if quantize not in (None, "int8"):
        raise CheckpointError(f"quantize must be 'int8', got {quantize!r}")
    src = os.fspath(src)
    fmt = detect_format(src)
    if fmt == "orbax":
        raise CheckpointError(f"{src}: already a mixtral_jax checkpoint")
    config = read_source_config(src, fmt)
    source = open_source(src, fmt, allow_pickle)
    items = plan(config, fmt, source)
    dt = source.dtype() if dtype is None else resolve_dtype(dtype)
    generation = _generation_config(src, config)
    tokenizer = os.path.join(src, TOKENIZER_FILE)
    total = source.nbytes()
    log.info("converting %s (%s, %.2f GB, %s) to %s", src, fmt, total / 1e9, dt, out)
    with atomic_folder(out) as tmp, _progress(total, "convert") as bar:
        for item in items:
            # As jax arrays: orbax then writes without staging a second host copy of the layer.
            leaves = read_item(config, source, item, lambda _i, _l, a: jnp.asarray(a.astype(dt, copy=False)))
            if quantize and item.layer is not None:
                leaves = quantize_layer(leaves)
            save_item(tmp, item.name, leaves)
            del leaves
            # glibc keeps the freed layer (and orbax's staging) otherwise: resident memory then
            # drifted between 0.46x and 0.62x of the checkpoint across runs, 0.41x with this.
            release_freed_memory()
            bar.update(item_nbytes(config, source, item))
        write_manifest(tmp, config, dt, source_format=fmt, quantize=quantize)
        if os.path.isfile(tokenizer):
            shutil.copy(tokenizer, os.path.join(tmp, TOKENIZER_FILE))
        if generation:
            shutil.copy(generation, os.path.join(tmp, GENERATION_CONFIG))
    return {"format": fmt, "config": config, "dtype": dt.name, "bytes": total, "quantize": quantize}


def _generation_config(folder: str, config: MixtralConfig) -> str | None:
    """The folder's generation_config.json after validation (a bad one is a CheckpointError), or
    None. It is copied as it is, keys this package does not read included."""
    try:
        read_generation_config(folder, config.vocab_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    path = os.path.join(folder, GENERATION_CONFIG)
    return path if os.path.isfile(path) else None


def project_manifest(ckpt: str) -> dict[str, Any]:
    """The manifest of a project checkpoint; CheckpointError naming the folder when it is missing
    or another format's."""
    if detect_format(ckpt) != "orbax":
        raise CheckpointError(f"{ckpt}: not a mixtral_jax checkpoint (no {MANIFEST})")
    return read_manifest(ckpt)


def export(ckpt: str, out: str, *, fmt: str) -> None:
    """Project checkpoint -> HF folder (sharded safetensors, index, config.json) or Mistral folder
    (consolidated.safetensors, params.json), in the checkpoint's dtype."""
    if fmt not in ("hf", "mistral"):
        raise CheckpointError(f"export format must be 'hf' or 'mistral', got {fmt!r}")
    ckpt = os.fspath(ckpt)
    manifest = project_manifest(ckpt)
    if manifest.get("quantize"):
        raise CheckpointError(f"{ckpt}: int8-quantized checkpoints cannot be exported (convert the "
                              "original again without --quantize)")
    config, dt = manifest["config"], np.dtype(resolve_dtype(manifest["dtype"]))
    generation = _generation_config(ckpt, config)
    items = ((name, restore_item(ckpt, config, name, dt)) for name in item_names(config))
    tokenizer = os.path.join(ckpt, TOKENIZER_FILE)
    write_folder(out, config, items, fmt, dt, tokenizer if os.path.isfile(tokenizer) else None,
                 generation_config=generation)


def write_folder(out: str, config: MixtralConfig, items: Iterable[tuple[str, dict[str, Any]]], fmt: str,
                 dtype, tokenizer: str | None = None, generation_config: str | None = None) -> None:
    """Write (item name, canonical leaves) pairs, globals first, as an HF or Mistral folder (HF: with
    a copy of the `generation_config` file; the Mistral format has no such file)."""
    dt = np.dtype(dtype)
    with atomic_folder(out) as tmp:
        if fmt == "hf":
            _write_hf(tmp, config, items, dt)
            if generation_config:
                shutil.copy(generation_config, os.path.join(tmp, GENERATION_CONFIG))
        else:
            _write_mistral(tmp, config, items, dt)
        if tokenizer:
            shutil.copy(tokenizer, os.path.join(tmp, TOKENIZER_FILE))


def _layer_of(name: str) -> int | None:
    return None if name == "globals" else int(name.split("_")[1])


def _write_hf(folder: str, config: MixtralConfig, items, dt: np.dtype) -> None:
    n = config.n_layers + 1
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map, total = {}, 0
    with _progress(sum(1 for _ in item_names(config)), "export") as bar:
        for k, (name, leaves) in enumerate(items):
            tensors = {key: export_tensor(config, leaves, shape, entry, j).astype(dt, copy=False)
                       for key, shape, entry, j in export_keys(config, "hf", _layer_of(name))}
            write_safetensors(os.path.join(folder, shard(k + 1, n)), tensors, {"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard(k + 1, n)))
            total += sum(a.nbytes for a in tensors.values())
            bar.update(1)
    _write_json(os.path.join(folder, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(os.path.join(folder, "config.json"), dict(config.to_hf(), dtype=dt.name))


def _write_mistral(folder: str, config: MixtralConfig, items, dt: np.dtype) -> None:
    layout = [(key, dt, shape) for name in item_names(config)
              for key, shape, _, _ in export_keys(config, "mistral", _layer_of(name))]
    writer = SafetensorsWriter(os.path.join(folder, "consolidated.safetensors"), layout)
    try:
        for name, leaves in items:
            for key, shape, entry, j in export_keys(config, "mistral", _layer_of(name)):
                writer.write(key, export_tensor(config, leaves, shape, entry, j).astype(dt, copy=False))
    finally:
        writer.close()
    _write_json(os.path.join(folder, "params.json"), config.to_mistral())


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def info(path: str) -> dict[str, Any]:
    """Format, config, parameter count, dtype and bytes on disk of any supported checkpoint."""
    path = os.fspath(path)
    fmt = detect_format(path)
    quantize = None
    if fmt == "orbax":
        manifest = read_manifest(path)
        config, dtype, quantize = manifest["config"], manifest["dtype"], manifest.get("quantize")
    else:
        config = read_source_config(path, fmt)
        source = open_source(path, fmt, allow_pickle=False)
        plan(config, fmt, source)
        dtype = source.dtype().name
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return {"path": path, "format": fmt, "dtype": dtype, "quantize": quantize, "parameters": count_params(config), "bytes_on_disk": disk,
            "tokenizer": os.path.isfile(os.path.join(path, TOKENIZER_FILE)), "config": config.to_dict()}
