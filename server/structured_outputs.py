"""The request fields that constrain the output to a grammar, to the engine's StructuredOutputsParams: OpenAI's
`response_format` (json_object, json_schema; text is no constraint) and vLLM's `structured_outputs` (json,
json_object, regex, choice, grammar) and its older `guided_json`, `guided_regex`, `guided_choice` and
`guided_grammar`; and the Responses API's `text.format`. Each is checked here, so an invalid schema, regex or
grammar is a 400 naming its field before anything is scheduled."""
from __future__ import annotations

from collections.abc import Callable

from engine.structured_output import StructuredOutputsParams, check
from server.errors import bad_request

FIELDS: dict[str, tuple[type, ...]] = {"response_format": (dict,), "structured_outputs": (dict,),
                                       "guided_json": (dict, str), "guided_regex": (str,), "guided_choice": (list,),
                                       "guided_grammar": (str,)}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_OUTPUTS_KEYS = frozenset({"json", "json_object", "regex", "choice", "grammar"})


def constraint_fields(body: dict) -> list[str]:
    """The fields of the request that constrain its output."""
    return [name for name in FIELDS if body.get(name) is not None and body.get(name) != {"type": "text"}]


def structured_outputs(body: dict) -> StructuredOutputsParams | None:
    given = constraint_fields(body)
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"{' and '.join(given)} each constrain the output: send one", param=given[1])
    field = given[0]
    return _checked(field, lambda: _parse(field, body[field]))


def text_format(value: object) -> StructuredOutputsParams | None:
    """The Responses API's `text.format`: response_format's types, with json_schema's name, schema and strict
    beside its type rather than under a json_schema key."""
    if value is None or value == {"type": "text"}:
        return None
    if not isinstance(value, dict):
        raise bad_request("text.format must be an object", param="text.format")
    if value.get("type") == "json_schema":
        value = {"type": "json_schema", "json_schema": {k: v for k, v in value.items() if k != "type"}}
    return _checked("text.format", lambda: _response_format(value))


def _checked(field: str, parse: Callable[[], StructuredOutputsParams]) -> StructuredOutputsParams:
    """What parse returns, once the backend accepts it; any ValueError is a 400 on field."""
    try:
        params = parse()
        check(params)
    except ValueError as e:
        raise bad_request(f"{field}: {e}", param=field) from None
    return params


def _parse(field: str, value: object) -> StructuredOutputsParams:
    if field == "response_format":
        return _response_format(value)
    if field == "structured_outputs":
        unknown = sorted(set(value) - _STRUCTURED_OUTPUTS_KEYS)
        if unknown:
            raise ValueError(f"{', '.join(unknown)} not supported (supported: {', '.join(sorted(_STRUCTURED_OUTPUTS_KEYS))})")
        return StructuredOutputsParams(**value)
    return StructuredOutputsParams(**{_GUIDED[field]: value})


def _response_format(value: dict) -> StructuredOutputsParams:
    """OpenAI's shapes: {"type": "json_object"} and {"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}. Whether strict or not, the schema is enforced: a grammar cannot follow a schema loosely."""
    kind = value.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise ValueError(f"type must be text, json_object or json_schema, got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError("json_schema must be an object with a name (and a schema)")
    schema = spec.get("schema")
    if schema is None:  # OpenAI allows it absent: any JSON object
        return StructuredOutputsParams(json_object=True)
    if not isinstance(schema, dict):
        raise ValueError("json_schema.schema must be a JSON Schema object")
    return StructuredOutputsParams(json=schema)
