"""Kernel sources shipped inside fastopt: Numba CPU kernels (``cpu``) and CUDA sources (``cuda``)."""
