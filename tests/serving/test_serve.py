"""serve_app on a real local Ray Serve instance, over HTTP, with the official openai client as the client."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import hypothesis
import openai
import pytest
import schemathesis
import torch
from schemathesis.checks import not_a_server_error

from meteora_moe import MeteoraModel
from meteora_moe.errors import InvalidRequest
from meteora_moe.prompts import prompt_format
from meteora_moe.serving import MeteoraService, SamplingParams
from pipelines.local_cluster import free_ports
from suites.tinytasks import char_tokenizer
from tiny import tiny_checkpoint

KEY = "sk-test-key"
APP = "meteora"
TOKENIZER = char_tokenizer()


def deploy(checkpoint, api_key: str | None = KEY, **options):
    """(Re)deploy the application with these deployment options; returns once its replicas are healthy."""
    from ray import serve

    import serve_app

    env = {"env_vars": {"METEORA_API_KEY": api_key}} if api_key else {}
    settings = {"checkpoint": str(checkpoint), "max_tokens_limit": 64, "max_prompt_tokens": 200}
    options = {"ray_actor_options": {"num_cpus": 0.5, "runtime_env": env}, **options}
    serve.run(serve_app.MeteoraServer.options(**options).bind(settings), name=APP, route_prefix="/")


def replica_count() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["MeteoraServer"]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory):
    from ray import serve

    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("serve"))
    port = free_ports(1)[0]
    serve.shutdown()  # a Serve left by an earlier test would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(checkpoint)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", checkpoint=checkpoint)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local_model(served):
    return MeteoraModel.from_pretrained(served.checkpoint)


def greedy(model: MeteoraModel, prompt: str, max_tokens: int, experts=()) -> str:
    """The independent reference: transformers' generate on this prompt alone."""
    forcing = model.force_experts(experts) if experts else torch.no_grad()
    ids = torch.tensor([prompt_format("plain").prompt_ids(TOKENIZER, prompt)])
    with forcing, torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=TOKENIZER.eos_token_id,
                             pad_token_id=TOKENIZER.pad_token_id)
    return TOKENIZER.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_models_lists_the_fused_model_and_every_expert(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["meteora", "meteora:alpha", "meteora:beta", "meteora:gamma"]


def test_completion_and_chat_answer_what_the_model_generates(client, local_model):
    out = client.completions.create(model="meteora", prompt="reverse: abc\n", max_tokens=8, temperature=0)
    assert out.choices[0].text == greedy(local_model, "reverse: abc\n", 8)
    assert out.usage.prompt_tokens == 14 and out.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="meteora", messages=[{"role": "user", "content": "sort: dcba"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == greedy(local_model, "sort: dcba\n", 6)  # the plain chat fallback


def test_streaming_sends_the_same_text_in_openai_chunks(client):
    kwargs = {"model": "meteora", "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(messages=[{"role": "user", "content": "upper: xyz"}], **kwargs)
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "upper: xyz"}], stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    pieces = list(client.completions.create(prompt="upper: xyz\n", stream=True, **kwargs))
    assert "".join(p.choices[0].text for p in pieces) == client.completions.create(prompt="upper: xyz\n", **kwargs).choices[0].text


def test_forced_experts_and_the_routing_trace(client, local_model):
    forced = client.completions.create(model="meteora:beta", prompt="double: ab\n", max_tokens=5, temperature=0,
                                       extra_body={"return_routing": True})
    assert forced.choices[0].text == greedy(local_model, "double: ab\n", 5, ["beta"])
    assert all(step["experts"] == {"beta": 1.0} for step in forced.choices[0].routing)
    pair = client.completions.create(model="meteora", prompt="double: ab\n", max_tokens=5, temperature=0,
                                     extra_body={"experts": ["alpha", "gamma"], "return_routing": True})
    assert all(step["experts"] == {"alpha": 0.5, "gamma": 0.5} for step in pair.choices[0].routing)
    gated = client.completions.create(model="meteora", prompt="double: ab\n", max_tokens=5, temperature=0,
                                      extra_body={"return_routing": True})
    trace = gated.choices[0].routing
    assert len(trace) == gated.usage.completion_tokens
    assert "".join(step["token"] for step in trace).startswith(gated.choices[0].text)
    assert all(abs(sum(step["experts"].values()) - 1) < 1e-3 for step in trace)


def test_stop_seed_and_concurrent_requests_for_different_tasks(client, local_model):
    full = client.completions.create(model="meteora", prompt="rotate: abcd\n", max_tokens=12, temperature=1.0, seed=7).choices[0]
    again = client.completions.create(model="meteora", prompt="rotate: abcd\n", max_tokens=12, temperature=1.0, seed=7).choices[0]
    assert full.text == again.text and len(full.text) >= 4
    stop = full.text[2:4]
    cut = client.completions.create(model="meteora", prompt="rotate: abcd\n", max_tokens=12, temperature=1.0, seed=7, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.find(stop)] and cut.choices[0].finish_reason == "stop"
    prompts = [f"{task}: abc\n" for task in ("reverse", "upper", "sort", "double", "length", "shift", "rotate", "evens")]
    with ThreadPoolExecutor(8) as pool:  # batched together on the replica; each must equal its own generation
        texts = list(pool.map(lambda p: client.completions.create(model="meteora", prompt=p, max_tokens=6, temperature=0)
                              .choices[0].text, prompts))
    assert texts == [greedy(local_model, p, 6) for p in prompts]


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "json_invalid"),
    (b'["a list"]', 400, None),
    (b'{"model": "meteora", "prompt": 5}', 400, None),
    (b'{"model": "meteora", "prompt": "x", "max_tokens": "5"}', 400, None),
    (b'{"model": "meteora", "prompt": "x", "max_tokens": -3}', 400, None),
    (b'{"model": "meteora", "prompt": "x", "max_tokens": 100000000000000000000000}', 400, "max_tokens_too_large"),
    (b'{"model": "meteora", "prompt": "x", "temperature": 9}', 400, None),
    (b'{"model": "meteora", "prompt": "x", "bogus": 1}', 400, None),
    (b'{"model": "gpt-4", "prompt": "x"}', 404, "model_not_found"),
    (b'{"model": "meteora:nope", "prompt": "x"}', 404, "model_not_found"),
    (b'{"model": "meteora", "prompt": "x", "experts": ["nope"]}', 404, "expert_not_found"),
    (b'{"model": "meteora", "prompt": ""}', 400, "empty_prompt"),
    (b'{"model": "meteora", "prompt": []}', 400, "invalid_prompt"),
    (b'{"model": "meteora", "prompt": "' + b"a" * 400 + b'"}', 413, "prompt_too_long"),
    (b'{"model": "meteora", "prompt": "' + b"a" * 195 + b'", "max_tokens": 64}', 400, "context_length_exceeded"),
])
def test_bad_input_gets_an_openai_shaped_4xx(served, body, status, code):
    r = httpx.post(f"{served.url}/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code


def test_a_missing_or_wrong_api_key_is_refused(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{served.url}/v1/completions", json={"model": "meteora", "prompt": "x"}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{served.url}/healthz", timeout=30).status_code == 200  # health checks need no key


def test_custom_metrics_reach_rays_prometheus_endpoint(served, client):
    """Tokens generated, per-expert routing and batch sizes, next to Serve's own ray_serve_* metrics."""
    import ray

    client.completions.create(model="meteora:gamma", prompt="metrics\n", max_tokens=3)
    port = ray._private.worker.global_worker.node.metrics_export_port
    # exported every few seconds: wait for this request's own label too, not only for names earlier tests exported
    wanted = ("ray_meteora_tokens_generated", 'ray_meteora_expert_routing_total{', "ray_meteora_batch_size_bucket",
              "ray_serve_num_http_requests", 'expert="gamma"')
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline and not all(name in text for name in wanted):
        time.sleep(2)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert all(name in text for name in wanted), [name for name in wanted if name not in text]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_fuzzed_requests_from_the_openapi_spec_never_get_a_5xx(served, mode):
    """Schemathesis generates requests from the app's own OpenAPI spec (valid ones, and ones that break it)."""
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz"}
    calls = []

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=hypothesis.strategies.one_of([op.as_strategy(mode) for op in operations]))
    def call(case):
        calls.append(case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error],
                                            timeout=60).status_code)

    call()
    print(f"fuzz ({mode.value}): {len(calls)} requests, status codes {sorted(set(calls))}")
    assert len(calls) >= 20


