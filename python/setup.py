"""Builds dma_torch._C from the repository's own sources (../core/src, ../cuda/src; nothing copied).

    python3 -m pip install --no-build-isolation ./python        (see README.md for Debian)

The CPU code (core/) is always built. The CUDA kernels (cuda/) and their binding are built when
torch is a CUDA build and nvcc is found (CUDA_HOME); DMA_TORCH_CUDA=0 forces a CPU-only build,
DMA_TORCH_CUDA=1 makes a missing CUDA toolchain an error.

Eigen3 (headers only) is needed by core/src/tiled.cpp, the tiled CPU implementation. It is looked
for in EIGEN3_INCLUDE_DIR, then $CONDA_PREFIX/include/eigen3, /usr/include/eigen3,
/usr/local/include/eigen3, /opt/homebrew/include/eigen3 (DMA_TORCH_EIGEN=0: not at all). Without
it the extension still builds: csrc/tiled_fallback.cpp stands in for tiled.cpp and runs the scalar
reference (same results, slower, memory B*Hd*Lq*Lk bytes for the explicit mask).
dma_torch.build_info() says which.

core/ and cuda/ are linked into _C as a static archive, as CMake links dma_core and dma_cuda, so
only the objects the binding uses are pulled in.

The repository is found from this file's real location (python/..); pip >= 21.3 builds a local
directory in place, so that holds. DMA_REPO_ROOT overrides it (for a copied python/ tree).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
REPO = Path(os.environ.get("DMA_REPO_ROOT", HERE.parent)).resolve()
CORE, CUDA = REPO / "core", REPO / "cuda"
if not (CORE / "include" / "dma" / "pipeline.hpp").is_file():
    sys.exit(f"dma_torch: the DMA sources are not at {REPO} (expected core/ and cuda/ there). "
             "Build from the repository's python/ folder in place, or set DMA_REPO_ROOT.")

# torch is needed at build time (pip --no-build-isolation uses the installed one).
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def find_eigen():
    if os.environ.get("DMA_TORCH_EIGEN", "").lower() in ("0", "off", "no"):
        return None  # force the fallback (to test it)
    candidates = [os.environ.get("EIGEN3_INCLUDE_DIR", "")]
    if os.environ.get("CONDA_PREFIX"):
        candidates.append(os.path.join(os.environ["CONDA_PREFIX"], "include", "eigen3"))
    candidates += ["/usr/include/eigen3", "/usr/local/include/eigen3", "/opt/homebrew/include/eigen3"]
    for c in candidates:
        if c and (Path(c) / "Eigen" / "Dense").is_file():
            return c
    return None


def want_cuda():
    flag = os.environ.get("DMA_TORCH_CUDA", "auto").lower()
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("0", "off", "no"):
        return False
    if flag in ("1", "on", "yes") and not have:
        sys.exit("dma_torch: DMA_TORCH_CUDA=1 but torch is not a CUDA build or nvcc was not found "
                 f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    return have


eigen = find_eigen()
with_cuda = want_cuda()

sources = [str(p) for p in sorted((CORE / "src").glob("*.cpp"))]
if eigen is None:
    sources = [s for s in sources if not s.endswith("/tiled.cpp")]
    sources.append(str(HERE / "csrc" / "tiled_fallback.cpp"))
    print("dma_torch: Eigen3 not found (set EIGEN3_INCLUDE_DIR): the CPU path uses the scalar "
          "reference instead of core/src/tiled.cpp", file=sys.stderr)
sources.append(str(HERE / "csrc" / "bindings.cpp"))

include_dirs = [str(CORE / "include"), str(CUDA / "include")]
if eigen:
    include_dirs.append(eigen)
macros = [("DMA_TORCH_HAVE_EIGEN", "1" if eigen else "0")]
cxx_flags = ["-O3", "-std=c++17"]


def nvcc_major():
    """The major version of the nvcc that builds the kernels (CUDA_HOME), else torch's CUDA."""
    try:
        out = subprocess.run([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split("release ")[1].split(".")[0])
    except (OSError, IndexError, ValueError, TypeError, subprocess.CalledProcessError):
        return int((torch.version.cuda or "0").split(".")[0])


if with_cuda:
    sources += [str(p) for p in sorted((CUDA / "src").glob("*.cu"))]
    # CUDA 12 and newer: every kernel is built for sm_90a, so the Hopper kernels
    # (cuda/src/forward_sm90.cu, dq_sm90.cu, backward_sm90.cu: wgmma, setmaxnreg) are in and
    # chosen at run time. (CMake builds only those files for sm_90a; one extension takes one set
    # of flags.) Older CUDA cannot target sm_90a: sm_90, with the mma.sync kernels only.
    sm90a = nvcc_major() >= 12
    arch = (["-gencode=arch=compute_90a,code=sm_90a", "-DDMA_HAVE_SM90=1"] if sm90a
            else ["-gencode=arch=compute_90,code=sm_90"])
    sources.append(str(HERE / "csrc" / "cuda_ops.cpp"))
    include_dirs.append(str(CUDA / "src"))
    macros.append(("DMA_TORCH_WITH_CUDA", "1"))
    nvcc_flags = [
        "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", *arch,
        # torch adds -D__CUDA_NO_HALF_OPERATORS__ and friends; the kernels use the operators.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    ]
    ext = cpp_extension.CUDAExtension(
        "dma_torch._C", sources, include_dirs=include_dirs, define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
else:
    ext = cpp_extension.CppExtension(
        "dma_torch._C", sources, include_dirs=include_dirs, define_macros=macros,
        extra_compile_args={"cxx": cxx_flags})

BINDING = [str(HERE / "csrc" / "bindings.cpp"), str(HERE / "csrc" / "cuda_ops.cpp")]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja, parallel, incremental), linking core/ and cuda/ the way CMake
    does, as a static archive: only the objects the binding needs are pulled in, so a source file
    it does not use (a tool's, or one mid-edit) cannot leave an undefined symbol in _C."""

    def build_extensions(self):
        link = self.compiler.link_shared_object
        binding_objs = {os.path.splitext(b)[0] for b in BINDING}

        def link_with_archive(objects, output, *args, **kwargs):
            own = [o for o in objects if any(o.endswith(b.lstrip("/") + ".o") for b in binding_objs)]
            lib = [o for o in objects if o not in own]
            archive = os.path.join(os.path.abspath(self.build_temp), "libdma_sources.a")
            if os.path.exists(archive):
                os.remove(archive)
            subprocess.check_call(["ar", "rcs", archive] + lib)
            return link(own + [archive], output, *args, **kwargs)

        self.compiler.link_shared_object = link_with_archive
        super().build_extensions()


setup(
    name="dma_torch",
    version="0.1.0",
    description="Dynamic Mask Attention (DMA) for PyTorch: a custom op and an nn.Module",
    packages=["dma_torch"],
    python_requires=">=3.8",
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
