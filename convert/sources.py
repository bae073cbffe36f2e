"""Checkpoint folders as one mapping of tensors, validated against a config before anything is read.

`plan` checks, from the file headers alone, that every tensor the config needs is present with
the right shape and that no tensor is left over; `read_item` then reads one layer at a time.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator, NamedTuple

import numpy as np

from .errors import CheckpointError
from .formats import FORMATS, Entry, assemble, detect_layout, entry_keys, layer_entries
from .safetensors_io import SafetensorsFile

PROJECT_FILE = "mixtral_jax.json"  # marks a project (orbax) checkpoint


class PickleFile:
    """A PyTorch pickle (`.pth`/`.bin`), opened with `torch.load(weights_only=True, mmap=True)`."""

    def __init__(self, path: str):
        import torch  # only here: an explicit opt-in (--allow-pickle)

        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise CheckpointError(f"{path}: cannot load PyTorch checkpoint ({e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a flat dict of tensors")
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def nbytes(self, name: str) -> int:
        t = self._state[name]
        return t.numel() * t.element_size()

    def dtype(self, name: str) -> np.dtype:
        import ml_dtypes
        import torch

        t = self._state[name]
        return np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t[:0].numpy().dtype

    def read(self, name: str) -> np.ndarray:
        import ml_dtypes
        import torch

        t = self._state[name].contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
        return t.numpy().copy()


class TensorSource:
    """The tensors of several files as one mapping; a key found in two files is an error."""

    def __init__(self, files):
        self._where = {}
        for f in files:
            for k in f.keys():
                if k in self._where:
                    raise CheckpointError(f"{f.path}: tensor {k!r} also found in {self._where[k].path}")
                self._where[k] = f

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def nbytes(self, key: str | None = None) -> int:
        keys = self._where if key is None else [key]
        return sum(self._where[k].nbytes(k) for k in keys)

    def dtype(self) -> np.dtype:
        """The checkpoint's dtype: that of its largest tensor."""
        key = max(self._where, key=lambda k: self._where[k].nbytes(k))
        return self._where[key].dtype(key)

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        if key not in self._where:
            raise CheckpointError(f"missing tensor {key!r}")
        if self._where[key].shape(key) != tuple(shape):
            raise CheckpointError(f"{self._where[key].path}: {key!r} has shape "
                                  f"{list(self._where[key].shape(key))}, the config implies {list(shape)}")

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def file_of(self, key: str) -> str:
        return self._where[key].path


def detect_format(path: str) -> str:
    """'orbax' (a project checkpoint), 'hf' or 'mistral', from the folder's marker file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a folder")
    for marker, fmt in ((PROJECT_FILE, "orbax"), ("config.json", "hf"), ("params.json", "mistral")):
        if os.path.isfile(os.path.join(path, marker)):
            return fmt
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json, params.json or {PROJECT_FILE})")


def open_source(path: str, fmt: str, allow_pickle: bool = False) -> TensorSource:
    """The tensor files of an HF or Mistral folder."""
    if fmt == "hf":
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            return _open_indexed(path, index)
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        pickles = sorted(glob.glob(os.path.join(path, "*.bin")))
    else:
        files = sorted(glob.glob(os.path.join(path, "consolidated*.safetensors")))
        pickles = sorted(glob.glob(os.path.join(path, "consolidated*.pth")))
    if files:
        return TensorSource([SafetensorsFile(f) for f in files])
    if pickles:
        if not allow_pickle:
            raise CheckpointError(f"{pickles[0]}: PyTorch pickles can run code when loaded; refusing "
                                  "without --allow-pickle (allow_pickle=True)")
        return TensorSource([PickleFile(f) for f in pickles])
    wanted = "*.safetensors" if fmt == "hf" else "consolidated.safetensors or consolidated.NN.pth"
    raise CheckpointError(f"{path}: no weights found ({wanted})")


def _open_indexed(path: str, index: str) -> TensorSource:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a valid safetensors index") from None
    for name in names:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{os.path.join(path, name)}: shard listed in the index is missing")
    source = TensorSource([SafetensorsFile(os.path.join(path, n)) for n in names])
    for key, name in weight_map.items():
        if key not in source:
            raise CheckpointError(f"{os.path.join(path, name)}: tensor {key!r} listed in the index "
                                  "is not in that shard")
    return source


class Item(NamedTuple):
    """One unit of streaming: the globals (layer None) or one layer, with its source entries."""
    name: str
    layer: int | None
    entries: tuple[Entry, ...]


def plan(config, fmt: str, source: TensorSource) -> list[Item]:
    """Validate the whole source against the config from headers alone; return the read plan.

    Raises CheckpointError for a missing tensor, a wrong shape or a tensor nothing uses.
    """
    items = [Item("globals", None, FORMATS[fmt][0])]
    for i in range(config.n_layers):
        layout = detect_layout(fmt, source.__contains__, i)
        items.append(Item(f"layers_{i}", i, layer_entries(fmt, layout)))
    used = set()
    for item in items:
        for entry in item.entries:
            for key, shape in entry_keys(config, entry, item.layer).items():
                source.check(key, shape)
                used.add(key)
    unused = sorted(set(source.keys()) - used)
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise CheckpointError(f"{source.file_of(unused[0])}: unexpected tensor {unused[0]!r}{more} "
                              f"(for a {config.n_layers}-layer, {config.n_experts}-expert config)")
    return items


def item_nbytes(config, source: TensorSource, item: Item) -> int:
    return sum(source.nbytes(k) for e in item.entries for k in entry_keys(config, e, item.layer))


def read_item(config, source: TensorSource, item: Item, convert_leaf=None) -> dict[str, Any]:
    """The canonical leaves of one planned item, in the source dtype.

    `convert_leaf(item name, leaf name, array)` (e.g. cast and move to devices) is applied to each
    leaf as soon as it is assembled, so at most one leaf exists in both forms at a time.
    """
    leaves = {}
    for entry in item.entries:
        keys = list(entry_keys(config, entry, item.layer))
        for leaf, a in assemble(config, entry, source.read, keys, item.layer).items():
            leaves[leaf] = a if convert_leaf is None else convert_leaf(item.name, leaf, a)
            del a
    return leaves


def iter_params(config, fmt: str, source: TensorSource,
                convert_leaf=None) -> Iterator[tuple[Item, dict[str, Any]]]:
    """Validate, then yield each item's canonical leaves in turn (see `read_item`)."""
    for item in plan(config, fmt, source):
        yield item, read_item(config, source, item, convert_leaf)
