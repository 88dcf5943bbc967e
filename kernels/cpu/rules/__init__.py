"""Each update rule's CPU kernel code, one module per rule (``fastopt.rules``' ``KERNEL`` names): nothing but

- ``coefficients(hyper, lr, step, row)``: the tensor's step scalars, computed in float64 from its group's row of the
  group table (``hyper``: kernels/cpu/layout.py's GROUP_COLUMNS, then the rule's ``COLUMNS``), the group's learning
  rate and ``step`` (the tensor's step count including this step, where the rule counts it), each rounded once into
  ``row`` (the math dtype), as torch passes Python floats;
- ``element(param, grad, state0, state1, state2, lr_scale, has_lr_scale, live0, live1, live2, c)``: the update of
  one element, returning ``(param, state0, state1, state2)``. ``grad`` is already unscaled, clipped and negated for
  maximize; ``c`` is the tuple of the row's values; ``live<k>`` (compile-time literals) say which state slots the
  group uses (the others hold placeholders and are not stored); ``lr_scale`` is the element's rate multiplier where
  ``has_lr_scale`` (a literal).

The generic loop of kernels/cpu/fused.py is instantiated per rule around them. Element functions follow torch's
single-tensor (for-loop) implementations operation for operation and use no literal constants (a Python number would
promote float32 math to float64): every scalar arrives in ``c``, rounded to the math dtype. The CUDA twins in
kernels/cuda/rules/ have the same names, arguments and operation order.
"""
