"""Fused multi-tensor optimizer steps: every tensor of one math dtype updated in one parallel call, by one generic
loop written once for every update rule and compiled per rule (``step_kernels``) around the rule's element function.

Like apex's multi-tensor apply, the kernel receives a table of buffer addresses and a table of chunks
(tensor, start, length) and runs the chunks in parallel; a chunk reads each of its live streams once and writes
each updated stream once. Before the parallel loop the kernel evaluates each group's schedule at the
optimizer step and has the rule compute each tensor's step scalars (bias corrections, signed rates) in float64,
rounding each once into the math dtype, as torch does with its Python floats; after it, each tensor's step count
advances where its group counts steps.

Tensors whose GRAD address is 0 have no gradient this step and are skipped, step count included (torch
skips parameters whose .grad is None).

Two kinds of rule state live beside the buffers: per-tensor running scalars (``tensor_scalars``, float64), which a
rule's ``advance_scalars`` moves on before its coefficients are formed (schedule-free's weight sum and largest rate),
and, for a rule whose update needs each tensor's norms (LAMB), a second parallel pass: the first updates the states
and sums squares per chunk, the chunks' sums are added in chunk order (the same for every thread count), the rule
turns them into coefficients, and the second pass moves the params. ``blend_toward_state`` is the one kernel outside
the step: ``p = lerp(p, state, w)``, schedule-free's ``train()``/``eval()``.

Mixed precision: the element type of each stream's array says how it is stored (``conversions.load`` /
``store``): float arrays as themselves, uint16 as bfloat16 bits, int16 as float16 bits; the math runs in the
math dtype of the bucket (the coefficients' dtype). A float32 MASTER copy of a 16-bit param, where there is one,
is the param the math reads and writes, and the 16-bit param is written as its rounding (``param_out``);
without one, a bfloat16 param may be rounded stochastically (``seed``, keyed by (seed, step, (tensor << 40) +
element)). A state slot may instead be stored in 8 bits (codes.py: fastopt.quantization's format; int8 codes for
a signed map, uint8 for an unsigned one, its block scales in the slot's SCALES address): the loops then walk the
chunk in blocks of CODE_BLOCK elements, decode each code as it is read and encode each block once against its new
absmax, so the states are still read and written once. The kernels take one typed scratch array per stream kind
(``param_like``, ``grad_like``, ``state_likes``: one per state slot and a float32 one for the block scales,
``master_like``), so each combination of storage formats compiles, on first use, into loops with no per-element
branches: the float32 and float64 steps are the same code as without mixed precision.
"""
import functools
import hashlib
import importlib
import types
from pathlib import Path

import numba
import numpy as np
from numba import prange
from numba import types as numba_types
from numba.extending import overload

from .codes import block_length, block_views, finish_states, load_state, slot_rounding, store_state
from .conversions import float32_to_bfloat16_stochastic, load, store, widen_bits
from .jit import jit, parallel_jit, reduction_jit, serial_twin
from .schedule_math import schedule_value
from .element_math import lerp
from .views import address_as_pointer, window
from .layout import (CHUNK, CODE_BLOCK, COEFFICIENT_GRAD_CLIP, COEFFICIENT_GRAD_UNSCALE, COUNTS_STEP, FLOAT32, GRAD,
                     GRAD_CLIP, GRAD_FORMAT, GRAD_UNSCALE, LIVE_STATES, LR_SCALE, MASTER, MAXIMIZE, NATIVE, NORM_PARAM,
                     NORM_UPDATE, PARAM, SCALES0, SKIP, STATE0)

# Elements per strip of 16-bit grads widened to float32 for the norm (a strip stays in L1).
STRIP = 1024

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


def state_stream(addresses, tensor, slot, start, length, like, scales_like, rounding):
    """Elements [start, start + length) of state slot ``slot``'s stream (see codes.py): its buffer typed as ``like``'s
    elements, or for a slot stored in 8 bits (``like`` int8 or uint8 codes) the tuple (codes, the scales of the
    chunk's blocks, a float32 strip of one block, ``rounding``: the slot's rounding of codes, codes.slot_rounding).
    The chunk starts at a multiple of CODE_BLOCK."""
    raise NotImplementedError("fastopt.kernels.cpu.fused.state_stream is compiled only")


