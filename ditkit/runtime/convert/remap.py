"""The pieces every format module of :mod:`ditkit.runtime.convert` uses: :class:`Remap`, which
moves tensors between key layouts and collects every problem, :class:`ConversionError`,
:func:`expected_shapes`, and the move declarations (:class:`Move`, :class:`Concat`,
:class:`Derived` with their :class:`Transform`) from which :func:`to_ditkit` and
:func:`from_ditkit` derive both directions of a conversion. A module of its own so that the
format modules and the package's dispatch do not import each other."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.errors import UserError


class ConversionInputError(UserError):
    """A source file, format, option or spec that conversion cannot use (the message says
    which and what to do)."""


class ConversionError(UserError):
    """The tensors do not fit the spec: every problem is listed in the message."""

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[str],
        other: list[str] | None = None,
    ):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.other = other or []
        lines = [f"cannot convert {source} weights:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(compact(missing)))
        if unexpected:
            lines.append(
                f"  left over / unknown ({len(unexpected)}): " + ", ".join(compact(unexpected))
            )
        if mismatched:
            lines.append(f"  mis-shaped ({len(mismatched)}):")
            lines += [f"    {m}" for m in mismatched]
        lines += [f"  {line}" for line in self.other]
        super().__init__("\n".join(lines))


def compact(names: list[str]) -> list[str]:
    """Key names with runs that differ in one index folded: ``blocks.2.attn.qkv.weight ...
    blocks.11.attn.qkv.weight`` -> ``blocks.{2..11}.attn.qkv.weight``. Nothing is dropped."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for name in names:
        parts = re.split(r"(?<=\.)(\d+)(?=\.|$)", name)
        template = tuple(parts[0::2])
        groups.setdefault(template, []).append(tuple(int(p) for p in parts[1::2]))
    out = []
    for template, values in groups.items():
        if len(values) == 1 or not values[0]:
            out += [_fill(template, v) for v in values]
            continue
        varying = [i for i in range(len(values[0])) if len({v[i] for v in values}) > 1]
        if len(varying) != 1:
            out += [_fill(template, v) for v in values]
            continue
        k = varying[0]
        idx = sorted({v[k] for v in values})
        if idx == list(range(idx[0], idx[-1] + 1)):
            text = f"{{{idx[0]}..{idx[-1]}}}"
        else:
            text = "{" + ",".join(map(str, idx)) + "}"
        out.append(
            _fill(template, tuple(text if i == k else str(x) for i, x in enumerate(values[0])))
        )
    return out


def _fill(template: tuple[str, ...], values: tuple) -> str:
    out = template[0]
    for v, t in zip(values, template[1:]):
        out += f"{v}{t}"
    return out


def _shape(t) -> str:
    return "(" + ", ".join(str(d) for d in t) + ")"


