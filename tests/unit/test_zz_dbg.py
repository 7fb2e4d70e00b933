import pytest, json
from tests.unit.ingress_stub import stub_ingress, StubHandle
pytestmark = pytest.mark.unit
def test_x(monkeypatch):
    from starlette.testclient import TestClient
    app, obj, handle = stub_ingress(monkeypatch, handle=StubHandle(validate_sampling=True))
    print("MW", app.user_middleware)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", content=json.dumps({"model": "smollm2", "prompt": "hi", "max_tokens": 3}))
        print("RESP", r.status_code, r.text[:200], r.request.headers)
