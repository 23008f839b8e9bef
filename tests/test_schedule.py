"""schedule.py: the seed's sigma spacing, the diffusion-forcing step matrix, and the per-frame UniPC solver."""
import copy
import itertools

import pytest
import torch
from conftest import seed_sigmas

import schedule

SEED_TEMPLATE = [999, 995, 991, 986, 980, 975, 969, 963, 956, 948, 941, 932, 922, 912, 901,
                 888, 874, 859, 841, 822, 799, 773, 743, 708, 666, 615, 551, 470, 363, 216]


def blocks(*values, size=5):
    return [v for v in values for _ in range(size)]


@pytest.fixture(scope="module")
def worked_example():
    """The seed's example: 30 steps, shift 8, 97 frames -> 25 latent frames, ar_step 5, causal blocks of 5."""
    ts, _ = schedule.timesteps(30, 8.0)
    return schedule.step_matrix(25, ts, ar_step=5, causal_block_size=5)


def diffusers_unipc(n, shift):
    """The oracle: diffusers' UniPC in SkyReels-V2's flow configuration, handed the seed's sigma spacing (its default
    spacing changed in diffusers 0.37 and no longer gives the seed's table)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=2,
        solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(sigmas=seed_sigmas(n))
    return scheduler


def diffusers_step_matrix(*args):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    # generate_timestep_matrix never touches self, so it runs unbound.
    return SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(None, *args)


# timesteps ------------------------------------------------------------------------------------------------------


def test_30_steps_at_shift_8_give_the_seed_template():
    ts, sigmas = schedule.timesteps(30, 8.0)
    assert ts.dtype == torch.int64 and ts.tolist() == SEED_TEMPLATE
    assert sigmas.dtype == torch.float32 and len(sigmas) == 31 and sigmas[-1] == 0


@pytest.mark.parametrize("n", [1, 2, 3, 10, 30, 50], ids=lambda n: f"{n} steps")
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0], ids=lambda s: f"shift {s:g}")
def test_timesteps_equal_diffusers_given_the_seed_sigmas(n, shift):
    """Oracle: diffusers' set_timesteps(sigmas=seed_sigmas(n)). Exact equality: the arithmetic is the same."""
    ref = diffusers_unipc(n, shift)
    ts, sigmas = schedule.timesteps(n, shift)
    assert torch.equal(ts, ref.timesteps) and torch.equal(sigmas, ref.sigmas)


# step matrix: the seed's worked example --------------------------------------------------------------------------


def test_worked_example_takes_50_iterations_over_25_frames(worked_example):
    step_matrix, update_mask = worked_example
    assert step_matrix.shape == update_mask.shape == (50, 25)


@pytest.mark.parametrize("row, values", [
    (1, (999, 999, 999, 999, 999)),
    (2, (995, 999, 999, 999, 999)),
    (3, (991, 999, 999, 999, 999)),
    (7, (969, 995, 999, 999, 999)),
    (21, (799, 888, 941, 975, 999)),
    (35, (0, 216, 666, 822, 901)),
    (42, (0, 0, 0, 551, 773)),
    (50, (0, 0, 0, 0, 216)),
], ids=lambda v: f"row {v}" if isinstance(v, int) else "blocks at " + "/".join(map(str, v)))
def test_worked_example_rows_match_the_seed(worked_example, row, values):
    assert worked_example[0][row - 1].tolist() == blocks(*values)


def test_worked_example_row_6(worked_example):
    step_matrix, update_mask = worked_example
    assert step_matrix[5].tolist() == blocks(975, 999, 999, 999, 999)
    assert update_mask[5].tolist() == blocks(True, True, False, False, False)


# step matrix: parity --------------------------------------------------------------------------------------------


def test_step_matrix_equals_diffusers_over_a_sweep():
    """Oracle: diffusers' generate_timestep_matrix (shrink_interval_with_mask=False) with the window as its own base
    (base_num_latent_frames = num_latent_frames), as the pipeline uses it. Exact equality of the step matrix and the
    update mask. Each value stands for a behaviour: 3 or 12 steps; 7 or 25 frames (a partial last block with blocks
    of 2, and of 5 for 7); ar_step 0 (synchronous), 1 (blocks overlap) and 5 (blocks follow one another with 3 steps,
    overlap with 12); no prefix, 3 frames (not whole blocks of 2 or 5) and 10; blocks of 1, 2 and 5. Longer videos
    and larger ar_steps only repeat these behaviours, at many times the cost."""
    checked = 0
    for n, frames, ar_step, pre, block in itertools.product((3, 12), (7, 25), (0, 1, 5), (0, 3, 10), (1, 2, 5)):
        if pre // block >= frames // block:
            continue  # nothing left to generate: both fail on an empty matrix
        ts, _ = schedule.timesteps(n, 8.0)
        matrix, update = schedule.step_matrix(frames, ts, ar_step, pre, block)
        ref_matrix, _, ref_update, _ = diffusers_step_matrix(frames, ts, frames, ar_step, pre, block)
        for a, b in ((matrix, ref_matrix), (update, ref_update)):
            assert a.dtype == b.dtype and torch.equal(a, b), (n, frames, ar_step, pre, block)
        checked += 1
    assert checked > 80


# UniPC solver -----------------------------------------------------------------------------------------------------

STEPS = [1, 2, 3, 10, 30, 50]
SHIFTS = [3.0, 5.0, 8.0]


