"""The fast decoder of `SampleBatch` messages, generated from the pydantic models.

`schema/messages.py` stays the only definition of a message: the msgspec structs
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
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gpuledger.schema.messages import (
    CONTROL_CHARACTERS,
    LABEL_MAX_CHARS,
    GpuSample,
    SampleBatch,
    normalise_label,
)

# Validator functions of the models, as the msgspec constraints of the values they leave
# unchanged: the fast path takes only those, and pydantic normalises (and counts) the rest.
# A model with a validator not listed here cannot be mirrored: generation fails at import.
# msgspec matches patterns with Python's `re.search`, whose `$` also matches before a final
# newline: `\Z` is the end of the string.
_MIRRORED_FUNCTIONS: dict[Any, msgspec.Meta] = {
    normalise_label: msgspec.Meta(
        max_length=LABEL_MAX_CHARS, pattern=f"^[^{CONTROL_CHARACTERS}]*\\Z"
    ),
}

_INT64_MAX = 2**63 - 1

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


def _meta(
    owner: str, constraints: list[Any], *, finite: bool = False, patterns: bool = True
) -> msgspec.Meta | None:
    """The msgspec constraints of pydantic's; `finite`: a float, bounded when not already;
    `patterns`: False leaves out the patterns of mirrored functions (`_plain_enough`)."""
    bounds: dict[str, Any] = {}
    for constraint in constraints:
        if isinstance(constraint, AfterValidator) and constraint.func in _MIRRORED_FUNCTIONS:
            mirrored = _MIRRORED_FUNCTIONS[constraint.func]
            bounds["max_length"] = mirrored.max_length
            if patterns:
                bounds["pattern"] = mirrored.pattern
            continue
        name = _CONSTRAINTS.get(type(constraint))
        if name is None:
            raise MirrorError(
                f"{owner}: constraint {constraint!r} has no msgspec equivalent; "
                "teach streams/decode.py to mirror it"
            )
        value = getattr(constraint, name)
        if isinstance(value, int) and value > _INT64_MAX:
            value = _INT64_MAX  # msgspec's bounds are int64: stricter, pydantic takes the rest
        bounds[name] = value
    if finite:
        if "ge" not in bounds and "gt" not in bounds:
            bounds["ge"] = -sys.float_info.max
        if "le" not in bounds and "lt" not in bounds:
            bounds["le"] = sys.float_info.max
    return msgspec.Meta(**bounds) if bounds else None


def _constrained(tp: Any, meta: msgspec.Meta | None) -> Any:
    return tp if meta is None else Annotated[tp, meta]


class _Generator:
    def __init__(self, *, patterns: bool = True, suffix: str = "Struct") -> None:
        self.structs: dict[type[BaseModel], type[msgspec.Struct]] = {}
        self.patterns = patterns
        self.suffix = suffix

    def translate(self, owner: str, tp: Any, *, finite: bool = True) -> Any:
        """The msgspec type that decodes what pydantic's `tp` validates (or less)."""
        if tp is float and finite:
            # `allow_inf_nan=False`: msgspec refuses NaN and Infinity as JSON already, and
            # reads 1e999 as out of these bounds.
            return _constrained(float, _meta(owner, [], finite=True))
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
            if inner is float:
                return _constrained(float, _meta(owner, constraints, finite=finite))
            return _constrained(
                self.translate(owner, inner, finite=finite),
                _meta(owner, constraints, patterns=self.patterns),
            )
        if origin in (Union, types.UnionType):
            translated = tuple(self.translate(owner, a, finite=finite) for a in args)
            return Union[translated]  # noqa: UP007 (a runtime-built union)
        if origin is list:
            return list[self.translate(owner, args[0], finite=finite)]  # type: ignore[misc]
        if origin is dict:
            key, value = (self.translate(owner, a, finite=finite) for a in args)
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
        finite = config.get("allow_inf_nan", True) is False
        decorators = model.__pydantic_decorators__
        validators = [
            *decorators.model_validators,
            *decorators.validators,
            *decorators.root_validators,
            *decorators.field_validators,
        ]
        if validators:
            raise MirrorError(
                f"{model.__name__}: validators {', '.join(validators)} cannot be mirrored; "
                "write the rule as a constraint, or an AfterValidator in _MIRRORED_FUNCTIONS"
            )
        fields: list[tuple[str, Any, Any]] = []
        for name, info in model.model_fields.items():
            owner = f"{model.__name__}.{name}"
            if info.alias not in (None, name) or info.validation_alias is not None:
                raise MirrorError(f"{owner}: aliases are not mirrored")
            if overrides and name in overrides:
                tp = overrides[name]
            else:
                annotation: Any = info.annotation
                if info.metadata:
                    annotation = Annotated[(annotation, *info.metadata)]
                tp = self.translate(owner, annotation, finite=finite)
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
            f"{model.__name__}{self.suffix}",
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