@overload(state_stream, jit_options=dict(cache=True))
def _state_stream(addresses, tensor, slot, start, length, like, scales_like, rounding):
    if like.dtype in (numba_types.int8, numba_types.uint8):
        def coded(addresses, tensor, slot, start, length, like, scales_like, rounding):
            blocks = (length + CODE_BLOCK - 1) // CODE_BLOCK
            return (stream(addresses, tensor, STATE0 + slot, start, length, like),
                    stream(addresses, tensor, SCALES0 + slot, start // CODE_BLOCK, blocks, scales_like),
                    np.empty(CODE_BLOCK, dtype=np.float32), rounding)
        return coded

    def plain(addresses, tensor, slot, start, length, like, scales_like, rounding):
        return stream(addresses, tensor, STATE0 + slot, start, length, like)
    return plain


def part_of(stream, offset, length):
    """``window(stream, offset, length)``, or None for an absent optional stream (None)."""
    raise NotImplementedError("fastopt.kernels.cpu.fused.part_of is compiled only")


@overload(part_of, jit_options=dict(cache=True))
def _part_of(stream, offset, length):
    if isinstance(stream, numba_types.NoneType):
        return lambda stream, offset, length: None
    return lambda stream, offset, length: window(stream, offset, length)


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
    if isinstance(master_like, numba_types.NoneType):
        def without_master(addresses, tensor, start, length, param_like, master_like):
            return stream(addresses, tensor, PARAM, start, length, param_like), None
        return without_master

    def with_master(addresses, tensor, start, length, param_like, master_like):
        return (stream(addresses, tensor, MASTER, start, length, master_like),
                stream(addresses, tensor, PARAM, start, length, param_like))
    return with_master


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
    """The sum of ``values[i]**2`` in float64 (16-bit values as the floats their bits hold), re-associated into vector
    lanes (a plain running sum is a chain of dependent additions, 10x slower here). NaN and inf still propagate: the
    sum is finite exactly when every value is, for float32 and narrower values, whose squares cannot overflow
    float64."""
    total = 0.0
    for i in range(values.shape[0]):
        value = np.float64(load(values, i))
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


@parallel_jit
def blend_toward_state(addresses, chunk_tensor, chunk_start, chunk_length, slot, tensor_weight, one, param_like,
                       state_like, master_like):
    """``p = lerp(p, s, w)`` for each tensor whose state slot ``slot`` holds a buffer ``s``, with its weight ``w``
    (``tensor_weight``, in the math dtype, as is ``one``): one pass reading the param (its master, where it has one)
    and the state and writing the param (and the master's rounding), rounded to nearest. Schedule-free's move of the
    params between where grads are taken and the average evaluated (``train()``/``eval()``)."""
    for chunk in prange(chunk_tensor.shape[0]):
        tensor = chunk_tensor[chunk]
        if addresses[tensor, slot] == 0:
            continue
        start, length = chunk_start[chunk], chunk_length[chunk]
        param, param_out = param_streams(addresses, tensor, start, length, param_like, master_like)
        target = storage_stream(addresses, tensor, slot, start, length, state_like)
        weight = tensor_weight[tensor]
        for i in range(length):
            write_param(param, param_out, i, lerp(load(param, i), load(target, i), weight, one), None, 0, 0)


@jit
def unscaled_grad(grad, grad_unscale, grad_clip, maximize):
    """The gradient the update uses: unscaled (GradScaler's multiply by 1 / scale), clipped (clip_grad_norm_'s
    multiply by the clip factor), in that order as in torch, then negated for maximize. Both factors are exactly
    1 without a loss scale or clipping, and x * 1 is x for every x."""
    g = grad * grad_unscale * grad_clip
    return -g if maximize else g


@jit
def coefficient_values(row):
    """The rule's step scalars of a coefficient row as a tuple, read once before the loop (loads from the row inside
    the loop could alias the streams' stores, and would be repeated)."""
    return (row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11],
            row[12], row[13])


