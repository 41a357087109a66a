"""Build script: the one place that knows compiler flags.

Builds the Cython kernels twice from one source: `kernels_baseline` for any
CPU of the target architecture, and on x86-64 `kernels_avx2` with AVX2/FMA
(and F16C, for float16 data), which fastbn loads at run time only where the CPU
has them (no -march=native:
a wheel must run on any x86-64).  OpenMP is used where the compiler has it;
otherwise the build is serial, says so here, and `python -m fastbn info`
says so too.
"""

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

OPTIMIZE = ["-O3"]
# sqrt() that need not set errno vectorises (the per-channel factors of a call).
NO_ERRNO = ["-fno-math-errno"]
# Loops start on a 64-byte boundary whatever code precedes them: on a Zen 3 EPYC the float16
# backward's sums (a loop over buffers in L1) ran 10-12% slower when only the alignment of
# their function moved (0c5b739's kernels built with -falign-functions=64), and any change
# elsewhere in the module could move it.  With this flag both placements ran alike; other
# kernels moved within the noise (0.97-1.04; float16 training 0.90).
ALIGN_LOOPS = ["-falign-loops=64"]
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# Every CPU with AVX2 and FMA has F16C (half-precision conversions) too.
AVX2 = ["-mavx2", "-mfma", "-mf16c"]


def _compiler():
    return os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0] or "cc"


def _compiles(flags):
    """True when the C compiler accepts `flags` for a program using them."""
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 0; }\n" \
        if "-fopenmp" in flags else "int main(void) { return 0; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            result = subprocess.run([_compiler(), path, "-o", os.path.join(tmp, "probe"), *flags],
                                    capture_output=True)
        except OSError:
            return False
        return result.returncode == 0


def _openmp_flags():
    if os.environ.get("FASTBN_DISABLE_OPENMP"):
        return []
    if shutil.which(_compiler()) and _compiles(["-fopenmp"]):
        return ["-fopenmp"]
    message = ("fastbn: the C compiler has no OpenMP (-fopenmp failed); building the kernels "
               "serial. They will use one thread; `python -m fastbn info` reports it.")
    warnings.warn(message)
    print(message, file=sys.stderr)
    return []


def extensions():
    openmp = _openmp_flags()
    optimize = OPTIMIZE + [flag for flag in NO_ERRNO + ALIGN_LOOPS if _compiles([flag])]
    common = dict(include_dirs=[np.get_include()],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                  extra_link_args=openmp)
    exts = [Extension("fastbn._cy.kernels_baseline", ["fastbn/_cy/kernels_baseline.pyx"],
                      extra_compile_args=optimize + openmp, **common)]
    if X86_64 and _compiles(AVX2):
        exts.append(Extension("fastbn._cy.kernels_avx2", ["fastbn/_cy/kernels_avx2.pyx"],
                              extra_compile_args=optimize + openmp + AVX2, **common))
    return cythonize(exts, compiler_directives={"language_level": 3}, quiet=True)


setup(ext_modules=extensions())