def load(url: str, stop: threading.Event, results: list, max_tokens: int = 48) -> None:
    """One client sending completions back to back until `stop`; appends "ok" or the error's class name."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=2, timeout=60)
    while not stop.is_set():
        try:
            client.completions.create(model="meteora", prompt="reverse: abcdef\n", max_tokens=max_tokens, temperature=0)
            results.append("ok")
        except openai.OpenAIError as error:
            results.append(type(error).__name__)


def test_replicas_scale_up_under_load_and_back_down(served):
    deploy(served.checkpoint, max_ongoing_requests=4, autoscaling_config={
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 1, "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2})
    assert replica_count() == 1
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=load, args=(served.url, stop, results)) for _ in range(6)]
    for thread in clients:
        thread.start()
    peak, deadline = 1, time.monotonic() + 60
    while peak < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        peak = max(peak, replica_count())
    stop.set()
    for thread in clients:
        thread.join()
    print(f"autoscaling: peak {peak} replicas, {results.count('ok')}/{len(results)} requests ok under load")
    assert peak >= 2
    deadline = time.monotonic() + 60
    while replica_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replica_count() == 1
    assert results and all(r == "ok" for r in results)


def test_the_app_loads_checkpoint_and_base_model_from_s3(tmp_path, s3_endpoint, monkeypatch):
    """The service reads both from the object store (SeaweedFS on loopback); here without Serve."""
    import boto3
    from fastapi.testclient import TestClient

    import serve_app
    from meteora_moe import open_store

    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    checkpoint = tiny_checkpoint(tmp_path / "local")
    boto3.client("s3").create_bucket(Bucket="serving")
    store = open_store("s3://serving/models")
    for path in [p for p in (tmp_path / "local").rglob("*") if p.is_file() and "adapters" not in p.parts]:
        store.write_bytes(path.relative_to(tmp_path / "local").as_posix(), path.read_bytes())
    settings = serve_app.ServeSettings(checkpoint="s3://serving/models/checkpoint", base_model="s3://serving/models/base")
    service = MeteoraService.load(**serve_app.service_settings(settings))
    try:
        reply = TestClient(serve_app.create_app(service, settings)).post(
            "/v1/completions", json={"model": "meteora", "prompt": "reverse: abc\n", "max_tokens": 6, "temperature": 0})
        local = MeteoraModel.from_pretrained(checkpoint)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == greedy(local, "reverse: abc\n", 6)
    finally:
        service.close()


def test_back_pressure_answers_429_when_too_many_requests_wait(tmp_path):
    from fastapi.testclient import TestClient

    import serve_app

    settings = serve_app.ServeSettings(checkpoint=str(tiny_checkpoint(tmp_path)), max_batch_size=1, max_waiting=1)
    service = MeteoraService.load(**serve_app.service_settings(settings))
    try:
        for i in range(2):  # two requests queued behind a batch of one (the engine thread is not woken for them)
            service.engine.submit(f"queued-{i}", [1, 5, 6], SamplingParams(max_tokens=2))
        reply = TestClient(serve_app.create_app(service, settings)).post("/v1/completions", json={"model": "meteora", "prompt": "x"})
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "server_busy"
    finally:
        service.close()


def test_a_failing_engine_step_answers_503_and_the_next_request_is_served(tmp_path):
    from fastapi.testclient import TestClient

    import serve_app

    settings = serve_app.ServeSettings(checkpoint=str(tiny_checkpoint(tmp_path)))
    service = MeteoraService.load(**serve_app.service_settings(settings))
    step, failures = service.engine.step, [1]

    def failing_once():
        if failures:
            failures.pop()
            raise RuntimeError("out of memory")
        return step()

    service.engine.step = failing_once
    try:
        app = TestClient(serve_app.create_app(service, settings))
        body = {"model": "meteora", "prompt": "reverse: abc\n", "max_tokens": 4, "temperature": 0}
        reply = app.post("/v1/completions", json=body)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "generation_failed"
        assert "out of memory" in reply.json()["error"]["message"]
        assert app.post("/v1/completions", json=body).status_code == 200
    finally:
        service.close()


def test_errors_name_the_field_sent_and_a_tiny_temperature_is_greedy(tmp_path):
    from fastapi.testclient import TestClient

    import serve_app

    settings = serve_app.ServeSettings(checkpoint=str(tiny_checkpoint(tmp_path)))
    service = MeteoraService.load(**serve_app.service_settings(settings))
    try:
        app = TestClient(serve_app.create_app(service, settings))
        chat = {"model": "meteora", "messages": [{"role": "user", "content": "reverse: abc"}]}
        reply = app.post("/v1/chat/completions", json=chat | {"max_completion_tokens": settings.max_tokens_limit + 1})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_completion_tokens"
        body = {"model": "meteora", "prompt": "reverse: abc\n", "max_tokens": 4}
        texts = [app.post("/v1/completions", json=body | {"temperature": t}).json()["choices"][0]["text"] for t in (1e-40, 0)]
        assert texts[0] == texts[1]
    finally:
        service.close()
    with pytest.raises(InvalidRequest, match="top_p") as error:
        SamplingParams(top_p=0)
    assert error.value.param == "top_p"
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_every_request_error_maps_to_an_openai_4xx():
    import serve_app
    from meteora_moe.errors import RequestError, UnknownExpert

    class Subclassed(UnknownExpert):
        pass

    assert serve_app.api_error(Subclassed("m", "model")).status == 404
    assert serve_app.api_error(RequestError("m")).status == 400