# Two mirrors: the checked one has every constraint; the plain one all but the patterns,
# which only refuse control characters (`_plain_enough` says when none can be there: the
# patterns cost a third of the decoding). Both decode into the same values.
_generator = _Generator(patterns=False)
_checked = _Generator(suffix="CheckedStruct")

GpuSampleStruct = _generator.struct(GpuSample)
"""`GpuSample` as a msgspec struct: the same attributes, validated the same way (or stricter)."""

SampleBatchStruct = _generator.struct(
    SampleBatch,
    overrides={"samples": list[GpuSampleStruct]},  # type: ignore[valid-type]
)
"""`SampleBatch` whose samples are decoded too: any bad sample fails the whole fast decode."""

_GpuSampleChecked = _checked.struct(GpuSample)
_SampleBatchChecked = _checked.struct(
    SampleBatch,
    overrides={"samples": list[_GpuSampleChecked]},  # type: ignore[valid-type]
)


def _plain_enough(value: bytes) -> bool:
    """True when no string of this JSON can hold a control character, so the patterns
    cannot refuse it. JSON has no raw C0 characters in strings (msgspec refuses them), so
    one arrives only escaped (a backslash), as a raw DEL, or as a raw C1 character (UTF-8
    lead byte 0xC2)."""
    return b"\\" not in value and b"\x7f" not in value and b"\xc2" not in value


class SampleDecoder:
    """Decodes `SampleBatch` message values on the fast path."""

    def __init__(self) -> None:
        self._batch = msgspec.json.Decoder(SampleBatchStruct)
        self._checked = msgspec.json.Decoder(_SampleBatchChecked)
        self._sample = msgspec.json.Decoder(GpuSampleStruct)
        self._sample_checked = msgspec.json.Decoder(_GpuSampleChecked)

    def decode(self, value: bytes | None) -> list[Any] | None:
        """The samples (`GpuSampleStruct`s) of a valid message; None: ask pydantic."""
        if value is None:
            return None
        try:
            if not _plain_enough(value):
                # The checked mirror decides; the plain one gives the same values, typed
                # as every other message's.
                self._checked.decode(value)
            batch = self._batch.decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        samples: list[Any] = batch.samples  # type: ignore[attr-defined]
        return samples

    def decode_sample(self, value: bytes) -> Any | None:
        """One sample's JSON (as `sample_payloads` writes it) as a `GpuSampleStruct`;
        None: ask pydantic."""
        try:
            if not _plain_enough(value):
                self._sample_checked.decode(value)
            return self._sample.decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None


_encoder = msgspec.json.Encoder()


def sample_payloads(samples: Sequence[Any]) -> list[bytes]:
    """Each sample as the JSON of a `GpuSample`, every field written (what `samples_raw`
    keeps): msgspec writes a decoded struct, pydantic a `GpuSample`."""
    return [
        _encoder.encode(s) if type(s) is GpuSampleStruct else s.model_dump_json().encode()
        for s in samples
    ]
