"""Project checkpoints (orbax) and `load`.

A project checkpoint is a folder:

    mixtral_jax.json     {"format": "mixtral_jax", "version": 1, "config": {...}, "dtype": ...,
                          "items": ["globals", "layers_0", ...]}
    params/globals/      orbax checkpoint of embed, final_norm, lm_head
    params/layers_{i}/   orbax checkpoint of layer i's leaves (canonical layout)
    tokenizer.model      when the source had one

One orbax item per layer keeps conversion and restore at about one layer of host memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from . import host_memory
from .config import MixtralConfig
from .generation_config import read as read_generation_config, write as write_generation_config
from .quant import CONTRACTED, MODES as QUANT_MODES, quantize_globals, quantize_layer
from .model import Model, ParamSpec, default_dtype, default_layout, layer_name, param_specs, split_layer
from .sharding import sharding_for
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MANIFEST = "mixtral_jax.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 1


def demo_model_path() -> str:
    """The built-in demo model shipped inside the package (see TRAINING.md)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise FileNotFoundError(f"{path}: the built-in demo model is missing from this install; "
                                "pass --checkpoint PATH")
    return path


def resolve_dtype(dtype):
    """None -> the platform default; "float32"/"bfloat16"/"float16" or a dtype -> a numpy dtype."""
    if dtype is None:
        return np.dtype(default_dtype())
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
        dtype = DTYPE_NAMES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"not a dtype: {dtype!r}") from None
    if dt not in {np.dtype(t) for t in DTYPE_NAMES.values()}:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dt}")
    return dt


def item_names(config: MixtralConfig) -> list[str]:
    return ["globals"] + [layer_name(i) for i in range(config.n_layers)]


