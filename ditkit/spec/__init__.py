"""``ditkit.spec``: typed, frozen, torch-free model specs (pydantic v2)."""

from .components import *  # noqa: F401,F403  (the component variants are the spec language)
from .components import neighborhood_misfits, pair
from .families import dit, hdit, hdit_ffhq_1024, hdit_imagenet_128, hdit_imagenet_256, mdit, mpdit
from .io import SpecError, dump, dumps, json_schema, load, loads, migrate, to_data, validate
from .model import SPEC_VERSION, Block, BlockOverride, Level, ModelSpec
from .objective import (
    OBJECTIVE_KINDS,
    CosineInterpolatedSigma,
    DDPMObjective,
    EDMObjective,
    FlowObjective,
    LogitNormalTime,
    LogNormalSigma,
    Objective,
    ObjectiveSpec,
    UniformTime,
    VObjective,
    X0Objective,
    objective_of_kind,
)
from .policy import AddLevels, AsIs, CorePatch, LocalCore, Policy
from .sampling import Sampling

__all__ = [
    "ModelSpec",
    "Level",
    "Block",
    "BlockOverride",
    "SPEC_VERSION",
    "SpecError",
    "load",
    "loads",
    "dump",
    "dumps",
    "to_data",
    "validate",
    "json_schema",
    "migrate",
    "pair",
    "neighborhood_misfits",
    "dit",
    "hdit",
    "mdit",
    "mpdit",
    "hdit_imagenet_128",
    "hdit_ffhq_1024",
    "hdit_imagenet_256",
    "Objective",
    "ObjectiveSpec",
    "OBJECTIVE_KINDS",
    "objective_of_kind",
    "EDMObjective",
    "DDPMObjective",
    "X0Objective",
    "FlowObjective",
    "VObjective",
    "LogNormalSigma",
    "CosineInterpolatedSigma",
    "LogitNormalTime",
    "UniformTime",
    "Policy",
    "AsIs",
    "LocalCore",
    "AddLevels",
    "CorePatch",
    "Sampling",
]
