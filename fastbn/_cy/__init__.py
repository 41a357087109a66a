"""Compiled kernels (Cython + OpenMP); see _kernels.pxi."""
