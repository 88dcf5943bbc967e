"""Fused multi-tensor optimizer steps: every tensor of one dtype updated in one parallel call.

Like apex's multi-tensor apply, the kernel receives a table of buffer addresses and a table of chunks
(tensor, start, length) and runs the chunks in parallel; a chunk reads each of its streams once and writes
each updated stream once. Before the parallel loop the kernel evaluates each group's schedule at the
optimizer step, advances each tensor's step count and computes the tensor's step scalars (bias corrections,
signed rates) in float64, rounding each once into the param dtype, as torch does with its Python floats.

Tensors whose GRAD address is 0 have no gradient this step and are skipped, step count included (torch
skips parameters whose .grad is None).

Mixed precision: the element type of each stream's array says how it is stored (``conversions.load`` /
``store``): float arrays as themselves, uint16 as bfloat16 bits, int16 as float16 bits; the math runs in the
math dtype of the bucket (the coefficients' dtype). A float32 MASTER copy of a 16-bit param, where there is one,
is the param the math reads and writes, and the 16-bit param is written as its rounding (``param_out``);
without one, a bfloat16 param may be rounded stochastically (``seed``, keyed by (seed, step, (tensor << 40) +
element)). The kernels take one typed scratch array per stream kind (``param_like``, ``grad_like``,
``state_like``, ``master_like``), so each combination of storage formats compiles, on first use, into loops with
no per-element branches: the float32 and float64 steps are the same code as without mixed precision.
"""
import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic, overload

from .conversions import float32_to_bfloat16_stochastic, load, store, widen_bits
from .element_math import adam_element, rmsprop_element, sgd_element
from .jit import jit, parallel_jit, reduction_jit, serial_twin
from .schedule_math import schedule_value
from .tables import (ADAM_COLUMNS, CHUNK, COEFFICIENT_GRAD_CLIP, COEFFICIENT_GRAD_UNSCALE, FLOAT32, GRAD,
                     GRAD_CLIP, GRAD_FORMAT, GRAD_UNSCALE, LR_SCALE, MASTER, NATIVE, PARAM, RMSPROP_COLUMNS,
                     SGD_COLUMNS, SKIP, STATE0, STATE1, STATE2)

# Elements per strip of 16-bit grads widened to float32 for the norm (a strip stays in L1).
STRIP = 1024

# Coefficient-row columns, per optimizer.
SGD_RATE, SGD_WEIGHT_DECAY, SGD_MOMENTUM, SGD_DAMPENING_COMPLEMENT = range(4)
RMSPROP_RATE, RMSPROP_ALPHA, RMSPROP_ALPHA_COMPLEMENT, RMSPROP_EPS, RMSPROP_WEIGHT_DECAY, RMSPROP_MOMENTUM, \
    RMSPROP_ONE = range(7)
(ADAM_STEP_RATE, ADAM_DECAY_FACTOR, ADAM_RATE_WEIGHT_DECAY, ADAM_BETA1_COMPLEMENT, ADAM_BETA2,
 ADAM_BETA2_COMPLEMENT, ADAM_BIAS_CORRECTION2_SQRT, ADAM_EPS, ADAM_WEIGHT_DECAY, ADAM_ONE) = range(10)

# Group-table columns, derived from the one list in tables.py that the host fills by name.
SGD_H_MOMENTUM, SGD_H_DAMPENING, SGD_H_WEIGHT_DECAY, SGD_H_NESTEROV, SGD_H_MAXIMIZE = (
    SGD_COLUMNS.index(name) for name in ("momentum", "dampening", "weight_decay", "nesterov", "maximize"))
RMS_H_ALPHA, RMS_H_EPS, RMS_H_WEIGHT_DECAY, RMS_H_MOMENTUM, RMS_H_CENTERED, RMS_H_MAXIMIZE = (
    RMSPROP_COLUMNS.index(name) for name in ("alpha", "eps", "weight_decay", "momentum", "centered", "maximize"))
ADAM_H_BETA1, ADAM_H_BETA2, ADAM_H_EPS, ADAM_H_WEIGHT_DECAY, ADAM_H_AMSGRAD, ADAM_H_MAXIMIZE, ADAM_H_DECOUPLED = (
    ADAM_COLUMNS.index(name) for name in
    ("beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"))


