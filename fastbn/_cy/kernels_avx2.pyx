# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""fastbn's CPU kernels, compiled with AVX2 and FMA; loaded only on CPUs that have them."""
include "_kernels.pxi"
