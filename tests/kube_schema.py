"""Custom resources checked offline as the Kubernetes API server checks them on `kubectl apply`:
against their CRD's structural schema (an openAPIV3Schema vendored under tests/schemas/, see its
README) and against Kubernetes' naming rules for metadata. jsonschema evaluates the schema's OpenAPI
keywords (draft 4); this module adds what Kubernetes layers on top of them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators

SCHEMAS = Path(__file__).resolve().parent / "schemas"
Schema = dict[str, Any]

# Keywords that never make an object invalid: documentation, defaults (only `required` reads them,
# below) and how server-side apply merges a map.
ANNOTATIONS = {"description", "default", "example", "x-kubernetes-map-type"}
EXTENSIONS = {
    "nullable",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
}
_DRAFT4 = Draft4Validator.VALIDATORS

FORMATS = FormatChecker(formats=())
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


# The controllers decode these into Go's int32 and int64: a value out of range is not an object
# they can read, whatever the API server stored.
@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@FORMATS.checks("date-time")
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or RFC3339.fullmatch(value) is not None


def _known_fields(schema: Schema) -> set[str] | None:
    """The fields an object keeps (None: any). Kubernetes prunes the others, and `kubectl apply`
    (strict field validation by default) refuses them: a misspelt field is an error."""
    if "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields"):
        return None
    return set(schema.get("properties", {}))


def _type(validator: Any, types: Any, instance: Any, schema: Schema) -> Iterator[ValidationError]:
    # A null is kept only where the schema says `nullable`. Elsewhere the API server drops it; in a
    # file of ours it is a slip (a key left without its value), so it counts as an error.
    if instance is None and schema.get("nullable"):
        return
    yield from _DRAFT4["type"](validator, types, instance, schema)
    known = _known_fields(schema)
    if types == "object" and isinstance(instance, dict) and known is not None:
        for name in sorted(set(instance) - known):
            yield ValidationError(f"unknown field {name!r}")


def _required(validator: Any, required: list[str], instance: Any, schema: Schema) -> Iterator[ValidationError]:
    # Defaults are applied before validation: a required field with a default is never missing.
    properties = schema.get("properties", {})
    missing_ok = [name for name in required if "default" not in properties.get(name, {})]
    yield from _DRAFT4["required"](validator, missing_ok, instance, schema)


def _int_or_string(validator: Any, enabled: bool, instance: Any, schema: Schema) -> Iterator[ValidationError]:
    if enabled and not (validator.is_type(instance, "integer") or validator.is_type(instance, "string")):
        yield ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator: Any, list_type: str, instance: Any, schema: Schema) -> Iterator[ValidationError]:
    """`set`: no item twice. `map`: no two items with the same values of the map keys, defaults
    filled in (a port without `protocol` is TCP). `atomic`: no rule."""
    if not isinstance(instance, list) or list_type == "atomic":
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        fields = schema["items"].get("properties", {})
        names = schema["x-kubernetes-list-map-keys"]
        keys = [
            json.dumps({n: item.get(n, fields.get(n, {}).get("default")) for n in names})
            for item in instance
            if isinstance(item, dict)
        ]
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        yield ValidationError(f"duplicate entries for {key} in a list of type {list_type!r}")


KubeValidator = validators.extend(
    Draft4Validator,
    {
        "type": _type,
        "required": _required,
        "x-kubernetes-int-or-string": _int_or_string,
        "x-kubernetes-list-type": _list_type,
    },
)


def subschemas(schema: Schema) -> Iterator[Schema]:
    """Every schema node, the root included."""
    yield schema
    children = [*schema.get("properties", {}).values(), *schema.get("anyOf", []), *schema.get("allOf", [])]
    children += [schema[k] for k in ("items", "additionalProperties", "not") if isinstance(schema.get(k), dict)]
    for child in children:
        yield from subschemas(child)


def unevaluated(schema: Schema) -> set[str]:
    """Keywords of `schema` nothing here evaluates (CEL rules, unknown formats...): a schema with
    any would be checked only in part."""
    known = set(_DRAFT4) | EXTENSIONS | ANNOTATIONS
    nodes = list(subschemas(schema))
    formats = {n["format"] for n in nodes if "format" in n} - set(FORMATS.checkers)
    return {key for node in nodes for key in node} - known | {f"format: {f}" for f in formats}


@cache
def vendored() -> dict[tuple[str, str], dict[str, Any]]:
    """The vendored files by (apiVersion, kind): {"source": where from, "openAPIV3Schema": ...}."""
    docs = [json.loads(path.read_text()) for path in sorted(SCHEMAS.glob("*.json"))]
    return {(d["source"]["apiVersion"], d["source"]["kind"]): d for d in docs}


@cache
def _validator(api_version: str, kind: str) -> Any:
    schema = vendored()[api_version, kind]["openAPIV3Schema"]
    # The API server checks the root's ObjectMeta itself, with rules no schema holds: metadata_errors.
    root_meta = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    root = {**schema, "properties": {**schema["properties"], "metadata": root_meta}}
    return KubeValidator(root, format_checker=FORMATS)


def errors(doc: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse `doc`, one `where: what` line each."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in vendored():
        return [f"no vendored schema for {key} in {SCHEMAS}"]
    found = [f"{_where(e)}: {e.message}" for e in _validator(*key).iter_errors(doc)]
    return found + metadata_errors(doc.get("metadata"))


def _where(error: ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "."


# Kubernetes' naming rules (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}


def is_subdomain(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 253 and re.fullmatch(DNS1123_SUBDOMAIN, value) is not None


def is_qualified_name(key: object) -> bool:
    """A label or annotation key: an optional DNS subdomain and `/`, then a name of up to 63."""
    if not isinstance(key, str):
        return False
    prefix, slash, name = key.rpartition("/")
    return (not slash or is_subdomain(prefix)) and len(name) <= 63 and re.fullmatch(QUALIFIED_NAME, name) is not None


def is_label_value(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 63 and re.fullmatch(f"({QUALIFIED_NAME})?", value) is not None


def metadata_errors(meta: object) -> list[str]:
    if not isinstance(meta, dict):
        return [f"metadata: {meta!r} is not an object"]
    found = [f"metadata.{key}: not an ObjectMeta field" for key in sorted(set(meta) - OBJECT_META)]
    if not is_subdomain(meta.get("name")):
        found.append(f"metadata.name: {meta.get('name')!r} is not a DNS-1123 subdomain")
    if "namespace" in meta and not re.fullmatch(DNS1123_LABEL, str(meta["namespace"])):
        found.append(f"metadata.namespace: {meta['namespace']!r} is not a DNS-1123 label")
    for key, value in (meta.get("labels") or {}).items():
        if not (is_qualified_name(key) and is_label_value(value)):
            found.append(f"metadata.labels: {key!r}: {value!r} is not a label (a qualified name, a string value)")
    for key, value in (meta.get("annotations") or {}).items():
        if not (is_qualified_name(key) and isinstance(value, str)):
            found.append(f"metadata.annotations: {key!r}: {value!r} is not an annotation (a qualified name, a string)")
    return found
