"""Engines that run an optimizer's step: ``cpu`` (fused Numba kernels) and ``reference`` (float64 NumPy)."""
