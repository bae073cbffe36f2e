"""Builds the optional CPU decode kernels (mixtral_jax/kernels/cpu_kernels.cc) against the XLA FFI
headers that jaxlib ships. A failed build is not a failed install: the pure-JAX path runs instead,
and `mixtral_jax.kernels.status()` (logged once on first use) says which path runs."""

import importlib.util
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include_dir() -> str:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("jaxlib is not importable at build time (its XLA FFI headers are needed)")
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        if os.environ.get("MIXTRAL_JAX_CPU_KERNELS") == "0":
            print("mixtral_jax: MIXTRAL_JAX_CPU_KERNELS=0: CPU kernels not built; the pure-JAX path will run")
            return
        try:
            ext.include_dirs.append(_ffi_include_dir())
            super().build_extension(ext)
        except Exception as error:  # a missing compiler or headers must leave a working install
            print(f"mixtral_jax: CPU kernels not built ({error}); the pure-JAX path will run")


setup(
    ext_modules=[Extension(
        "mixtral_jax.kernels._cpu_kernels",
        sources=["mixtral_jax/kernels/cpu_kernels.cc"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O3", "-fno-math-errno", "-Wno-psabi"],
        optional=True,
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)