# ---------------------------------------------------------------- the generic loop, instantiated per rule
# The functions below are templates, never compiled themselves: ``step_kernels`` compiles a copy of each per rule, with
# these globals bound to the rule's functions and constants and each level of the dispatch bound to the rule's copy of
# the next.
rule_element = rule_coefficients = rule_advance_scalars = None
rule_moments = rule_direction = rule_norm_coefficients = rule_apply = None  # a rule with per-tensor norms (LAMB)
RULE_NORMS = False
LIVE_MASK0 = LIVE_MASK1 = LIVE_MASK2 = LIVE_MASK3 = LIVE_MASK4 = LIVE_MASK5 = LIVE_MASK6 = LIVE_MASK7 = False
# The passes of a step: one fused UPDATE, or for a rule with per-tensor norms a NORMS pass (moments updated, partial
# norms summed) and an APPLY pass (the param moved by the norms' ratio). ``run_chunk`` and ``one_chunk`` are bound
# once per pass, with PHASE and the pass's loop (``chunk_loop``) and ``run_chunk``.
UPDATE, NORMS, APPLY = range(3)
PHASE = UPDATE
chunk_loop = run_chunk_of_phase = None


def update_loop(has_lr_scale, live0, live1, live2, streams):
    """One chunk of a one-pass rule: each element of every live stream read once, the rule's element function
    applied, each updated stream written once. The flags that decide which streams are read and written are
    literals (one loop per combination, each without a per-element branch, so each vectorises); an absent stream's
    placeholder is the grad. ``streams``: (param, param_out, grad, lr_scale, state0, state1, state2, coefficient row,
    maximize, and the stochastic rounding's seed, step and first element), a tuple rather than star-args, which
    Numba types without the literals. The chunk is walked in blocks (codes.block_length: the whole chunk, or with
    8-bit states CODE_BLOCK elements, each block's states decoded as read and encoded once after its loop), over
    windows indexed from 0. Returns no sums (those of the NORMS pass)."""
    param, param_out, grad, lr_scale, state0, state1, state2, row, maximize, seed, step, first_element = streams
    c = coefficient_values(row)
    grad_unscale = row[COEFFICIENT_GRAD_UNSCALE]
    grad_clip = row[COEFFICIENT_GRAD_CLIP]
    block = block_length(state0, state1, state2, param.shape[0])
    for offset in range(0, param.shape[0], block):
        length = min(block, param.shape[0] - offset)
        param_part, param_out_part = window(param, offset, length), part_of(param_out, offset, length)
        grad_part, scale_part = window(grad, offset, length), window(lr_scale, offset, length)
        view0, view1, view2 = block_views(state0, state1, state2, offset, length)
        for i in range(length):
            g = unscaled_grad(load(grad_part, i), grad_unscale, grad_clip, maximize)
            scale = scale_part[i] if has_lr_scale else g
            s0 = load_state(view0, i) if live0 else g
            s1 = load_state(view1, i) if live1 else g
            s2 = load_state(view2, i) if live2 else g
            p, s0, s1, s2 = rule_element(load(param_part, i), g, s0, s1, s2, scale, has_lr_scale, live0, live1, live2,
                                         c)
            write_param(param_part, param_out_part, i, p, seed, step, first_element + offset)
            if live0:
                store_state(view0, i, s0)
            if live1:
                store_state(view1, i, s1)
            if live2:
                store_state(view2, i, s2)
        finish_states(view0, view1, view2, live0, live1, live2)
    return 0.0, 0.0


