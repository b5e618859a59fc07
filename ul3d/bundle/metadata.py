"""Validation of a MONAI bundle's ``configs/metadata.json``.

The rules of the MONAI Bundle specification (https://docs.monai.io/en/latest/mb_specification.html) are
written down as a JSON Schema in ``schema/metadata.schema.json`` (:data:`SCHEMA_PATH`), together with the
keys that every ul3d bundle writes although MONAI makes them optional (``changelog``,
``required_packages_version``). The rules a JSON Schema cannot express are checked here in Python:

* ``changelog`` has an entry for the current ``version``;
* an output whose ``format`` is ``"labels"`` or ``"classes"`` (one channel per class) has a ``channel_def``
  entry ``"0"`` .. ``"N-1"`` for each of its ``num_channels`` channels; a ``"segmentation"`` output names its
  classes: one ``channel_def`` entry per channel when it has several channels, at least one entry (the label
  values) when it is the specification's single-channel label map;
* ``value_range`` is ``[MIN, MAX]`` with ``MIN <= MAX``;
* every ``"image"`` output has as many spatial dimensions as every ``"image"`` input.

``metadata_errors`` lists every problem, one readable line each, naming the JSON path of the offending value;
``validate_metadata`` raises :class:`MetadataError` with all of them, naming the file.

``profile="monai"`` checks the plain MONAI rules only (no ``changelog`` / ``required_packages_version``
requirement), e.g. for bundles that ul3d did not write. Both profiles require ``modality`` for inputs only:
the specification lists it for every tensor, but its own example leaves it out of the outputs.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema

__all__ = ["PROFILES", "SCHEMA_PATH", "MetadataError", "load_schema", "metadata_errors", "validate_metadata"]

#: The JSON Schema file; shipped as package data (``ul3d.bundle = schema/*.json``).
SCHEMA_PATH: Path = Path(__file__).resolve().parent / "schema" / "metadata.schema.json"

#: ``"ul3d"``: the MONAI rules plus the keys every ul3d bundle writes; ``"monai"``: the MONAI rules only.
PROFILES = ("ul3d", "monai")

_ROOT = "<top level>"
_ONE_CHANNEL_PER_CLASS = ("labels", "classes")
_MAX_REPR = 80


class MetadataError(ValueError):
    """Invalid or unreadable bundle metadata; ``problems`` holds one line per problem."""

    def __init__(self, message: str, source: str | None = None, problems: Sequence[str] = ()):
        super().__init__(message)
        self.source = source
        self.problems = list(problems)


def load_schema() -> dict[str, Any]:
    """The schema as a dict (a fresh copy each call)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _validator(profile: str) -> jsonschema.Draft202012Validator:
    schema = load_schema()
    if profile == "monai":
        schema.pop("allOf")
        schema["$ref"] = "#/$defs/monai_metadata"
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _path(parts: Sequence[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or _ROOT


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _schema_message(error: jsonschema.ValidationError) -> str:
    """A one-line message: jsonschema's wording, with long values shortened and regexes explained."""
    kind, value, instance = error.validator, error.validator_value, error.instance
    described = error.schema.get("description") if isinstance(error.schema, dict) else None
    in_key = "propertyNames" in error.schema_path  # the instance is a key of the object at error's path
    subject = f"key {_short(instance)}" if in_key else _short(instance)
    if kind == "required":
        missing = error.message.removesuffix(" is a required property")
        return f"missing required key {missing}"
    if kind == "type":
        expected = " or ".join(repr(t) for t in value) if isinstance(value, list) else repr(value)
        return f"{subject} is not of type {expected}"
    if kind == "pattern":
        return f"{subject} is not valid: expected {described}" if described else f"{subject} does not match {value!r}"
    if kind in ("anyOf", "oneOf") and described:
        return f"{subject} is not valid: expected {described}"
    if kind == "minLength" and value == 1 and instance == "":
        return "must not be empty"
    message = error.message
    if in_key:
        message = f"key {message}"
    return message if len(message) <= 300 else message[:297] + "..."


def _tensors(meta: dict, group: str) -> dict:
    ndf = meta.get("network_data_format")
    tensors = ndf.get(group) if isinstance(ndf, dict) else None
    if not isinstance(tensors, dict):
        return {}
    return {name: t for name, t in tensors.items() if isinstance(t, dict)}


def _semantic_errors(meta: dict) -> list[tuple[str, str]]:
    """The cross-field rules; written to run on metadata that the schema has already found broken."""
    errors: list[tuple[str, str]] = []
    version, changelog = meta.get("version"), meta.get("changelog")
    if isinstance(version, str) and isinstance(changelog, dict) and version not in changelog:
        errors.append(("changelog", f"no entry for the current version {version!r}"))

    inputs, outputs = _tensors(meta, "inputs"), _tensors(meta, "outputs")
    for group, tensors in (("inputs", inputs), ("outputs", outputs)):
        for name, tensor in tensors.items():
            where = f"network_data_format.{group}.{name}"
            value_range = tensor.get("value_range")
            if (
                isinstance(value_range, list)
                and len(value_range) == 2
                and all(_is_number(v) for v in value_range)
                and value_range[0] > value_range[1]
            ):
                errors.append(
                    (f"{where}.value_range", f"minimum {value_range[0]!r} exceeds maximum {value_range[1]!r}")
                )

    for name, tensor in outputs.items():
        fmt, n, channel_def = tensor.get("format"), tensor.get("num_channels"), tensor.get("channel_def")
        if not isinstance(channel_def, dict) or not _is_int(n) or n < 1:
            continue  # the schema reports these
        where = f"network_data_format.outputs.{name}.channel_def"
        keys = sorted(channel_def, key=lambda k: (len(k), k))
        if fmt in _ONE_CHANNEL_PER_CLASS or (fmt == "segmentation" and n > 1):
            expected = [str(i) for i in range(n)]
            if keys != expected:
                errors.append(
                    (
                        where,
                        (
                            f"format {fmt!r} has one channel per class, so channel_def needs one entry per channel "
                            f"('0'..'{n - 1}', num_channels={n}); found {len(keys)}: {_short(keys)}"
                        ),
                    )
                )
        elif fmt == "segmentation" and not channel_def:
            errors.append(
                (where, "format 'segmentation' needs channel_def to name its classes (label values); found none")
            )

    for out_name, out in outputs.items():
        out_shape = out.get("spatial_shape")
        if out.get("type") != "image" or not isinstance(out_shape, list):
            continue
        for in_name, inp in inputs.items():
            in_shape = inp.get("spatial_shape")
            if inp.get("type") == "image" and isinstance(in_shape, list) and len(in_shape) != len(out_shape):
                errors.append(
                    (
                        f"network_data_format.outputs.{out_name}.spatial_shape",
                        (
                            f"{len(out_shape)} spatial dimensions {_short(out_shape)}, but input {in_name!r} has "
                            f"{len(in_shape)} {_short(in_shape)}"
                        ),
                    )
                )
    return errors


def metadata_errors(meta: Any, *, profile: str = "ul3d") -> list[str]:
    """Every problem with ``meta`` (a parsed metadata.json) as ``"json.path: message"`` lines; [] when valid."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    found = [(_path(error.absolute_path), _schema_message(error)) for error in _validator(profile).iter_errors(meta)]
    if isinstance(meta, dict):
        found += _semantic_errors(meta)
    unique = dict.fromkeys(found)  # drop repeats, keep order
    ordered = sorted(unique, key=lambda item: (item[0] != _ROOT, item[0]))
    return [f"{where}: {message}" for where, message in ordered]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load(path: Path, source: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{source}: cannot read bundle metadata: {exc}", source) from exc
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise MetadataError(f"{source}: bundle metadata is not valid JSON: {exc}", source) from exc


def validate_metadata(
    meta_or_path: dict | str | os.PathLike, name: str | None = None, *, profile: str = "ul3d"
) -> dict:
    """Validate bundle metadata: a dict, or the path of a metadata.json file.

    Args:
        meta_or_path: the parsed metadata, or a path to read it from (UTF-8 JSON; duplicate keys and
            NaN/Infinity are refused).
        name: what to call the metadata in messages; defaults to the path (a path given with a name is
            still named), or ``"metadata"`` for a dict.
        profile: ``"ul3d"`` (default) or ``"monai"``, see :data:`PROFILES`.

    Returns:
        the metadata dict.

    Raises:
        MetadataError: the file cannot be read or parsed, or the metadata breaks a rule; the message names the
            source and lists every problem, one per line.
    """
    if isinstance(meta_or_path, (str, os.PathLike)):
        path = Path(meta_or_path)
        source = f"{name} ({path})" if name else str(path)
        meta = _load(path, source)
    elif isinstance(meta_or_path, dict):
        source, meta = name or "metadata", meta_or_path
    else:
        raise TypeError(f"expected a metadata dict or a path, got {type(meta_or_path).__name__}")
    problems = metadata_errors(meta, profile=profile)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        lines = "\n".join(f"  {problem}" for problem in problems)
        raise MetadataError(f"{source}: invalid bundle metadata ({count}):\n{lines}", source, problems)
    return meta
