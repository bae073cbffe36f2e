"""`mixtral-jax serve` as a subprocess on 127.0.0.1, driven by the official openai client and httpx."""

import os
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import mixtral_jax as mj
from mixtral_jax.checkpoint import demo_model_path, save
from mixtral_jax.detokenize import text_in_context

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import serve_load  # noqa: E402  (its server launcher: a free port, a bounded wait for /health)
from serve_load import stop_server  # noqa: E402

STARTUP_S = 600
TINY_KEY = "sk-tiny-test"


def start_server(*args, env=None):
    return serve_load.start_server(list(args), timeout=STARTUP_S, env=env)


@pytest.fixture(scope="module")
def demo():
    """The demo model behind a 2-slot server; (url, Model)."""
    url, proc = start_server("--slots", 2, "--prefill-chunk", 64)
    try:
        yield url, mj.load(demo_model_path())
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model with the real tokenizer behind a 1-slot server queueing at most 1 request,
    its /v1/ routes behind the API key TINY_KEY (given through the environment)."""
    config = mj.MixtralConfig.tiny().replace(vocab_size=32000, max_seq_len=4096)
    path = tmp_path_factory.mktemp("tiny") / "tiny-random"
    save(str(path), config, mj.init_params(config, seed=3), tokenizer=mj.Tokenizer().path)
    url, proc = start_server("--checkpoint", path, "--slots", 1, "--max-queue", 1, "--prefill-chunk", 16,
                             env={"MIXTRAL_JAX_API_KEY": TINY_KEY})
    try:
        yield url, mj.load(path)
    finally:
        stop_server(proc)


def client(url, api_key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def metric(url, name) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def served_defaults(model):
    """What the server applies to omitted fields besides temperature and length: the checkpoint's
    generation_config.json penalties and filters (the demo model ships a repetition penalty)."""
    keep = ("repetition_penalty", "presence_penalty", "frequency_penalty", "top_k", "top_p", "min_p")
    return {k: v for k, v in model.generation_config_kwargs().items() if k in keep}


def greedy_text(model, ids, n):
    new = mj.generate(model, [ids], max_new_tokens=n, **served_defaults(model))[0]
    return text_in_context(model.tokenizer, ids, new), new


def test_completion_chat_stream_usage_and_n(demo):
    url, model = demo
    c = client(url)
    tok = model.tokenizer
    prompt = "def fibonacci(n):"
    want, new = greedy_text(model, tok.encode(prompt), 24)
    got = c.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0)
    assert got.object == "text_completion" and got.choices[0].text == want
    assert got.usage.prompt_tokens == len(tok.encode(prompt)) and got.usage.completion_tokens == len(new)
    stream = list(c.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == want
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == len(new)
    assert [ch.choices[0].finish_reason for ch in stream if ch.choices][-1] == "length"
    ids = c.completions.create(model="demo", prompt=tok.encode(prompt), max_tokens=24, temperature=0)
    assert ids.choices[0].text == want  # a token-id prompt (BOS included by the caller)

    messages = [{"role": "user", "content": "Write a function"}]
    chat_ids = tok.encode_chat(messages)
    want_chat, _ = greedy_text(model, chat_ids, 20)
    got = c.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.content == want_chat
    assert got.choices[0].message.role == "assistant" and got.usage.prompt_tokens == len(chat_ids)
    chunks = list(c.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want_chat
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)

    two = c.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=1.0, seed=5, n=2)
    assert [ch.index for ch in two.choices] == [0, 1] and all(ch.finish_reason for ch in two.choices)
    sampled = mj.generate(model, [tok.encode(prompt)] * 2, max_new_tokens=12, temperature=1.0, seed=[5, 6],
                          **served_defaults(model))
    assert [ch.text for ch in two.choices] == [text_in_context(tok, tok.encode(prompt), s) for s in sampled]
    assert two.usage.completion_tokens == sum(map(len, sampled))  # choice i samples with seed + i


def test_a_batch_of_prompts_answers_each_prompt_as_alone(demo):
    """OpenAI's completions take a list of prompts (LangChain always sends one): n choices per
    prompt, indexed prompt by prompt, usage counting each prompt once."""
    url, model = demo
    c = client(url)
    tok = model.tokenizer
    prompts = ["def f(x):", "Once upon a time", "import numpy"]
    want = [greedy_text(model, tok.encode(p), 8)[0] for p in prompts]
    got = c.completions.create(model="demo", prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [ch.index for ch in got.choices] == list(range(6))
    assert [ch.text for ch in got.choices] == [w for w in want for _ in range(2)]
    assert got.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert got.usage.completion_tokens == 6 * 8
    ids = c.completions.create(model="demo", prompt=[tok.encode(p) for p in prompts], max_tokens=8, temperature=0)
    assert [ch.text for ch in ids.choices] == want
    texts = {}
    for chunk in c.completions.create(model="demo", prompt=prompts, max_tokens=8, temperature=0, stream=True,
                                      stream_options={"include_usage": True}):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
        usage = chunk.usage
    assert texts == dict(enumerate(want)) and usage.completion_tokens == 3 * 8


def test_echo_model_retrieval_and_unknown_routes(demo):
    url, model = demo
    c = client(url)
    tok = model.tokenizer
    prompt = "def f(x):"
    want = tok.decode(tok.encode(prompt)) + greedy_text(model, tok.encode(prompt), 6)[0]
    got = c.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert got.choices[0].text == want and want.startswith(prompt)
    chunks = c.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0, echo=True, stream=True)
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert c.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("other")
    for method, path, status in (("GET", "/v1/nothing", 404), ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, f"{url}{path}", timeout=10)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_logprobs_and_routing(demo):
    url, model = demo
    c = client(url)
    got = c.completions.create(model="demo", prompt="import os", max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(len(t) == 3 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    ids = model.tokenizer.encode("import os")
    _, ref = mj.generate(model, [ids], max_new_tokens=6, logprobs=True, **served_defaults(model))
    np.testing.assert_allclose(lp.token_logprobs, ref[0], atol=1e-4)
    chat = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    raw = httpx.post(f"{url}/v1/completions", json={"model": "demo", "prompt": "import os", "max_tokens": 5,
                                                    "temperature": 0, "return_routing": True}, timeout=60).json()
    routing = raw["choices"][0]["routing"]
    assert len(routing) == 5 and all(len(step) == model.config.n_layers for step in routing)
    assert all(len(set(pair)) == 2 and all(0 <= e < 8 for e in pair) for step in routing for pair in step)


def test_concurrent_streams_equal_requests_alone_and_nothing_compiles(demo):
    url, model = demo
    c = client(url)
    compiled = metric(url, "mixtral_jax_compilations_total")
    prompts = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main(argv):\n    " * 3, "class Stack:",
               "x = " + "1 + " * 60 + "1"]
    lengths = [20, 7, 31, 12]
    alone = [c.completions.create(model="demo", prompt=p, max_tokens=n, temperature=0).choices[0].text
             for p, n in zip(prompts, lengths)]
    results = [None] * 4

    def run(i):
        stream = c.completions.create(model="demo", prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True)
        results[i] = "".join(ch.choices[0].text for ch in stream if ch.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == alone
    assert metric(url, "mixtral_jax_compilations_total") == compiled


def test_disconnect_frees_the_slot(demo):
    url, model = demo
    body = {"model": "demo", "prompt": "def fibonacci(n):", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # the first chunk, then go away
    deadline = time.monotonic() + 2.0
    while metric(url, "mixtral_jax_slots_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "mixtral_jax_slots_used") == 0
    want, _ = greedy_text(model, model.tokenizer.encode("import os"), 10)
    assert client(url).completions.create(model="demo", prompt="import os", max_tokens=10,
                                          temperature=0).choices[0].text == want


def test_stop_string_across_a_token_boundary_never_leaks(demo):
    url, model = demo
    tok = model.tokenizer
    ids = tok.encode("def fibonacci(n):")
    new = mj.generate(model, [ids], max_new_tokens=40)[0]
    pieces = [text_in_context(tok, ids + new[:i], new[i:i + 1]) for i in range(len(new))]
    i = next(i for i in range(3, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[i][-2:] + pieces[i + 1][:2]          # spans the boundary between tokens i and i+1
    full = "".join(pieces)
    before = full[:full.index(stop)]
    c = client(url)
    got = c.completions.create(model="demo", prompt="def fibonacci(n):", max_tokens=40, temperature=0, stop=[stop])
    assert got.choices[0].text == before and got.choices[0].finish_reason == "stop"
    chunks = [ch.choices[0].text for ch in c.completions.create(model="demo", prompt="def fibonacci(n):",
                                                                  max_tokens=40, temperature=0, stop=stop, stream=True)
              if ch.choices]
    assert "".join(chunks) == before


BAD = [  # (endpoint, body or raw string, status, param)
    ("completions", "{not json", 400, None),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": "demo"}, 400, "prompt"),
    ("completions", {"model": "demo", "prompt": 5}, 400, "prompt"),
    ("completions", {"model": "demo", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": "demo", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("completions", {"model": "demo", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"model": "demo", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": "demo", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"model": "demo", "prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"model": "demo", "prompt": "hi", "max_tokens": 600}, 400, "max_tokens"),
    ("completions", {"model": "demo", "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ("completions", {"model": "demo", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"model": "demo", "prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("completions", {"model": "demo", "prompt": ["hi", ""]}, 400, "prompt"),
    ("completions", {"model": "demo", "prompt": ["hi", 5]}, 400, "prompt"),
    ("completions", {"model": "demo", "prompt": [[1, 5], [1, -3]]}, 400, "prompt"),
    ("completions", {"model": "demo", "prompt": ["hi", "x " * 600], "max_tokens": 4}, 400, "prompt"),
    ("completions", {"model": "demo", "prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo"),
    ("completions", {"model": "demo", "prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("chat/completions", {"model": "demo", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}]}, 400, "messages"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "a"}], "logprobs": "yes"},
     400, "logprobs"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "a"}], "logprobs": True,
                          "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user"}]}, 400, "messages"),
]


def test_malformed_requests_get_the_right_errors_and_the_server_keeps_serving(demo):
    url, model = demo
    for endpoint, body, status, param in BAD:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
        r = httpx.post(f"{url}/v1/{endpoint}", timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
        assert err["param"] == param, (body, err)
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="other", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model="demo", prompt="hi", max_tokens=-1)
    want, _ = greedy_text(model, model.tokenizer.encode("import os"), 8)
    assert client(url).completions.create(model="demo", prompt="import os", max_tokens=8,
                                          temperature=0).choices[0].text == want
    assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "demo"


def test_tiny_model_a_full_queue_and_the_api_key(tiny):
    url, model = tiny
    c = client(url, TINY_KEY)
    auth = {"Authorization": f"Bearer {TINY_KEY}"}
    want, _ = greedy_text(model, model.tokenizer.encode("Hello"), 10)
    assert c.completions.create(model="tiny-random", prompt="Hello", max_tokens=10, temperature=0).choices[0].text == want
    # Without the key, or with another: 401 in OpenAI's shape on every /v1/ route; probes stay open.
    for wrong in ("unused", TINY_KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, wrong).completions.create(model="tiny-random", prompt="Hello", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/v1/chat/completions"):
        r = httpx.request("GET" if "models" in path else "POST", f"{url}{path}", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=auth, timeout=10).json()["data"][0]["id"] == "tiny-random"
    # More completions than the queue holds could never be admitted: a 400 (a 429 would be retried).
    too_many = httpx.post(f"{url}/v1/completions", json={"model": "tiny-random", "prompt": "Hello", "max_tokens": 2,
                                                         "n": 2}, headers=auth, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    assert "--max-queue 1" in too_many.json()["error"]["message"]
    # Thousands of tokens: the first request holds the only slot for seconds.
    body = {"model": "tiny-random", "prompt": "Hello", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth, timeout=60) as first:
        lines = first.iter_lines()  # kept: a dropped iterator closes the stream, and the server cancels
        next(lines)                                               # holds the only slot
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth, timeout=60) as second:  # waits
            deadline = time.monotonic() + 10
            while metric(url, "mixtral_jax_requests_waiting") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            third = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=auth, timeout=30)
            assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
            assert second.status_code == 200
    deadline = time.monotonic() + 5
    while metric(url, "mixtral_jax_slots_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.completions.create(model="tiny-random", prompt="Hello", max_tokens=10, temperature=0).choices[0].text == want


@pytest.mark.slow
def test_two_processes_serve_like_one():
    """Process 0 serves HTTP, process 1 mirrors its device calls; 8 host devices over 2 processes."""
    import subprocess

    port, coordinator = serve_load.free_port(), serve_load.free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-m", "mixtral_jax.cli", "serve", "--port", str(port), "--slots", "2",
                               "--prefill-chunk", "64", "--mesh", "data=1,expert=8,tensor=1",
                               "--coordinator", f"localhost:{coordinator}", "--num-processes", "2",
                               "--process-id", str(i)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        model = mj.load(demo_model_path())
        for prompt, n in (("def fibonacci(n):", 24), ("import os", 12)):
            want, _ = greedy_text(model, model.tokenizer.encode(prompt), n)
            got = client(url).completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0)
            assert got.choices[0].text == want
    finally:
        stop_server(procs[0])
        procs[1].wait(timeout=60)  # process 0's shutdown tells it to stop
        assert procs[1].returncode == 0