def norm_loop(has_lr_scale, live0, live1, live2, streams):
    """The first pass of a rule with per-tensor norms over one chunk: the states updated from the grad (read and
    written once, the param read once), and the chunk's sums of squares of the param and of the rule's update
    direction returned. The direction is computed from the states as stored (16-bit states rounded, 8-bit ones
    encoded), exactly as the APPLY pass recomputes it from them: block by block (a strip, or an 8-bit block), the
    moments are updated and stored, then the direction is formed from the block as stored into a strip in L1, and
    ``sum_of_squares`` reads it and the block's params (a running float64 sum in this loop would be a chain of
    dependent additions). The loops run over windows indexed from 0: indexed ``offset + k`` instead, LLVM did not
    vectorise them (3x slower, measured)."""
    param, param_out, grad, lr_scale, state0, state1, state2, row, maximize, seed, step, first_element = streams
    c = coefficient_values(row)
    grad_unscale = row[COEFFICIENT_GRAD_UNSCALE]
    grad_clip = row[COEFFICIENT_GRAD_CLIP]
    strip = np.empty((1, STRIP), dtype=row.dtype)
    param_sum = 0.0
    update_sum = 0.0
    block = block_length(state0, state1, state2, STRIP)
    for offset in range(0, param.shape[0], block):
        length = min(block, param.shape[0] - offset)
        updates = strip_row(strip, 0, length)
        param_part, grad_part = window(param, offset, length), window(grad, offset, length)
        view0, view1, view2 = block_views(state0, state1, state2, offset, length)
        for i in range(length):
            g = unscaled_grad(load(grad_part, i), grad_unscale, grad_clip, maximize)
            s0 = load_state(view0, i) if live0 else g
            s1 = load_state(view1, i) if live1 else g
            s2 = load_state(view2, i) if live2 else g
            s0, s1, s2 = rule_moments(load(param_part, i), g, s0, s1, s2, live0, live1, live2, c)
            if live0:
                store_state(view0, i, s0)
            if live1:
                store_state(view1, i, s1)
            if live2:
                store_state(view2, i, s2)
        finish_states(view0, view1, view2, live0, live1, live2)
        view0, view1, view2 = block_views(state0, state1, state2, offset, length)  # as stored: 8-bit blocks' new scales
        for i in range(length):
            p = load(param_part, i)
            s0 = load_state(view0, i) if live0 else p
            s1 = load_state(view1, i) if live1 else p
            s2 = load_state(view2, i) if live2 else p
            updates[i] = rule_direction(p, s0, s1, s2, live0, live1, live2, c)
        param_sum += sum_of_squares(param_part)  # read again while in L1
        update_sum += sum_of_squares(updates)
    return param_sum, update_sum


def apply_loop(has_lr_scale, live0, live1, live2, streams):
    """The second pass of a rule with per-tensor norms over one chunk: the update direction recomputed from the
    param and the states the NORMS pass wrote (no grad read; cheaper than storing the direction, which would be one
    more buffer written and read), and the param moved by the rule's ``apply`` with the tensor's ratio in ``c``."""
    param, param_out, grad, lr_scale, state0, state1, state2, row, maximize, seed, step, first_element = streams
    c = coefficient_values(row)
    block = block_length(state0, state1, state2, param.shape[0])
    for offset in range(0, param.shape[0], block):
        length = min(block, param.shape[0] - offset)
        param_part, param_out_part = window(param, offset, length), part_of(param_out, offset, length)
        scale_part = window(lr_scale, offset, length)
        view0, view1, view2 = block_views(state0, state1, state2, offset, length)
        for i in range(length):
            p = load(param_part, i)
            s0 = load_state(view0, i) if live0 else p
            s1 = load_state(view1, i) if live1 else p
            s2 = load_state(view2, i) if live2 else p
            scale = scale_part[i] if has_lr_scale else p
            update = rule_direction(p, s0, s1, s2, live0, live1, live2, c)
            write_param(param_part, param_out_part, i, rule_apply(p, update, scale, has_lr_scale, c), seed, step,
                        first_element + offset)
    return 0.0, 0.0


def run_chunk(has_lr_scale, live, streams):
    """The pass's chunk_loop for one chunk, with the group's live state slots (``live``, bit k for slot k) as
    literals; the caller makes ``has_lr_scale`` one. A live mask the rule cannot have (its LIVE_MASK<m> constant
    False) is pruned at compile time, so only the loops a rule can run are compiled. All in one function: every level
    of calls between the step and its loops is optimised again by LLVM with everything below it, which multiplied
    compile times."""
    if LIVE_MASK0 and live == 0:
        return chunk_loop(has_lr_scale, False, False, False, streams)
    elif LIVE_MASK1 and live == 1:
        return chunk_loop(has_lr_scale, True, False, False, streams)
    elif LIVE_MASK2 and live == 2:
        return chunk_loop(has_lr_scale, False, True, False, streams)
    elif LIVE_MASK3 and live == 3:
        return chunk_loop(has_lr_scale, True, True, False, streams)
    elif LIVE_MASK4 and live == 4:
        return chunk_loop(has_lr_scale, False, False, True, streams)
    elif LIVE_MASK5 and live == 5:
        return chunk_loop(has_lr_scale, True, False, True, streams)
    elif LIVE_MASK6 and live == 6:
        return chunk_loop(has_lr_scale, False, True, True, streams)
    elif LIVE_MASK7 and live == 7:
        return chunk_loop(has_lr_scale, True, True, True, streams)
    return 0.0, 0.0


