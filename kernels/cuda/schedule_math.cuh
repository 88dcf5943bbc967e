// Evaluate a packed schedule program at a step: the CUDA twin of fastopt/kernels/cpu/schedule_math.py.
//
// The program layout is documented in schedule_codes.py; the host reference is fastopt.schedules. Each leaf
// repeats the host's formula in the same operation order and in double, so it agrees with the host to the
// accuracy of cos and pow: glibc's (used by the host build of this file) round them within an ulp, CUDA's
// double cos and pow within 2 ulp (CUDA Programming Guide, "Mathematical Functions"). Exponents go to pow as
// doubles, as in the Numba kernel (repeated squaring would round up to ~2 log2(n) times).
//
// Composite nodes (WARMUP, SEQUENTIAL) only change the step and a multiplier and then move to one child, so
// evaluation is a loop over nodes: no recursion and no allocation. A malformed program whose offsets form a
// cycle gives NaN instead of hanging, as on the CPU.
#pragma once

#include "host_device.cuh"
#include "schedule_codes.cuh"

namespace fastopt {

// A packed program: the float64 words and their count (the Numba kernel reads program.shape[0]).
struct Program {
    const double* words;
    int64 size;

    FASTOPT_HOST_DEVICE double operator[](int64 index) const { return words[index]; }
};

FASTOPT_HOST_DEVICE int64 smaller(int64 a, int64 b) { return a < b ? a : b; }

// (T_cur, T_i) of SGDR: ``step``'s position in its period, periods being t_0, t_0 t_mult, ...
//
// Exact integer arithmetic, as a floating log misrounds at period boundaries. T_i is returned as a double
// because the period holding ``step`` may be too long for int64.
FASTOPT_HOST_DEVICE void restart_position(int64 step, int64 t_0, int64 t_mult, int64& position, double& period_length) {
    if (t_mult == 1) {
        position = step % t_0;
        period_length = double(t_0);
        return;
    }
    position = step;
    int64 period = t_0;
    while (position >= period) {
        position -= period;
        // Stop before forming a period longer than what is left: it could overflow int64.
        if (position / t_mult < period) {
            period_length = double(period) * double(t_mult);
            return;
        }
        period *= t_mult;
    }
    period_length = double(period);
}

// OneCycleLR with torch's phase boundaries; the final value holds from total_steps - 1 on.
FASTOPT_HOST_DEVICE double onecycle_value(Program program, int64 node, int64 step) {
    const double initial_lr = program[node + 1];
    const double max_lr = program[node + 2];
    const double min_lr = program[node + 3];
    const int64 last_step = int64(program[node + 4]) - 1;
    const double phase_1_end = program[node + 5];
    const double phase_2_end = program[node + 6];
    const bool three_phase = program[node + 7] != 0.0;
    const int anneal = int(program[node + 8]);

    const int64 t = smaller(step, last_step);
    double start_step, end_step, start_lr, end_lr;
    if (double(t) <= phase_1_end) {
        start_step = 0.0, end_step = phase_1_end, start_lr = initial_lr, end_lr = max_lr;
    } else if (!three_phase) {
        start_step = phase_1_end, end_step = double(last_step), start_lr = max_lr, end_lr = min_lr;
    } else if (double(t) <= phase_2_end) {
        start_step = phase_1_end, end_step = phase_2_end, start_lr = max_lr, end_lr = initial_lr;
    } else {
        start_step = phase_2_end, end_step = double(last_step), start_lr = initial_lr, end_lr = min_lr;
    }
    const double pct = (double(t) - start_step) / (end_step - start_step);
    if (anneal == schedule_codes::ANNEAL_COS) {
        return end_lr + (start_lr - end_lr) / 2.0 * (cos(PI * pct) + 1.0);
    }
    return (end_lr - start_lr) * pct + start_lr;
}

// CyclicLR: a triangle between base_lr and max_lr, its height scaled per mode.
FASTOPT_HOST_DEVICE double cyclic_value(Program program, int64 node, int64 step) {
    const double base_lr = program[node + 1];
    const double max_lr = program[node + 2];
    const int64 step_size_up = int64(program[node + 3]);
    const int64 step_size_down = int64(program[node + 4]);
    const int mode = int(program[node + 5]);
    const double gamma = program[node + 6];

    const int64 cycle_length = step_size_up + step_size_down;
    const int64 cycle = step / cycle_length;
    const int64 position = step - cycle * cycle_length;
    double height;
    if (position <= step_size_up) {
        height = double(position) / double(step_size_up);
    } else {
        height = double(cycle_length - position) / double(step_size_down);
    }
    double scale;
    if (mode == schedule_codes::CYCLIC_TRIANGULAR) {
        scale = 1.0;
    } else if (mode == schedule_codes::CYCLIC_TRIANGULAR2) {
        scale = 1.0 / pow(2.0, double(cycle));
    } else {
        scale = pow(gamma, double(step));
    }
    return base_lr + (max_lr - base_lr) * height * scale;
}

// Value of the leaf node at ``node`` (absolute offset) at ``step``; NaN for an unknown kind.
FASTOPT_HOST_DEVICE double leaf_value(Program program, int64 node, int64 step) {
    namespace codes = schedule_codes;
    const int kind = int(program[node]);
    if (kind == codes::CONSTANT) {
        return program[node + 1];
    }
    if (kind == codes::STEP_DECAY) {
        const double lr = program[node + 1], gamma = program[node + 3];
        const int64 step_size = int64(program[node + 2]);
        return lr * pow(gamma, double(step / step_size));
    }
    if (kind == codes::MULTISTEP) {
        const double lr = program[node + 1], gamma = program[node + 2];
        const int64 count = int64(program[node + 3]);
        int64 passed = 0;
        while (passed < count && program[node + 4 + passed] <= double(step)) {
            passed += 1;
        }
        return lr * pow(gamma, double(passed));
    }
    if (kind == codes::EXPONENTIAL) {
        return program[node + 1] * pow(program[node + 2], double(step));
    }
    if (kind == codes::LINEAR) {
        const double lr = program[node + 1], start_factor = program[node + 2], end_factor = program[node + 3];
        const int64 total_iters = int64(program[node + 4]);
        return lr * (start_factor +
                     (end_factor - start_factor) * double(smaller(step, total_iters)) / double(total_iters));
    }
    if (kind == codes::POLYNOMIAL) {
        const double lr = program[node + 1], power = program[node + 3];
        const int64 total_iters = int64(program[node + 2]);
        return lr * pow(1.0 - double(smaller(step, total_iters)) / double(total_iters), power);
    }
    if (kind == codes::COSINE) {
        const double lr = program[node + 1], eta_min = program[node + 3];
        const int64 t_max = int64(program[node + 2]);
        return eta_min + (lr - eta_min) * (1.0 + cos(PI * double(step) / double(t_max))) / 2.0;
    }
    if (kind == codes::COSINE_RESTARTS) {
        const double lr = program[node + 1], eta_min = program[node + 4];
        const int64 t_0 = int64(program[node + 2]), t_mult = int64(program[node + 3]);
        int64 position;
        double period;
        restart_position(step, t_0, t_mult, position, period);
        return eta_min + (lr - eta_min) * (1.0 + cos(PI * double(position) / period)) / 2.0;
    }
    if (kind == codes::ONECYCLE) {
        return onecycle_value(program, node, step);
    }
    if (kind == codes::CYCLIC) {
        return cyclic_value(program, node, step);
    }
    return quiet_nan();
}

// Value at ``step`` (>= 0) of the schedule whose root node is at ``program[base]``.
//
// Child offsets in the program are relative to ``base``. WARMUP multiplies by its ramp
// ``start_factor + (1 - start_factor) step / warmup_steps`` while ``step < warmup_steps``;
// SEQUENTIAL picks the child whose milestone ``step`` has passed last and restarts its step at 0.
FASTOPT_HOST_DEVICE double schedule_value(Program program, int64 base, int64 step) {
    namespace codes = schedule_codes;
    int64 node = base;
    double multiplier = 1.0;
    for (int64 visited = 0; visited < program.size; ++visited) {
        const int kind = int(program[node]);
        if (kind == codes::WARMUP) {
            const int64 warmup_steps = int64(program[node + 1]);
            const double start_factor = program[node + 2];
            if (step < warmup_steps) {
                multiplier *= start_factor + (1.0 - start_factor) * double(step) / double(warmup_steps);
            }
            node = base + int64(program[node + 3]);
        } else if (kind == codes::SEQUENTIAL) {
            const int64 count = int64(program[node + 1]);
            int64 child = 0;
            while (child < count - 1 && program[node + 2 + child] <= double(step)) {
                child += 1;
            }
            if (child > 0) {
                step -= int64(program[node + 2 + child - 1]);
            }
            node = base + int64(program[node + 2 + count - 1 + child]);
        } else {
            return multiplier * leaf_value(program, node, step);
        }
    }
    return quiet_nan();
}

}  // namespace fastopt
