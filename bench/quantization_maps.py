"""Which code map for 8-bit optimizer states (issue 16): candidates measured on real optimizer states, on training
with states stored in 8 bits after every step, and on the per-element cost of encoding in a Numba loop.

    python bench/quantization_maps.py                  # about 3 minutes on the 2-core machine; prints markdown
    python bench/quantization_maps.py --quick          # a smoke run (fewer steps and seeds)

Candidates (``fastopt.quantization``; the signed map for first moments, the unsigned map for second moments):

- ``dynamic``: bitsandbytes' dynamic (tree) map, ``create_dynamic_map(signed)``, bit for bit; encoded by a search.
- ``e4m3 / e5m3``: sign-magnitude floats relative to the absmax, 3 mantissa bits, no subnormals, top code 1.0
  (signed: 4 exponent bits, down to 1.9e-5; unsigned: 5 exponent bits, down to 2.9e-10); encoded in closed form.
- ``e5m2 / e5m3`` and ``e4m3 / e4m4``: the same family with the other trade on one side: signed 2 mantissa bits
  (range 3.5e-10), or unsigned 4 (range 1.7e-5).
- ``linear``: k/127 and k/255, the baseline that shows why the map must be nonlinear.

Parts:

1. *Round trip of real states.* AdamW's ``exp_avg`` and ``exp_avg_sq`` snapshotted from the digits MLP
   (``fastopt.demo``, float32 AdamW in NumPy, 460 steps) and from the byte-level transformer LM of ``bench/lm.py``
   (``torch.optim.AdamW``, 600 steps), early (10% of the steps) and at the end; tensors of at least 4096 elements
   (those stored in 8 bits). Per map: relative error of nonzero values (median, 99th percentile), the share of
   nonzero values that decode to 0, and the error of the Adam direction ``u = m^ / (sqrt(v^) + eps)`` that the
   update multiplies by the rate: ``|du| / |u|`` over all elements, and ``max |u_8bit| / max |u|`` (a second moment
   decoded as 0 under a nonzero first moment gives ``m / eps``: a blow-up).
2. *Training with 8-bit states.* The same runs with every state of >= ``min_8bit_size`` elements replaced by its
   round trip after every step (exactly what ``fastopt.quantization.update_8bit`` does per step): digits MLP, 3 seeds,
   at the default threshold 4096 (only the 64x128 layer is 8-bit) and at 0 (every tensor 8-bit); the LM, 2 seeds,
   float32 beside the dynamic map and the chosen one.
3. *Encode cost.* Numba loops over 1M float32 values in blocks of 256, one thread, best of 20: the closed-form encode
   (by reciprocal, the format's, and by division), a search over 255 midpoints (branchy and branchless
   bisection), decoding by table and by bits; a plain copy as the yardstick.
4. *Centered RMSprop*: how often ``square_avg - grad_avg^2`` goes negative with both states in 8 bits.
"""
import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this tree's fastopt
sys.path.insert(0, HERE)  # bench/lm.py

import numpy as np  # noqa: E402

from fastopt import demo, schedules  # noqa: E402
from fastopt import quantization as q  # noqa: E402

PAIRS = {  # name: (signed map, unsigned map); None: the format's own map (closed-form encode)
    "dynamic (bnb)": (q.dynamic_code_map(True), q.dynamic_code_map(False)),
    "e4m3 / e5m3": (None, None),
    "e5m2 / e5m3": (q.float_code_map(True, 2), None),
    "e4m3 / e4m4": (None, q.float_code_map(False, 4)),
    "linear": (q.linear_code_map(True), q.linear_code_map(False)),
}
LM_PAIRS = ("dynamic (bnb)", "e4m3 / e5m3")  # the others are settled on the MLP and the round trips
EPS = 1e-8
LM_PEAK_LR = 3e-3


def round_trip(values, signed, code_map):
    return q.round_trip(values, signed, code_map=code_map)


# --------------------------------------------------------------------------------------------- digits MLP, NumPy
def adamw_math(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999, eps=EPS, weight_decay=0.01):
    """torch.optim.AdamW's single-tensor step in float32, in its order (what the fused kernels compute)."""
    f32 = np.float32
    param *= f32(1 - lr * weight_decay)
    exp_avg += (grad - exp_avg) * f32(1 - beta1)
    exp_avg_sq *= f32(beta2)
    exp_avg_sq += f32(1 - beta2) * grad * grad
    denom = np.sqrt(exp_avg_sq) / f32(math.sqrt(1 - beta2 ** step)) + f32(eps)
    param -= f32(lr / (1 - beta1 ** step)) * exp_avg / denom