@intrinsic
def address_as_pointer(typingctx, address, like):
    """Reinterpret an int64 address as a pointer to ``like``'s element type."""
    signature = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@jit
def stream(addresses, tensor, slot, start, length, scratch):
    """Elements [start, start + length) of the buffer in ``slot``, as a contiguous array.

    An absent buffer (address 0) is replaced by the slot's own region of ``scratch``, which the loop variant the
    flags select never touches: every stream must still point at distinct memory, or LLVM's run-time alias
    check fails and the loop falls back to scalar code (5x slower, measured).
    """
    address = addresses[tensor, slot]
    if address == 0:
        address = scratch.ctypes.data + slot * CHUNK * scratch.itemsize
    else:
        address += start * scratch.itemsize
    # A carray at an offset address rather than a slice: a slice is typed as non-contiguous ('A' layout)
    # and its loop is not vectorised.
    return numba.carray(address_as_pointer(address, scratch), length)


@jit
def storage_stream(addresses, tensor, slot, start, length, like):
    """Elements [start, start + length) of the (present) buffer in ``slot``, typed as ``like``'s elements."""
    address = addresses[tensor, slot] + start * like.itemsize
    return numba.carray(address_as_pointer(address, like), length)


@jit
def window(array, offset, length):
    """``array[offset:offset + length]`` as a contiguous array (see ``stream``)."""
    return numba.carray(address_as_pointer(array.ctypes.data + offset * array.itemsize, array), length)


@jit
def strip_row(strips, row, length):
    """The first ``length`` elements of row ``row`` of ``strips``, as a contiguous array (see ``stream``)."""
    address = strips.ctypes.data + row * strips.shape[1] * strips.itemsize
    return numba.carray(address_as_pointer(address, strips), length)


@jit
def write_param(param, param_out, i, value, seed, step, first_element):
    """Store an updated param element: into ``param`` (rounded to nearest, or with a ``seed`` stochastically:
    bfloat16 params without a master copy), and with a master copy (``param`` is then the master) its rounding
    into the 16-bit ``param_out``. ``param_out``/``seed`` are None or not per compiled variant: no branch is left
    in the loop."""
    if seed is None:
        store(param, i, value)
    else:
        param[i] = float32_to_bfloat16_stochastic(value, seed, step, first_element + i)
    if param_out is not None:
        store(param_out, i, value)


def param_streams(addresses, tensor, start, length, param_like, master_like):
    """(the param the math reads and writes, the 16-bit param written as its rounding): (the param, None), or
    with a master copy (``master_like`` not None) (the master, the param). Chosen by type when compiled."""
    raise NotImplementedError("fastopt.kernels.cpu.fused.param_streams is compiled only")


@overload(param_streams, jit_options=dict(cache=True))
def _param_streams(addresses, tensor, start, length, param_like, master_like):
    if isinstance(master_like, types.NoneType):
        def without_master(addresses, tensor, start, length, param_like, master_like):
            return stream(addresses, tensor, PARAM, start, length, param_like), None
        return without_master

    def with_master(addresses, tensor, start, length, param_like, master_like):
        return (stream(addresses, tensor, MASTER, start, length, master_like),
                stream(addresses, tensor, PARAM, start, length, param_like))
    return with_master


@jit
def set_grad_coefficients(addresses, grad_control, coefficients):
    """Every tensor's grad factors, rounded once to the math dtype (GradScaler's inverse scale is a float32)."""
    for tensor in range(addresses.shape[0]):
        coefficients[tensor, COEFFICIENT_GRAD_UNSCALE] = grad_control[GRAD_UNSCALE]
        coefficients[tensor, COEFFICIENT_GRAD_CLIP] = grad_control[GRAD_CLIP]


@jit
def group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor):
    """Each group's schedule at the optimizer step, times ``lr_factor`` (the divergence guard's back-off; 1.0
    leaves the rate exactly as scheduled)."""
    learning_rates = np.empty(schedule_base.shape[0])
    for group in range(schedule_base.shape[0]):
        learning_rates[group] = schedule_value(schedule_program, schedule_base[group], optimizer_step) * lr_factor
    return learning_rates


