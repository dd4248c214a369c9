"""Builds moefast and its native extension moefast._C with torch.utils.cpp_extension and ninja.

C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are added
when torch has CUDA and nvcc is found, or when MOEFAST_CUDA=1 forces them (compile checks on a machine
without a GPU); MOEFAST_CUDA=0 turns them off. TORCH_CUDA_ARCH_LIST picks the GPU architectures, and
nothing here asks a driver for a device. The tensor-core grouped GEMM builds on the CUTLASS headers of the
`nvidia-cutlass` wheel (found without importing it, or at MOEFAST_CUTLASS_INCLUDE); without them only its
CUDA-core path is built. Install with `pip install --no-build-isolation -e .` against
the torch already installed.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"


def _want_cuda() -> bool:
    flag = os.environ.get("MOEFAST_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _cutlass_include() -> str | None:
    """The CUTLASS/CuTe include directory shipped in the nvidia-cutlass wheel, if installed."""
    explicit = os.environ.get("MOEFAST_CUTLASS_INCLUDE")
    if explicit:
        return explicit
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        include = Path(root) / "source" / "include"
        if (include / "cutlass" / "cutlass.h").is_file():
            return str(include)
    return None


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    include_dirs = [str(ROOT / "csrc"), str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "cpu")]
    debug = os.environ.get("MOEFAST_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-fopenmp"]
    define_macros = [("MOEFAST_VERSION", f'"{VERSION}"')]
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    if _want_cuda() and cuda_sources:
        define_macros.append(("MOEFAST_WITH_CUDA", None))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        if os.environ.get("MOEFAST_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")  # register and spill report, checked by CI
        cuda_includes = [str(ROOT / "csrc" / "cuda")]
        cutlass = _cutlass_include()
        if cutlass is not None:
            cuda_includes.append(cutlass)
            define_macros.append(("MOEFAST_WITH_CUTLASS", None))
        elif os.environ.get("MOEFAST_REQUIRE_CUTLASS") == "1":
            raise RuntimeError(
                "MOEFAST_REQUIRE_CUTLASS=1 but the nvidia-cutlass headers were not found"
            )
        return [
            CUDAExtension(
                "moefast._C",
                sources + cuda_sources,
                include_dirs=[*include_dirs, *cuda_includes],
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "moefast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    version=VERSION,
    packages=find_packages(include=["moefast", "moefast.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
