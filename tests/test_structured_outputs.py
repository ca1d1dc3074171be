"""Grammar-constrained decoding on the default model: whatever a 135M model would rather write, the output
parses and validates (JSON Schema checked by jsonschema, regexes by re), with n > 1, under preemption, with
stop strings, max_tokens and logprobs; through the engine and through the server with the openai client."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import xgrammar as xgr
from pydantic import BaseModel

from engine import LLM, SamplingParams
from engine.structured_output import StructuredOutputsParams
from engine.structured_output.xgrammar_backend import grammar_of
from server_fixtures import Server, leaves_server_idle, openai_client, running_server  # noqa: F401 (autouse fixture)

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "address", "tags"]}
# Asked for a small object: with any JSON allowed, a 135M model asked for a whole person nests on and on.
ASK = [{"role": "user", "content": 'What is the capital of France? Answer in JSON with the key "answer".'}]
PHONE = r"[0-9]{3}-[0-9]{4}"


@pytest.fixture(scope="module")
def llm() -> LLM:
    # A small KV cache: the preemption test fills it.
    return LLM(dtype="float32", max_model_len=512, num_gpu_blocks_override=24)


def generate(llm: LLM, constraint: StructuredOutputsParams, **kwargs) -> list:
    params = SamplingParams(**{"temperature": 0.7, "seed": 7, "max_tokens": 120} | kwargs, structured_outputs=constraint)
    return llm.chat(ASK, params, use_tqdm=False)[0].outputs


def test_json_schema_output_validates_for_every_choice(llm):
    choices = generate(llm, StructuredOutputsParams(json=PERSON), n=3)
    assert len({c.text for c in choices}) > 1, "the choices sample independently"
    for choice in choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), PERSON)


@pytest.mark.parametrize(("constraint", "accepts"), [
    (StructuredOutputsParams(regex=PHONE), lambda text: re.fullmatch(PHONE, text)),
    (StructuredOutputsParams(choice=["Paris", "Lyon", "Marseille"]), lambda text: text in ("Paris", "Lyon", "Marseille")),
    (StructuredOutputsParams(grammar='root ::= ("yes" | "no") " because " [a-z ]{1,20} "."'),
     lambda text: re.fullmatch(r"(yes|no) because [a-z ]{1,20}\.", text)),
    (StructuredOutputsParams(json_object=True), lambda text: isinstance(json.loads(text), dict)),
], ids=["regex", "choice", "ebnf", "json_object"])
def test_regex_choice_grammar_and_json_object_outputs_match(llm, constraint, accepts):
    for choice in generate(llm, constraint, n=2):
        assert choice.finish_reason == "stop" and accepts(choice.text), choice.text


def test_json_object_takes_objects_only():
    # OpenAI's JSON mode promises an object: the grammar itself must refuse a top-level array or scalar, whatever
    # a sample happens to write.
    grammar = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_grammar(
        grammar_of(StructuredOutputsParams(json_object=True)))
    for text, accepted in [('{"a": [1, {"b": null}]}', True), ("{ }", True), ("[1, 2]", False), ('"a"', False)]:
        matcher = xgr.GrammarMatcher(grammar)
        assert (matcher.accept_string(text) and matcher.is_completed()) == accepted, text


def test_constrained_requests_survive_preemption(llm):
    """Eight requests in a 24-block cache: some are preempted and recomputed; their matchers carry on."""
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=60, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=PERSON))
    before = llm.engine.scheduler.num_preemptions
    outputs = llm.chat([ASK] * 8, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > before, "the cache was meant to run out"
    for out in outputs:
        [choice] = out.outputs
        if choice.finish_reason == "stop":  # complete: the grammar ended it, even with ignore_eos
            jsonschema.validate(json.loads(choice.text), PERSON)
        else:  # cut by max_tokens: a prefix of valid JSON, so never parseable yet
            assert choice.finish_reason == "length" and len(choice.token_ids) == 60


def test_max_tokens_cuts_the_output_with_length_and_logprobs_follow_the_mask(llm):
    [choice] = generate(llm, StructuredOutputsParams(json=PERSON), max_tokens=5, logprobs=2)
    assert choice.finish_reason == "length" and len(choice.token_ids) == 5
    assert choice.text.startswith('{"name"')  # the grammar's only way to start
    assert all(token in entry for token, entry in zip(choice.token_ids, choice.logprobs))


def test_a_stop_string_ends_a_constrained_output(llm):
    [choice] = generate(llm, StructuredOutputsParams(json=PERSON), stop=['"age"'])
    assert choice.finish_reason == "stop" and choice.text.startswith('{"name"') and '"age"' not in choice.text


class Address(BaseModel):
    city: str
    zip: str


class Person(BaseModel):
    name: str
    age: int
    address: Address


@pytest.fixture(scope="module")
def server() -> Server:
    with running_server("--max-model-len", "1024") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai_client(server)


def test_openai_parse_returns_a_validated_pydantic_object(client):
    completion = client.chat.completions.parse(model="SmolLM2-135M-Instruct", messages=ASK, response_format=Person,
                                               max_tokens=200, temperature=0.7)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop" and isinstance(message.parsed, Person), message.content


def test_streamed_json_schema_output_concatenates_to_valid_json(client):
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=200, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_take_response_format_and_vllm_structured_outputs(client):
    # A sampled object can still be open when max_tokens runs out (finish_reason "length"; greedy loops): of 8
    # choices, those that stop are whole objects, and some stop.
    json_object = client.completions.create(model="SmolLM2-135M-Instruct", prompt='The capital of France, as JSON: ',
                                            max_tokens=100, n=8, seed=0,
                                            extra_body={"response_format": {"type": "json_object"}})
    stopped = [choice.text for choice in json_object.choices if choice.finish_reason == "stop"]
    assert stopped and all(isinstance(json.loads(text), dict) for text in stopped)
    assert all(choice.text.lstrip().startswith("{") for choice in json_object.choices)
    phone = client.completions.create(model="SmolLM2-135M-Instruct", prompt="My phone number is", max_tokens=20,
                                      extra_body={"structured_outputs": {"regex": PHONE}})
    assert re.fullmatch(PHONE, phone.choices[0].text)
    choice = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=10,
                                            extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}),
    ("response_format", {"type": "xml"}),
    ("structured_outputs", {"regex": "[a-"}),
    ("structured_outputs", {"grammar": "root ::= undefined_rule"}),
    ("structured_outputs", {"regex": "a", "choice": ["b"]}),
    ("guided_choice", []),
])
def test_an_invalid_constraint_is_a_400_naming_its_field(server, field, value):
    response = server.post("/v1/chat/completions", {"messages": ASK, field: value})
    assert response.status == 400, response.body
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(field)