def one_chunk(chunk, addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, group_hyper, optimizer_step,
              coefficients, chunk_norms, scratch, param_like, grad_like, state_like0, state_like1, state_like2, scales_like,
              master_like, seed, code_seed, code_slots):
    """Chunk ``chunk`` of the pass, if its tensor has a grad; the NORMS pass writes the chunk's sums into
    ``chunk_norms``."""
    tensor = chunk_tensor[chunk]
    if addresses[tensor, GRAD] == 0:
        return
    start = chunk_start[chunk]
    length = chunk_length[chunk]
    hyper = group_hyper[tensor_group[tensor]]
    param, param_out = param_streams(addresses, tensor, start, length, param_like, master_like)
    live = np.int64(hyper[LIVE_STATES])
    first_element = (np.int64(tensor) << np.int64(40)) + start
    rounding = (code_seed, optimizer_step, code_slots, first_element)  # codes.slot_rounding's arguments, less the slot
    streams = (param, param_out, stream(addresses, tensor, GRAD, start, length, grad_like),
               stream(addresses, tensor, LR_SCALE, start, length, scratch),
               state_stream(addresses, tensor, 0, start, length, state_like0, scales_like, slot_rounding(*rounding, 0)),
               state_stream(addresses, tensor, 1, start, length, state_like1, scales_like, slot_rounding(*rounding, 1)),
               state_stream(addresses, tensor, 2, start, length, state_like2, scales_like, slot_rounding(*rounding, 2)),
               coefficients[tensor],
               hyper[MAXIMIZE] != 0, seed, optimizer_step, first_element)
    if addresses[tensor, LR_SCALE] != 0:
        sums = run_chunk_of_phase(True, live, streams)
    else:
        sums = run_chunk_of_phase(False, live, streams)
    if PHASE == NORMS:
        chunk_norms[chunk, NORM_PARAM] = sums[0]
        chunk_norms[chunk, NORM_UPDATE] = sums[1]


def rule_step(addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, tensor_step, tensor_scalars,
              group_hyper, schedule_program, schedule_base, optimizer_step, lr_factor, grad_control, coefficients,
              chunk_norms, scratch, param_like, grad_like, state_likes, master_like, seed, code_seed, code_slots):
    """One step of the rule over every tensor of one math dtype (state slots STATE0..STATE2: the rule's
    ``STATE_SLOTS``): one parallel pass, or for a rule with per-tensor norms two, with the norms added up between
    them chunk by chunk in order (the same totals for any thread count). A tensor's step count advances where its
    group's COUNTS_STEP is set; the rule's running scalars and coefficients see the count including this step.
    ``seed``: bfloat16 params round stochastically (None: to nearest); ``code_seed``: the 8-bit codes of the state
    slots in the mask ``code_slots`` do (None: all to nearest)."""
    if grad_control[SKIP] != 0:
        return
    learning_rates = group_learning_rates(schedule_program, schedule_base, optimizer_step, lr_factor)
    for tensor in range(tensor_group.shape[0]):
        if addresses[tensor, GRAD] == 0:
            continue
        group = tensor_group[tensor]
        step = tensor_step[tensor] + np.int64(group_hyper[group, COUNTS_STEP] != 0)
        rule_advance_scalars(group_hyper[group], learning_rates[group], step, tensor_scalars[tensor])
        rule_coefficients(group_hyper[group], learning_rates[group], step, tensor_scalars[tensor],
                          coefficients[tensor])
        coefficients[tensor, COEFFICIENT_GRAD_UNSCALE] = grad_control[GRAD_UNSCALE]
        coefficients[tensor, COEFFICIENT_GRAD_CLIP] = grad_control[GRAD_CLIP]
    # The state likes travel unpacked: a parallel region takes arrays and scalars, not a tuple of arrays.
    state_like0, state_like1, state_like2, scales_like = state_likes
    tables = (addresses, chunk_tensor, chunk_start, chunk_length, tensor_group, group_hyper, optimizer_step,
              coefficients, chunk_norms, scratch, param_like, grad_like, state_like0, state_like1, state_like2,
              scales_like, master_like, seed, code_seed, code_slots)
    if RULE_NORMS:
        for chunk in prange(chunk_tensor.shape[0]):
            norm_chunk(chunk, *tables)
        # Scalar code only between the passes: an array expression here would become a parallel region of its own
        # (one per chunk inside this loop: 50x slower, measured, on a busy machine).
        chunk = 0
        for tensor in range(tensor_group.shape[0]):
            param_sum = 0.0
            update_sum = 0.0
            while chunk < chunk_tensor.shape[0] and chunk_tensor[chunk] == tensor:  # a tensor's chunks are adjacent
                param_sum += chunk_norms[chunk, NORM_PARAM]
                update_sum += chunk_norms[chunk, NORM_UPDATE]
                chunk += 1
            if addresses[tensor, GRAD] != 0:
                group = tensor_group[tensor]
                rule_norm_coefficients(group_hyper[group], learning_rates[group], param_sum, update_sum,
                                       coefficients[tensor])
        for chunk in prange(chunk_tensor.shape[0]):
            apply_chunk(chunk, *tables)
    else:
        for chunk in prange(chunk_tensor.shape[0]):
            update_chunk(chunk, *tables)
    for tensor in range(tensor_group.shape[0]):
        if addresses[tensor, GRAD] != 0 and group_hyper[tensor_group[tensor], COUNTS_STEP] != 0:
            tensor_step[tensor] += 1