@reduction_jit
def sum_of_squares(values):
    """The sum of ``values[i]**2`` in float64, re-associated into vector lanes (a plain running sum is a chain of
    dependent additions, 10x slower here). NaN and inf still propagate: the sum is finite exactly when every
    value is, for float32 and narrower values, whose squares cannot overflow float64."""
    total = 0.0
    for i in range(values.shape[0]):
        value = np.float64(values[i])
        total += value * value
    return total


@jit
def count_nonfinite(values):
    count = 0
    for i in range(values.shape[0]):
        count += not np.isfinite(values[i])
    return count


@jit
def chunk_grad_stats(grad):
    """Sum of squares (float64) and count of non-finite values of one chunk: the values are counted only when
    the sum is not finite, so the common case is one vectorised read. (A float64 grad beyond 1e154 overflows the
    sum: its norm is inf, as in float64 torch, and it counts as no non-finite value.)"""
    total = sum_of_squares(grad)
    return total, 0 if np.isfinite(total) else count_nonfinite(grad)


@jit
def chunk_grad_stats_bits(bits, storage_format, strip):
    """chunk_grad_stats of 16-bit grads (BFLOAT16 or FLOAT16 bits), widened strip by strip into ``strip``."""
    total = 0.0
    nonfinite = 0
    for offset in range(0, bits.shape[0], strip.shape[0]):
        length = min(strip.shape[0], bits.shape[0] - offset)
        values = strip_row(strip, 0, length)
        widen_bits(window(bits, offset, length), storage_format, values)
        strip_total, strip_nonfinite = chunk_grad_stats(values)
        total += strip_total
        nonfinite += strip_nonfinite
    return total, nonfinite


@parallel_jit
def grad_stats(addresses, tensor_format, chunk_tensor, chunk_start, chunk_length, scratch, bits_like, single_like):
    """One read of every grad: the global sum of squares (for the L2 norm) and the number of non-finite values."""
    total = 0.0
    nonfinite = 0
    for chunk in prange(chunk_tensor.shape[0]):
        tensor = chunk_tensor[chunk]
        if addresses[tensor, GRAD] == 0:
            continue
        start, length = chunk_start[chunk], chunk_length[chunk]
        grad_format = tensor_format[tensor, GRAD_FORMAT]
        if grad_format == NATIVE:
            chunk_total, chunk_nonfinite = chunk_grad_stats(stream(addresses, tensor, GRAD, start, length, scratch))
        elif grad_format == FLOAT32:
            chunk_total, chunk_nonfinite = chunk_grad_stats(
                storage_stream(addresses, tensor, GRAD, start, length, single_like))
        else:
            chunk_total, chunk_nonfinite = chunk_grad_stats_bits(
                storage_stream(addresses, tensor, GRAD, start, length, bits_like), grad_format,
                np.empty((1, STRIP), dtype=np.float32))
        total += chunk_total
        nonfinite += chunk_nonfinite
    return total, nonfinite


@jit
def unscaled_grad(grad, grad_unscale, grad_clip, maximize):
    """The gradient the update uses: unscaled (GradScaler's multiply by 1 / scale), clipped (clip_grad_norm_'s
    multiply by the clip factor), in that order as in torch, then negated for maximize. Both factors are exactly
    1 without a loss scale or clipping, and x * 1 is x for every x."""
    g = grad * grad_unscale * grad_clip
    return -g if maximize else g


@jit
def sgd_loop(has_lr_scale, use_momentum, first_momentum_step, param, param_out, grad, lr_scale, momentum_buffer,
             coefficients, maximize, use_weight_decay, nesterov, seed, step, first_element):
    rate = coefficients[SGD_RATE]
    weight_decay = coefficients[SGD_WEIGHT_DECAY]
    momentum = coefficients[SGD_MOMENTUM]
    dampening_complement = coefficients[SGD_DAMPENING_COMPLEMENT]
    grad_unscale = coefficients[COEFFICIENT_GRAD_UNSCALE]
    grad_clip = coefficients[COEFFICIENT_GRAD_CLIP]
    for i in range(param.shape[0]):
        g = unscaled_grad(load(grad, i), grad_unscale, grad_clip, maximize)
        element_rate = rate * lr_scale[i] if has_lr_scale else rate
        buffer = load(momentum_buffer, i) if use_momentum and not first_momentum_step else g
        p, buffer = sgd_element(load(param, i), g, buffer, element_rate, weight_decay, momentum,
                                dampening_complement, use_weight_decay, use_momentum, first_momentum_step, nesterov)
        write_param(param, param_out, i, p, seed, step, first_element)
        if use_momentum:
            store(momentum_buffer, i, buffer)


