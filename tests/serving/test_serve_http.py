"""The HTTP API on a live uvicorn server (127.0.0.1, a free port), called with the official `openai`
client and with plain HTTP; parity with `embedft export`; errors, auth, overload and metrics."""

from __future__ import annotations

import json
import threading

import httpx2 as httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from embedft.cli import main
from embedft.serving.app import create_app
from serving.serve_helpers import FAMILIES, TEXTS, LiveServer, assert_close, engine_for


@pytest.fixture(scope="module", params=FAMILIES)
def live(request, family_models):
    fm = family_models[request.param]
    server = LiveServer(engine_for(fm))
    server.fm = fm
    yield server
    server.close()


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def test_openai_client_gets_each_adapters_vectors_as_floats_or_base64_documents_or_queries(live):
    fm, client = live.fm, live.client
    for name in ("base", "a1", "a2", "a3"):
        # The client asks for base64 unless told otherwise, and decodes it.
        r = client.embeddings.create(model=name, input=TEXTS)
        assert r.model == name and len(r.data) == len(TEXTS)
        assert_close(vectors(r), fm["refs"][name]["document"])
        n_tokens = sum(len(x) for x in live.engine._tokenize(TEXTS, live.engine._models[name].profile, False))
        assert r.usage.prompt_tokens == r.usage.total_tokens == n_tokens
        floats = client.embeddings.create(model=name, input=TEXTS, encoding_format="float",
                                          extra_body={"input_type": "query"})
        assert_close(vectors(floats), fm["refs"][name]["query"])
    one = client.embeddings.create(model="a2", input="tv")
    assert_close(vectors(one), fm["refs"]["a2"]["document"][1:2])
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["base", "a1", "a2", "a3"]
    assert client.models.retrieve("a3").max_length == 16


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live):
    client = live.client
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="nope", input=["tv"])
    assert e.value.body["code"] == "model_not_found" and "served models: base, a1, a2, a3" in e.value.body["message"]
    for bad, message in (([], "empty list"), ("", "empty string"), ([""], "empty string"),
                         (["tv"] * 300, "at most 256 per request"), ([[1, 2, 3]], "token arrays")):
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.embeddings.create(model="a1", input=bad)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
        assert e.value.body["param"] == "input"
    post = f"{live.url}/v1/embeddings"
    raw = [(b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "JSON list"),
           (json.dumps({"input": ["tv"]}).encode(), 400, "'model' is required"),
           (json.dumps({"model": "a1"}).encode(), 400, "'input' is required"),
           (json.dumps({"model": 7, "input": "tv"}).encode(), 400, "'model' is required"),
           (json.dumps({"model": "a1", "input": {"a": 1}}).encode(), 400, "string or a list of strings"),
           (json.dumps({"model": "a1", "input": "tv", "encoding_format": "int8"}).encode(), 400, "'float' or 'base64'"),
           (json.dumps({"model": "a1", "input": "tv", "dimensions": 8}).encode(), 400, "own 32 dimensions"),
           (json.dumps({"model": "a1", "input": "tv", "input_type": "passage"}).encode(), 400, "input_type"),
           (b"{" + b" " * (9 * 1024 * 1024) + b"}", 413, "over 8388608 bytes")]
    for body, status, message in raw:
        r = httpx.post(post, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == status, (body[:60], r.text)
        err = r.json()["error"]
        assert message in err["message"] and set(err) == {"message", "type", "param", "code"}
    r = httpx.get(f"{live.url}/v1/nothing-here", timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{live.url}/v1/embeddings", timeout=60)
    assert r.status_code == 405 and "error" in r.json()
    assert_close(vectors(client.embeddings.create(model="a1", input=TEXTS)), live.fm["refs"]["a1"]["document"])


def test_adapters_load_and_unload_over_http_while_clients_embed(live):
    fm, client = live.fm, live.client
    failures: list[str] = []
    done = threading.Event()

    def steady(name: str) -> None:
        for i in range(25):
            if done.is_set():
                return
            try:
                got = vectors(client.embeddings.create(model=name, input=TEXTS[:4]))
                if np.abs(got - fm["refs"][name]["document"][:4]).max() > 1e-5:
                    failures.append(f"{name}: another model's vectors")
            except Exception as e:  # any failure of a steady request fails the test below
                failures.append(f"{name}: {e!r}")

    threads = [threading.Thread(target=steady, args=(n,)) for n in ("base", "a1", "a2", "a1")]
    for t in threads:
        t.start()
    for g in range(3):
        weights = ("a2", "a3")[g % 2]
        r = httpx.post(f"{live.url}/v1/adapters", json={"name": "hot", "source": str(fm["adapters"][weights])},
                       timeout=60)
        assert r.status_code == 201 and r.json()["id"] == "hot" and r.json()["kind"] == "adapter"
        assert_close(vectors(client.embeddings.create(model="hot", input=TEXTS)), fm["refs"][weights]["document"])
        r = httpx.delete(f"{live.url}/v1/adapters/hot", timeout=60)
        assert r.status_code == 200 and r.json() == {"id": "hot", "object": "model", "deleted": True}
    done.set()
    for t in threads:
        t.join(120)
    assert failures == []
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "a1", "source": str(fm["adapters"]["a2"])}, timeout=60)
    assert r.status_code == 409 and "already served" in r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "x", "source": str(fm["adapters"]["a1"]) + "-missing"},
                   timeout=60)
    assert r.status_code == 400 and "no such folder" in r.json()["error"]["message"]
    assert httpx.delete(f"{live.url}/v1/adapters/base", timeout=60).status_code == 400
    assert httpx.delete(f"{live.url}/v1/adapters/hot", timeout=60).status_code == 404
    assert [m.id for m in client.models.list().data] == ["base", "a1", "a2", "a3"]


