"""vLLM's extensions of the OpenAI API, through the official openai client (extra_body) and raw HTTP: prompt
logprobs against transformers' logits, echo with logprobs, token ids, vLLM's sampling extras, chat template
options, and the extra endpoints, with the shapes vLLM returns."""
from __future__ import annotations

import time

import openai
import pytest
import torch

from server_fixtures import Server, leaves_server_idle, openai_client, running_server  # noqa: F401 (autouse)

# ChatML without SmolLM2's default system prompt: served with --chat-template, so that what the server renders
# can only come from this file.
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPT = "The capital of France is Paris. The capital of Germany is"
LONG_PROMPT = PROMPT + " Berlin. The capital of Italy is Rome. The capital of Spain is"  # over one block and one step
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    template = tmp_path_factory.mktemp("template") / "chatml.jinja"
    template.write_text(TEMPLATE)
    # float32 to compare with transformers' logits; 16-token steps, so that prompts are prefilled in chunks.
    with running_server("--max-model-len", "512", "--dtype", "float32", "--max-num-batched-tokens", "16",
                        "--chat-template", str(template), "--trust-request-chat-template",
                        "--enable-server-load-tracking", "--enable-tokenizer-info-endpoint") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai_client(server)


def complete(client: openai.OpenAI, prompt: str | list[int] = PROMPT, **kwargs):
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("max_tokens", "temperature", "logprobs", "echo",
                                                                   "stop", "stream", "stream_options")}
    return client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, **kwargs, extra_body=extra)


def chat(client: openai.OpenAI, messages: list[dict] = MESSAGES, **kwargs):
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("max_tokens", "temperature", "logprobs",
                                                                   "top_logprobs", "stream", "stream_options")}
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, **kwargs, extra_body=extra)


def test_prompt_logprobs_match_transformers_across_prefill_chunks_and_skip_the_prefix_cache(client, hf_model,
                                                                                            tokenizer):
    ids = tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 16, "the prompt must span several prefill chunks"
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for attempt in range(2):  # the second time the prompt is in the prefix cache, which prompt logprobs must skip
        completion = complete(client, LONG_PROMPT, max_tokens=1, temperature=0, prompt_logprobs=2,
                              return_token_ids=True)
        [choice] = completion.choices
        assert choice.prompt_token_ids == ids
        assert completion.usage.prompt_tokens_details.cached_tokens == 0
        prompt_logprobs = choice.prompt_logprobs
        assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
        for position, token_id in enumerate(ids[1:], start=1):
            expected = reference[position - 1]
            entry = prompt_logprobs[position]
            assert next(iter(entry)) == str(token_id), "the prompt token comes first"
            own = entry[str(token_id)]
            assert own["logprob"] == pytest.approx(expected[token_id].item(), abs=1e-4)
            assert abs(own["rank"] - int((expected >= expected[token_id]).sum())) <= 2  # fp32 near-ties aside
            assert own["decoded_token"] == tokenizer.decode([token_id])
            assert {int(k) for k, v in entry.items() if v["rank"] <= 2} == set(expected.topk(2).indices.tolist())


def test_prompt_logprobs_are_null_unless_asked_and_minus_one_gives_the_whole_vocabulary(server, tokenizer):
    plain = server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}).json()
    assert "prompt_logprobs" in plain and plain["prompt_logprobs"] is None
    assert plain["prompt_token_ids"] is None and plain["choices"][0]["token_ids"] is None
    asked = server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert asked["prompt_logprobs"][0] is None and all(len(p) == 1 for p in asked["prompt_logprobs"][1:])
    whole = server.post("/v1/completions", {"prompt": "Hi there", "max_tokens": 1, "prompt_logprobs": -1}).json()
    [choice] = whole["choices"]
    assert choice["prompt_logprobs"][0] is None
    assert [len(p) for p in choice["prompt_logprobs"][1:]] == [len(tokenizer)] * (len(choice["prompt_logprobs"]) - 1)
    assert sorted(v["rank"] for v in choice["prompt_logprobs"][1].values()) == list(range(1, len(tokenizer) + 1))


def test_echo_with_logprobs_scores_the_prompt_tokens_first(client, tokenizer):
    completion = complete(client, echo=True, logprobs=0, return_token_ids=True, **GREEDY)
    [choice] = completion.choices
    ids = choice.prompt_token_ids + choice.token_ids
    logprobs = choice.logprobs
    assert choice.text == PROMPT + tokenizer.decode(choice.token_ids)
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    # logprobs=0: each position shows its own token only, its logprob as token_logprobs says (OpenAI: up to 1)
    assert [list(top.items()) for top in logprobs.top_logprobs[1:]] == [
        [pair] for pair in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:])]
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[len(choice.prompt_token_ids)] == len(PROMPT)
    prompt_scores = [p[str(t)]["logprob"] for p, t in zip(choice.prompt_logprobs[1:], choice.prompt_token_ids[1:])]
    assert logprobs.token_logprobs[1:len(choice.prompt_token_ids)] == pytest.approx(prompt_scores)