@jit
def sgd_chunk(param, param_out, grad, lr_scale, momentum_buffer, coefficients, has_lr_scale, maximize,
              use_weight_decay, use_momentum, first_momentum_step, nesterov, seed, step, first_element):
    """sgd_loop with the flags that decide which streams are read or written passed as literals: Numba compiles
    one loop per combination with the unused streams absent, and each vectorises (LLVM does not reliably
    unswitch a loop on five run-time flags, and a conditional load blocks vectorisation)."""
    if has_lr_scale:
        if not use_momentum:
            sgd_loop(True, False, False, param, param_out, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov, seed, step, first_element)
        elif first_momentum_step:
            sgd_loop(True, True, True, param, param_out, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov, seed, step, first_element)
        else:
            sgd_loop(True, True, False, param, param_out, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov, seed, step, first_element)
    else:
        if not use_momentum:
            sgd_loop(False, False, False, param, param_out, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov, seed, step, first_element)
        elif first_momentum_step:
            sgd_loop(False, True, True, param, param_out, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov, seed, step, first_element)
        else:
            sgd_loop(False, True, False, param, param_out, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov, seed, step, first_element)


@parallel_jit
def sgd_step(addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, tensor_step, group_hyper,
             schedule_program, schedule_base, optimizer_step, lr_factor, grad_control, coefficients, scratch,
             param_like, grad_like, state_like, master_like, seed):
    """One SGD step over all tensors; ``tensor_step`` counts momentum steps (0: the buffer starts as the grad)."""
    if grad_control[SKIP] != 0:
        return
    learning_rates = group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor)
    set_grad_coefficients(addresses, grad_control, coefficients)
    for tensor in range(tensor_group.shape[0]):
        if addresses[tensor, GRAD] == 0:
            continue
        hyper = group_hyper[tensor_group[tensor]]
        coefficients[tensor, SGD_RATE] = -learning_rates[tensor_group[tensor]]
        coefficients[tensor, SGD_WEIGHT_DECAY] = hyper[SGD_H_WEIGHT_DECAY]
        coefficients[tensor, SGD_MOMENTUM] = hyper[SGD_H_MOMENTUM]
        coefficients[tensor, SGD_DAMPENING_COMPLEMENT] = 1.0 - hyper[SGD_H_DAMPENING]
    for chunk in prange(chunk_tensor.shape[0]):
        tensor = chunk_tensor[chunk]
        if addresses[tensor, GRAD] == 0:
            continue
        start = chunk_start[chunk]
        length = chunk_length[chunk]
        hyper = group_hyper[tensor_group[tensor]]
        param, param_out = param_streams(addresses, tensor, start, length, param_like, master_like)
        sgd_chunk(param, param_out, stream(addresses, tensor, GRAD, start, length, grad_like),
                  stream(addresses, tensor, LR_SCALE, start, length, scratch),
                  stream(addresses, tensor, STATE0, start, length, state_like), coefficients[tensor],
                  addresses[tensor, LR_SCALE] != 0, hyper[SGD_H_MAXIMIZE] != 0, hyper[SGD_H_WEIGHT_DECAY] != 0,
                  hyper[SGD_H_MOMENTUM] != 0, tensor_step[tensor] == 0, hyper[SGD_H_NESTEROV] != 0, seed,
                  optimizer_step, (np.int64(tensor) << np.int64(40)) + start)
    for tensor in range(tensor_group.shape[0]):
        if addresses[tensor, GRAD] != 0 and group_hyper[tensor_group[tensor], SGD_H_MOMENTUM] != 0:
            tensor_step[tensor] += 1


