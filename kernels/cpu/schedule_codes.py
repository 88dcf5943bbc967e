"""Node kinds of a packed schedule program, and the layout of each node.

This module imports nothing, so the host side (``fastopt.schedules``, which must not import Numba)
and the kernels (``schedule_math``) share the codes without either importing the other.

A program is a 1-D float64 array. Node ``kind`` starts at some offset ``o`` with ``program[o] ==
kind``; the words after it are that kind's fields, in this order (integers are stored exactly, as
float64 holds every integer below 2**53):

==================  ==========================================================================
kind                words after the code
==================  ==========================================================================
CONSTANT            lr
STEP_DECAY          lr, step_size, gamma
MULTISTEP           lr, gamma, n, milestone_1 ... milestone_n
EXPONENTIAL         lr, gamma
LINEAR              lr, start_factor, end_factor, total_iters
POLYNOMIAL          lr, total_iters, power
COSINE              lr, t_max, eta_min
COSINE_RESTARTS     lr, t_0, t_mult, eta_min
ONECYCLE            initial_lr, max_lr, min_lr, total_steps, phase_1_end, phase_2_end,
                    three_phase (0 or 1), anneal (ANNEAL_COS or ANNEAL_LINEAR)
CYCLIC              base_lr, max_lr, step_size_up, step_size_down, mode (CYCLIC_*), gamma
SEQUENTIAL          n, milestone_1 ... milestone_(n-1), child_offset_1 ... child_offset_n
WARMUP              warmup_steps, start_factor, child_offset
==================  ==========================================================================

``child_offset`` is relative to the start of the program, not to the node, so that programs of
several parameter groups can be concatenated and each evaluated from its own base offset
(``schedule_value(program, base, step)`` reads a child at ``base + child_offset``). A program
holds its root at offset 0 and its children after it.

ONECYCLE stores torch's derived numbers rather than its arguments, so the kernel repeats torch's
arithmetic: ``initial_lr = max_lr / div_factor``, ``min_lr = initial_lr / final_div_factor``,
``phase_1_end = pct_start * total_steps - 1`` and ``phase_2_end`` is ``2 * pct_start *
total_steps - 2`` with three phases, else ``total_steps - 1``.

Numba's cache checks only the timestamp of the file that defines a jitted function, and it freezes
these module constants into the machine code: after changing a code, delete the ``__pycache__``
of ``schedule_math`` (or touch that file).
"""

CONSTANT = 0
STEP_DECAY = 1
MULTISTEP = 2
EXPONENTIAL = 3
LINEAR = 4
POLYNOMIAL = 5
COSINE = 6
COSINE_RESTARTS = 7
ONECYCLE = 8
CYCLIC = 9
SEQUENTIAL = 10
WARMUP = 11

ANNEAL_COS = 0
ANNEAL_LINEAR = 1

CYCLIC_TRIANGULAR = 0
CYCLIC_TRIANGULAR2 = 1
CYCLIC_EXP_RANGE = 2