def test_streamed_echo_with_logprobs_matches_the_full_response(client):
    full = complete(client, echo=True, logprobs=1, **GREEDY).choices[0]
    chunks = list(complete(client, echo=True, logprobs=1, stream=True, **GREEDY))
    choices = [c for chunk in chunks for c in chunk.choices]
    assert "".join(c.text for c in choices) == full.text
    assert [t for c in choices if c.logprobs for t in c.logprobs.tokens] == full.logprobs.tokens
    assert [t for c in choices if c.logprobs for t in c.logprobs.text_offset] == full.logprobs.text_offset


def test_completion_logprobs_give_the_sampled_token_and_up_to_k_more(client):
    [choice] = complete(client, logprobs=3, temperature=1.0, max_tokens=8, seed=1).choices
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert 3 <= len(top) <= 4 and top[token] == logprob


def test_return_token_ids_give_the_prompt_and_output_ids_streamed_or_not(client, server, tokenizer):
    completion = chat(client, return_token_ids=True, **GREEDY)
    rendered = server.post("/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert completion.prompt_token_ids == rendered
    [choice] = completion.choices
    assert tokenizer.decode(choice.token_ids, skip_special_tokens=True) == choice.message.content
    chunks = list(chat(client, return_token_ids=True, stream=True, **GREEDY))
    assert chunks[0].prompt_token_ids == rendered
    assert [t for chunk in chunks for c in chunk.choices for t in c.token_ids] == choice.token_ids
    [text_choice] = complete(client, return_token_ids=True, **GREEDY).choices
    assert text_choice.prompt_token_ids == server.post("/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert tokenizer.decode(text_choice.token_ids) == text_choice.text


def test_return_tokens_as_token_ids_names_every_logprob_token_by_its_id(client):
    completion = chat(client, logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True, return_token_ids=True,
                      **GREEDY)
    [choice] = completion.choices
    content = choice.logprobs.content
    assert [entry.token for entry in content] == [f"token_id:{t}" for t in choice.token_ids]
    assert all(top.token.startswith("token_id:") for entry in content for top in entry.top_logprobs)
    [text_choice] = complete(client, logprobs=1, return_tokens_as_token_ids=True, return_token_ids=True,
                             **GREEDY).choices
    assert text_choice.logprobs.tokens == [f"token_id:{t}" for t in text_choice.token_ids]


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, server):
    completion = complete(client, truncate_prompt_tokens=4, return_token_ids=True, **GREEDY)
    assert completion.usage.prompt_tokens == 4
    assert completion.choices[0].prompt_token_ids == server.post("/tokenize", {"prompt": PROMPT}).json()["tokens"][-4:]


def test_include_stop_str_in_output_and_min_tokens_holding_back_stop_strings(client, tokenizer):
    text = complete(client, **GREEDY).choices[0].text
    stop = text[3:6]
    end = text.find(stop) + len(stop)
    cut = complete(client, stop=[stop], **GREEDY).choices[0]
    kept = complete(client, stop=[stop], include_stop_str_in_output=True, **GREEDY).choices[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (text[:end - len(stop)], "stop", stop)
    assert (kept.text, kept.finish_reason, kept.stop_reason) == (text[:end], "stop", stop)
    [plain] = complete(client, return_token_ids=True, **GREEDY).choices
    stop_token = plain.token_ids[2]
    with_token = complete(client, stop_token_ids=[stop_token], include_stop_str_in_output=True, **GREEDY).choices[0]
    assert with_token.stop_reason == stop_token and with_token.text.endswith(tokenizer.decode([stop_token]))
    held = complete(client, stop=[stop], min_tokens=6, return_token_ids=True, ignore_eos=True,
                    **GREEDY | {"max_tokens": 12}).choices[0]
    assert len(held.token_ids) > 6 and held.text.startswith(text[:end]), "the early stop string must not count"


def test_bad_words_and_allowed_token_ids_constrain_the_output(client, server):
    assert "Berlin" in complete(client, **GREEDY).choices[0].text
    assert "Berlin" not in complete(client, bad_words=["Berlin"], **GREEDY).choices[0].text
    allowed = [server.post("/tokenize", {"prompt": w, "add_special_tokens": False}).json()["tokens"][0]
               for w in (" Rome", " Madrid")]
    [choice] = complete(client, allowed_token_ids=allowed, return_token_ids=True, **GREEDY).choices
    assert set(choice.token_ids) <= set(allowed) and len(choice.token_ids) == GREEDY["max_tokens"]


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client):
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                       ignore_eos=True, **GREEDY))
    counts = [chunk.usage.completion_tokens for chunk in chunks if chunk.choices]
    assert counts == sorted(counts) and counts[-1] == GREEDY["max_tokens"]
    assert all(chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens for chunk in chunks)
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]


