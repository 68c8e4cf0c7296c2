"""The names of the samplers and step schedules (``ditkit.runtime.samplers`` implements them).

They live in the spec layer so that specs, experiment files and the command line can check a
name without importing torch; the runtime's dispatch is the implementation of this list.
"""

from __future__ import annotations

SAMPLERS = ("euler", "heun", "ddim", "ddpm", "dpmpp_2m", "dpmpp_3m_sde")
SCHEDULES = ("native", "karras", "uniform")
