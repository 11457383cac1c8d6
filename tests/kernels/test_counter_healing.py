"""Every kernel that counts arrivals, after a launch of it that died midway.

Their counters live in one buffer per device and stream that every later launch on that stream
reuses: the look-ahead forward of lora_fused (16-bit activations: tile ticket, shrink slices done per
row block, the row blocks' t-ready flags), and the backward kernels whose last program to arrive sums
the others' fp32 partials (lora_fused's dY pass for G and dB, its dX kernel for dA, the 4-bit and
int8 dX kernels of qmatmul for dA). A launch that stops after some of its programs leaves them
partially advanced; the next launch must still hand out every ticket, wait only for its own work,
let its own last arriver sum, and produce the right y and gradients.

A launch that died is simulated by running only the first ``programs`` programs of its grid (the
interpreter runs programs in ticket order, so this is the state a launch killed at that point
leaves). The healthy forward afterwards runs in a worker thread with a time limit: a forward that
waits for a flag nobody raises spins forever, which fails here as a timeout instead of a hang."""
import math
import threading

import pytest
import torch

from peftfast.kernels import lora_fused as LF
from peftfast.kernels import qmatmul as QM
from peftfast.kernels.adapters import cat_a, cat_b, make_plan

from tests.kernels.test_lora_fused import (assert_matches_float64, make_inputs, make_q8inputs, make_qinputs,
                                           run_op)

F16, F32 = torch.float16, torch.float32
TIME_LIMIT_S = 240.0


def die_midway(monkeypatch, inputs, programs: int) -> int:
    """Run the look-ahead forward's launch on ``inputs`` with only its first ``programs`` programs
    (a launch that died there); returns the full grid's size."""
    x, w, bias, As, Bs, scalings, _ = inputs
    real = LF.launch
    grid_seen = []

    def dying(kernel, grid, *args, **meta):
        grid_seen.append(grid[0])
        assert programs < grid[0], f"the dead launch must stop before its last program (grid {grid})"
        return real(kernel, (programs,), *args, **meta)

    monkeypatch.setattr(LF, "launch", dying)
    try:
        plan = make_plan([a.shape[0] for a in As], scalings, [0.0] * len(As))
        LF.launch_fused_forward(x.reshape(-1, x.shape[-1]), w, bias, cat_a(As), cat_b(Bs), plan, 0)
    finally:
        monkeypatch.setattr(LF, "launch", real)
    assert len(grid_seen) == 1
    return grid_seen[0]