@jit
def rmsprop_loop(has_lr_scale, use_momentum, centered, param, param_out, grad, lr_scale, square_avg,
                 momentum_buffer, grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element):
    rate = coefficients[RMSPROP_RATE]
    alpha = coefficients[RMSPROP_ALPHA]
    alpha_complement = coefficients[RMSPROP_ALPHA_COMPLEMENT]
    eps = coefficients[RMSPROP_EPS]
    weight_decay = coefficients[RMSPROP_WEIGHT_DECAY]
    momentum = coefficients[RMSPROP_MOMENTUM]
    one = coefficients[RMSPROP_ONE]
    grad_unscale = coefficients[COEFFICIENT_GRAD_UNSCALE]
    grad_clip = coefficients[COEFFICIENT_GRAD_CLIP]
    for i in range(param.shape[0]):
        g = unscaled_grad(load(grad, i), grad_unscale, grad_clip, maximize)
        element_rate = rate * lr_scale[i] if has_lr_scale else rate
        buffer = load(momentum_buffer, i) if use_momentum else g
        average = load(grad_avg, i) if centered else g
        p, v, buffer, average = rmsprop_element(load(param, i), g, load(square_avg, i), buffer, average,
                                                element_rate, alpha, alpha_complement, eps, weight_decay, momentum,
                                                one, use_weight_decay, use_momentum, centered)
        write_param(param, param_out, i, p, seed, step, first_element)
        store(square_avg, i, v)
        if use_momentum:
            store(momentum_buffer, i, buffer)
        if centered:
            store(grad_avg, i, average)


@jit
def rmsprop_chunk(param, param_out, grad, lr_scale, square_avg, momentum_buffer, grad_avg, coefficients,
                  has_lr_scale, maximize, use_weight_decay, use_momentum, centered, seed, step, first_element):
    """rmsprop_loop with the stream-selecting flags as literals (see sgd_chunk)."""
    if has_lr_scale:
        if use_momentum:
            if centered:
                rmsprop_loop(True, True, True, param, param_out, grad, lr_scale, square_avg, momentum_buffer,
                             grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element)
            else:
                rmsprop_loop(True, True, False, param, param_out, grad, lr_scale, square_avg, momentum_buffer,
                             grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element)
        elif centered:
            rmsprop_loop(True, False, True, param, param_out, grad, lr_scale, square_avg, momentum_buffer,
                         grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element)
        else:
            rmsprop_loop(True, False, False, param, param_out, grad, lr_scale, square_avg, momentum_buffer,
                         grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element)
    else:
        if use_momentum:
            if centered:
                rmsprop_loop(False, True, True, param, param_out, grad, lr_scale, square_avg, momentum_buffer,
                             grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element)
            else:
                rmsprop_loop(False, True, False, param, param_out, grad, lr_scale, square_avg, momentum_buffer,
                             grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element)
        elif centered:
            rmsprop_loop(False, False, True, param, param_out, grad, lr_scale, square_avg, momentum_buffer,
                         grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element)
        else:
            rmsprop_loop(False, False, False, param, param_out, grad, lr_scale, square_avg, momentum_buffer,
                         grad_avg, coefficients, maximize, use_weight_decay, seed, step, first_element)