@jit
def no_scalars(hyper, lr, step, scalars):
    """``advance_scalars`` of a rule that keeps no running scalars."""


def _bound(template, suffix, names):
    """``template`` with the globals ``names`` bound (Numba reads globals as compile-time constants), renamed
    ``<name>_<suffix>`` so that its on-disk cache entry is its own."""
    function = types.FunctionType(template.__code__, dict(template.__globals__, **names),
                                  f"{template.__name__}_{suffix}", template.__defaults__, template.__closure__)
    function.__qualname__ = function.__name__
    function.__module__ = template.__module__
    function.__doc__ = template.__doc__
    return function


@functools.lru_cache(maxsize=None)
def step_kernels(kernel, always_live, optional_live):
    """(parallel, serial) step kernels of the rule ``kernel`` (its module in kernels/cpu/rules/): the generic loop
    above with the rule's element function and coefficients bound in. ``always_live`` and ``optional_live`` are bit
    masks of the state slots the rule always uses and may use. The cache name carries a hash of the rule's source and
    of this folder's (the element math, conversions and codes the loops inline), so an edit of any compiles anew
    (Numba checks only this file's time stamp)."""
    rule = importlib.import_module(f"{__package__}.rules.{kernel}")
    sources = [Path(rule.__file__)] + sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:12]
    suffix = f"{kernel}_{always_live}_{optional_live}_{digest}"
    norms = getattr(rule, "NORMS", False)
    names = dict(rule_coefficients=rule.coefficients, RULE_NORMS=norms,
                 rule_advance_scalars=getattr(rule, "advance_scalars", no_scalars))
    if norms:
        names.update(rule_moments=rule.moments, rule_direction=rule.direction,
                     rule_norm_coefficients=rule.norm_coefficients, rule_apply=rule.apply)
        passes = dict(norm_chunk=(NORMS, norm_loop), apply_chunk=(APPLY, apply_loop))
    else:
        names.update(rule_element=rule.element)
        passes = dict(update_chunk=(UPDATE, update_loop))
    for mask in range(8):  # the live masks a group of the rule can have: every slot it always uses, and no others
        names[f"LIVE_MASK{mask}"] = mask & always_live == always_live and mask & ~(always_live | optional_live) == 0
    for name, (phase, loop) in passes.items():
        bound = dict(names, PHASE=phase)
        bound["chunk_loop"] = jit(_bound(loop, suffix, bound))
        bound["run_chunk_of_phase"] = jit(_bound(run_chunk, f"{loop.__name__}_{suffix}", bound))
        names[name] = jit(_bound(one_chunk, f"{loop.__name__}_{suffix}", bound))
    step = parallel_jit(_bound(rule_step, suffix, names))
    return step, serial_twin(step)
