"""Fused multi-tensor optimizer steps: every tensor of one dtype updated in one parallel call.

Like apex's multi-tensor apply, the kernel receives a table of buffer addresses and a table of chunks
(tensor, start, length) and runs the chunks in parallel; a chunk reads each of its streams once and writes
each updated stream once. Before the parallel loop the kernel evaluates each group's schedule at the
optimizer step, advances each tensor's step count and computes the tensor's step scalars (bias corrections,
signed rates) in float64, rounding each once into the param dtype, as torch does with its Python floats.

Tensors whose GRAD address is 0 have no gradient this step and are skipped, step count included (torch
skips parameters whose .grad is None).
"""
import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from .element_math import adam_element, rmsprop_element, sgd_element
from .jit import jit, parallel_jit, serial_twin
from .schedule_math import schedule_value
from .tables import ADAM_COLUMNS, CHUNK, GRAD, LR_SCALE, PARAM, RMSPROP_COLUMNS, SGD_COLUMNS, STATE0, STATE1, STATE2

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
def group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor):
    """Each group's schedule at the optimizer step, times ``lr_factor`` (the divergence guard's back-off; 1.0
    leaves the rate exactly as scheduled)."""
    learning_rates = np.empty(schedule_base.shape[0])
    for group in range(schedule_base.shape[0]):
        learning_rates[group] = schedule_value(schedule_program, schedule_base[group], optimizer_step) * lr_factor
    return learning_rates


@jit
def chunk_grad_stats(grad):
    """Sum of squares and count of non-finite values of one chunk, in float64 (no fastmath: NaN must count)."""
    total = 0.0
    nonfinite = 0
    for i in range(grad.shape[0]):
        value = np.float64(grad[i])
        total += value * value
        nonfinite += not np.isfinite(value)
    return total, nonfinite


@parallel_jit
def grad_stats(addresses, chunk_tensor, chunk_start, chunk_length, scratch):
    """One read of every grad: the global sum of squares (for the L2 norm) and the number of non-finite values."""
    total = 0.0
    nonfinite = 0
    for chunk in prange(chunk_tensor.shape[0]):
        tensor = chunk_tensor[chunk]
        if addresses[tensor, GRAD] == 0:
            continue
        chunk_total, chunk_nonfinite = chunk_grad_stats(
            stream(addresses, tensor, GRAD, chunk_start[chunk], chunk_length[chunk], scratch))
        total += chunk_total
        nonfinite += chunk_nonfinite
    return total, nonfinite


@jit
def sgd_loop(has_lr_scale, use_momentum, first_momentum_step, param, grad, lr_scale, momentum_buffer, coefficients,
             maximize, use_weight_decay, nesterov):
    rate = coefficients[SGD_RATE]
    weight_decay = coefficients[SGD_WEIGHT_DECAY]
    momentum = coefficients[SGD_MOMENTUM]
    dampening_complement = coefficients[SGD_DAMPENING_COMPLEMENT]
    for i in range(param.shape[0]):
        g = -grad[i] if maximize else grad[i]
        element_rate = rate * lr_scale[i] if has_lr_scale else rate
        buffer = momentum_buffer[i] if use_momentum and not first_momentum_step else g
        p, buffer = sgd_element(param[i], g, buffer, element_rate, weight_decay, momentum, dampening_complement,
                                use_weight_decay, use_momentum, first_momentum_step, nesterov)
        param[i] = p
        if use_momentum:
            momentum_buffer[i] = buffer


@jit
def sgd_chunk(param, grad, lr_scale, momentum_buffer, coefficients, has_lr_scale, maximize, use_weight_decay,
              use_momentum, first_momentum_step, nesterov):
    """sgd_loop with the flags that decide which streams are read or written passed as literals: Numba compiles
    one loop per combination with the unused streams absent, and each vectorises (LLVM does not reliably
    unswitch a loop on five run-time flags, and a conditional load blocks vectorisation)."""
    if has_lr_scale:
        if not use_momentum:
            sgd_loop(True, False, False, param, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov)
        elif first_momentum_step:
            sgd_loop(True, True, True, param, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov)
        else:
            sgd_loop(True, True, False, param, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov)
    else:
        if not use_momentum:
            sgd_loop(False, False, False, param, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov)
        elif first_momentum_step:
            sgd_loop(False, True, True, param, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov)
        else:
            sgd_loop(False, True, False, param, grad, lr_scale, momentum_buffer, coefficients, maximize,
                     use_weight_decay, nesterov)


