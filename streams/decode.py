"""The fast decoder of `SampleBatch` messages, generated from the pydantic models.

`schema/messages.py` stays the only definition of a message (STYLE.md): the msgspec structs
here are built from the pydantic models' fields at import (types, constraints, defaults,
frozen), so a field added there is decoded here without an edit. Decoding straight into
structs costs about a tenth of `SampleBatch.model_validate_json` followed by
`GpuSample.model_validate` per sample, which was the worker's largest cost.

The fast path only ever says yes or "ask pydantic": `SampleDecoder.decode` returns the samples
of a message when every part of it is valid, and None otherwise; the worker then takes the
pydantic path, which dead-letters exactly what it always did (the bad samples of a batch with
their reasons, or the whole message). Whatever msgspec accepts, pydantic accepts with the same
values (tests/unit/test_decode.py checks it with hypothesis); msgspec is the stricter of the
two (no strings for numbers, no 3.0 for an int), and anything only pydantic accepts goes
through pydantic.

A decoded sample is a frozen struct with the attributes of `GpuSample`, which is all the cost
model and the joiner read of a sample.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import msgspec
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from schema.messages import GpuSample, SampleBatch

# Field validators of the models that the structs mirror, as msgspec constraints. A model
# with a validator not listed here cannot be mirrored: generation fails, loudly, at import.
# `Message._finite_ts`: ts must be finite and >= 0 (NaN fails both bounds).
_MIRRORED_VALIDATORS: dict[str, msgspec.Meta] = {
    "_finite_ts": msgspec.Meta(ge=0.0, le=sys.float_info.max),
}

_CONSTRAINTS: dict[type, str] = {
    annotated_types.Ge: "ge",
    annotated_types.Gt: "gt",
    annotated_types.Le: "le",
    annotated_types.Lt: "lt",
    annotated_types.MinLen: "min_length",
    annotated_types.MaxLen: "max_length",
}


class MirrorError(TypeError):
    """A pydantic model uses something the generated struct cannot mirror exactly."""


def _meta(owner: str, constraints: list[Any]) -> msgspec.Meta | None:
    bounds: dict[str, Any] = {}
    for constraint in constraints:
        name = _CONSTRAINTS.get(type(constraint))
        if name is None:
            raise MirrorError(
                f"{owner}: constraint {constraint!r} has no msgspec equivalent; "
                "teach streams/decode.py to mirror it"
            )
        bounds[name] = getattr(constraint, name)
    return msgspec.Meta(**bounds) if bounds else None


def _constrained(tp: Any, meta: msgspec.Meta | None) -> Any:
    return tp if meta is None else Annotated[tp, meta]


class _Generator:
    def __init__(self) -> None:
        self.structs: dict[type[BaseModel], type[msgspec.Struct]] = {}

    def translate(self, owner: str, tp: Any) -> Any:
        """The msgspec type that decodes what pydantic's `tp` validates (or less)."""
        if tp is Any or tp in (str, int, float, bool, type(None)):
            return tp
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self.struct(tp)
        if isinstance(tp, type) and issubclass(tp, Enum):
            return tp
        origin = get_origin(tp)
        args = get_args(tp)
        if origin is Literal:
            return tp
        if origin is Annotated:
            inner, *extra = args
            constraints: list[Any] = []
            for item in extra:
                if isinstance(item, FieldInfo):
                    constraints.extend(item.metadata)
                else:
                    constraints.append(item)
            return _constrained(self.translate(owner, inner), _meta(owner, constraints))
        if origin in (Union, types.UnionType):
            translated = tuple(self.translate(owner, a) for a in args)
            return Union[translated]  # noqa: UP007 (a runtime-built union)
        if origin is list:
            return list[self.translate(owner, args[0])]  # type: ignore[misc]
        if origin is dict:
            key, value = (self.translate(owner, a) for a in args)
            return dict[key, value]  # type: ignore[valid-type]
        raise MirrorError(f"{owner}: type {tp!r} has no msgspec mirror in streams/decode.py")

    def struct(
        self, model: type[BaseModel], overrides: dict[str, Any] | None = None
    ) -> type[msgspec.Struct]:
        """The frozen struct that decodes `model`'s JSON (memoised per model)."""
        if overrides is None and model in self.structs:
            return self.structs[model]
        config = model.model_config
        if config.get("extra", "ignore") != "ignore" or config.get("strict"):
            raise MirrorError(f"{model.__name__}: only extra='ignore', lax models are mirrored")
        decorators = model.__pydantic_decorators__
        if decorators.model_validators or decorators.validators or decorators.root_validators:
            raise MirrorError(f"{model.__name__}: model validators cannot be mirrored")
        extra_meta: dict[str, list[msgspec.Meta]] = {}
        for name, decorator in decorators.field_validators.items():
            if name not in _MIRRORED_VALIDATORS:
                raise MirrorError(
                    f"{model.__name__}: field validator {name} is not mirrored; add its "
                    "msgspec equivalent to _MIRRORED_VALIDATORS in streams/decode.py"
                )
            for field_name in decorator.info.fields:
                if field_name in model.model_fields:
                    extra_meta.setdefault(field_name, []).append(_MIRRORED_VALIDATORS[name])
        fields: list[tuple[str, Any, Any]] = []
        for name, info in model.model_fields.items():
            owner = f"{model.__name__}.{name}"
            if info.alias not in (None, name) or info.validation_alias is not None:
                raise MirrorError(f"{owner}: aliases are not mirrored")
            if overrides and name in overrides:
                tp = overrides[name]
            else:
                tp = _constrained(
                    self.translate(owner, info.annotation), _meta(owner, info.metadata)
                )
            for meta in extra_meta.get(name, ()):
                tp = Annotated[tp, meta]
            if info.default_factory is not None:
                if info.default_factory_takes_validated_data:
                    raise MirrorError(f"{owner}: a default factory of the data is not mirrored")
                factory: Any = info.default_factory
                fields.append((name, tp, msgspec.field(default_factory=factory)))
            elif info.default is PydanticUndefined:
                fields.append((name, tp, msgspec.NODEFAULT))
            else:
                fields.append((name, tp, self._default(owner, info.default)))
        struct = msgspec.defstruct(
            f"{model.__name__}Struct",
            [(n, t) if d is msgspec.NODEFAULT else (n, t, d) for n, t, d in fields],
            frozen=True,
            kw_only=True,  # pydantic allows a required field after a defaulted one
            gc=False,  # no cycles: keeps a batch's thousands of objects out of the collector
            module=__name__,
        )
        if overrides is None:
            self.structs[model] = struct
        return struct

    def _default(self, owner: str, value: Any) -> Any:
        if isinstance(value, BaseModel):
            return self.struct(type(value))(**value.model_dump())
        if isinstance(value, list):
            if value:
                raise MirrorError(f"{owner}: a non-empty list default is not mirrored")
            return msgspec.field(default_factory=list)
        return value


