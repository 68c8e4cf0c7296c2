"""Load and dump specs as YAML or JSON, with errors that name the field and the fix."""

from __future__ import annotations

import difflib
import json
import os
import stat
import typing
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ditkit.errors import EnvironmentFault, UserError
from ditkit.files import atomic_path
from ditkit.spec.components import BOOL_NOT_NUMBER, Spec
from ditkit.spec.model import SPEC_VERSION, ModelSpec

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


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    version = data.get("spec_version", SPEC_VERSION)
    if not isinstance(version, int) or version < 1:
        raise SpecError(
            [("spec_version", f"{version!r} is not a spec version; use {SPEC_VERSION}")]
        )
    if version > SPEC_VERSION:
        raise SpecError(
            [
                (
                    "spec_version",
                    f"version {version} is newer than this ditkit "
                    f"understands ({SPEC_VERSION}); upgrade ditkit",
                )
            ]
        )
    while version < SPEC_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
        data["spec_version"] = version
    return data


# --------------------------------------------------------------------------------------------
# validation errors -> field paths


def _path(loc: tuple[Any, ...], model: type[BaseModel] | None = None) -> str:
    """``('levels', 0, 'attention', 'neighborhood', 'kernel_size')`` ->
    ``levels[0].attention.kernel_size`` (union tags and pydantic's internal steps dropped)."""
    out = ""
    candidates: list[type[BaseModel]] = [model] if model else []
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        part = str(part)
        tagged = [
            m
            for m in candidates
            if "kind" in m.model_fields and m.model_fields["kind"].default == part
        ]
        if tagged:
            candidates = tagged
            continue
        if part.startswith(("function-", "tagged-union", "union", "int", "tuple")) and not any(
            part in m.model_fields for m in candidates
        ):
            continue
        owners = [m for m in candidates if part in m.model_fields]
        candidates = _models_in(owners[0].model_fields[part].annotation) if owners else []
        out += ("." if out else "") + part
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model inside a (possibly Optional / tuple / Annotated) annotation."""

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that owns ``loc[-1]`` (for did-you-mean suggestions)."""
    candidates: list[type[BaseModel]] = [model]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        tagged = [
            m
            for m in candidates
            if "kind" in m.model_fields and m.model_fields["kind"].default == part
        ]
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
            hint = (
                f"; did you mean `{close[0]}`?"
                if close
                else (f"; known keys: {', '.join(known)}" if known else "; remove it")
            )
            issues.append((_path(loc, model), f"unknown key `{name}`{hint}"))
        elif typ == "union_tag_invalid":
            ctx = e.get("ctx", {})
            issues.append(
                (
                    _path(loc, model) + ".kind",
                    f"unknown kind {ctx.get('tag')!r}; use one of {ctx.get('expected_tags')}",
                )
            )
        elif typ == "union_tag_not_found":
            issues.append(
                (
                    _path(loc, model),
                    "missing `kind`; every variant needs one, e.g. "
                    "`{kind: ...}` (see `ditkit schema`)",
                )
            )
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
    return [
        (p, m)
        for p, m in issues
        if not ("at least" in m and any(q != p and q.startswith(p) for q in paths))
    ]


def validate(data: Any, model: type[T] = ModelSpec, source: str = "spec") -> T:  # type: ignore[assignment]
    """Validate plain data (a dict) into a spec, raising :class:`SpecError`."""
    if not isinstance(data, dict):
        raise SpecError(
            [("", f"expected a mapping at the top level, got {type(data).__name__}")], source
        )
    if model is ModelSpec:
        data = migrate(dict(data))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(_issues_from(err, model), source) from None


# --------------------------------------------------------------------------------------------
# YAML without silent surprises: a key written twice is an error, not "the last one wins"


class DuplicateKeyError(yaml.constructor.ConstructorError):  # type: ignore[misc]  # PyYAML: no stubs
    """A mapping holds the same key twice (YAML would keep the last one silently)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark):
        self.key, self.lines = key, (first.line + 1, second.line + 1)
        super().__init__(
            None,
            None,
            f"duplicate key `{key}` on lines {first.line + 1} and "
            f"{second.line + 1}; YAML would silently keep only the second, so "
            "remove one of them",
            second,
        )

    def __str__(self) -> str:
        return str(self.problem)


class StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no stubs
    """PyYAML's ``SafeLoader`` (plain data, nothing constructed from tags) that refuses a key
    written twice in one mapping, naming both lines. Keys brought in by a merge (``<<:``) may
    be overridden, as YAML intends."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                    key_node, yaml.ScalarNode
                ):
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # unhashable: the base class reports it
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep)