def within_time_limit(fn):
    """fn() in a daemon thread; fails when it has not returned after TIME_LIMIT_S (a forward waiting
    for a flag that is never raised), re-raises what it raised."""
    outcome = {}

    def run():
        try:
            fn()
            outcome["ok"] = True
        except BaseException as err:  # noqa: BLE001 - handed to the test below
            outcome["err"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(TIME_LIMIT_S)
    if worker.is_alive():
        pytest.fail(f"the forward after a launch that died midway did not finish in {TIME_LIMIT_S:.0f} s "
                    "(it waits on counters the dead launch left behind)")
    if "err" in outcome:
        raise outcome["err"]


# 300 rows, d_in = d_out = 150: 3 shrink slices per row block, 3 column blocks; 16-bit adapters:
# 3 row blocks of 128 rows, a grid of 3 * 3 slices + 3 * 3 tiles = 18 programs; fp32 adapters: 5 row
# blocks of 64 rows, 15 slices + 15 tiles = 30 programs
@pytest.mark.parametrize("programs", [2, 13, 17], ids=["early", "mid", "late"])  # 16-bit: slice, tile, tile
@pytest.mark.parametrize("dtypes", [(F16, F16), (F16, F32)], ids=["f16", "f16-f32"])
def test_forward_after_a_launch_that_died_midway(triton_kernels, monkeypatch, programs, dtypes):
    inputs = make_inputs((300,), 150, 150, [7, 3], *dtypes, seed=programs)
    assert die_midway(monkeypatch, inputs, programs) == (18 if dtypes[1] == F16 else 30)
    within_time_limit(lambda: assert_matches_float64(inputs, [0.1, 0.0]))
    # and again: the launch after the healed one starts from a clean state as well
    within_time_limit(lambda: assert_matches_float64(make_inputs((300,), 150, 150, [5], *dtypes, seed=99), [0.0]))


def test_two_dead_launches_in_a_row(triton_kernels, monkeypatch):
    inputs = make_inputs((300,), 150, 150, [7, 3], F16, F16, seed=1)
    die_midway(monkeypatch, inputs, 13)
    die_midway(monkeypatch, inputs, 5)
    within_time_limit(lambda: assert_matches_float64(inputs, [0.0, 0.2]))


# The backward kernels: the launch that dies is the first one of ``kernel`` that counts arrivals
# (the dX kernels only with dA). It is launched with its full grid (programs read the grid's size)
# and stops after its first ``programs`` programs: the interpreter runs programs one after the other
# on the tensors themselves, so what those programs wrote (partials, counters) stays, as when a
# launch is killed there. Its op's results are not looked at; the next forward and backward, on
# other random inputs of the same shapes (a stale partial of the dead launch is then a wrong value,
# not by chance the right one), must match float64.
class _Died(Exception):
    pass


def backward_that_dies(monkeypatch, module, kernel, programs, inputs, quantised, ps):
    """One forward and backward of the op whose first counting launch of ``kernel`` stops after
    ``programs`` programs; returns that launch's full grid."""
    from triton.runtime import interpreter

    real, real_idx = module.launch, interpreter.interpreter_builder.set_grid_idx
    died = []

    def stop_after(n):
        ran = [0]

        def set_grid_idx(*idx):
            if ran[0] == n:
                raise _Died
            ran[0] += 1
            return real_idx(*idx)
        return set_grid_idx

    def dying(k, grid, *args, **meta):
        if k is kernel and not died and meta.get("HAS_DA", True) and meta.get("LORA_DA", True):
            died.append(tuple(grid))
            assert programs < math.prod(grid), f"the dead launch must stop before its last program (grid {grid})"
            monkeypatch.setattr(interpreter.interpreter_builder, "set_grid_idx", stop_after(programs))
            try:
                real(k, grid, *args, **meta)
            except Exception as err:  # noqa: BLE001 - the interpreter wraps what the kernel raised
                assert "_Died" in repr(err) or isinstance(err.__cause__, _Died), err
            else:
                raise AssertionError("the launch ran to its end")
            finally:
                monkeypatch.setattr(interpreter.interpreter_builder, "set_grid_idx", real_idx)
            return None
        return real(k, grid, *args, **meta)

    monkeypatch.setattr(module, "launch", dying)
    try:
        run_op(inputs, ps, quantised=quantised)
    finally:
        monkeypatch.setattr(module, "launch", real)
    assert len(died) == 1, "the op launched no counting kernel to stop"
    return died[0]


F16_F16 = (F16, F16)
BACKWARD_CASES = [  # (id, module, kernel, programs run, seed -> (quantised or None, inputs), full grid)
    # dY pass, 150 rows x 300 outputs: grid (rank tiles 1, column blocks 2 (G summed over them),
    # splits of the rows 10 (dB summed over them)), programs in that order: 5 leaves dB partial,
    # 15 leaves G partial on the last 5 splits' rows and dB partial on column block 1
    ("dy-5", LF, "_lora_fused_dy_kernel", 5,
     lambda seed: (None, make_inputs((150,), 45, 300, [7, 20], *F16_F16, seed=seed)), (1, 2, 10)),
    ("dy-15", LF, "_lora_fused_dy_kernel", 15,
     lambda seed: (None, make_inputs((150,), 45, 300, [7, 20], *F16_F16, seed=seed)), (1, 2, 10)),
    # fused dX with dA, 300 rows: 3 row blocks per column block
    ("grad_x-4", LF, "_lora_fused_grad_x_kernel", 4,
     lambda seed: (None, make_inputs((300,), 150, 150, [7, 3], *F16_F16, seed=seed)), (9,)),
    ("grad_x-8", LF, "_lora_fused_grad_x_kernel", 8,
     lambda seed: (None, make_inputs((300,), 150, 150, [7, 3], *F16_F16, seed=seed)), (9,)),
    # int8 and 4-bit dX with dA, 150 rows
    ("int8-5", QM, "_matmul_int8_kernel", 5,
     lambda seed: make_q8inputs((2, 75), 96, 83, [7, 16], F16, F32, seed=seed), (6, 1)),
    ("4bit-4", QM, "_matmul_4bit_kernel", 4,
     lambda seed: make_qinputs((2, 75), 192, 97, [7, 16], *F16_F16, seed=seed), (9, 1)),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_after_a_launch_that_died_midway(triton_kernels, monkeypatch, case):
    _, module, kernel_name, programs, make, full_grid = case
    ps = [0.1, 0.0]
    dead_quantised, dead_inputs = make(1)
    grid = backward_that_dies(monkeypatch, module, getattr(module, kernel_name), programs, dead_inputs,
                              dead_quantised, ps)
    assert grid == full_grid
    quantised, inputs = make(2)
    within_time_limit(lambda: assert_matches_float64(inputs, ps, quantised=quantised))
