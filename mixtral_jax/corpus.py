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

Optionally, installed packages' Python sources (`packages`) add code and prose to the training split
only, the held-out split staying the stdlib's: their tests and vendored folders are skipped, exact
duplicates of files already taken are dropped, and so is any file that shares a quarter or more of
its substantial lines with a held-out stdlib file (vendored stdlib copies such as setuptools'
distutils). Files are taken in CRC32 order of their paths up to `max_package_tokens` code tokens per
package; the manifest records each package's version and the files used and dropped.

With `strip_docstrings`, the training split's code documents lose their docstrings (the prose
domain still has them; held-out code is unchanged, so held-out losses compare across recipes).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
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


VENDORED_DIRS = {"_vendor", "vendor", "vendored", "_vendored", "third_party", "_distutils"}
MAX_FILE_BYTES = 300_000      # larger package files are generated tables, not code people write
_LINE_MIN = 24                # a "substantial" line for the near-duplicate check (stripped chars)


def stdlib_files(root: str | None = None, exclude: set[str] = EXCLUDED_DIRS) -> list[str]:
    """Paths of the .py files under `root` (default the standard library; sorted; tests and
    third-party packages excluded)."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in exclude and not d.startswith("test"))
        out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return out


def package_root(name: str) -> tuple[str, str]:
    """(folder or file, version) of an installed top-level package; ValueError when not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ValueError(f"package {name!r} is not installed")
    root = list(spec.submodule_search_locations)[0] if spec.submodule_search_locations else spec.origin
    dists = importlib.metadata.packages_distributions().get(name, [])
    version = importlib.metadata.version(dists[0]) if dists else "unknown"
    return root, version


def _substantial_lines(source: str) -> set[str]:
    return {line.strip() for line in source.splitlines() if len(line.strip()) >= _LINE_MIN}


def _read_source(path: str) -> str | None:
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def is_val(relpath: str, val_percent: float) -> bool:
    return zlib.crc32(relpath.encode()) % 10000 >= 10000 - val_percent * 100


