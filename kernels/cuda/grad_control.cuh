// This step's grad control from the grads' statistics: the arithmetic of finish_grad_control (grad_control.cu),
// shared with the host test shim, which checks it against backends.GradControl bit for bit.
#pragma once

#include "host_device.cuh"
#include "layout.cuh"

namespace fastopt {

// This step's grad control from the global sum of squares of the (scaled) grads and their count of non-finite
// values: what backends.GradControl computes on the host. ``max_norm`` < 0: no clipping; ``skip_nonfinite`` false:
// NaN/inf grads do not skip the step. Writes grad_control (GRAD_CONTROLS values) and statistics (STATISTICS values:
// the norm of the unscaled grads and the count).
FASTOPT_HOST_DEVICE void set_grad_control(double sum_of_squares, int64 nonfinite, double unscale, double max_norm,
                                          bool skip_nonfinite, double* grad_control, double* statistics) {
    const double norm = sqrt(sum_of_squares) * unscale;
    double clip = 1.0;
    if (max_norm >= 0.0 && !isnan(norm)) {  // an overflowing (inf) norm clips to 0, as clip_grad_norm_ does
        const double factor = max_norm / (norm + CLIP_EPSILON);
        clip = factor < 1.0 ? factor : 1.0;  // Python's min(1.0, factor)
    }
    grad_control[GRAD_UNSCALE] = unscale;
    grad_control[GRAD_CLIP] = clip;
    grad_control[SKIP] = skip_nonfinite && nonfinite > 0 ? 1.0 : 0.0;
    statistics[STATISTIC_NORM] = norm;
    statistics[STATISTIC_NONFINITE] = double(nonfinite);
}

}  // namespace fastopt