class Remap:
    """Moves tensors from one key layout to another and checks the result.

    ``take(key)`` reads a source tensor (recording it as used, or as missing); ``put(name,
    tensor, origin)`` writes a target tensor; ``finish()`` compares the result against
    ``expected`` (target name -> shape), adds every unused source key as left over, and raises
    a :class:`ConversionError` listing all problems, or returns the target dict."""

    def __init__(
        self,
        state: Mapping[str, torch.Tensor],
        source: str,
        expected: Mapping[str, tuple[int, ...]] | None = None,
    ):
        self.state = dict(state)
        self.source = source
        self.expected = dict(expected) if expected is not None else None
        self.out: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.other: list[str] = []
        self.unfilled: set[str] = set()  # targets whose source is already reported missing

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.state:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.state[key]

    def put(self, name: str, tensor: torch.Tensor | None, origin: str = "") -> None:
        if tensor is not None:
            self.out[name] = tensor
            self.origin[name] = origin

    def move(
        self,
        key: str,
        name: str,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``out[name] = fn(state[key])``; a transform that fails on a wrong shape is reported
        as mis-shaped."""
        t = self.take(key)
        if t is None:
            self.unfilled.add(name)
            return
        if fn is not None:
            try:
                t = fn(t)
            except (RuntimeError, ValueError, IndexError) as err:
                self.mismatched.append(f"{key} {_shape(t.shape)} cannot become {name} ({err})")
                return
        self.put(name, t, key)

    def concat(self, keys: list[str], name: str, dim: int = 0) -> None:
        parts = [self.take(k) for k in keys]
        found = [p for p in parts if p is not None]
        if len(found) != len(parts):
            self.unfilled.add(name)
            return
        try:
            self.put(name, torch.cat(found, dim), " + ".join(keys))
        except RuntimeError:
            shapes = ", ".join(f"{k} {_shape(p.shape)}" for k, p in zip(keys, found))
            self.mismatched.append(f"cannot concatenate {shapes} into {name}")

    def split(self, key: str, names: Sequence[str], dim: int = 0) -> None:
        """The inverse of :meth:`concat`: ``state[key]`` cut into ``len(names)`` equal parts."""
        t = self.take(key)
        if t is None:
            return
        for name, part in zip(names, t.chunk(len(names), dim=dim)):
            self.put(name, part.contiguous(), key)

    def problem(self, message: str) -> None:
        self.other.append(message)

    def finish(self) -> dict[str, torch.Tensor]:
        unexpected = sorted(set(self.state) - self.used)
        missing = list(self.missing)
        mismatched = list(self.mismatched)
        if self.expected is not None:
            for name, shape in self.expected.items():
                if name not in self.out:
                    if name not in self.unfilled and not any(name in m for m in mismatched):
                        missing.append(f"{name} (ditkit)")
                elif tuple(self.out[name].shape) != tuple(shape):
                    origin = self.origin.get(name)
                    src = f"{origin} -> " if origin else ""
                    mismatched.append(
                        f"{src}{name}: got {_shape(self.out[name].shape)}, the "
                        f"spec needs {_shape(shape)}"
                    )
            unexpected += sorted(
                f"{n} (produced, not in the spec)" for n in self.out if n not in self.expected
            )
        if missing or unexpected or mismatched or self.other:
            raise ConversionError(self.source, missing, unexpected, mismatched, self.other)
        return self.out


# --------------------------------------------------------------------------------------------
# moves, declared once per tensor: both directions follow


@dataclass(frozen=True)
class Transform:
    """A tensor layout change and its inverse: ``to_ditkit(source tensor)`` and
    ``to_source(ditkit tensor)``; ``to_source(to_ditkit(t))`` must equal ``t`` bit for bit."""

    to_ditkit: Callable[[torch.Tensor], torch.Tensor]
    to_source: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Move:
    """The tensor at source key ``source`` is ditkit's ``target`` (after ``transform``, a copy
    without one)."""

    source: str
    target: str
    transform: Transform | None = None

    def forward(self, r: Remap) -> None:
        r.move(
            self.source,
            self.target,
            self.transform.to_ditkit if self.transform is not None else None,
        )

    def backward(self, r: Remap) -> None:
        r.move(
            self.target,
            self.source,
            self.transform.to_source if self.transform is not None else None,
        )


@dataclass(frozen=True)
class Concat:
    """Source tensors ``sources`` (equal sizes along ``dim``) are one ditkit tensor
    ``target``, concatenated in that order."""

    sources: tuple[str, ...]
    target: str
    dim: int = 0

    def forward(self, r: Remap) -> None:
        r.concat(list(self.sources), self.target, self.dim)

    def backward(self, r: Remap) -> None:
        r.split(self.target, self.sources, self.dim)


@dataclass(frozen=True)
class Derived:
    """A source tensor ditkit does not store because the spec determines it (``value``): read
    and checked against ``value`` on the way in, regenerated in the dtype of ditkit's
    ``dtype_of`` tensor on the way out. ``wrong_shape`` (with ``{shape}``, the one needed) and
    ``wrong_value`` (with ``{source}`` and ``{diff}``, the largest difference) say what a
    source that does not match means."""

    source: str
    value: torch.Tensor
    dtype_of: str
    wrong_shape: str
    wrong_value: str

    def forward(self, r: Remap) -> None:
        got = r.take(self.source)
        if got is None:
            return
        want = self.value
        if got.shape != want.shape:
            r.mismatched.append(
                f"{self.source}: got {tuple(got.shape)}, "
                + self.wrong_shape.format(shape=tuple(want.shape))
            )
        elif not torch.equal(got, want.to(got.dtype)):  # fp16 inference files: rounded
            diff = (got.float() - want).abs().max().item()
            r.problem(self.wrong_value.format(source=self.source, diff=diff))

    def backward(self, r: Remap) -> None:
        like = r.state.get(self.dtype_of)
        dtype = like.dtype if like is not None else self.value.dtype
        r.put(self.source, self.value.to(dtype))


Declaration = Move | Concat | Derived


def to_ditkit(
    moves: Sequence[Declaration],
    state: Mapping[str, torch.Tensor],
    source: str,
    expected: Mapping[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """Source tensors -> ditkit's, by ``moves`` in order; every problem in one
    :class:`ConversionError`."""
    r = Remap(state, source, expected)
    for m in moves:
        m.forward(r)
    return r.finish()


def from_ditkit(
    moves: Sequence[Declaration], tensors: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """ditkit tensors -> the source layout: the same ``moves``, each inverted."""
    r = Remap(tensors, f"ditkit -> {source}")
    for m in moves:
        m.backward(r)
    return r.finish()


def check_heads(n_heads: int, d_model: int, presets: Mapping[int, int], family: str) -> None:
    """A head count the weights cannot confirm (qkv is ``(3 D, D)`` for any count): refuse one
    that does not divide the width, warn about one that differs from the preset of that width
    (a wrong count converts silently into a different model)."""
    if n_heads <= 0 or d_model % n_heads:
        hint = (
            f" (the width-{d_model} {family} preset has {presets[d_model]})"
            if d_model in presets
            else ""
        )
        raise ConversionInputError(
            f"--heads {n_heads} does not divide the width {d_model}; use a divisor{hint}"
        )
    if d_model in presets and presets[d_model] != n_heads:
        warnings.warn(
            f"--heads {n_heads} differs from the {presets[d_model]} heads of the "
            f"width-{d_model} {family} preset: the weights load either way, but the "
            "model computes something else; check the source's configuration",
            stacklevel=3,
        )


def expected_shapes(spec: S.ModelSpec) -> dict[str, tuple[int, ...]]:
    """The ditkit ``state_dict()`` names and shapes of ``spec`` (built on the meta device: free
    for any size)."""

    model = build(spec, device="meta", init=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