def without_docstrings(source: str) -> str:
    """The source with its docstrings' lines removed (a body left empty gets `pass`); the rest, comments
    and formatting included, unchanged. A file that does not parse is returned as it is."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source
    lines = source.splitlines(keepends=True)
    drop: dict[int, str | None] = {}  # first line (0-based) -> replacement; covered lines -> None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        start, end = first.lineno - 1, first.end_lineno - 1
        text = lines[start]
        if text[:first.col_offset].strip() or lines[end][first.end_col_offset:].strip():
            continue  # shares a line with other code
        indent = text[:first.col_offset]
        drop[start] = f"{indent}pass\n" if len(node.body) == 1 else None
        for i in range(start + 1, end + 1):
            drop[i] = None
    return "".join(drop.get(i, line) if i in drop else line for i, line in enumerate(lines)
                   if not (i in drop and drop[i] is None))


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
                 val_percent: float = 5.0, math_docs: int = 1000, seed: int = 0,
                 packages: tuple[str, ...] = (), max_package_tokens: int | None = None,
                 strip_docstrings: bool = False) -> dict:
    """Build the corpus into folder `out` (created; an existing complete corpus is left alone and
    returned, unless `packages` are asked for and it was built from others: ValueError).

    Args:
      out: output folder.
      tokenizer: default the Mixtral v1 tokenizer.
      stdlib: the standard library folder to read (default this interpreter's).
      val_percent: share of files (and math documents) held out.
      math_docs: generated math documents.
      seed: math generator seed.
      packages: installed top-level packages whose Python sources add training code and prose.
      max_package_tokens: code tokens taken from each package at most (None: all).
      strip_docstrings: the training split's code documents without their docstrings
        (`without_docstrings`; prose still takes them; held-out code unchanged).
    Returns:
      The manifest: token counts per split and domain, the recipe, the held-out files and, per
      package, its version and the files used and dropped.
    """
    tokenizer = tokenizer or Tokenizer()
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    recipe = {"stdlib": stdlib, "val_percent": val_percent, "math_docs": math_docs, "seed": seed,
              "tokenizer": "mixtral v1", "vocab_size": tokenizer.vocab_size}
    if packages:
        recipe |= {"packages": list(packages), "max_package_tokens": max_package_tokens}
    if strip_docstrings:
        recipe["strip_docstrings"] = True
    if os.path.isfile(os.path.join(out, MANIFEST)):
        manifest = read_corpus_manifest(out)
        built = [manifest["recipe"].get(k) for k in ("packages", "max_package_tokens")]
        if packages and built != [list(packages), max_package_tokens]:
            raise ValueError(f"{out}: holds a corpus built from other packages; use a new folder")
        if manifest["recipe"].get("strip_docstrings", False) != strip_docstrings:
            raise ValueError(f"{out}: holds a corpus built with{'out' if strip_docstrings else ''} "
                             "docstrings in its training code; use a new folder")
        return manifest
    streams: dict[tuple[str, str], list[int]] = {(s, d): [] for s in SPLITS for d in DOMAINS}

    def add(split: str, source: str) -> int:
        code = tokenizer.encode(without_docstrings(source) if strip_docstrings and split == "train" else source)
        streams[split, "code"] += code
        prose = prose_of(source)
        if prose:
            streams[split, "prose"] += tokenizer.encode(prose)
        return len(code)

    val_files, val_lines, seen = [], set(), set()
    for path in stdlib_files(stdlib):
        rel = os.path.relpath(path, stdlib)
        split = "val" if is_val(rel, val_percent) else "train"
        source = _read_source(path)
        if split == "val":
            val_files.append(rel)
            val_lines |= _substantial_lines(source or "")
        if source is None:
            continue
        seen.add(hashlib.sha256(source.encode()).hexdigest())
        add(split, source)
    n_val = max(1, round(math_docs * val_percent / 100))
    for i, doc in enumerate(math_documents(math_docs, seed)):
        streams["val" if i >= math_docs - n_val else "train", "math"] += tokenizer.encode(doc)
    used = {name: _add_package(name, add, val_lines, seen, max_package_tokens) for name in packages}
    os.makedirs(out, exist_ok=True)
    for (split, domain), ids in streams.items():
        np.save(os.path.join(out, f"{split}_{domain}.npy"), np.asarray(ids, np.int32))
    manifest = {"tokens": {s: {d: len(streams[s, d]) for d in DOMAINS} for s in SPLITS},
                "recipe": recipe, "val_files": val_files}
    if packages:
        manifest["packages"] = used
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    log.info("corpus %s: %s", out, manifest["tokens"])
    return manifest


def _add_package(name: str, add, val_lines: set[str], seen: set[str], max_tokens: int | None) -> dict:
    """Add one installed package's sources to the training split; returns what was used."""
    root, version = package_root(name)
    paths = [root] if os.path.isfile(root) else stdlib_files(root, EXCLUDED_DIRS | VENDORED_DIRS)
    paths = [p for p in paths if not os.path.basename(p).startswith(("test_", "conftest"))]
    base = os.path.dirname(root)
    paths.sort(key=lambda p: zlib.crc32(os.path.relpath(p, base).encode()))
    record = {"version": version, "files": [], "near_duplicates_dropped": [], "exact_duplicates_dropped": 0,
              "code_tokens": 0}
    for path in paths:
        if max_tokens is not None and record["code_tokens"] >= max_tokens:
            break
        source = _read_source(path)
        if not source:
            continue
        digest = hashlib.sha256(source.encode()).hexdigest()
        rel = os.path.relpath(path, base)
        if digest in seen:
            record["exact_duplicates_dropped"] += 1
            continue
        lines = _substantial_lines(source)
        shared = len(lines & val_lines)
        if shared >= 10 and shared >= 0.25 * len(lines):
            record["near_duplicates_dropped"].append(rel)
            continue
        seen.add(digest)
        record["code_tokens"] += add("train", source)
        record["files"].append(rel)
    log.info("corpus: package %s %s: %d files, %d code tokens", name, version, len(record["files"]),
             record["code_tokens"])
    return record


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