def param_items(config: MixtralConfig, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The parameter pytree as (item name, leaves) pairs, in checkpoint item order."""
    globals_ = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return [("globals", globals_)] + [(layer_name(i), params[layer_name(i)]) for i in range(config.n_layers)]


def item_specs(config: MixtralConfig, item: str) -> dict[str, Any]:
    specs = param_specs(config)
    if item == "globals":
        return {k: v for k, v in specs.items() if not k.startswith("layers_")}
    return specs[item]


@contextlib.contextmanager
def atomic_folder(out: str) -> Iterator[str]:
    """A temporary sibling of `out`, renamed to `out` on success and removed on any failure, so an
    interrupted write never leaves a folder that looks complete. An existing `out` is refused."""
    from mixtral_convert import CheckpointError

    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise CheckpointError(f"{out}: already exists; not overwriting")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{parent}: output folder's parent does not exist")
    tmp = f"{out}.partial-{os.getpid()}"
    os.mkdir(tmp)
    try:
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(path, config: MixtralConfig, params, *, dtype=None, tokenizer: str | None = None,
         generation_config: dict | None = None) -> None:
    """Write `params` (canonical layout) as a new project checkpoint folder `path`.

    Args:
      path: the folder to create (must not exist; written under a temporary name, then renamed).
      config: the model config.
      params: canonical parameter pytree (stacked experts, unquantized).
      dtype: None keeps the parameters' dtype; else "float32", "bfloat16" or "float16".
      tokenizer: a tokenizer.model to copy in, or None.
      generation_config: generation defaults to write as generation_config.json (see
        mixtral_jax.generation_config), or None.
    """
    dt = np.dtype(jax.tree.leaves(params)[0].dtype) if dtype is None else resolve_dtype(dtype)
    with atomic_folder(os.fspath(path)) as tmp:
        for item, leaves in param_items(config, params):
            save_item(tmp, item, jax.tree.map(lambda a: jnp.asarray(a, dt), leaves))
        write_manifest(tmp, config, dt)
        if tokenizer:
            shutil.copy(tokenizer, os.path.join(tmp, TOKENIZER_FILE))
        if generation_config:
            write_generation_config(tmp, generation_config)


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_item(folder: str, item: str, leaves: dict[str, Any]) -> None:
    """Write one item (the globals or a layer) under `folder/params/`."""
    ckpt = _checkpointer()
    ckpt.save(os.path.join(os.path.abspath(folder), "params", item), leaves)
    ckpt.wait_until_finished()


def write_manifest(folder: str, config: MixtralConfig, dtype, **extra) -> None:
    manifest = {"format": "mixtral_jax", "version": FORMAT_VERSION, "config": config.to_dict(),
                "dtype": np.dtype(dtype).name, "items": item_names(config), **extra}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


def read_manifest(folder: str) -> dict[str, Any]:
    from mixtral_convert import CheckpointError

    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != "mixtral_jax":
            raise ValueError("not a mixtral_jax manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {manifest.get('version')} (this is {FORMAT_VERSION})")
        manifest["config"] = MixtralConfig.from_dict(manifest["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    for item in manifest["items"]:
        if not os.path.isdir(os.path.join(folder, "params", item)):
            raise CheckpointError(f"{os.path.join(folder, 'params', item)}: missing checkpoint item")
    return manifest


def restore_item(folder: str, config: MixtralConfig, item: str, dtype, sharding=None,
                 quantized: str | None = None) -> dict[str, Any]:
    """One item's leaves as `dtype`: numpy arrays, or jax arrays placed per `sharding(leaf_spec)`.
    With `quantized="int8"`, the quantizable leaves are restored as int8 {"q", "scale"} dicts."""
    def target(shape, axes, dt):
        s = None if sharding is None else sharding(ParamSpec(shape, axes))
        return jax.ShapeDtypeStruct(shape, dt, sharding=s)

    import orbax.checkpoint as ocp

    def restore_args(a):
        if a.sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)
        return ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape)

    # Leaf by leaf: a restore stages what it reads on the host before placing it, so restoring a
    # whole layer at once held a second copy of the layer; leaf by leaf, with the staging returned
    # to the OS after each, the peak of a sharded restore holds about one leaf extra.
    ckpt, where = ocp.PyTreeCheckpointer(), os.path.join(os.path.abspath(folder), "params", item)
    leaves = {}
    for leaf, spec in item_specs(config, item).items():
        if quantized and leaf in CONTRACTED:
            kept = {a % len(spec.shape) for a in CONTRACTED[leaf]}
            scale = tuple(1 if a in kept else n for a, n in enumerate(spec.shape))
            abstract = {"q": target(spec.shape, spec.axes, np.int8), "scale": target(scale, spec.axes, np.float32)}
        else:
            abstract = target(spec.shape, spec.axes, dtype)
        tree = {leaf: abstract}
        leaves.update(ckpt.restore(where, args=ocp.args.PyTreeRestore(
            item=tree, restore_args=jax.tree.map(restore_args, tree), partial_restore=True)))
        release_freed_memory()
    return leaves


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Restoring layer after layer frees a layer-sized host staging buffer each time; without this,
    glibc keeps those pages and resident memory grows by tens of MB per layer.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _place(params: dict[str, Any], item: str, leaves: dict[str, Any]) -> None:
    """Put an item's leaves into the nested layout (the globals sit at the top level)."""
    if item == "globals":
        params.update(leaves)
    else:
        params[item] = leaves


def load(path, *, dtype=None, mesh=None, layout=None, quantize=None, adapter=None) -> Model:
    """Load a model.

    Args:
      path: a project checkpoint written by `mixtral-jax convert`, a Hugging Face folder
        (config.json + one or many *.safetensors, with or without the index) or a Mistral folder
        (params.json + consolidated.safetensors). Tensors are read one at a time, without torch.
      dtype: "float32", "bfloat16", "float16" or a jnp dtype; None for float32 on CPU and
        bfloat16 on GPU/TPU.
      mesh: a `make_mesh` mesh to place every parameter on, split per its logical axes (experts
        over `expert`, heads/ffw/vocab over `tensor`). Project checkpoints are restored straight
        into those shardings (each device reads only its slice); HF/Mistral folders are read one
        layer at a time on the host and then placed. In a multi-process run every process calls
        `load` with the same mesh.
      layout: "stacked" (canonical [E, ...] expert weights) or "split" (per-expert leaves and 2-D
        [out, in] attention matrices); None for split on CPU without a mesh, stacked otherwise
        (see mixtral_jax.model).
      quantize: None, or "int8" for int8 weight-only expert and attention matrices and a bfloat16
        lm_head (see mixtral_jax.quant). A checkpoint converted with `--quantize int8` loads
        quantized anyway.
      adapter: a LoRA adapter folder (`finetune --lora` writes OUT/adapter): the model runs the base
        weights plus the adapter, unmerged (mixtral_jax.lora); not with int8.
    Returns:
      Model with `.config`, `.params` (canonical layout), `.tokenizer` (from the folder's
      tokenizer.model, or None) and `.generation_config` (the folder's generation_config.json,
      validated, or {}).
    Raises:
      ValueError (mixtral_convert.CheckpointError) naming the file and the problem.
    """
    from mixtral_convert import CheckpointError, detect_format, iter_params, open_source

    dt = resolve_dtype(dtype)
    layout = default_layout(mesh) if layout is None else layout
    if layout not in ("split", "stacked"):
        raise ValueError(f"layout must be 'split' or 'stacked', got {layout!r}")
    if layout == "split" and mesh is not None:
        raise ValueError("the split layout is for one device; use layout='stacked' with a mesh")
    if quantize not in QUANT_MODES:
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    path = os.fspath(path)
    if adapter is not None and (quantize or (detect_format(path) == "orbax" and read_manifest(path).get("quantize"))):
        raise ValueError("a LoRA adapter needs unquantised base weights; load without int8")
    fmt = detect_format(path)
    manifest = read_manifest(path) if fmt == "orbax" else {}
    read_generation_config(path)  # a malformed file fails before any weight is read
    stored_quant = manifest.get("quantize")
    quantize = quantize or stored_quant

    def arrange(leaves):
        leaves = split_layer(leaves) if layout == "split" else leaves
        return quantize_layer(leaves) if quantize else leaves

    def arrange_globals(leaves):
        return quantize_globals(leaves) if quantize else leaves

    log.info("loading %s (%s checkpoint) as %s%s", path, fmt, dt, "" if mesh is None else f" onto {mesh}")
    params: dict[str, Any] = {}
    if fmt == "orbax":
        config = manifest["config"]
        shard = None if mesh is None else (lambda spec: sharding_for(spec.shape, spec.axes, mesh))
        for item in item_names(config):
            leaves = restore_item(path, config, item, dt, shard, stored_quant)
            # on host arrays, splitting makes views, not copies
            leaves = arrange_globals(leaves) if item == "globals" else arrange(leaves)
            if mesh is None:
                leaves = jax.tree.map(host_memory.place, leaves)
            _place(params, item, leaves)
            del leaves
            release_freed_memory()
    else:
        config = (MixtralConfig.from_hf if fmt == "hf" else MixtralConfig.from_mistral)(path)
        specs = param_specs(config)

        def put(item: str, leaf: str, a: np.ndarray):
            a = a.astype(dt, copy=False)
            if mesh is None:
                return host_memory.place(a)
            spec = specs[leaf] if item == "globals" else specs[item][leaf]
            return jax.make_array_from_callback(a.shape, sharding_for(spec.shape, spec.axes, mesh),
                                                lambda index: a[index])

        for item, leaves in iter_params(config, fmt, open_source(path, fmt), put):
            _place(params, item.name, arrange_globals(leaves) if item.layer is None else arrange(leaves))
            release_freed_memory()
    tok_path = os.path.join(path, TOKENIZER_FILE)
    try:
        tokenizer = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if adapter is not None:
        from . import lora

        weights, lora_config = lora.load_adapter(os.fspath(adapter), config)
        params = lora.attach(params, weights, lora_config)
    return Model(config, params, tokenizer, read_generation_config(path, config.vocab_size))