@pytest.mark.parametrize("n", STEPS, ids=lambda n: f"{n} steps")
@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift {s:g}")
def test_lockstep_unipc_equals_diffusers(n, shift):
    """All frames update every step (T2V). Oracle: one diffusers UniPCMultistepScheduler over the whole tensor, fed
    the same random flow predictions. Tolerance 1e-5 max abs in float32 (measured: 0, the arithmetic is the same)."""
    ref = diffusers_unipc(n, shift)
    ts, sigmas = schedule.timesteps(n, shift)
    g = torch.Generator().manual_seed(n)
    expected = torch.randn(2, 4, 6, 3, 5, generator=g)  # (B, C, F, H, W)
    ours, state = expected.clone(), schedule.unipc_init(sigmas, 6)
    for t in ts:
        v = torch.randn(expected.shape, generator=g)
        expected = ref.step(v, t, expected, return_dict=False)[0]
        ours = schedule.unipc_step(state, v, ours, torch.ones(6, dtype=torch.bool))
        assert (ours - expected).abs().max() <= 1e-5
    assert state.step.tolist() == [n] * 6


@pytest.mark.parametrize("n", STEPS, ids=lambda n: f"{n} steps")
@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift {s:g}")
@pytest.mark.parametrize("in_place", [False, True], ids=["clean", "df-pipeline-aliasing"])
def test_staggered_unipc_equals_one_diffusers_scheduler_per_frame(n, shift, in_place):
    """Frames staggered as diffusion forcing schedules them: 6 causal blocks of 2, each a quarter of the steps
    behind the block before (ar_step = ceil(n/4)), a 1-block prefix. Oracle: one deep-copied diffusers scheduler per
    frame, stepped at the frame's step-matrix timestep where the update mask is set, on random flow predictions
    drawn per iteration (the same for both). "clean" hands each scheduler a copy of its frame; "df-pipeline-aliasing"
    hands it a view of the latents and writes the result back in place, as diffusers' DF pipeline does, which our
    alias_first_step reproduces. Tolerance 1e-5 max abs in float32 (measured: 0)."""
    frames, block = 12, 2
    ts, sigmas = schedule.timesteps(n, shift)
    step_matrix, update_mask = schedule.step_matrix(frames, ts, ar_step=-(-n // 4), num_pre_ready=2,
                                                    causal_block_size=block)
    proto = diffusers_unipc(n, shift)
    per_frame = [copy.deepcopy(proto) for _ in range(frames)]
    g = torch.Generator().manual_seed(100 + n)
    expected = torch.randn(1, 3, frames, 4, 2, generator=g)
    ours, state = expected.clone(), schedule.unipc_init(sigmas, frames, alias_first_step=in_place)
    for t, update in zip(step_matrix, update_mask):
        v = torch.randn(expected.shape, generator=g)
        for f in update.nonzero()[:, 0].tolist():
            sample = expected[:, :, f] if in_place else expected[:, :, f].clone()
            expected[:, :, f] = per_frame[f].step(v[:, :, f], t[f], sample, return_dict=False)[0]
        ours = schedule.unipc_step(state, v, ours, update)
        assert (ours - expected).abs().max() <= 1e-5
    assert state.step.tolist() == [0, 0] + [n] * (frames - 2)


def test_df_pipeline_aliasing_changes_the_result():
    """The aliasing is not a no-op: with 10 staggered steps the two variants differ visibly."""
    ts, sigmas = schedule.timesteps(10, 8.0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 2, 2, 3, 3, generator=g)
    outputs = [torch.randn(latents.shape, generator=g) for _ in range(10)]
    results = []
    for alias in (False, True):
        x, state = latents, schedule.unipc_init(sigmas, 2, alias_first_step=alias)
        for v in outputs:
            x = schedule.unipc_step(state, v, x, torch.ones(2, dtype=torch.bool))
        results.append(x)
    assert (results[0] - results[1]).abs().max() > 1e-3


def test_frames_outside_the_update_mask_and_their_state_are_untouched():
    ts, sigmas = schedule.timesteps(10, 8.0)
    g = torch.Generator().manual_seed(0)
    latents, state = torch.randn(1, 2, 4, 3, 3, generator=g), schedule.unipc_init(sigmas, 4)
    for _ in range(3):
        v = torch.randn(latents.shape, generator=g)
        latents = schedule.unipc_step(state, v, latents, torch.ones(4, dtype=torch.bool))
    update = torch.tensor([True, False, True, False])
    before = [t.clone() for t in (latents, state.x0, state.x0_prev, state.last_sample)]
    after = schedule.unipc_step(state, torch.randn(latents.shape, generator=g), latents, update)
    for old, new in zip(before, (after, state.x0, state.x0_prev, state.last_sample)):
        assert torch.equal(old[:, :, ~update], new[:, :, ~update])
    assert state.step.tolist() == [4, 3, 4, 3]
    assert not torch.equal(after[:, :, update], latents[:, :, update])


def test_stepping_a_finished_frame_raises():
    _, sigmas = schedule.timesteps(1, 8.0)
    latents, state = torch.zeros(1, 1, 2, 1, 1), schedule.unipc_init(sigmas, 2)
    latents = schedule.unipc_step(state, latents, latents, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="past the end"):
        schedule.unipc_step(state, latents, latents, torch.tensor([True, True]))