def _first_duplicate(
    node: Any, path: str = "", seen: set[int] | None = None
) -> tuple[str, Any, Any, Any] | None:
    """``(field path, key, first mark, second mark)`` of the first key written twice in a
    composed YAML node tree, or ``None`` (merge keys excepted; aliases visited once)."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if isinstance(key_node, yaml.ScalarNode):
                ident = (key_node.tag, key_node.value)
                if ident in keys:
                    return (
                        f"{path}.{key_node.value}" if path else str(key_node.value),
                        key_node.value,
                        keys[ident],
                        key_node.start_mark,
                    )
                keys[ident] = key_node.start_mark
                child = f"{path}.{key_node.value}" if path else str(key_node.value)
            else:
                child = path
            found = _first_duplicate(value_node, child, seen)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _first_duplicate(item, f"{path}[{i}]", seen)
            if found:
                return found
    return None


def load_yaml(text: str, source: str = "spec", field: str = "") -> Any:
    """Plain data from YAML (JSON is YAML) text with :class:`StrictLoader`; a syntax error, a
    duplicate key or absurd nesting is a :class:`SpecError` naming ``source`` (and ``field``,
    the path of the text inside a larger file, if any)."""
    try:
        found = _first_duplicate(yaml.compose(text, Loader=yaml.SafeLoader))
        if found:  # named by its field path (the loader below would name the lines only)
            where, key, first, second = found
            err = DuplicateKeyError(key, first, second)
            raise SpecError([(".".join(p for p in (field, where) if p), str(err))], source)
        data = yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
    except DuplicateKeyError as err:
        raise SpecError([(field, str(err))], source) from None
    except yaml.YAMLError as err:
        raise SpecError([(field, f"not valid YAML/JSON: {_yaml_problem(err)}")], source) from None
    except RecursionError:
        raise SpecError([(field, "not valid YAML/JSON: nested too deeply")], source) from None
    except ValueError as err:  # int(): more digits than sys.get_int_max_str_digits()
        raise SpecError(
            [
                (
                    field,
                    f"a value could not be read ({str(err).split(';')[0]}); "
                    "no spec field takes a number that long",
                )
            ],
            source,
        ) from None
    depth = nesting_depth(data)
    if depth > MAX_NESTING:
        raise SpecError(
            [
                (
                    field,
                    f"nested {depth} levels deep (limit {MAX_NESTING}); no spec "
                    "or experiment is nested like that",
                )
            ],
            source,
        )
    return data


def _yaml_problem(err: Exception) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's text spans lines)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(err, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


MAX_NESTING = 64
"""Lists and mappings inside each other; a spec or experiment needs fewer than 10."""


def nesting_depth(data: Any) -> int:
    """How deeply lists and mappings nest in ``data`` (iterative: no recursion limit)."""
    deepest, stack = 0, [(data, 1)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)) or id(item) in seen:
            continue
        seen.add(id(item))
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            return depth
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


def loads(text: str, model: type[T] = ModelSpec, source: str = "spec") -> T:  # type: ignore[assignment]
    """Parse YAML (JSON is YAML) text into a spec."""
    return validate(load_yaml(text, source), model, source)


TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MAX_SPEC_BYTES = 16 * 2**20
"""A spec or experiment file is a few KB; anything this large is not one."""


def _binary_kind(path: Path, head: bytes) -> str | None:
    """What a binary file probably is, from its name and first bytes (no parsing)."""
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES or head.startswith(
        (b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05")
    ):
        return (
            "a PyTorch checkpoint (a pickle, which ditkit never loads); turn it "
            "into a ditkit checkpoint with `ditkit convert --from dit|k-diffusion|mpdit "
            f"{path.name} --out model.safetensors`, then use that"
        )
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

    path = Path(path)
    if path.is_dir():
        raise SpecError(
            [
                (
                    "",
                    f"{path} is a directory, not a {what} file; give the "
                    f"{what} file (.yaml/.json) inside it",
                )
            ],
            str(path),
        )
    if not path.exists():
        raise SpecError([("", f"no such file: {path}")], str(path))
    try:
        with open_regular(path, what) as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(MAX_SPEC_BYTES + 1)
    except SpecError:
        raise
    except PermissionError:
        raise EnvironmentFault(
            f"{path}: permission denied; cannot read the {what} file (check its permissions)"
        ) from None
    except OSError as err:
        raise EnvironmentFault(
            f"{path}: cannot read the {what} file: {err.strerror or err}"
        ) from None
    kind = _binary_kind(path, raw[:8])
    if kind is not None and (
        b"\0" in raw[:4096]
        or path.suffix.lower() in TORCH_SUFFIXES
        or path.suffix.lower() in (".safetensors", ".onnx")
    ):
        raise SpecError([("", f"not a {what} file (YAML/JSON text) but {kind}")], str(path))
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            [
                (
                    "",
                    f"{size:,} bytes is too large for a {what} file (YAML/JSON "
                    f"text of at most {MAX_SPEC_BYTES // 2**20} MiB)",
                )
            ],
            str(path),
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(
            [
                (
                    "",
                    f"not a text file: byte {err.start} is not UTF-8 ({kind or 'binary data'}); "
                    f"a {what} file is YAML or JSON text in UTF-8",
                )
            ],
            str(path),
        ) from None
    if "\0" in text:
        raise SpecError(
            [("", f"not a text file (it contains NUL bytes); a {what} file is YAML or JSON text")],
            str(path),
        )
    return text


_NOT_REGULAR = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def not_regular(mode: int) -> str | None:
    """What a file of ``st_mode`` ``mode`` is when it is not a regular file, else ``None``."""
    if stat.S_ISREG(mode):
        return None
    return next((text for test, text in _NOT_REGULAR if test(mode)), "not a regular file")


def check_regular(path: str | os.PathLike[str], what: str = "input") -> None:
    """Refuse (:class:`SpecError`, exit 2) a ``path`` that exists but is not a regular file
    (a FIFO, a device, a socket, a folder): reading one would block forever or never end.
    Symbolic links to regular files are fine; a missing file is left to the caller."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    kind = not_regular(mode)
    if kind is not None:
        raise SpecError(
            [("", f"{path} is {kind}, not a regular file; give the {what} as a plain file")],
            str(path),
        )