@parallel_jit
def sgd_step(addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, tensor_step, group_hyper,
             schedule_program, schedule_base, optimizer_step, lr_factor, coefficients, scratch):
    """One SGD step over all tensors; ``tensor_step`` counts momentum steps (0: the buffer starts as the grad)."""
    learning_rates = group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor)
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
        sgd_chunk(stream(addresses, tensor, PARAM, start, length, scratch),
                  stream(addresses, tensor, GRAD, start, length, scratch),
                  stream(addresses, tensor, LR_SCALE, start, length, scratch),
                  stream(addresses, tensor, STATE0, start, length, scratch),
                  coefficients[tensor], addresses[tensor, LR_SCALE] != 0, hyper[SGD_H_MAXIMIZE] != 0,
                  hyper[SGD_H_WEIGHT_DECAY] != 0, hyper[SGD_H_MOMENTUM] != 0, tensor_step[tensor] == 0,
                  hyper[SGD_H_NESTEROV] != 0)
    for tensor in range(tensor_group.shape[0]):
        if addresses[tensor, GRAD] != 0 and group_hyper[tensor_group[tensor], SGD_H_MOMENTUM] != 0:
            tensor_step[tensor] += 1


@jit
def rmsprop_loop(has_lr_scale, use_momentum, centered, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                 coefficients, maximize, use_weight_decay):
    rate = coefficients[RMSPROP_RATE]
    alpha = coefficients[RMSPROP_ALPHA]
    alpha_complement = coefficients[RMSPROP_ALPHA_COMPLEMENT]
    eps = coefficients[RMSPROP_EPS]
    weight_decay = coefficients[RMSPROP_WEIGHT_DECAY]
    momentum = coefficients[RMSPROP_MOMENTUM]
    one = coefficients[RMSPROP_ONE]
    for i in range(param.shape[0]):
        g = -grad[i] if maximize else grad[i]
        element_rate = rate * lr_scale[i] if has_lr_scale else rate
        buffer = momentum_buffer[i] if use_momentum else g
        average = grad_avg[i] if centered else g
        p, s, buffer, average = rmsprop_element(param[i], g, square_avg[i], buffer, average, element_rate, alpha,
                                                alpha_complement, eps, weight_decay, momentum, one,
                                                use_weight_decay, use_momentum, centered)
        param[i] = p
        square_avg[i] = s
        if use_momentum:
            momentum_buffer[i] = buffer
        if centered:
            grad_avg[i] = average


@jit
def rmsprop_chunk(param, grad, lr_scale, square_avg, momentum_buffer, grad_avg, coefficients, has_lr_scale,
                  maximize, use_weight_decay, use_momentum, centered):
    """rmsprop_loop with the stream-selecting flags as literals (see sgd_chunk)."""
    if has_lr_scale:
        if use_momentum:
            if centered:
                rmsprop_loop(True, True, True, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                             coefficients, maximize, use_weight_decay)
            else:
                rmsprop_loop(True, True, False, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                             coefficients, maximize, use_weight_decay)
        elif centered:
            rmsprop_loop(True, False, True, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                         coefficients, maximize, use_weight_decay)
        else:
            rmsprop_loop(True, False, False, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                         coefficients, maximize, use_weight_decay)
    else:
        if use_momentum:
            if centered:
                rmsprop_loop(False, True, True, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                             coefficients, maximize, use_weight_decay)
            else:
                rmsprop_loop(False, True, False, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                             coefficients, maximize, use_weight_decay)
        elif centered:
            rmsprop_loop(False, False, True, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                         coefficients, maximize, use_weight_decay)
        else:
            rmsprop_loop(False, False, False, param, grad, lr_scale, square_avg, momentum_buffer, grad_avg,
                         coefficients, maximize, use_weight_decay)


