# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""fastbn's CPU kernels, compiled for baseline x86-64 (or whatever the target is)."""
include "_kernels.pxi"