def train_mlp(pair, seed, epochs, min_8bit_size, snapshot_steps=()):
    """The demo's AdamW run (onecycle, peak 3e-3, batch 64) with ``update_8bit`` steps; ``pair`` None: float32."""
    data = demo.load_digits_split(seed=seed)
    model = demo.MLP(seed=seed)
    steps_per_epoch = -(-len(data.y_train) // 64)
    total = epochs * steps_per_epoch
    schedule = schedules.onecycle(max_lr=3e-3, total_steps=total)
    signed_map, unsigned_map = pair if pair else (None, None)

    def store(values, signed, code_map):
        if pair is None or not q.stores_8bit(values.size, min_8bit_size):
            return values
        codes, scales = q.quantize(values, signed, code_map=code_map)
        return (codes, scales)

    def load(stored, signed, code_map, shape):
        if isinstance(stored, np.ndarray):
            return stored
        return q.dequantize(*stored, signed, code_map=code_map).reshape(shape)

    states = [[store(np.zeros_like(p), True, signed_map), store(np.zeros_like(p), False, unsigned_map)]
              for p in model.params]
    rng = np.random.default_rng(seed + 1)
    snapshots, step = {}, 0
    for _ in range(epochs):
        for batch in demo.batches(len(data.y_train), 64, rng):
            _, grads = model.loss_and_grads(data.x_train[batch], data.y_train[batch])
            step += 1
            lr = schedule(step - 1)
            for param, grad, state in zip(model.params, grads, states):
                exp_avg = load(state[0], True, signed_map, param.shape)
                exp_avg_sq = load(state[1], False, unsigned_map, param.shape)
                adamw_math(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr)  # decode, float32 math, encode
                state[:] = store(exp_avg, True, signed_map), store(exp_avg_sq, False, unsigned_map)
            if step in snapshot_steps:
                snapshots[step] = [(s[0].copy(), s[1].copy()) for s in states]  # float32 runs only
    test_loss, test_accuracy = model.evaluate(data.x_test, data.y_test)
    return dict(test_loss=test_loss, test_accuracy=test_accuracy, snapshots=snapshots, steps=total)


# ------------------------------------------------------------------------------------------------- the LM, torch
def train_language_model(pair, seed, steps, min_8bit_size, snapshot_steps=()):
    import torch

    import lm

    class StoredAdamW(torch.optim.AdamW):
        """torch's AdamW whose states of >= min_8bit_size elements are stored in 8 bits after every step."""

        def __init__(self, params):
            super().__init__(params, lr=LM_PEAK_LR, weight_decay=0.01, foreach=False)
            self.step_count, self.snapshots = 0, {}

        @torch.no_grad()
        def step(self, closure=None):
            super().step()
            self.step_count += 1
            tensors = [self.state[p] for group in self.param_groups for p in group["params"]
                       if p.numel() >= 4096 and p in self.state]
            if pair is not None:
                for state in (self.state[p] for group in self.param_groups for p in group["params"]):
                    if "exp_avg" in state and q.stores_8bit(state["exp_avg"].numel(), min_8bit_size):
                        for name, signed, code_map in (("exp_avg", True, pair[0]), ("exp_avg_sq", False, pair[1])):
                            state[name].copy_(torch.from_numpy(round_trip(state[name].numpy(), signed, code_map)))
            if self.step_count in snapshot_steps:
                self.snapshots[self.step_count] = [(s["exp_avg"].numpy().copy(), s["exp_avg_sq"].numpy().copy())
                                                   for s in tensors]

    def warmup_cosine(optimizer):
        warmup = max(1, steps // 20)

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    made = []
    result = lm.train_lm(lambda params: made.append(StoredAdamW(params)) or made[0], steps=steps, batch_size=32,
                         seed=seed, lr_schedule=warmup_cosine)
    return dict(heldout_loss=result["final_heldout_loss"], snapshots=made[0].snapshots, seconds=result["seconds"],
                params=result["params"])


# ------------------------------------------------------------------------------------------ part 1: round trips
def dynamic_map_check():
    """Whether fastopt's rebuild of the dynamic maps equals bitsandbytes' own, bit for bit."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb
    except Exception as error:  # not installed, or no backend here
        return f"bitsandbytes not importable ({type(error).__name__}); the rebuild is unchecked"
    same = all(np.array_equal(bnb.create_dynamic_map(signed=signed).numpy().view(np.uint32),
                              q.dynamic_code_map(signed).view(np.uint32)) for signed in (True, False))
    return f"{'equal' if same else 'DIFFERENT'}, bit for bit, to bitsandbytes {bitsandbytes.__version__}'s"


def state_errors(snapshot, step, pair):
    """Round-trip statistics of one snapshot (a list of (exp_avg, exp_avg_sq) of the tensors stored in 8 bits)."""
    signed_map, unsigned_map = pair
    rows = {}
    for which, signed, code_map in (("exp_avg", True, signed_map), ("exp_avg_sq", False, unsigned_map)):
        exact = np.concatenate([s[0 if signed else 1].ravel() for s in snapshot]).astype(np.float64)
        approx = np.concatenate([round_trip(s[0 if signed else 1], signed, code_map).ravel()
                                 for s in snapshot]).astype(np.float64)
        nonzero = exact != 0
        relative = np.abs(approx[nonzero] - exact[nonzero]) / np.abs(exact[nonzero])
        rows[which] = dict(median=np.median(relative), p99=np.quantile(relative, 0.99),
                           zeroed=np.mean(approx[nonzero] == 0))
    directions = []
    for exp_avg, exp_avg_sq in snapshot:
        for m, v in ((exp_avg, exp_avg_sq),
                     (round_trip(exp_avg, True, signed_map), round_trip(exp_avg_sq, False, unsigned_map))):
            m, v = m.astype(np.float64) / (1 - 0.9 ** step), v.astype(np.float64) / (1 - 0.999 ** step)
            directions.append((m / (np.sqrt(v) + EPS)).ravel())
    exact_u = np.concatenate(directions[0::2])
    approx_u = np.concatenate(directions[1::2])
    rows["direction"] = dict(error=np.linalg.norm(approx_u - exact_u) / np.linalg.norm(exact_u),
                             blowup=np.abs(approx_u).max() / np.abs(exact_u).max())
    return rows


def part_round_trip(sources, out):
    out("## 1. Round trip of real AdamW states\n")
    out("Relative error |q - v| / |v| over nonzero elements (median, 99th percentile), share of nonzero elements "
        "decoded as 0, and the Adam direction u = m^/(sqrt(v^) + 1e-8): norm(du)/norm(u) over all elements and "
        "max abs(u_8bit) / max abs(u) (1 = no blow-up).\n")
    out("| states | map | exp_avg median | exp_avg p99 | exp_avg zeroed | exp_avg_sq median | exp_avg_sq p99 "
        "| exp_avg_sq zeroed | direction norm(du)/norm(u) | max abs(u) ratio |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    for label, step, snapshot in sources:
        for name, pair in PAIRS.items():
            rows = state_errors(snapshot, step, pair)
            m, v, d = rows["exp_avg"], rows["exp_avg_sq"], rows["direction"]
            out(f"| {label} | {name} | {m['median']:.2%} | {m['p99']:.2%} | {m['zeroed']:.2%} | {v['median']:.2%} "
                f"| {v['p99']:.2%} | {v['zeroed']:.2%} | {d['error']:.2%} | {d['blowup']:.2f} |")
    out("")


# ------------------------------------------------------------------------------------------ part 3: encode cost
def part_encode_cost(out):
    import numba
    from numba import njit

    mantissa_bits = q.MANTISSA_BITS
    largest, offset, shift, half = q._float_map_constants(True, mantissa_bits)
    rounding = 1 << (shift - 1)

    @njit(error_model="numpy")
    def encode_closed_form(values, scales, codes, strip, reciprocal):
        bits = strip.view(np.int32)
        for block in range(scales.size):
            scale = scales[block]
            start = block * 256
            count = min(256, values.size - start)
            if reciprocal:
                inverse = np.float32(1) / scale
                for i in range(count):
                    strip[i] = values[start + i] * inverse
            else:
                for i in range(count):
                    strip[i] = values[start + i] / scale
            for i in range(count):
                b = bits[i]
                a = b & 0x7FFFFFFF
                k = min(max(((a + rounding) >> shift) - offset, 1), largest)
                if a < half:
                    k = 0
                codes[start + i] = ((b >> 24) & 0x80) | k
        return codes

    @njit(error_model="numpy")
    def encode_search(values, scales, codes, strip, midpoints, branchless):
        for block in range(scales.size):
            scale = scales[block]
            start = block * 256
            count = min(256, values.size - start)
            for i in range(count):
                strip[i] = values[start + i] / scale
            for i in range(count):
                x = strip[i]
                code = 0
                if branchless:
                    for step in (128, 64, 32, 16, 8, 4, 2, 1):
                        code += step if midpoints[code + step - 1] <= x else 0
                else:
                    step = 128
                    while step > 0:
                        if midpoints[code + step - 1] <= x:
                            code += step
                        step >>= 1
                codes[start + i] = code
        return codes

    @njit(error_model="numpy")
    def decode_table(codes, scales, table, values):
        for block in range(scales.size):
            scale = scales[block]
            start = block * 256
            for i in range(min(256, codes.size - start)):
                values[start + i] = table[codes[start + i]] * scale

    @njit(error_model="numpy")
    def decode_bits(codes, scales, values, strip):
        bits = strip.view(np.int32)
        for block in range(scales.size):
            scale = scales[block]
            start = block * 256
            count = min(256, codes.size - start)
            for i in range(count):
                code = np.int32(codes[start + i])
                k = code & 0x7F
                sign = (code & 0x80) << 24
                bits[i] = (((k + offset) << shift) | sign) if k != 0 else sign
            for i in range(count):
                values[start + i] = strip[i] * scale

    @njit(error_model="numpy")
    def copy(source, target):
        for i in range(source.size):
            target[i] = source[i]

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    size = 1 << 20
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(size) * np.exp(2 * rng.standard_normal(size))).astype(np.float32)
    codes, scales = q.quantize(values, True)
    strip, out_codes, out_values = np.zeros(256, np.float32), np.zeros(size, np.uint8), np.zeros(size, np.float32)
    dynamic = q.dynamic_code_map(True)
    midpoints = ((dynamic[:-1].astype(np.float64) + dynamic[1:]) / 2).astype(np.float32)  # timing only
    encode_closed_form(values, scales, out_codes, strip, True)
    assert np.array_equal(out_codes, codes), "the Numba closed form differs from the reference"
    encode_closed_form(values, scales, out_codes, strip, False)
    division_agrees = np.mean(out_codes == codes)
    decode_bits(codes, scales, out_values, strip)
    assert np.array_equal(out_values.view(np.uint32), q.dequantize(codes, scales, True).view(np.uint32))
    cases = {
        "copy float32 -> float32 (yardstick)": lambda: copy(values, out_values),
        "encode, closed form, x = v * (1 / s) (the format)":
            lambda: encode_closed_form(values, scales, out_codes, strip, True),
        "encode, closed form, x = v / s": lambda: encode_closed_form(values, scales, out_codes, strip, False),
        "encode, bisection over 255 midpoints (branches)":
            lambda: encode_search(values, scales, out_codes, strip, midpoints, False),
        "encode, bisection over 255 midpoints (selects)":
            lambda: encode_search(values, scales, out_codes, strip, midpoints, True),
        "decode, table[code] * s": lambda: decode_table(codes, scales, q.SIGNED_MAP, out_values),
        "decode, bits of the code * s": lambda: decode_bits(codes, scales, out_values, strip),
    }
    best = {}
    for _ in range(20):  # interleaved rounds: every case once per round
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    numba.set_num_threads(previous)
    out("## 3. Encode and decode cost (Numba, one thread, 1M float32 in blocks of 256, best of 20)\n")
    out("| loop | ns per element |")
    out("|---|---|")
    for name, seconds in best.items():
        out(f"| {name} | {seconds / size * 1e9:.2f} |")
    out(f"\nEncoding by division gives the format's codes (by reciprocal) on {division_agrees:.4%} of these "
        "values: x differs by an ulp at most, and a code changes only where x crosses a midpoint.\n")


# ------------------------------------------------------------------------------- part 4: centered RMSprop hazard
def part_centered_rmsprop(out, steps=200, size=4096):
    """Centered RMSprop divides by sqrt(square_avg - grad_avg^2): with both states in 8 bits, independently rounded,
    the difference can go negative (NaN in torch's formula). Nearly constant gradients, where it is smallest."""
    rng = np.random.default_rng(0)
    alpha = np.float32(0.99)
    square_avg, grad_avg = np.zeros(size, np.float32), np.zeros(size, np.float32)
    magnitude = np.exp(rng.standard_normal(size)).astype(np.float32)
    worst = 0
    for _ in range(steps):
        grad = (magnitude * (1 + 0.05 * rng.standard_normal(size))).astype(np.float32)
        square_avg = q.round_trip(alpha * square_avg + (1 - alpha) * grad * grad, False)
        grad_avg = q.round_trip(alpha * grad_avg + (1 - alpha) * grad, True)
        worst = max(worst, int(np.count_nonzero(square_avg - grad_avg * grad_avg < 0)))
    out("## 4. Centered RMSprop with both states in 8 bits\n")
    out(f"Gradients of {size} elements, each nearly constant (5% noise), alpha 0.99, {steps} steps, both states "
        f"stored e5m3 / e4m3: at most {worst} elements in one step with square_avg - grad_avg^2 < 0 (NaN under "
        f"torch's sqrt).\n")


# ---------------------------------------------------------------------------------------------------- the run
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer steps and seeds")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # deterministic LM runs; the MLP's matmuls are tiny
    lines = []

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    started = time.perf_counter()
    epochs = 4 if args.quick else 20
    lm_steps = 60 if args.quick else 600  # 400-500 steps left some seeds on the plateau before attention works
    mlp_seeds = (0,) if args.quick else (0, 1, 2)
    lm_seeds = (0,) if args.quick else (0, 1)
    try:
        import lm
        lm_seeds = lm_seeds if lm.LMConfig else ()
    except ImportError as error:  # bench/lm.py, the LM of the optimizer studies
        print(f"no LM runs: {error}")
        lm_seeds = ()
    mlp_total = epochs * -(-1438 // 64)
    mlp_early, lm_early = max(1, mlp_total // 10), max(1, lm_steps // 10)

    # float32 runs, with the state snapshots of part 1
    mlp_float32 = {seed: train_mlp(None, seed, epochs, 0, (mlp_early, mlp_total) if seed == 0 else ())
                   for seed in mlp_seeds}
    lm_float32 = {seed: train_language_model(None, seed, lm_steps, 0, (lm_early, lm_steps) if seed == 0 else ())
                  for seed in lm_seeds}
    big = [i for i, p in enumerate(demo.MLP().params) if p.size >= 4096]
    sources = [(f"digits MLP, step {step}", step, [snapshot[i] for i in big])
               for step, snapshot in mlp_float32[0]["snapshots"].items()]
    if lm_seeds:
        sources += [(f"LM, step {step}", step, snapshot) for step, snapshot in lm_float32[0]["snapshots"].items()]
    out(f"# 8-bit state code maps: measured ({'quick' if args.quick else 'full'} run)\n")
    out(f"bitsandbytes' dynamic maps: {dynamic_map_check()}\n")
    part_round_trip(sources, out)

    out("## 2. Training with states stored in 8 bits after every step\n")
    out(f"Digits MLP: AdamW (onecycle, peak 3e-3, weight decay 0.01, batch 64, {mlp_total} steps), seeds "
        f"{list(mlp_seeds)}: mean test accuracy and loss, and the largest accuracy difference from float32 over the "
        f"seeds (one test image is 0.28 points).\n")
    out("| states | min_8bit_size | test accuracy | test loss | largest accuracy change vs float32 (points) |")
    out("|---|---|---|---|---|")
    out(f"| float32 | - | {np.mean([r['test_accuracy'] for r in mlp_float32.values()]):.2%} "
        f"| {np.mean([r['test_loss'] for r in mlp_float32.values()]):.4f} | - |")
    for threshold in (4096, 0):
        for name, pair in PAIRS.items():
            with np.errstate(all="ignore"):  # a map that diverges overflows
                runs = {seed: train_mlp(pair, seed, epochs, threshold) for seed in mlp_seeds}
            gap = max(abs(runs[s]["test_accuracy"] - mlp_float32[s]["test_accuracy"]) for s in mlp_seeds)
            out(f"| {name} | {threshold} | {np.mean([r['test_accuracy'] for r in runs.values()]):.2%} "
                f"| {np.mean([r['test_loss'] for r in runs.values()]):.4f} | {100 * gap:.2f} |")
    out("")
    if lm_seeds:
        params = lm_float32[lm_seeds[0]]["params"]
        out(f"LM (bench/lm.py: {params:,} params, byte-level, AdamW peak 3e-3 warmup 5% + cosine, weight decay 0.01, "
            f"batch 32, {lm_steps} steps, min_8bit_size 4096), seeds {list(lm_seeds)}: held-out loss (nats per byte) "
            f"per seed and the mean's difference from float32.\n")
        out("| states | " + " | ".join(f"seed {s}" for s in lm_seeds) + " | mean | vs float32 |")
        out("|---|" + "---|" * len(lm_seeds) + "---|---|")
        reference = np.mean([lm_float32[s]["heldout_loss"] for s in lm_seeds])
        out("| float32 | " + " | ".join(f"{lm_float32[s]['heldout_loss']:.4f}" for s in lm_seeds)
            + f" | {reference:.4f} | - |")
        for name in LM_PAIRS:
            pair = PAIRS[name]
            losses = [train_language_model(pair, seed, lm_steps, 4096)["heldout_loss"] for seed in lm_seeds]
            out(f"| {name} | " + " | ".join(f"{loss:.4f}" for loss in losses)
                + f" | {np.mean(losses):.4f} | {np.mean(losses) / reference - 1:+.2%} |")
        out("")
    part_encode_cost(out)
    part_centered_rmsprop(out)
    out(f"Whole run: {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
