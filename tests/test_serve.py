"""``moecache serve``: the official OpenAI client over real HTTP (uvicorn on 127.0.0.1) against the embedded
model's architecture at a small size, offloaded; one test runs the `moecache serve` command itself."""

from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from .serve_helpers import serve_small, small_default_model  # noqa: E402

from moecache.default_model import decode, encode  # noqa: E402
from moecache.serve.textgen import plain_chat_prompt  # noqa: E402

MODEL = "moecache-default"


@pytest.fixture(scope="module")
def live():
    server, handle = serve_small()
    yield server, handle
    server.close()
    handle.remove()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _reference_greedy(prompt: str, n: int) -> str:
    """The unpatched model's greedy text (transformers' generate, stopping at its end-of-sequence id)."""
    import torch

    model = small_default_model()
    x = torch.tensor([encode(prompt)])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x))
    return decode(out[0, x.shape[1]:].tolist())


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(live[0].url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL


def test_greedy_completion_equals_unpatched_generate(client):
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert r.choices[0].text == _reference_greedy("def add(a, b):", 12)
    assert r.usage.prompt_tokens == len(encode("def add(a, b):"))
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"


def test_stream_equals_non_stream_and_seed_repeats(client):
    kw = dict(model=MODEL, prompt="The mixture of experts", max_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    whole = client.completions.create(**kw)
    other = client.completions.create(**{**kw, "seed": 8})  # a request in between changes nothing
    pieces, finish = [], None
    for ev in client.completions.create(**kw, stream=True):
        pieces.append(ev.choices[0].text)
        finish = ev.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert client.completions.create(**kw).choices[0].text == whole.choices[0].text
    assert other.choices[0].text != whole.choices[0].text


def test_stop_string_cuts_the_answer(client):
    kw = dict(model=MODEL, prompt="abc", max_tokens=30, temperature=1.0, seed=3)
    full = client.completions.create(**kw).choices[0].text
    candidates = [c for c in full[3:] if c != "\ufffd"]
    if not candidates:
        pytest.skip("the sampled text has no plain character to stop at")
    stop = candidates[0]
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ev.choices[0].text for ev in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_chat_uses_the_plain_template(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0.7, seed=1)
    same = client.completions.create(model=MODEL, prompt=plain_chat_prompt(messages), max_tokens=10,
                                     temperature=0.7, seed=1)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == same.choices[0].text
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0.7, seed=1,
                                            stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for ev in stream:
        if ev.choices:
            text += ev.choices[0].delta.content or ""
        if ev.usage is not None:
            usage = ev.usage
    assert text == same.choices[0].text
    assert usage is not None and usage.completion_tokens == same.usage.completion_tokens


def test_bad_requests_get_openai_errors_and_the_server_stays_up(live, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x" * 500, max_tokens=100)
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert "max_tokens" in e.value.body["message"]
    url = live[0].url
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert "\n" not in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["message"] == "'messages' is required"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert client.completions.create(model=MODEL, prompt="still up", max_tokens=2).choices[0].text is not None


def test_metrics_report_the_cache(live, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt="count me", max_tokens=4, temperature=0)
    r = httpx.get(live[0].url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples if not s.labels}
    stats = live[1].stats()
    assert samples["moecache_cache_hits_total"] == stats["hits"] > 0
    assert samples["moecache_cache_misses_total"] == stats["misses"] > 0
    assert samples["moecache_cache_bytes_copied_total"] == stats["bytes_copied"]
    assert 0 <= samples["moecache_cache_ready_rate"] <= 1
    assert samples["moecache_completion_tokens_total"] >= 4
    assert samples["moecache_tokens_per_second"] > 0
    assert "moecache_cache_stall_seconds_total" in samples and "moecache_cache_cpu_experts_total" in samples
    assert any(k.startswith("moecache_requests_total") for k in
               (s.name for fam in text_string_to_metric_families(r.text) for s in fam.samples))


def test_concurrent_streams_each_equal_their_solo_answer(client):
    prompts = [f"request {i}:" for i in range(8)]
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=1.0, seed=i).choices[0].text
            for i, p in enumerate(prompts)]

    def stream(i: int) -> str:
        return "".join(ev.choices[0].text for ev in client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=10, temperature=1.0, seed=i, stream=True))

    with cf.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(stream, range(8))) == solo


