// Layouts of the tables the fused kernels read: the constants of fastopt/kernels/cpu/tables.py.
//
// tables.py is the one source of truth (the host fills the group table by its column names).
// fastopt.backends.cuda.compile_defines() passes each address slot as -DFASTOPT_SLOT_NAME and each group-table
// column as -DFASTOPT_<OPTIMIZER>_<COLUMN> (its index in SGD_COLUMNS, RMSPROP_COLUMNS or ADAM_COLUMNS), plus
// each table's width; this header names them and refuses to compile without them.
//
// Per optimizer step and param dtype the kernel reads:
// - addresses   int64 [tensors][SLOTS]: data address of each tensor's param, grad, lr_scale and state buffers;
//               0 marks an absent buffer (no lr_scale, no grad this step, a state the group does not use).
// - chunk_tensor, chunk_start, chunk_length  int64 [chunks]: the work split, at most CHUNK elements each;
//               one thread block per chunk.
// - tensor_group int64 [tensors], tensor_step int64 [tensors] (steps taken; advanced on the device).
// - group_hyper double [groups][columns] below, and the packed schedules with each group's base offset.
// - counters    int64 [COUNTERS]: the optimizer step count and the ticket of the last block.
#pragma once

#if !defined(FASTOPT_SLOT_PARAM) || !defined(FASTOPT_SLOTS) || !defined(FASTOPT_ADAM_COLUMNS) || \
    !defined(FASTOPT_SGD_COLUMNS) || !defined(FASTOPT_RMSPROP_COLUMNS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the table layouts)"
#endif

namespace fastopt {

// Address-table slots shared by all optimizers.
constexpr int PARAM = FASTOPT_SLOT_PARAM;
constexpr int GRAD = FASTOPT_SLOT_GRAD;
constexpr int LR_SCALE = FASTOPT_SLOT_LR_SCALE;
constexpr int STATE0 = FASTOPT_SLOT_STATE0;
constexpr int STATE1 = FASTOPT_SLOT_STATE1;
constexpr int STATE2 = FASTOPT_SLOT_STATE2;
constexpr int SLOTS = FASTOPT_SLOTS;

// Group-table columns (booleans are stored as 0.0 / 1.0).
constexpr int SGD_H_MOMENTUM = FASTOPT_SGD_MOMENTUM;
constexpr int SGD_H_DAMPENING = FASTOPT_SGD_DAMPENING;
constexpr int SGD_H_WEIGHT_DECAY = FASTOPT_SGD_WEIGHT_DECAY;
constexpr int SGD_H_NESTEROV = FASTOPT_SGD_NESTEROV;
constexpr int SGD_H_MAXIMIZE = FASTOPT_SGD_MAXIMIZE;
constexpr int SGD_COLUMNS = FASTOPT_SGD_COLUMNS;

constexpr int RMS_H_ALPHA = FASTOPT_RMSPROP_ALPHA;
constexpr int RMS_H_EPS = FASTOPT_RMSPROP_EPS;
constexpr int RMS_H_WEIGHT_DECAY = FASTOPT_RMSPROP_WEIGHT_DECAY;
constexpr int RMS_H_MOMENTUM = FASTOPT_RMSPROP_MOMENTUM;
constexpr int RMS_H_CENTERED = FASTOPT_RMSPROP_CENTERED;
constexpr int RMS_H_MAXIMIZE = FASTOPT_RMSPROP_MAXIMIZE;
constexpr int RMSPROP_COLUMNS = FASTOPT_RMSPROP_COLUMNS;

constexpr int ADAM_H_BETA1 = FASTOPT_ADAM_BETA1;
constexpr int ADAM_H_BETA2 = FASTOPT_ADAM_BETA2;
constexpr int ADAM_H_EPS = FASTOPT_ADAM_EPS;
constexpr int ADAM_H_WEIGHT_DECAY = FASTOPT_ADAM_WEIGHT_DECAY;
constexpr int ADAM_H_AMSGRAD = FASTOPT_ADAM_AMSGRAD;
constexpr int ADAM_H_MAXIMIZE = FASTOPT_ADAM_MAXIMIZE;
constexpr int ADAM_H_DECOUPLED = FASTOPT_ADAM_DECOUPLED_WEIGHT_DECAY;
constexpr int ADAM_COLUMNS = FASTOPT_ADAM_COLUMNS;

// The device counters of one dtype's kernel (CUDA only: the CPU kernel gets the step count as an argument).
constexpr int OPTIMIZER_STEP = FASTOPT_COUNTER_OPTIMIZER_STEP;  // steps taken by the optimizer
constexpr int TICKET = FASTOPT_COUNTER_TICKET;                  // blocks of this launch that have finished
constexpr int COUNTERS = FASTOPT_COUNTERS;

}  // namespace fastopt
