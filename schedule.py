"""The noise schedule, the diffusion-forcing step matrix, and the UniPC solver that walks it, in reading order:
`timesteps` picks the sigmas, `step_matrix` which latent frame sits at which sigma at each iteration, and `unipc_step`
moves every frame that the matrix updates one step along its own schedule."""
from dataclasses import dataclass

import numpy as np
import torch


def timesteps(num_inference_steps, shift):
    """The timesteps the model sees, (n,) int64, and the sigmas the solver walks, (n+1,) float32 ending in 0.
    The spacing is the original's, linspace(0.999, 0, n+1)[:-1] (diffusers >= 0.37 no longer gives its table: 999,
    995, 991, ... for 30 steps at shift 8); the arithmetic is diffusers' own, so the values are identical."""
    s = np.linspace(0.999, 0.0, num_inference_steps + 1)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)  # a shift > 1 spends more steps at high noise
    ts = torch.from_numpy(sigmas * 1000).long()
    return ts, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def step_matrix(num_latent_frames, step_template, ar_step=0, num_pre_ready=0, causal_block_size=1):
    """Diffusion forcing's schedule (diffusers' generate_timestep_matrix, base_num_latent_frames = num_latent_frames):
    the timesteps and update mask, (iterations, F) int64 and bool. Frames form causal blocks that share a timestep:
    causal_block_size frames each (F: num_latent_frames in whole blocks, as diffusers), or a tuple of each block's
    frames (F: their sum), so blocks may differ (an image's latent frame alone, a shorter last block). Each block walks
    the template `ar_step` iterations after the block before it (0: lock-step), so earlier frames are always cleaner;
    the blocks within the first `num_pre_ready` frames (a video prefix, an image) are clean and never updated.
    Progress is an index into [999, *step_template, 0] (n+1: finished); a frame is updated when its index moves and
    it is not finished."""
    if isinstance(causal_block_size, int):
        causal_block_size = (causal_block_size,) * (num_latent_frames // causal_block_size)
    sizes = torch.tensor(causal_block_size, dtype=torch.long)
    n, num_blocks = len(step_template), len(sizes)
    template = torch.cat([torch.tensor([999]), step_template.long().cpu(), torch.tensor([0])])
    finished = n + 1

    rows = [torch.zeros(num_blocks, dtype=torch.long)]  # the indices before the first iteration, then after each
    rows[0][:int((sizes.cumsum(0) <= num_pre_ready).sum())] = finished
    while (rows[-1] < n).any():
        row, new = rows[-1], torch.zeros(num_blocks, dtype=torch.long)
        for b in range(num_blocks):  # a step on where nothing ahead still denoises, else ar_step behind the block ahead
            new[b] = row[b] + 1 if b == 0 or row[b - 1] >= n else new[b - 1] - ar_step
        rows.append(new.clamp(0, finished))

    index = torch.stack(rows).repeat_interleave(sizes, dim=1)  # (1 + iterations, F)
    return template[index[1:]].to(step_template.device), (index[1:] != index[:-1]) & (index[1:] != finished)


@dataclass
class UniPC:
    """Per-frame solver state: every latent frame has its own position on the sigma schedule and its own history."""
    sigmas: torch.Tensor  # (n+1,) float32, ends in 0
    step: torch.Tensor  # (F,) int64: steps each frame has taken, its index into sigmas
    x0: torch.Tensor = None  # (B, C, F, H, W) float32: each frame's x0 prediction at its latest step
    x0_prev: torch.Tensor = None  # ... and at the step before
    last_sample: torch.Tensor = None  # the sample each frame's latest step started from (after correction)
    alias_first_step: bool = False


def unipc_init(sigmas, num_frames, alias_first_step=False):
    """alias_first_step=True as the original's and diffusers' diffusion-forcing loops (not T2V, I2V): their "last
    sample" views the latents, so a frame's second-step corrector starts from its first step's output, not its input."""
    return UniPC(sigmas=sigmas, step=torch.zeros(num_frames, dtype=torch.long), alias_first_step=alias_first_step)


def _per_frame(c):
    return c[:, None, None]  # (F,) -> (F, 1, 1): broadcasts over (B, C, F, H, W)


def _log_snr(sigma):
    return torch.log(1 - sigma) - torch.log(sigma)  # flow matching: x = (1 - sigma) * x0 + sigma * noise


def _uni_bh2(x, m0, m1, sigma_t, sigma_s0, sigma_s1, order, model_t=None):
    """One UniPC update (B(h) = e^h - 1, "bh2") of x from sigma_s0 to sigma_t, in the x0 parameterisation: m0, m1
    the x0 predictions at sigma_s0 and sigma_s1, the step before (order 2 only). Without model_t (the x0 prediction
    at sigma_t) the predictor UniP, with it the corrector UniC. sigma_* and order are (F,): coefficients per frame."""
    second = order == 2
    lam_s0 = _log_snr(sigma_s0)
    h = _log_snr(sigma_t) - lam_s0
    rk = torch.where(second, (_log_snr(sigma_s1) - lam_s0) / h, -1.0)  # -1: any harmless value for order 1
    hh = -h  # the x0 parameterisation integrates in -lambda
    h_phi_1 = torch.expm1(hh)  # e^hh - 1, which bh2 also takes as B(h)
    d1 = (m1 - m0) / _per_frame(rk)
    x_t = _per_frame(sigma_t / sigma_s0) * x - _per_frame((1 - sigma_t) * h_phi_1) * m0
    if model_t is None:  # UniP-2 uses the fixed weight 1/2 on the first difference
        res = _per_frame(torch.where(second, 0.5, 0.0)) * d1
    else:  # UniC-2 weights solve R rho = b, R = [[1, 1], [rk, 1]], as diffusers does (bit-identical); UniC-1: 1/2
        phi_2 = h_phi_1 / hh - 1
        b = torch.stack([phi_2 / h_phi_1, (phi_2 / hh - 0.5) * 2 / h_phi_1], dim=-1)  # (f, 2)
        R = torch.ones(len(rk), 2, 2, dtype=rk.dtype, device=rk.device)
        R[:, 1, 0] = rk
        rho = torch.linalg.solve(R, b)  # (f, 2)
        rho_1, rho_t = torch.where(second, rho[:, 0], 0.0), torch.where(second, rho[:, 1], 0.5)
        res = _per_frame(rho_1) * d1 + _per_frame(rho_t) * (model_t - m0)
    return x_t - _per_frame((1 - sigma_t) * h_phi_1) * res


def unipc_step(state, model_output, latents, update):
    """Step the frames in `update` ((F,) bool) one sigma along their own schedules by the flow prediction model_output
    (noise - x0, (B, C, F, H, W)): diffusers' UniPCMultistepScheduler (order 2, bh2, lower_order_final) per frame."""
    f = update.cpu().nonzero()[:, 0]  # the frames that step now
    n, sig, k = len(state.sigmas) - 1, state.sigmas.to(latents.device), state.step[f].to(latents.device)  # k: (f,)
    if (k >= n).any():
        raise ValueError("a frame was stepped past the end of its schedule")
    if state.x0 is None:
        state.x0, state.x0_prev, state.last_sample = (torch.zeros_like(latents, dtype=torch.float32) for _ in range(3))
    prev, prev2 = (k - 1).clamp(min=0), (k - 2).clamp(min=0)  # clamped where unused: first steps have no history
    x = latents[:, :, f].float()  # (B, C, f, H, W)
    m0, m1, last = state.x0[:, :, f], state.x0_prev[:, :, f], state.last_sample[:, :, f]
    x0 = x - _per_frame(sig[k]) * model_output[:, :, f].float()

    # UniC: from a frame's second step on, redo its previous step with the x0 just predicted at its end.
    corrected = _uni_bh2(last, m0, m1, sig[k], sig[prev], sig[prev2], torch.where(k >= 2, 2, 1), model_t=x0)
    x = torch.where(_per_frame(k > 0), corrected, x)
    # UniP: second order, except at a frame's first step (no history yet) and its last, to sigma = 0.
    x_next = _uni_bh2(x, x0, m0, sig[k + 1], sig[k], sig[prev], torch.where((k == 0) | (k == n - 1), 1, 2))

    if state.alias_first_step:
        x = torch.where(_per_frame(k == 0), x_next, x)
    state.x0_prev[:, :, f], state.x0[:, :, f], state.last_sample[:, :, f] = m0, x0, x
    state.step[f] += 1
    return latents.index_copy(2, f.to(latents.device), x_next.to(latents.dtype))  # the other frames as they were