def render(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    kwargs = {"chat_template": TEMPLATE, "add_generation_prompt": True} | kwargs
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def test_tokenize_renders_messages_with_the_servers_template_and_the_requests_options(server, tokenizer):
    partial = MESSAGES + [{"role": "assistant", "content": "The capital of France is"}]
    custom = "{% for m in messages %}{{ prefix }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cases = [
        ({"messages": MESSAGES}, render(tokenizer, MESSAGES)),
        ({"messages": MESSAGES, "add_generation_prompt": False}, render(tokenizer, MESSAGES, add_generation_prompt=False)),
        ({"messages": partial, "add_generation_prompt": False, "continue_final_message": True},
         render(tokenizer, partial, add_generation_prompt=False, continue_final_message=True)),
        ({"messages": [{"role": "narrator", "content": "Once upon a time"}]},
         render(tokenizer, [{"role": "narrator", "content": "Once upon a time"}])),
        ({"messages": MESSAGES, "chat_template": custom, "chat_template_kwargs": {"prefix": ">> "}},
         tokenizer.encode(">> user: What is the capital of France?\n", add_special_tokens=False)),
    ]
    for body, expected in cases:
        tokenized = server.post("/tokenize", body | {"return_token_strs": True}).json()
        assert tokenized["tokens"] == expected, body
        assert tokenized["token_strs"] == tokenizer.convert_ids_to_tokens(expected)
    assert server.post("/tokenize", {"prompt": "Hi"}).json()["token_strs"] is None


def test_chat_continues_the_final_message_and_echoes_it(client, server):
    partial = MESSAGES + [{"role": "assistant", "content": "The capital of France is"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    completion = chat(client, partial, echo=True, return_token_ids=True, **options, **GREEDY)
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert completion.prompt_token_ids == server.post("/tokenize", {"messages": partial, **options}).json()["tokens"]
    continued = complete(client, completion.prompt_token_ids, **GREEDY).choices[0].text
    assert choice.message.content == partial[-1]["content"] + continued
    both = server.post("/v1/chat/completions", {"messages": partial, "continue_final_message": True, "max_tokens": 1})
    assert both.status == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_a_request_template_and_a_custom_role_reach_the_model(client):
    template = "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n{% endfor %}assistant says"
    completion = chat(client, [{"role": "narrator", "content": "Once upon a time"}], chat_template=template,
                      return_token_ids=True, **GREEDY)
    assert completion.prompt_token_ids == complete(client, "narrator says Once upon a time\nassistant says", max_tokens=1,
                                                   return_token_ids=True).choices[0].prompt_token_ids


def test_tokenizer_info_describes_the_tokenizer_and_the_servers_template(server, tokenizer):
    info = server.request("GET", "/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tokenizer).__name__ and info["chat_template"] == TEMPLATE
    assert info["eos_token"] == tokenizer.eos_token and "vocab_file" not in info
    added = info["added_tokens_decoder"]
    assert added and all(k.isdigit() and isinstance(v["content"], str) and isinstance(v["special"], bool)
                         for k, v in added.items())


def test_load_counts_generation_requests_in_flight(server):
    assert server.request("GET", "/load").json() == {"server_load": 0}
    events = server.stream("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 16, "ignore_eos": True,
                                                     "stream": True})
    next(events)
    assert server.request("GET", "/load").json() == {"server_load": 1}
    assert list(events)[-1] == "[DONE]"
    deadline = time.monotonic() + 10
    while server.request("GET", "/load").json()["server_load"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_ping_and_invocations_are_sagemakers_health_and_generation_routes(server):
    assert server.request("GET", "/ping").status == 200 and server.request("POST", "/ping").status == 200
    chat_response = server.post("/invocations", {"messages": MESSAGES, "max_tokens": 2})
    assert chat_response.status == 200 and chat_response.json()["object"] == "chat.completion"
    text_response = server.post("/invocations", {"prompt": PROMPT, "max_tokens": 2})
    assert text_response.status == 200 and text_response.json()["object"] == "text_completion"
    neither = server.post("/invocations", {"input": "Hi"})
    assert neither.status == 400 and "messages" in neither.json()["error"]["message"]


def test_batch_chat_answers_each_conversation_as_chat_does(client, server):
    conversations = [MESSAGES, [{"role": "user", "content": "Name a color."}]]
    body = {"messages": conversations, "temperature": 0, "max_tokens": 6}
    batch = server.post("/v1/chat/completions/batch", body).json()
    singles = [chat(client, conversation, **GREEDY | {"max_tokens": 6}).choices[0].message.content
               for conversation in conversations]
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in batch["choices"]] == singles
    streamed = server.post("/v1/chat/completions/batch", body | {"stream": True})
    assert streamed.status == 400 and streamed.json()["error"]["param"] == "stream"