@parallel_jit
def rmsprop_step(addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, tensor_step, group_hyper,
                 schedule_program, schedule_base, optimizer_step, lr_factor, coefficients, scratch):
    """One RMSprop step over all tensors (state slots: square_avg, momentum_buffer, grad_avg)."""
    learning_rates = group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor)
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
        rmsprop_chunk(stream(addresses, tensor, PARAM, start, length, scratch),
                      stream(addresses, tensor, GRAD, start, length, scratch),
                      stream(addresses, tensor, LR_SCALE, start, length, scratch),
                      stream(addresses, tensor, STATE0, start, length, scratch),
                      stream(addresses, tensor, STATE1, start, length, scratch),
                      stream(addresses, tensor, STATE2, start, length, scratch),
                      coefficients[tensor], addresses[tensor, LR_SCALE] != 0, hyper[RMS_H_MAXIMIZE] != 0,
                      hyper[RMS_H_WEIGHT_DECAY] != 0, hyper[RMS_H_MOMENTUM] > 0, hyper[RMS_H_CENTERED] != 0)


@jit
def adam_loop(has_lr_scale, amsgrad, param, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, maximize,
              use_weight_decay, decoupled_weight_decay):
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
    for i in range(param.shape[0]):
        g = -grad[i] if maximize else grad[i]
        if has_lr_scale:
            element_step_rate = step_rate * lr_scale[i]
            element_decay_factor = one - rate_weight_decay * lr_scale[i]
        else:
            element_step_rate = step_rate
            element_decay_factor = decay_factor
        v_max = max_exp_avg_sq[i] if amsgrad else g
        p, m, v, v_max = adam_element(param[i], g, exp_avg[i], exp_avg_sq[i], v_max, element_step_rate,
                                      element_decay_factor, beta1_complement, beta2, beta2_complement,
                                      bias_correction2_sqrt, eps, weight_decay, one, use_weight_decay,
                                      decoupled_weight_decay, amsgrad)
        param[i] = p
        exp_avg[i] = m
        exp_avg_sq[i] = v
        if amsgrad:
            max_exp_avg_sq[i] = v_max


@jit
def adam_chunk(param, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, has_lr_scale, maximize,
               use_weight_decay, decoupled_weight_decay, amsgrad):
    """adam_loop with the stream-selecting flags as literals (see sgd_chunk)."""
    if has_lr_scale:
        if amsgrad:
            adam_loop(True, True, param, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients,
                      maximize, use_weight_decay, decoupled_weight_decay)
        else:
            adam_loop(True, False, param, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients,
                      maximize, use_weight_decay, decoupled_weight_decay)
    else:
        if amsgrad:
            adam_loop(False, True, param, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients,
                      maximize, use_weight_decay, decoupled_weight_decay)
        else:
            adam_loop(False, False, param, grad, lr_scale, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients,
                      maximize, use_weight_decay, decoupled_weight_decay)


@parallel_jit
def adam_step(addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, tensor_step, group_hyper,
              schedule_program, schedule_base, optimizer_step, lr_factor, coefficients, scratch):
    """One Adam/AdamW step over all tensors (state slots: exp_avg, exp_avg_sq, max_exp_avg_sq)."""
    learning_rates = group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor)
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
        adam_chunk(stream(addresses, tensor, PARAM, start, length, scratch),
                   stream(addresses, tensor, GRAD, start, length, scratch),
                   stream(addresses, tensor, LR_SCALE, start, length, scratch),
                   stream(addresses, tensor, STATE0, start, length, scratch),
                   stream(addresses, tensor, STATE1, start, length, scratch),
                   stream(addresses, tensor, STATE2, start, length, scratch),
                   coefficients[tensor], addresses[tensor, LR_SCALE] != 0, hyper[ADAM_H_MAXIMIZE] != 0,
                   hyper[ADAM_H_WEIGHT_DECAY] != 0, hyper[ADAM_H_DECOUPLED] != 0, hyper[ADAM_H_AMSGRAD] != 0)


# Single-threaded twins for small buckets (see tables.SERIAL_BELOW).
sgd_step_serial = serial_twin(sgd_step)
rmsprop_step_serial = serial_twin(rmsprop_step)
adam_step_serial = serial_twin(adam_step)
