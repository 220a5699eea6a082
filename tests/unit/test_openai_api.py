"""OpenAI-style bodies -> RequestFields, and engine output -> OpenAI-shaped objects (no Ray, no server)."""
from __future__ import annotations

import copy
import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError
from transformers import AutoTokenizer

from specray.assets import DEMO_TARGET
from specray.core.sequence import SpecStats
from specray.deployments.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_fields,
    chat_response,
    completion_chunk,
    completion_fields,
    completion_response,
    describe_validation_error,
    error_body,
    ignored_fields,
    models_response,
    openai_finish_reason,
    openai_param,
    sse,
    usage_chunk,
    usage_dict,
)
from specray.deployments.validation import InvalidArgument, RequestFields

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
STATS = SpecStats(num_steps=2, num_draft_tokens=8, num_accepted_tokens=6, accepted_per_position=[2, 2, 1, 1])


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO_TARGET)


def rejection(model, body: dict) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return describe_validation_error(info.value)


# ---- bodies -> RequestFields


def test_minimal_completion_takes_server_defaults():
    # Omitted temperature is greedy (0) here, unlike OpenAI's 1.
    assert completion_fields(CompletionRequest(prompt="def f(")) == RequestFields(prompt="def f(")


def test_full_completion_with_speculation_extra_body():
    body = CompletionRequest.model_validate({
        "model": "demo", "prompt": "def f(", "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
        "seed": 7, "stop": "\n\n", "ignore_eos": True, "user": "u", "stream": True,
        "stream_options": {"include_usage": True},
        "speculation": {"mode": "tree", "num_speculative_tokens": 3, "branching": [2, 2, 1],
                        "with_replacement": True, "fan_out": [3, 2, 1, 1], "saguaro_c": 0.5, "backup": "fast"}})
    assert completion_fields(body) == RequestFields(
        prompt="def f(", max_tokens=16, temperature=0.7, top_p=0.9, top_k=20, seed=7, stop=["\n\n"],
        ignore_eos=True, mode="tree", num_speculative_tokens=3, branching=[2, 2, 1], with_replacement=True,
        fan_out=[3, 2, 1, 1], saguaro_c=0.5, backup="fast")
    assert body.stream_options.include_usage


def test_token_id_prompt_and_stop_list():
    body = CompletionRequest.model_validate({"prompt": [5, 6, 7], "stop": ["a", "b"], "temperature": None})
    assert completion_fields(body) == RequestFields(prompt_token_ids=[5, 6, 7], stop=["a", "b"])


