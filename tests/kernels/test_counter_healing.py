"""The ticketed look-ahead forward of lora_fused (16-bit activations) after a launch that died midway.

Its arrival counters (the tile ticket, the shrink slices done per row block, the row blocks' t-ready
flags) live in one buffer per device and stream that every later forward on that stream reuses. A
launch that stops after its first programs leaves them partially advanced; the next forward must
still hand out every ticket, wait only for its own slices and produce the right y and gradients.

A launch that died is simulated by running only the first ``programs`` programs of its grid (the
interpreter runs programs in ticket order, so this is the state a launch killed at that point
leaves). The healthy forward afterwards runs in a worker thread with a time limit: a forward that
waits for a flag nobody raises spins forever, which fails here as a timeout instead of a hang."""
import threading

import pytest
import torch

from peftfast.kernels import lora_fused as LF
from peftfast.kernels.adapters import cat_a, cat_b, make_plan

from tests.kernels.test_lora_fused import assert_matches_float64, make_inputs

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
                    "(it waits on arrival counters the dead launch left behind)")
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