@parallel_jit
def rmsprop_step(addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, tensor_step, group_hyper,
                 schedule_program, schedule_base, optimizer_step, lr_factor, grad_control, coefficients, scratch,
                 param_like, grad_like, state_like, master_like, seed):
    """One RMSprop step over all tensors (state slots: square_avg, momentum_buffer, grad_avg)."""
    if grad_control[SKIP] != 0:
        return
    learning_rates = group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor)
    set_grad_coefficients(addresses, grad_control, coefficients)
    for tensor in range(tensor_group.shape[0]):
        if addresses[tensor, GRAD] == 0:
            continue
        tensor_step[tensor] += 1
        hyper = group_hyper[tensor_group[tensor]]
        coefficients[tensor, RMSPROP_RATE] = -learning_rates[tensor_group[tensor]]
        coefficients[tensor, RMSPROP_ALPHA] = hyper[RMS_H_ALPHA]
        coefficients[tensor, RMSPROP_ALPHA_COMPLEMENT] = 1.0 - hyper[RMS_H_ALPHA]
        coefficients[tensor, RMSPROP_EPS] = hyper[RMS_H_EPS]
        coefficients[tensor, RMSPROP_WEIGHT_DECAY] = hyper[RMS_H_WEIGHT_DECAY]
        coefficients[tensor, RMSPROP_MOMENTUM] = hyper[RMS_H_MOMENTUM]
        coefficients[tensor, RMSPROP_ONE] = 1.0
    for chunk in prange(chunk_tensor.shape[0]):
        tensor = chunk_tensor[chunk]
        if addresses[tensor, GRAD] == 0:
            continue
        start = chunk_start[chunk]
        length = chunk_length[chunk]
        hyper = group_hyper[tensor_group[tensor]]
        param, param_out = param_streams(addresses, tensor, start, length, param_like, master_like)
        rmsprop_chunk(param, param_out, stream(addresses, tensor, GRAD, start, length, grad_like),
                      stream(addresses, tensor, LR_SCALE, start, length, scratch),
                      stream(addresses, tensor, STATE0, start, length, state_like),
                      stream(addresses, tensor, STATE1, start, length, state_like),
                      stream(addresses, tensor, STATE2, start, length, state_like), coefficients[tensor],
                      addresses[tensor, LR_SCALE] != 0, hyper[RMS_H_MAXIMIZE] != 0, hyper[RMS_H_WEIGHT_DECAY] != 0,
                      hyper[RMS_H_MOMENTUM] > 0, hyper[RMS_H_CENTERED] != 0, seed, optimizer_step,
                      (np.int64(tensor) << np.int64(40)) + start)


@jit
def adam_loop(has_lr_scale, amsgrad, param, param_out, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq,
              coefficients, maximize, use_weight_decay, decoupled_weight_decay, seed, step, first_element):
    step_rate = coefficients[ADAM_STEP_RATE]
    decay_factor = coefficients[ADAM_DECAY_FACTOR]
    rate_weight_decay = coefficients[ADAM_RATE_WEIGHT_DECAY]
    beta1_complement = coefficients[ADAM_BETA1_COMPLEMENT]
    beta2 = coefficients[ADAM_BETA2]
    beta2_complement = coefficients[ADAM_BETA2_COMPLEMENT]
    bias_correction2_sqrt = coefficients[ADAM_BIAS_CORRECTION2_SQRT]
    eps = coefficients[ADAM_EPS]
    weight_decay = coefficients[ADAM_WEIGHT_DECAY]
    one = coefficients[ADAM_ONE]
    grad_unscale = coefficients[COEFFICIENT_GRAD_UNSCALE]
    grad_clip = coefficients[COEFFICIENT_GRAD_CLIP]
    for i in range(param.shape[0]):
        g = unscaled_grad(load(grad, i), grad_unscale, grad_clip, maximize)
        if has_lr_scale:
            element_step_rate = step_rate * lr_scale[i]
            element_decay_factor = one - rate_weight_decay * lr_scale[i]
        else:
            element_step_rate = step_rate
            element_decay_factor = decay_factor
        v_max = load(max_exp_avg_sq, i) if amsgrad else g
        p, m, v, v_max = adam_element(load(param, i), g, load(exp_avg, i), load(exp_avg_sq, i), v_max,
                                      element_step_rate, element_decay_factor, beta1_complement, beta2,
                                      beta2_complement, bias_correction2_sqrt, eps, weight_decay, one,
                                      use_weight_decay, decoupled_weight_decay, amsgrad)
        write_param(param, param_out, i, p, seed, step, first_element)
        store(exp_avg, i, m)
        store(exp_avg_sq, i, v)
        if amsgrad:
            store(max_exp_avg_sq, i, v_max)