def test_chat_fields_render_default_template_when_tokenizer_has_none(tok):
    assert tok.chat_template is None
    body = ChatCompletionRequest.model_validate({"messages": CHAT, "max_completion_tokens": 9, "temperature": 0.5,
                                                 "speculation": {"mode": "async", "backup": "neural"}})
    assert chat_fields(body, tok) == RequestFields(
        prompt="<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        max_tokens=9, temperature=0.5, mode="async", backup="neural")


def test_chat_uses_the_tokenizers_own_template(tok):
    own = copy.deepcopy(tok)
    own.chat_template = ("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    body = ChatCompletionRequest.model_validate({"messages": CHAT, "max_tokens": 4})
    assert chat_fields(body, own) == RequestFields(prompt="[system:Be brief.][user:hi]>", max_tokens=4)


def test_a_template_refusal_names_messages(tok):
    own = copy.deepcopy(tok)
    own.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidArgument, match="roles must alternate") as info:
        chat_fields(ChatCompletionRequest.model_validate({"messages": CHAT}), own)
    assert info.value.field == "messages"


# ---- rejections


@pytest.mark.parametrize("model, body, param, message", [
    (CompletionRequest, {"prompt": "x", "speculation": {"mode": "chain", "depth": 3}},
     "speculation.depth", "unknown field 'speculation.depth'"),
    (CompletionRequest, {"prompt": ["a", "b"]}, "prompt", "prompt: one prompt per request"),
    (CompletionRequest, {"prompt": [[1, 2]]}, "prompt", "prompt: must be a string or a list of token ids"),
    (ChatCompletionRequest, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
     "messages[0].role: Input should be 'system', 'user' or 'assistant'"),
    (ChatCompletionRequest, {"messages": []}, "messages", "messages: List should have at least 1 item"),
    (CompletionRequest, {"prompt": "x", "speculation": {"mode": "fast"}}, "speculation.mode",
     "speculation.mode: Input should be 'off', 'chain', 'tree' or 'async'"),
    (CompletionRequest, {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens: Input should be greater"),
    (CompletionRequest, {}, "prompt", "prompt: Field required"),
])
def test_bad_bodies_are_described_by_field(model, body, param, message):
    got_param, got_message = rejection(model, body)
    assert got_param == param
    assert got_message.startswith(message)


def test_every_offending_field_is_named():
    param, message = rejection(CompletionRequest, {"prompt": "x", "max_tokens": 0, "speculation": {"depth": 3}})
    want = "max_tokens: Input should be greater than or equal to 1; unknown field 'speculation.depth'"
    assert (param, message) == ("max_tokens", want)


def test_unknown_fields_are_ignored_and_listed_as_vllm_does():
    """Fields the server does not know, at any depth outside `speculation`, pass and are listed."""
    body = {"prompt": "x", "foo": 1, "stream_options": {"include_usage": True, "x": 1},
            "presence_penalty_x": 0.5}
    req = CompletionRequest.model_validate(body)
    assert ignored_fields(req) == ["foo", "presence_penalty_x", "stream_options.x"]
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi", "name": "bob"}]})
    assert ignored_fields(chat) == ["messages[0].name"]
    assert ignored_fields(CompletionRequest.model_validate({"prompt": "x"})) == []


def test_a_body_that_is_not_an_object():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json("[1]")
    assert describe_validation_error(info.value)[0] == "body"


@pytest.mark.parametrize("extra, field", [
    ({"n": 2}, "n"), ({"echo": True}, "echo"), ({"logprobs": 1}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_unsupported_completion_fields(extra, field):
    with pytest.raises(InvalidArgument) as info:
        completion_fields(CompletionRequest.model_validate({"prompt": "x", **extra}))
    assert info.value.field == field


@pytest.mark.parametrize("extra, field", [
    ({"n": 2}, "n"), ({"max_tokens": 3, "max_completion_tokens": 3}, "max_completion_tokens"),
])
def test_unsupported_chat_fields(tok, extra, field):
    with pytest.raises(InvalidArgument) as info:
        chat_fields(ChatCompletionRequest.model_validate({"messages": CHAT, **extra}), tok)
    assert info.value.field == field


@pytest.mark.parametrize("field, chat, param", [
    ("sampling.top_p", False, "top_p"), ("sampling.max_tokens", True, "max_tokens"),
    ("prompt_token_ids", False, "prompt"), ("prompt", True, "messages"), ("input", False, "prompt"),
    ("speculation", False, "speculation"),
])
def test_engine_field_paths_become_body_names(field, chat, param):
    assert openai_param(field, chat) == param


# ---- responses


@pytest.mark.parametrize("engine, openai", [("length", "length"), ("stop", "stop"), ("eos", "stop"), (None, None)])
def test_finish_reasons(engine, openai):
    assert openai_finish_reason(engine) == openai


def test_completion_response_shape():
    got = completion_response("r1", "demo", "pass", "eos", usage_dict(3, 4), STATS, created=100)
    assert got == {"id": "cmpl-r1", "object": "text_completion", "created": 100, "model": "demo",
                   "choices": [{"index": 0, "text": "pass", "logprobs": None, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                   "speculation": STATS.to_dict()}
    assert Completion.model_validate(got).choices[0].text == "pass"


def test_completion_chunks():
    mid = completion_chunk("r1", "demo", "pa", created=5)
    last = completion_chunk("r1", "demo", "ss", "length", STATS, created=5)
    assert mid["choices"] == [{"index": 0, "text": "pa", "logprobs": None, "finish_reason": None}]
    assert "speculation" not in mid and "usage" not in mid
    assert last["choices"][0]["finish_reason"] == "length" and last["speculation"] == STATS.to_dict()
    assert (mid["id"], mid["object"], mid["created"]) == ("cmpl-r1", "text_completion", 5)


def test_chat_response_shape():
    got = chat_response("r2", "demo", "Hello.", "stop", usage_dict(5, 2), None)
    assert got["id"] == "chatcmpl-r2" and got["object"] == "chat.completion" and isinstance(got["created"], int)
    assert got["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello."},
                               "logprobs": None, "finish_reason": "stop"}]
    assert "speculation" not in got
    assert ChatCompletion.model_validate(got).choices[0].message.content == "Hello."


def test_chat_chunks_name_the_role_first_and_end_with_an_empty_delta():
    first = chat_chunk("r2", "demo", "", first=True)
    mid = chat_chunk("r2", "demo", "Hel")
    last = chat_chunk("r2", "demo", "", "eos", STATS)
    assert [c["choices"][0]["delta"] for c in (first, mid, last)] == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in (first, mid, last)] == [None, None, "stop"]
    assert last["speculation"] == STATS.to_dict() and "speculation" not in mid
    for c in (first, mid, last):
        assert c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r2"
        ChatCompletionChunk.model_validate(c)


@pytest.mark.parametrize("chat, prefix, obj", [(True, "chatcmpl", "chat.completion.chunk"),
                                               (False, "cmpl", "text_completion")])
def test_usage_chunk(chat, prefix, obj):
    got = usage_chunk("r3", "demo", usage_dict(1, 2), chat=chat, created=9)
    assert got == {"id": f"{prefix}-r3", "object": obj, "created": 9, "model": "demo", "choices": [],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def test_sse_framing():
    obj = {"a": 1, "b": "é\n"}
    event = sse(obj)
    assert event.startswith("data: {") and event.endswith("}\n\n") and event.count("\n") == 2
    assert json.loads(event.removeprefix("data: ")) == obj
    assert SSE_DONE == "data: [DONE]\n\n"


def test_error_body_and_models():
    assert error_body("n: only n=1", "invalid_request_error", "n") == {
        "error": {"message": "n: only n=1", "type": "invalid_request_error", "param": "n", "code": None}}
    got = models_response(["target", "draft"])
    assert got["object"] == "list" and [m["id"] for m in got["data"]] == ["target", "draft"]
    assert all(m["object"] == "model" and m["owned_by"] == "specray" and isinstance(m["created"], int)
               for m in got["data"])


@pytest.mark.parametrize("field, value", [("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                          ("repetition_penalty", 1.2), ("min_tokens", 3),
                                          ("logit_bias", {"5": 10.0})])
def test_sampling_controls_not_honoured_yet_are_a_400_unless_neutral(field, value):
    """A penalty silently ignored would change what the client asked for: 400, except at the neutral
    value that load generators send by default."""
    with pytest.raises(InvalidArgument) as info:
        completion_fields(CompletionRequest.model_validate({"prompt": "x", field: value}))
    assert info.value.field == field
    neutral = {"repetition_penalty": 1.0, "logit_bias": {}}.get(field, 0)
    completion_fields(CompletionRequest.model_validate({"prompt": "x", field: neutral}))


def test_chat_logprobs_are_a_400(tok):
    for extra, field in [({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs")]:
        with pytest.raises(InvalidArgument) as info:
            chat_fields(ChatCompletionRequest.model_validate({"messages": CHAT, **extra}), tok)
        assert info.value.field == field
    chat_fields(ChatCompletionRequest.model_validate({"messages": CHAT, "logprobs": False}), tok)
