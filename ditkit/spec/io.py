"""Load and dump specs as YAML or JSON, with errors that name the field and the fix."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ditkit.errors import UserError
from .components import BOOL_NOT_NUMBER, Spec
from .model import SPEC_VERSION, ModelSpec

T = TypeVar("T", bound=BaseModel)


class SpecError(UserError):
    """A spec failed to load or validate. ``issues`` is a list of ``(field path, message)``."""

    def __init__(self, issues: list[tuple[str, str]], source: str = "spec"):
        self.issues = issues
        self.source = source
        lines = [f"{source}: {len(issues)} problem(s)"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in issues]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# migrations: spec_version N -> N + 1 on plain data, applied before validation

MIGRATIONS: dict[int, Any] = {}
"""``{from_version: fn(data) -> data}``; empty while only version 1 exists."""


def migrate(data: dict) -> dict:
    version = data.get("spec_version", SPEC_VERSION)
    if not isinstance(version, int) or version < 1:
        raise SpecError([("spec_version", f"{version!r} is not a spec version; use {SPEC_VERSION}")])
    if version > SPEC_VERSION:
        raise SpecError([("spec_version", f"version {version} is newer than this ditkit "
                          f"understands ({SPEC_VERSION}); upgrade ditkit")])
    while version < SPEC_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
        data["spec_version"] = version
    return data


# --------------------------------------------------------------------------------------------
# validation errors -> field paths


def _path(loc: tuple, model: type[BaseModel] | None = None) -> str:
    """``('levels', 0, 'attention', 'neighborhood', 'kernel_size')`` ->
    ``levels[0].attention.kernel_size`` (union tags and pydantic's internal steps dropped)."""
    out = ""
    candidates: list[type[BaseModel]] = [model] if model else []
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        part = str(part)
        tagged = [m for m in candidates
                  if "kind" in m.model_fields and m.model_fields["kind"].default == part]
        if tagged:
            candidates = tagged
            continue
        if part.startswith(("function-", "tagged-union", "union", "int", "tuple")) and not any(
                part in m.model_fields for m in candidates):
            continue
        owners = [m for m in candidates if part in m.model_fields]
        candidates = _models_in(owners[0].model_fields[part].annotation) if owners else []
        out += ("." if out else "") + part
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model inside a (possibly Optional / tuple / Annotated) annotation."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model that owns ``loc[-1]`` (for did-you-mean suggestions)."""
    candidates: list[type[BaseModel]] = [model]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        tagged = [m for m in candidates
                  if "kind" in m.model_fields and m.model_fields["kind"].default == part]
        if tagged:  # a discriminated-union tag in the location
            candidates = tagged
            continue
        owners = [m for m in candidates if part in m.model_fields]
        if not owners:
            return []
        candidates = _models_in(owners[0].model_fields[part].annotation)
    return list(candidates[0].model_fields) if len(candidates) == 1 else []


def _issues_from(err: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    for e in err.errors(include_url=False):
        loc, typ, msg = tuple(e["loc"]), e["type"], e["msg"]
        if typ == "extra_forbidden":
            name = str(loc[-1])
            known = _known_fields(model, loc)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else (
                f"; known keys: {', '.join(known)}" if known else "; remove it")
            issues.append((_path(loc, model), f"unknown key `{name}`{hint}"))
        elif typ == "union_tag_invalid":
            ctx = e.get("ctx", {})
            issues.append((_path(loc, model) + ".kind", f"unknown kind {ctx.get('tag')!r}; use one of "
                           f"{ctx.get('expected_tags')}"))
        elif typ == "union_tag_not_found":
            issues.append((_path(loc, model), "missing `kind`; every variant needs one, e.g. "
                           "`{kind: ...}` (see `ditkit schema`)"))
        elif typ == "value_error" and not loc:
            text = msg.removeprefix("Value error, ")
            for line in text.splitlines():
                path, _, rest = line.partition(": ")
                issues.append((path, rest))
        elif typ == "value_error" and BOOL_NOT_NUMBER in msg:  # Spec's strict-number check
            base = _path(loc, model)
            for line in msg.removeprefix("Value error, ").splitlines():
                name, _, rest = line.partition(": ")
                issues.append((f"{base}.{name}" if base else name, rest))
        else:
            text = msg.removeprefix("Value error, ")
            got = e.get("input")
            if typ not in ("missing",) and not isinstance(got, (dict, list)):
                text += f" (got {got!r})"
            issues.append((_path(loc, model), text))
    # a failed item also makes its list "too short": keep only the real cause
    paths = [p for p, _ in issues]
    return [(p, m) for p, m in issues
            if not ("at least" in m and any(q != p and q.startswith(p) for q in paths))]


def validate(data: Any, model: type[T] = ModelSpec, source: str = "spec") -> T:  # type: ignore[assignment]
    """Validate plain data (a dict) into a spec, raising :class:`SpecError`."""
    if not isinstance(data, dict):
        raise SpecError([("", f"expected a mapping at the top level, got {type(data).__name__}")],
                        source)
    if model is ModelSpec:
        data = migrate(dict(data))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(_issues_from(err, model), source) from None


def loads(text: str, model: type[T] = ModelSpec, source: str = "spec") -> T:  # type: ignore[assignment]
    """Parse YAML (JSON is YAML) text into a spec."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError([("", f"not valid YAML/JSON: {err}")], source) from None
    except RecursionError:
        raise SpecError([("", "not valid YAML/JSON: nested too deeply")], source) from None
    return validate(data, model, source)


TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MAX_SPEC_BYTES = 16 * 2**20
"""A spec or experiment file is a few KB; anything this large is not one."""


def _binary_kind(path: Path, head: bytes) -> str | None:
    """What a binary file probably is, from its name and first bytes (no parsing)."""
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES or head.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x04",
                                                    b"\x80\x05")):
        return ("a PyTorch checkpoint (a pickle, which ditkit never loads); turn it "
                "into a ditkit checkpoint with `ditkit convert --from dit|k-diffusion|mpdit "
                f"{path.name} --out model.safetensors`, then use that")
    if suffix == ".safetensors":
        return "a safetensors file; give it to the command as a checkpoint, not as a spec"
    if suffix == ".onnx":
        return "an ONNX model; `ditkit sample` runs it, other commands need a spec or checkpoint"
    if head.startswith(b"\x89PNG") or head[:3] == b"\xff\xd8\xff":
        return "an image"
    return None


def read_text(path: str | Path, what: str = "spec") -> str:
    """The text of a spec/experiment file, or one clear error: a folder, a missing file, an
    unreadable file (:class:`ditkit.errors.EnvironmentFault`), a binary file (a PyTorch
    checkpoint is named as such, with the ``ditkit convert`` command), text that is not UTF-8."""
    from ditkit.errors import EnvironmentFault

    path = Path(path)
    if path.is_dir():
        raise SpecError([("", f"{path} is a directory, not a {what} file; give the "
                              f"{what} file (.yaml/.json) inside it")], str(path))
    if not path.exists():
        raise SpecError([("", f"no such file: {path}")], str(path))
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except PermissionError:
        raise EnvironmentFault(f"{path}: permission denied; cannot read the {what} file "
                               "(check its permissions)") from None
    except OSError as err:
        raise EnvironmentFault(f"{path}: cannot read the {what} file: "
                               f"{err.strerror or err}") from None
    kind = _binary_kind(path, raw[:8])
    if kind is not None and (b"\0" in raw[:4096] or path.suffix.lower() in TORCH_SUFFIXES
                             or path.suffix.lower() in (".safetensors", ".onnx")):
        raise SpecError([("", f"not a {what} file (YAML/JSON text) but {kind}")], str(path))
    if size > MAX_SPEC_BYTES:
        raise SpecError([("", f"{size:,} bytes is too large for a {what} file (YAML/JSON "
                              f"text of at most {MAX_SPEC_BYTES // 2**20} MiB)")], str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError([("", f"not a text file: byte {err.start} is not UTF-8 ({kind or 'binary data'}); "
                              f"a {what} file is YAML or JSON text in UTF-8")], str(path)) from None
    if "\0" in text:
        raise SpecError([("", f"not a text file (it contains NUL bytes); a {what} file is "
                              "YAML or JSON text")], str(path))
    return text


def load(path: str | Path, model: type[T] = ModelSpec) -> T:  # type: ignore[assignment]
    """Load a spec from a ``.yaml``/``.yml``/``.json`` file."""
    return loads(read_text(path, "spec"), model, str(path))


# --------------------------------------------------------------------------------------------
# dumping: only what differs from the defaults, but always the `kind` of a variant


def to_data(spec: BaseModel, full: bool = False) -> dict:
    """Plain JSON-compatible data. ``full=False`` keeps what was written (explicitly set fields,
    values differing from the default, every ``kind`` so unions still load) and drops the
    implied defaults: the readable form presets use. ``full=True`` writes every field."""
    out: dict = {}
    fields = type(spec).model_fields
    first = [n for n in ("kind", "d_model", "encoder", "middle", "decoder") if n in fields]
    order = first + [n for n in fields if n not in first]
    for name in order:
        value = getattr(spec, name)
        keep = (full or name in ("kind", "spec_version") or name in spec.model_fields_set
                or not _is_default(fields[name], value))
        if keep:
            out[name] = _plain(value, full)
    return out


def _is_default(field: Any, value: Any) -> bool:
    if field.default_factory is not None:
        default = field.default_factory()
    elif field.is_required():
        return False
    else:
        default = field.default
    return value == default


def _plain(value: Any, full: bool) -> Any:
    if isinstance(value, BaseModel):
        return to_data(value, full)
    if isinstance(value, (tuple, list)):
        return [_plain(v, full) for v in value]
    return value


def dumps(spec: BaseModel, format: str = "yaml", full: bool = False) -> str:
    data = to_data(spec, full)
    if format == "json":
        return json.dumps(data, indent=2) + "\n"
    if format == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    raise ValueError(f"format must be 'yaml' or 'json', got {format!r}")


def dump(spec: BaseModel, path: str | Path, full: bool = False) -> None:
    path = Path(path)
    fmt = "json" if path.suffix == ".json" else "yaml"
    path.write_text(dumps(spec, fmt, full))


def json_schema(model: type[BaseModel] = ModelSpec) -> dict:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", model.__name__)
    return schema


__all__ = [
    "SpecError", "validate", "loads", "load", "read_text", "dumps", "dump", "to_data", "json_schema",
    "migrate", "MIGRATIONS", "Spec",
]