@jit
def adam_chunk(param, param_out, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, has_lr_scale,
               maximize, use_weight_decay, decoupled_weight_decay, amsgrad, seed, step, first_element):
    """adam_loop with the stream-selecting flags as literals (see sgd_chunk)."""
    if has_lr_scale:
        if amsgrad:
            adam_loop(True, True, param, param_out, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq,
                      coefficients, maximize, use_weight_decay, decoupled_weight_decay, seed, step, first_element)
        else:
            adam_loop(True, False, param, param_out, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq,
                      coefficients, maximize, use_weight_decay, decoupled_weight_decay, seed, step, first_element)
    else:
        if amsgrad:
            adam_loop(False, True, param, param_out, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq,
                      coefficients, maximize, use_weight_decay, decoupled_weight_decay, seed, step, first_element)
        else:
            adam_loop(False, False, param, param_out, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq,
                      coefficients, maximize, use_weight_decay, decoupled_weight_decay, seed, step, first_element)


@parallel_jit
def adam_step(addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, tensor_step, group_hyper,
              schedule_program, schedule_base, optimizer_step, lr_factor, grad_control, coefficients, scratch,
              param_like, grad_like, state_like, master_like, seed):
    """One Adam/AdamW step over all tensors (state slots: exp_avg, exp_avg_sq, max_exp_avg_sq)."""
    if grad_control[SKIP] != 0:
        return
    learning_rates = group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor)
    set_grad_coefficients(addresses, grad_control, coefficients)
    for tensor in range(tensor_group.shape[0]):
        if addresses[tensor, GRAD] == 0:
            continue
        tensor_step[tensor] += 1
        hyper = group_hyper[tensor_group[tensor]]
        lr = learning_rates[tensor_group[tensor]]
        step = float(tensor_step[tensor])
        bias_correction1 = 1.0 - hyper[ADAM_H_BETA1] ** step
        bias_correction2 = 1.0 - hyper[ADAM_H_BETA2] ** step
        coefficients[tensor, ADAM_STEP_RATE] = -(lr / bias_correction1)
        coefficients[tensor, ADAM_DECAY_FACTOR] = 1.0 - lr * hyper[ADAM_H_WEIGHT_DECAY]
        coefficients[tensor, ADAM_RATE_WEIGHT_DECAY] = lr * hyper[ADAM_H_WEIGHT_DECAY]
        coefficients[tensor, ADAM_BETA1_COMPLEMENT] = 1.0 - hyper[ADAM_H_BETA1]
        coefficients[tensor, ADAM_BETA2] = hyper[ADAM_H_BETA2]
        coefficients[tensor, ADAM_BETA2_COMPLEMENT] = 1.0 - hyper[ADAM_H_BETA2]
        coefficients[tensor, ADAM_BIAS_CORRECTION2_SQRT] = bias_correction2 ** 0.5
        coefficients[tensor, ADAM_EPS] = hyper[ADAM_H_EPS]
        coefficients[tensor, ADAM_WEIGHT_DECAY] = hyper[ADAM_H_WEIGHT_DECAY]
        coefficients[tensor, ADAM_ONE] = 1.0
    for chunk in prange(chunk_tensor.shape[0]):
        tensor = chunk_tensor[chunk]
        if addresses[tensor, GRAD] == 0:
            continue
        start = chunk_start[chunk]
        length = chunk_length[chunk]
        hyper = group_hyper[tensor_group[tensor]]
        param, param_out = param_streams(addresses, tensor, start, length, param_like, master_like)
        adam_chunk(param, param_out, stream(addresses, tensor, GRAD, start, length, grad_like),
                   stream(addresses, tensor, LR_SCALE, start, length, scratch),
                   stream(addresses, tensor, STATE0, start, length, state_like),
                   stream(addresses, tensor, STATE1, start, length, state_like),
                   stream(addresses, tensor, STATE2, start, length, state_like), coefficients[tensor],
                   addresses[tensor, LR_SCALE] != 0, hyper[ADAM_H_MAXIMIZE] != 0, hyper[ADAM_H_WEIGHT_DECAY] != 0,
                   hyper[ADAM_H_DECOUPLED] != 0, hyper[ADAM_H_AMSGRAD] != 0, seed, optimizer_step,
                   (np.int64(tensor) << np.int64(40)) + start)


# Single-threaded twins for small buckets (see tables.SERIAL_BELOW).
sgd_step_serial = serial_twin(sgd_step)
rmsprop_step_serial = serial_twin(rmsprop_step)
adam_step_serial = serial_twin(adam_step)
