// Element-math helpers that the rules' element functions share (kernels/cuda/rules/): the CUDA twins of
// fastopt/kernels/cpu/element_math.py, torch's formulas where they differ from the textbook's.
//
// Same names, same argument order, same operation order as the Numba functions. Every argument is a scalar already
// in the math dtype T, and ``one`` is passed in (no literal constants appear in the math, so a float kernel never
// computes in double). The kernels are compiled with --fmad=false: no multiply-add is contracted, so each operation
// rounds exactly as in the Numba kernels (which LLVM does not contract either), and the host build that
// tests/test_cuda_host_math.py checks is bit-for-bit the device code.
#pragma once

#include "host_device.cuh"

namespace fastopt {

// torch.lerp's formula: the form used depends on whether |weight| is below one half (negative weights:
// schedule-free's eval()).
template <typename T>
FASTOPT_HOST_DEVICE T lerp(T start, T end, T weight, T one) {
    if (absolute(weight) < one - absolute(weight)) {
        return start + weight * (end - start);
    }
    return end - (end - start) * (one - weight);
}

// torch.maximum: NaN when either input is NaN (a bare comparison would drop it).
template <typename T>
FASTOPT_HOST_DEVICE T maximum(T a, T b) {
    if (a != a || b != b) {
        return a + b;
    }
    return a > b ? a : b;
}

// An element's rate and decoupled weight-decay factor: the tensor's ``rate`` and ``decay_factor`` (1 - lr wd), or
// with the element's ``lr_scale`` s, ``rate s`` and ``1 - (lr wd) s``. Numba: element_rates.
template <typename T>
FASTOPT_HOST_DEVICE void element_rates(T rate, T decay_factor, T rate_weight_decay, T one, T lr_scale,
                                       bool has_lr_scale, T& element_rate, T& element_decay_factor) {
    if (has_lr_scale) {
        element_rate = rate * lr_scale;
        element_decay_factor = one - rate_weight_decay * lr_scale;
    } else {
        element_rate = rate;
        element_decay_factor = decay_factor;
    }
}

}  // namespace fastopt
