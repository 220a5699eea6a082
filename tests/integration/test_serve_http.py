"""The OpenAI-style HTTP routes through Serve's HTTP proxy, driven by the `openai` Python client.

Completions and chat completions, plain and streamed (server-sent events), speculation settings as
extra body fields, usage and speculation statistics in the response, /v1/models, and bad input
answered 400 with the offending field named. Greedy text equals the target's own greedy decoding."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from conftest import target_greedy
from serving import free_port, serve_apps
from transformers import AutoTokenizer

from specray.assets import DEMO_TARGET

openai = pytest.importorskip("openai")

PROMPT = "def fibonacci(n):"
N = 16
ARGS = {"max_batch": 4, "max_context": 512, "replica_cpus": 0.1, "draft_cpus": 0.5, "stage_cpus": 0.5,
        "min_replicas": 1, "max_replicas": 1, "name": "demo"}


@pytest.fixture(scope="module")
def client():
    from specray.deployments.app import build_app
    http = free_port()
    with serve_apps({"specray": (build_app(ARGS), "/")}, free_port(), http):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    tok = AutoTokenizer.from_pretrained(DEMO_TARGET)
    return tok.decode(target_greedy(tok.encode(PROMPT, add_special_tokens=False), N))


@pytest.mark.parametrize("speculation", [{"mode": "off"}, {"mode": "tree", "branching": [2, 2]},
                                         {"mode": "async", "num_speculative_tokens": 3}])
def test_completion_plain_and_streamed_equal_the_target(client, reference, speculation):
    body = {"ignore_eos": True, "speculation": speculation}
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=N, extra_body=body)
    assert out.choices[0].text == reference and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == N and out.usage.prompt_tokens > 0
    stats = out.model_extra["speculation"]
    assert stats["num_steps"] >= 1 and (stats["num_draft_tokens"] == 0) == (speculation["mode"] == "off")
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=N, stream=True,
                                            extra_body=body, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == reference and len(texts) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == N


def test_chat_completion_plain_and_streamed(client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    out = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, extra_body={
        "ignore_eos": True, "speculation": {"mode": "chain", "num_speculative_tokens": 2}})
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and out.usage.completion_tokens == 8
    assert out.model_extra["speculation"]["num_draft_tokens"] > 0
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, bytes]:
    """A raw HTTP call (status, body), as a client that is not the openai package makes it."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_probes_and_tokenizer_endpoints_answer_as_vllm(client):
    """What vLLM clients and load generators call besides /v1: /health, /ping, /version, /tokenize, /detokenize."""
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    for method, path in [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")]:
        assert call(root + path, method) == (200, b"")
    assert json.loads(call(root + "/version")[1])["version"]
    status, out = call(root + "/tokenize", "POST", {"model": "demo", "prompt": PROMPT})
    tokens = json.loads(out)
    usage = client.completions.create(model="demo", prompt=PROMPT, max_tokens=1).usage
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) == usage.prompt_tokens
    assert tokens["max_model_len"] == 512
    assert json.loads(call(root + "/detokenize", "POST", {"tokens": tokens["tokens"]})[1]) == {"prompt": PROMPT}
    chat = json.loads(call(root + "/tokenize", "POST", {"messages": [{"role": "user", "content": "hi"}]})[1])
    assert chat["count"] > 2
    for path, body, param in [("/tokenize", {}, "prompt"), ("/detokenize", {"tokens": [10 ** 9]}, "tokens")]:
        status, out = call(root + path, "POST", body)
        assert status == 400 and json.loads(out)["error"]["param"] == param


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client):
    """vLLM's stream_options.continuous_usage_stats, which vLLM load generators send."""
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    status, out = call(root + "/v1/completions", "POST", {
        "model": "demo", "prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: {")]
    assert status == 200 and all("usage" in e for e in events)
    done = [e["usage"]["completion_tokens"] for e in events]
    assert done == sorted(done) and done[-1] == 8 and not events[-1]["choices"]  # the last: the usage chunk


def test_unknown_fields_are_ignored_and_named_in_a_header(client):
    """As vLLM: a request with fields the server does not know is answered, and they are named."""
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "hi", "name": "bob"}], max_tokens=2,
        extra_body={"foo": 1, "speculation": {"mode": "chain"}})
    assert raw.http_response.status_code == 200 and raw.parse().usage.completion_tokens >= 1
    assert raw.headers["x-specray-ignored-fields"] == "foo, messages[0].name"
    status, _ = call(str(client.base_url).rstrip("/").removesuffix("/v1") + "/tokenize", "POST", {"prompt": "x", "bar": 1})
    assert status == 200


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"extra_body": {"speculation": {"depth": 3}}}, "speculation.depth"),
    ({"extra_body": {"speculation": {"mode": "tree", "branching": [2, 2], "num_speculative_tokens": 3}}},
     "speculation"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_input_is_400_naming_the_field(client, kwargs, param):
    kwargs = {"model": "demo", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kwargs)
    assert err.value.status_code == 400 and param in err.value.message
    assert client.completions.create(model="demo", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