def test_full_queue_answers_429_and_a_disconnect_frees_its_place():
    server, handle = serve_small(max_waiting=1)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        sched = server.server.config.app.state.scheduler
        # no end-of-text token: the running request must still be generating when its client goes away
        # (a sampled end of text would finish it first, and it would not count as cancelled)
        server.server.config.app.state.generator.eos_ids = set()
        running = c.completions.create(model=MODEL, prompt="long", max_tokens=400, stream=True)
        next(iter(running))                       # it is being generated
        waiting = c.completions.create(model=MODEL, prompt="wait", max_tokens=2, stream=True)
        assert sched.waiting == 1
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="too many", max_tokens=2)
        assert e.value.body["code"] == "queue_full"
        waiting.close()                           # this client goes away: its place frees
        _until(lambda: sched.waiting == 0)
        running.close()                           # the running one stops before its next token
        _until(lambda: sched.running is None)
        assert c.completions.create(model=MODEL, prompt="now", max_tokens=2).usage.completion_tokens >= 1
        assert sched.cancelled == 2
    finally:
        server.close()
        handle.remove()


def test_api_key():
    server, handle = serve_small(api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == MODEL
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 401
    finally:
        server.close()
        handle.remove()


def test_small_soak_leaves_nothing_behind(live, client):
    """Sixty short requests: the line empties and the resident memory stays flat (the big soak is in eval/)."""
    import psutil

    proc = psutil.Process()
    sched = live[0].server.config.app.state.scheduler
    for i in range(10):
        client.completions.create(model=MODEL, prompt=f"warm {i}", max_tokens=3, seed=i)
    before = proc.memory_info().rss
    done = sched.completed
    for i in range(60):
        if i % 2:
            "".join(e.choices[0].text for e in client.completions.create(model=MODEL, prompt=f"s{i}", max_tokens=3,
                                                                        seed=i, stream=True))
        else:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"m{i}"}], max_tokens=3)
    assert sched.completed - done == 60
    _until(lambda: sched.running is None)  # the worker clears it just after the answer's last event
    assert sched.waiting == 0
    assert proc.memory_info().rss - before < 64 * 2**20


def _until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_cli_refuses_bad_options_before_loading(capsys):
    from moecache.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "moecache serve: error: --port 70000 is not a TCP port; use 1-65535 (0: any free port)\n"
    assert main(["serve", "--model", "/nonexistent", "--max-queue", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err
    assert main(["serve", "--max-queue", "0"]) == 2 and "--max-queue" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serves_over_http(tiny_model_dir):
    """`moecache serve` as a user starts it (a trained checkpoint, offloaded), driven by the client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MOECACHE_API_KEY="k")
    proc = subprocess.Popen([sys.executable, "-m", "moecache", "serve", "--model", str(tiny_model_dir), "--device",
                             "cpu", "--cache-slots", "16", "--port", str(port), "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        c = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=120)
        assert c.models.list().data[0].id == tiny_model_dir.name
        r = c.completions.create(model=tiny_model_dir.name, prompt="def main(", max_tokens=8, temperature=0)
        assert r.usage.completion_tokens >= 1 and isinstance(r.choices[0].text, str)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_scheduler_close_stops_the_running_request_and_drops_the_line():
    import asyncio

    from moecache.serve import SamplingParams, TextGenerator
    from moecache.serve.scheduler import Scheduler

    gen = TextGenerator(small_default_model(), encode, decode)
    sched = Scheduler(gen, max_waiting=8)
    loop = asyncio.new_event_loop()
    try:
        jobs = [sched.submit(encode("go"), SamplingParams(max_tokens=400, temperature=0), loop) for _ in range(3)]
        _until(lambda: sched.running is not None)
        sched.close()
        assert not sched._thread.is_alive()
        assert [j.state for j in jobs] == ["cancelled"] * 3 and sched.completed == 0
    finally:
        loop.close()


def test_chat_uses_the_model_template_where_it_has_one():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moecache.serve import TextGenerator

    vocab = {chr(i): i for i in range(32, 127)}
    vocab["<unk>"] = 0
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    gen = TextGenerator(small_default_model(), lambda s: tok(s)["input_ids"], tok.decode, tok)
    assert gen.has_chat_template
    assert gen.chat_prompt_ids([{"role": "user", "content": "hi"}]) == tok("<user>hi<a>")["input_ids"]
    plain = TextGenerator(small_default_model(), encode, decode)
    assert not plain.has_chat_template
    assert plain.chat_prompt_ids([{"role": "user", "content": "hi"}]) == encode("user: hi\nassistant:")
