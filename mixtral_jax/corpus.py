"""A training corpus that needs no download: code, prose and math made from what every machine has.

- code: the Python standard library's own source files (`sysconfig` "stdlib"; tests, site-packages
  and idlelib excluded), each file one document.
- prose: English from the same files: every docstring (`ast`) and every run of comment lines
  (`tokenize`) longer than 80 characters, one document per source file.
- math: generated arithmetic, one problem per line ("37 * 12 = 444"), in documents of 64 lines:
  addition, subtraction, multiplication of numbers up to 3 digits, and integer division with remainder.

Held-out split by source file: a file goes to `val` when the CRC32 of its path relative to the
stdlib falls in the last `val_percent` (math: the last documents of the same seeded stream). Every
document is tokenized with the Mixtral v1 tokenizer, BOS first, and the documents of a (split,
domain) are concatenated into one int32 stream saved as `{split}_{domain}.npy` with a `corpus.json`
manifest (recipe, files, token counts).
"""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import sysconfig
import tokenize
import zlib
from typing import Iterator

import numpy as np

from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DOMAINS = ("code", "prose", "math")
SPLITS = ("train", "val")
MANIFEST = "corpus.json"
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "__pycache__",
                 "lib2to3", "turtledemo"}


def stdlib_files(root: str | None = None) -> list[str]:
    """Paths of the standard library's .py files (sorted; tests and third-party packages excluded)."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("test"))
        out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return out


def is_val(relpath: str, val_percent: float) -> bool:
    return zlib.crc32(relpath.encode()) % 10000 >= 10000 - val_percent * 100


def prose_of(source: str) -> str:
    """Docstrings and comment blocks of a Python source, longer than 80 characters, as paragraphs."""
    parts = []
    try:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
        block: list[str] = []
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and not tok.string.startswith("#!"):
                block.append(tok.string.lstrip("#").strip())
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                if len(" ".join(block)) > 80:
                    parts.append(" ".join(block))
                block = []
    except (SyntaxError, tokenize.TokenError, ValueError):
        pass
    return "\n\n".join(parts)


def math_documents(n: int, seed: int) -> Iterator[str]:
    """`n` documents of 64 arithmetic lines each, from a seeded generator."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        lines = []
        for _ in range(64):
            a, b = (int(v) for v in rng.integers(0, 1000, 2))
            op = int(rng.integers(4))
            if op == 0:
                lines.append(f"{a} + {b} = {a + b}")
            elif op == 1:
                lines.append(f"{a} - {b} = {a - b}")
            elif op == 2:
                a, b = a % 100, b % 1000
                lines.append(f"{a} * {b} = {a * b}")
            else:
                b = b % 97 + 2
                lines.append(f"{a} / {b} = {a // b} remainder {a % b}")
        yield "\n".join(lines) + "\n"


def build_corpus(out: str, *, tokenizer: Tokenizer | None = None, stdlib: str | None = None,
                 val_percent: float = 5.0, math_docs: int = 1000, seed: int = 0) -> dict:
    """Build the corpus into folder `out` (created; an existing complete corpus is left alone).

    Args:
      out: output folder.
      tokenizer: default the Mixtral v1 tokenizer.
      stdlib: the standard library folder to read (default this interpreter's).
      val_percent: share of files (and math documents) held out.
      math_docs: generated math documents.
      seed: math generator seed.
    Returns:
      The manifest: token counts per split and domain, the recipe and the held-out files.
    """
    if os.path.isfile(os.path.join(out, MANIFEST)):
        return read_corpus_manifest(out)
    tokenizer = tokenizer or Tokenizer()
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    streams: dict[tuple[str, str], list[int]] = {(s, d): [] for s in SPLITS for d in DOMAINS}
    val_files = []
    for path in stdlib_files(stdlib):
        rel = os.path.relpath(path, stdlib)
        split = "val" if is_val(rel, val_percent) else "train"
        if split == "val":
            val_files.append(rel)
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        streams[split, "code"] += tokenizer.encode(source)
        prose = prose_of(source)
        if prose:
            streams[split, "prose"] += tokenizer.encode(prose)
    n_val = max(1, round(math_docs * val_percent / 100))
    for i, doc in enumerate(math_documents(math_docs, seed)):
        streams["val" if i >= math_docs - n_val else "train", "math"] += tokenizer.encode(doc)
    os.makedirs(out, exist_ok=True)
    for (split, domain), ids in streams.items():
        np.save(os.path.join(out, f"{split}_{domain}.npy"), np.asarray(ids, np.int32))
    manifest = {"tokens": {s: {d: len(streams[s, d]) for d in DOMAINS} for s in SPLITS},
                "recipe": {"stdlib": stdlib, "val_percent": val_percent, "math_docs": math_docs,
                           "seed": seed, "tokenizer": "mixtral v1", "vocab_size": tokenizer.vocab_size},
                "val_files": val_files}
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    log.info("corpus %s: %s", out, manifest["tokens"])
    return manifest


def read_corpus_manifest(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def load_corpus(folder: str) -> dict[tuple[str, str], np.ndarray]:
    """{(split, domain): int32 token stream} of a built corpus (memory-mapped)."""
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; not a corpus built by build_corpus")
    return {(s, d): np.load(os.path.join(folder, f"{s}_{d}.npy"), mmap_mode="r") for s in SPLITS for d in DOMAINS}


def unigram_loss(corpus: dict[tuple[str, str], np.ndarray], vocab_size: int) -> dict[str, float]:
    """Per domain: cross-entropy (nats/token) of the val stream under the add-one-smoothed unigram
    distribution of that domain's train stream: the baseline a trained model must beat."""
    out = {}
    for d in DOMAINS:
        counts = np.bincount(np.asarray(corpus["train", d]), minlength=vocab_size) + 1.0
        logp = np.log(counts / counts.sum())
        out[d] = float(-logp[np.asarray(corpus["val", d])].mean())
    return out