def open_regular(path: str | os.PathLike[str], what: str = "input") -> BinaryIO:
    """``open(path, "rb")`` for a regular file only. The file is opened non-blocking and its
    type checked on the open descriptor, so a FIFO (or a file swapped for one after a check)
    never blocks: it is a :class:`SpecError` naming what it is."""
    check_regular(path, what)
    f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK))
    try:
        kind = not_regular(os.fstat(f.fileno()).st_mode)
        if kind is not None:
            raise SpecError(
                [("", f"{path} is {kind}, not a regular file; give the {what} as a plain file")],
                str(path),
            )
        os.set_blocking(f.fileno(), True)
        return f
    except BaseException:
        f.close()
        raise


def load(path: str | Path, model: type[T] = ModelSpec) -> T:  # type: ignore[assignment]
    """Load a spec from a ``.yaml``/``.yml``/``.json`` file."""
    return loads(read_text(path, "spec"), model, str(path))


# --------------------------------------------------------------------------------------------
# dumping: only what differs from the defaults, but always the `kind` of a variant


def to_data(spec: BaseModel, full: bool = False) -> dict[str, Any]:
    """Plain JSON-compatible data. ``full=False`` keeps what was written (explicitly set fields,
    values differing from the default, every ``kind`` so unions still load) and drops the
    implied defaults: the readable form presets use. ``full=True`` writes every field."""
    out: dict[str, Any] = {}
    fields = type(spec).model_fields
    first = [n for n in ("kind", "d_model", "encoder", "middle", "decoder") if n in fields]
    order = first + [n for n in fields if n not in first]
    for name in order:
        value = getattr(spec, name)
        keep = (
            full
            or name in ("kind", "spec_version")
            or name in spec.model_fields_set
            or not _is_default(fields[name], value)
        )
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
    return bool(value == default)


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
        return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
    raise ValueError(f"format must be 'yaml' or 'json', got {format!r}")


def dump(spec: BaseModel, path: str | Path, full: bool = False) -> None:
    """Write ``spec`` to ``path`` (JSON for ``.json``, else YAML), atomically."""
    path = Path(path)
    fmt = "json" if path.suffix == ".json" else "yaml"
    write_atomic(path, dumps(spec, fmt, full).encode())


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """``data`` into ``path`` all or nothing, through the ground floor's
    :func:`ditkit.files.atomic_path` (a unique temporary name created exclusively, so a
    planted symlink is never followed; synced, then renamed over ``path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def json_schema(model: type[BaseModel] = ModelSpec) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", model.__name__)
    return schema


__all__ = [
    "SpecError",
    "validate",
    "loads",
    "load",
    "read_text",
    "dumps",
    "dump",
    "to_data",
    "json_schema",
    "migrate",
    "MIGRATIONS",
    "Spec",
    "load_yaml",
    "StrictLoader",
    "DuplicateKeyError",
    "check_regular",
    "open_regular",
    "write_atomic",
]
