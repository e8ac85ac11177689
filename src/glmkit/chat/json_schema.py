"""JSON Schemas from clients and tool files (response_format, tool parameters), checked and
applied without any network access.

jsonschema resolves a `$ref` it does not hold by fetching it (urlopen, no timeout), so a
client's schema could make the server connect anywhere and hang.  Every validator made here
gets a registry that refuses to retrieve anything: only references inside the schema itself
(`#/$defs/x`, anchors, relative to any `$id`) and the standard meta-schemas resolve.

`check_schema` refuses up front a schema that is too large or deep, malformed, holds a
reference that does not resolve locally, or whose references expand to too many subschemas
(a few `$ref`s to `$ref`s make validation exponential).  Checking against the 2020-12
meta-schema costs jsonschema about 0.25 ms per subschema, hence the bound on containers (which
callers share across the schemas of one request) and the cache: agents resend the same tools
with every turn."""

from __future__ import annotations

import functools
import json
import math

import jsonschema
from jsonschema_specifications import REGISTRY as _SPECIFICATIONS
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT202012

from ..errors import GlmkitError

MAX_SCHEMA_BYTES = 64 * 1024    # compact JSON; real tool and response schemas are a few KiB
MAX_DEPTH = 32                  # nesting of JSON containers (tool-call arguments have the same bound)
MAX_CONTAINERS = 2048           # JSON objects and arrays: bounds the meta-schema check (~0.5 s)
MAX_EXPANDED = 10_000           # subschemas with every $ref followed (a recursive one counted once)


class SchemaRefused(GlmkitError):
    """A schema the server will not use; the message says why (safe to show the client)."""


def _no_retrieval(uri: str):
    raise NoSuchResource(ref=uri)


_REGISTRY = Registry(retrieve=_no_retrieval)
_LOCAL = _SPECIFICATIONS.combine(_REGISTRY)   # what a validator resolves against (jsonschema adds the same)


def containers(value, limit: int = MAX_DEPTH) -> int:
    """How many objects and arrays a JSON value holds (iterative; ValueError past `limit` levels)."""
    n, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                raise ValueError(f"nested deeper than {limit} levels")
            n += 1
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return n


def loads_bounded(text: str, limit: int = MAX_DEPTH):
    """json.loads for client text: ValueError, never RecursionError or a non-finite number."""
    def finite(s):
        if not math.isfinite(f := float(s)):
            raise ValueError(f"number {s[:20]}… is out of range")
        return f

    def refuse(name):
        raise ValueError(f"{name} is not a JSON number")
    try:
        value = json.loads(text, parse_float=finite, parse_constant=refuse)
    except RecursionError:
        raise ValueError(f"nested deeper than {limit} levels") from None
    containers(value, limit)
    return value


def _validator_class(schema):
    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        raise SchemaRefused("$schema must be a string")
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)


def check_schema(schema, max_containers: int = MAX_CONTAINERS) -> int:
    """SchemaRefused unless `schema` is a usable, bounded, self-contained JSON Schema; returns
    how many objects and arrays it holds (for a budget shared by several schemas)."""
    if not isinstance(schema, (dict, bool)):
        raise SchemaRefused("a JSON Schema must be an object")
    try:
        n = containers(schema)
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise SchemaRefused(f"schema is {e}" if "nested" in str(e) else "schema holds NaN or Infinity") from None
    if n > max_containers:
        raise SchemaRefused(f"schema holds more than {max_containers} objects and arrays" if
                            max_containers == MAX_CONTAINERS else "the request's schemas hold more than "
                            f"{MAX_CONTAINERS} objects and arrays in all")
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise SchemaRefused(f"schema is larger than {MAX_SCHEMA_BYTES} bytes of JSON")
    problem = _problem(text)
    if problem:
        raise SchemaRefused(problem)
    return n


@functools.lru_cache(maxsize=256)
def _problem(text: str) -> str | None:
    schema = json.loads(text)
    try:
        _validator_class(schema).check_schema(schema)
        _expanded_size(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(map(str, e.absolute_path))
        return f"schema is invalid{' at ' + where if where else ''}: {e.message}"
    except SchemaRefused as e:
        return str(e)
    return None


def _expanded_size(schema) -> int:
    root = Resource.from_contents(schema, default_specification=DRAFT202012)
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(resource, resolver) -> int:   # resolves as jsonschema's descend() and $ref do
        key = id(resource.contents)
        if key in memo:
            return memo[key]
        if key in active:      # recursion: validation follows it only as deep as the value goes
            return 1
        active.add(key)
        n, c = 1, resource.contents
        for kw in ("$ref", "$dynamicRef", "$recursiveRef"):
            ref = c.get(kw) if isinstance(c, dict) else None
            if isinstance(ref, str):
                try:
                    target = resolver.lookup(ref)
                except Unresolvable:
                    raise SchemaRefused(f"{kw} {ref[:200]!r} does not resolve inside the schema (references "
                                        "are local only, e.g. '#/$defs/name'; nothing is fetched)") from None
                n += size(Resource.from_contents(target.contents, default_specification=DRAFT202012),
                          target.resolver)
        for sub in resource.subresources():
            n += size(sub, resolver.in_subresource(sub))
            if n > MAX_EXPANDED:
                raise SchemaRefused(f"schema expands to more than {MAX_EXPANDED} subschemas through its $refs")
        active.discard(key)
        memo[key] = n
        return n
    try:
        return size(root, _LOCAL.resolver_with_root(root))
    except RecursionError:
        raise SchemaRefused("schema's $refs chain too deeply") from None


def validate(value, schema) -> None:
    """jsonschema.ValidationError naming the first problem; SchemaRefused if the schema is unusable."""
    check_schema(schema)
    try:
        error = jsonschema.exceptions.best_match(
            _validator_class(schema)(schema, registry=_REGISTRY).iter_errors(value))
    except Unresolvable as e:   # not after check_schema; kept so no schema can reach the network
        raise SchemaRefused(f"schema reference {getattr(e, 'ref', '')!r} does not resolve locally") from None
    if error is not None:
        raise error