_generator = _Generator()

GpuSampleStruct = _generator.struct(GpuSample)
"""`GpuSample` as a msgspec struct: the same attributes, validated the same way (or stricter)."""

SampleBatchStruct = _generator.struct(
    SampleBatch,
    overrides={"samples": list[GpuSampleStruct]},  # type: ignore[valid-type]
)
"""`SampleBatch` whose samples are decoded too: any bad sample fails the whole fast decode."""


class SampleDecoder:
    """Decodes `SampleBatch` message values on the fast path."""

    def __init__(self) -> None:
        self._batch = msgspec.json.Decoder(SampleBatchStruct)

    def decode(self, value: bytes | None) -> list[Any] | None:
        """The samples (`GpuSampleStruct`s) of a valid message; None: ask pydantic."""
        if value is None:
            return None
        try:
            batch = self._batch.decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        samples: list[Any] = batch.samples  # type: ignore[attr-defined]
        return samples


_encoder = msgspec.json.Encoder()


def sample_payloads(samples: Sequence[Any]) -> list[bytes]:
    """Each sample as the JSON of a `GpuSample`, every field written (what `samples_raw`
    keeps): msgspec writes a decoded struct, pydantic a `GpuSample`."""
    return [
        _encoder.encode(s) if type(s) is GpuSampleStruct else s.model_dump_json().encode()
        for s in samples
    ]
