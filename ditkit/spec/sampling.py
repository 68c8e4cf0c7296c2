"""The names of the samplers and step schedules (``ditkit.runtime.samplers`` implements them).

They live in the spec layer so that specs, experiment files and the command line can check a
name without importing torch; the runtime's dispatch is the implementation of this list.
"""

from __future__ import annotations

SAMPLERS = ("euler", "heun", "ddim", "ddpm", "dpmpp_2m", "dpmpp_3m_sde", "euler_ancestral",
            "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
            "unipc", "dpm_adaptive")
SCHEDULES = ("native", "karras", "uniform")

DEFAULT_SAMPLER = "dpmpp_2m"
"""The sampler of previews, evaluations and every sampling command unless one is named. DPM++ 2M
is a second-order multistep method with one network evaluation per step: at 20 steps it scored
the same as Heun at 20 steps (39 evaluations) in the demo's ablation (docs/measurements.md,
*The demo*), so it gives the same quality at half the time."""
