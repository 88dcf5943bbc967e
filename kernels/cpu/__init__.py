"""Numba CPU kernels.

``jit`` holds the one set of compile options; ``schedule_math`` evaluates packed schedules;
``element_math`` holds the per-element update of each optimizer; ``fused`` runs them over all
tensors of an optimizer in one parallel call.
"""
