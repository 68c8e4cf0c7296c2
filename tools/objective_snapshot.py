"""Bit-identity check for objective refactors: record every objective-dependent output
(denoiser at fp32/fp64 with and without DDPM quantisation, noise ranges, sigma <-> t, every
schedule, every sampler with CFG, loss values, extras, gradients and noise draws) of the four
pre-v objectives on tiny models, then compare two recordings bit for bit.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tools/objective_snapshot.py write before.pt
    ... change the code ...
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tools/objective_snapshot.py write after.pt
    python tools/objective_snapshot.py compare before.pt after.pt
"""

from __future__ import annotations

import sys

import torch


def write(path: str) -> None:
    from ditkit import spec as S
    from ditkit.builder import build
    from ditkit.runtime.denoiser import Denoiser, NoiseRange
    from ditkit.runtime.samplers import SAMPLERS, get_sigmas, sample
    from ditkit.training.objectives import DiffusionLoss

    torch.manual_seed(0)
    dit = build(S.load("examples/tiny/tiny-dit.yaml")).eval()  # learned sigma, sinusoidal
    hdit = build(S.load("examples/tiny/tiny-hdit-neighborhood.yaml")).eval()  # fourier

    OBJS = {
        "edm": (S.EDMObjective(), hdit),
        "edm_cos": (
            S.EDMObjective(
                sigma_sampling=S.CosineInterpolatedSigma(sigma_min=0.01, sigma_max=160),
                weighting="soft_min_snr",
                gamma=4.0,
            ),
            hdit,
        ),
        "edm_range": (S.EDMObjective(sigma_min=0.01, sigma_max=50.0, weighting="min_snr"), hdit),
        "edm_snr": (S.EDMObjective(weighting="snr", sigma_data=0.7), hdit),
        "ddpm": (S.DDPMObjective(), dit),
        "ddpm_exact": (S.DDPMObjective(decoder_cdf="exact", steps=500), dit),
        "x0": (S.X0Objective(lambda_var=0.5), dit),
        "x0_off": (S.X0Objective(lambda_var=0.5, var_off_after=0), dit),
        "flow": (S.FlowObjective(), dit),
        "flow_u": (S.FlowObjective(time_sampling=S.UniformTime(), time_scale=1000.0), dit),
    }
    out = {}
    for name, (obj, model) in OBJS.items():
        spec = model.spec
        C, R = spec.input.channels, spec.input.resolution
        nr = NoiseRange.of(obj)
        out[f"{name}.range"] = torch.tensor([nr.sigma_min, nr.sigma_max], dtype=torch.float64)
        s = torch.tensor([nr.sigma_min, 0.1, 1.0, 7.5, nr.sigma_max], dtype=torch.float64)
        out[f"{name}.s2t"] = nr.sigma_to_t(s)
        out[f"{name}.t2s"] = nr.t_to_sigma(nr.sigma_to_t(s))
        for sched in ("native", "karras", "uniform"):
            out[f"{name}.sig.{sched}"] = get_sigmas(nr, 7, sched)
            out[f"{name}.sig.{sched}.lo"] = get_sigmas(nr, 5, sched, sigma_min=0.05)
        g = torch.Generator().manual_seed(1)
        labels = torch.tensor([1, 3])
        for dt in (torch.float32, torch.float64):
            m = model.to(dt)
            x = torch.randn(2, C, *R, generator=g).to(dt)
            for q in (False, True):
                d = Denoiser(m, obj, quantize=q)
                for sv in (0.05, 1.3, 20.0):
                    with torch.no_grad():
                        x0, var = d.denoise(x * sv, torch.tensor([sv, sv * 0.5]), labels)
                    out[f"{name}.den.{dt}.{q}.{sv}"] = x0
                    if var is not None:
                        out[f"{name}.var.{dt}.{q}.{sv}"] = var
                out[f"{name}.lv.{q}"] = torch.tensor(float(d.learned_variance))
            m.float()
        d = Denoiser(model, obj)
        for smp in SAMPLERS:
            with torch.no_grad():
                out[f"{name}.sample.{smp}"] = sample(
                    d, (2, C, *R), steps=4, sampler=smp, seed=3, class_labels=labels, cfg_scale=1.5
                )
        # training
        loss = DiffusionLoss(obj, spec)
        x0 = torch.randn(3, C, *R, generator=g).clamp(-1, 1)
        lab = torch.tensor([0, 4, 9])
        for dt in (torch.float32, torch.float64):
            model.to(dt).train()
            model.zero_grad()
            gen = torch.Generator().manual_seed(5)
            val, extras = loss(model, x0.to(dt), lab, gen, step=3)
            val.backward()
            out[f"{name}.loss.{dt}"] = val.detach()
            for k, v in extras.items():
                out[f"{name}.extra.{k}.{dt}"] = torch.tensor(v, dtype=torch.float64)
            out[f"{name}.grad.{dt}"] = torch.cat(
                [p.grad.flatten() for p in model.parameters() if p.grad is not None]
            )
            gen = torch.Generator().manual_seed(6)
            noise, level = loss.draw(x0.to(dt), gen)
            out[f"{name}.draw.noise.{dt}"], out[f"{name}.draw.level.{dt}"] = noise, level
            model.float().eval()
            model.zero_grad()
    torch.save(out, path)
    print(len(out), "tensors")


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    bad = [
        k
        for k in a
        if k not in b
        or a[k].dtype != b[k].dtype
        or a[k].shape != b[k].shape
        or not torch.equal(a[k], b[k])
    ]
    print(f"{len(a)} compared, {len(bad)} differ, {len(set(b) - set(a))} new")
    for k in bad[:40]:
        print("DIFF", k)
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"] and len(sys.argv) == 3:
        write(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