def test_metrics_count_requests_batches_queue_and_latency(live):
    live.client.embeddings.create(model="a1", input=TEXTS)
    text = httpx.get(f"{live.url}/metrics", timeout=60).text
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            series[key] = float(value)
    assert series['embedft_http_requests_total{code="200",route="/v1/embeddings"}'] >= 1
    assert series['embedft_http_request_seconds_count{route="/v1/embeddings"}'] >= 1
    assert series['embedft_rows_total{model="a1"}'] >= len(TEXTS)
    assert series["embedft_batch_rows_count"] >= 1 and series['embedft_batch_rows_bucket{le="+Inf"}'] >= 1
    assert series["embedft_queue_rows"] == 0 and series["embedft_adapters_loaded"] == 3
    assert "# TYPE embedft_forward_seconds histogram" in text
    h = httpx.get(f"{live.url}/health", timeout=60).json()
    assert h["status"] == "ok" and h["models"] == 4


def test_exports_served_vectors_match_plain_sentence_transformers_and_verify_server(live, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedft.export.merge import export_merged
    from embedft.serving.verify import read_probes

    fm = live.fm
    for name in ("a1", "a2", "a3"):
        out = tmp_path / name
        export_merged(fm["adapters"][name], out)
        probes, _, _ = read_probes(out)
        st = SentenceTransformer(str(out), device="cpu")
        for kind, kw in (("document", {}), ("query", {"prompt_name": "query"})):
            want = st.encode(probes, normalize_embeddings=False, **kw)
            got = vectors(live.client.embeddings.create(model=name, input=probes, extra_body={"input_type": kind}))
            cos = (want * got).sum(1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
            assert cos.min() >= 0.99999 and np.abs(want - got).max() <= 1e-5, (name, kind, cos.min())
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(tmp_path / "a1"), "--server", live.url, "--served-model", "a1"])
    assert ok.exit_code == 0, ok.output
    assert f"OK: {live.url} model a1: min cosine" in ok.output
    wrong = runner.invoke(main, ["verify", str(tmp_path / "a1"), "--server", live.url, "--served-model", "a2"])
    assert wrong.exit_code == 1 and "does not give the vectors of" in wrong.output
    gone = runner.invoke(main, ["verify", str(tmp_path / "a1"), "--server", live.url, "--served-model", "zz"])
    assert gone.exit_code == 1 and "refused the probes (404)" in gone.output
    usage = runner.invoke(main, ["verify", str(tmp_path / "a1"), "--server", live.url])
    assert usage.exit_code == 2 and "go together" in usage.output


def test_bearer_token_guards_every_endpoint_but_health(family_models):
    engine = engine_for(family_models["bert"], adapters=("a1",), api_key="s3cret")
    app = create_app(engine)
    with TestClient(app) as c:
        for path in ("/v1/models", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/embeddings", json={"model": "a1", "input": "tv"}).status_code == 401
        r = c.post("/v1/embeddings", json={"model": "a1", "input": "tv"}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
        assert c.get("/health").status_code == 200
    assert engine.metrics.value("http_requests_total", route="/v1/models", code="401") == 2


def test_a_full_queue_answers_503_with_retry_after(family_models):
    fm = family_models["bert"]
    engine = engine_for(fm, adapters=("a1",), max_queue_rows=4, max_inputs=4)
    c = TestClient(create_app(engine))  # no lifespan yet: the worker is not running, the queue only fills
    waiting = engine.submit("a1", TEXTS[:4])
    r = c.post("/v1/embeddings", json={"model": "a1", "input": "tv"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "server_overloaded" and "queue is full" in r.json()["error"]["message"]
    with c:  # the lifespan starts the worker
        assert_close(waiting.result(60).vectors, fm["refs"]["a1"]["document"][:4])
        r = c.post("/v1/embeddings", json={"model": "a1", "input": "tv", "encoding_format": "float"})
        assert r.status_code == 200
        assert_close(np.array([r.json()["data"][0]["embedding"]], dtype=np.float32), fm["refs"]["a1"]["document"][1:2])
