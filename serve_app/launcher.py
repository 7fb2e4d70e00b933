"""``kvserve serve CONFIG``: run a config file in the foreground, say when it serves, stop it cleanly.

Owns: the foreground run behind ``./dev serve``: start a local Ray (or join ``--address``), start
Serve with the file's ``http_options``/``proxy_location``, deploy each application through its
``import_path`` builder (Serve's public ``serve.start``/``serve.run``), poll the ingress's ``/health``
and print one ``kvserve: ready at http://...`` line when every model has a running replica (progress
lines meanwhile), and on Ctrl-C / SIGTERM stop what it started within ``STOP_BUDGET_S``: the apps
(``serve.shutdown`` on its own Ray, ``serve.delete`` of its apps on a joined cluster), then Ray, then
any process of its own tree that outlived them (vLLM engine cores and workers). A second signal skips
the graceful part.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

STOP_BUDGET_S = 15.0
_SERVE_SHUTDOWN_S = 8.0  # graceful part of the budget; Ray's shutdown and the process sweep get the rest
PROGRESS_EVERY_S = 30.0


def health_url(http_options: dict[str, Any] | None) -> tuple[str, str]:
    """(the ingress's /health URL, the OpenAI base URL) as a client on this machine reaches them."""
    opts = http_options or {}
    host = str(opts.get("host", "127.0.0.1"))
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{host}:{int(opts.get('port', 8000))}"
    return base + "/health", base + "/v1"


def fetch_health(url: str, timeout_s: float = 5.0) -> tuple[int, dict[str, Any] | None]:
    """(HTTP status, JSON body) of /health; (0, None) while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"null")
        except ValueError:
            return err.code, None
    except (OSError, ValueError):
        return 0, None


def progress_line(status: int, body: dict[str, Any] | None) -> str:
    if status == 0:
        return "HTTP proxy not answering yet"
    if status == 404:
        return "the app's route is not up yet"
    if not isinstance(body, dict) or "models" not in body:
        return f"/health answered {status}"
    return ", ".join(f"{m}: {s}" for m, s in sorted(body["models"].items()))


def wait_ready(health: Callable[[], tuple[int, dict[str, Any] | None]], stop: threading.Event,
               say: Callable[[str], None], now: Callable[[], float] = time.monotonic,
               poll_s: float = 1.0) -> bool:
    """Poll until /health says every model is ready (True) or ``stop`` is set (False)."""
    start = last = now()
    while not stop.is_set():
        status, body = health()
        if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
            return True
        if now() - last >= PROGRESS_EVERY_S:
            last = now()
            say(f"kvserve: waiting for the models ({now() - start:.0f} s): {progress_line(status, body)}")
        stop.wait(poll_s)
    return False


class _Stopper:
    """SIGINT/SIGTERM -> ``requested``; a second signal -> ``forced``."""

    def __init__(self) -> None:
        self.requested, self.forced, self.signal_name = threading.Event(), threading.Event(), ""

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        if self.requested.is_set():
            self.forced.set()
            return
        self.signal_name = signal.Signals(signum).name
        self.requested.set()


def _descendants() -> list[Any]:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def sweep(procs: list[Any], grace_s: float, sigkilled: list[int] | None = None) -> int:
    """Terminate the given processes that still run (SIGTERM, then SIGKILL after ``grace_s``); return how many.
    The pids that needed the SIGKILL are appended to ``sigkilled`` when it is given."""
    import psutil

    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        try:
            p.kill()
            if sigkilled is not None:
                sigkilled.append(p.pid)
        except psutil.Error:
            pass
    return len(alive)


def _run_with_timeout(fn: Callable[[], Any], timeout_s: float) -> bool:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()


def _deploy(doc: dict[str, Any]) -> list[str]:
    from ray import serve

    serve.start(http_options=doc.get("http_options") or {}, proxy_location=doc.get("proxy_location", "HeadOnly"))
    names = []
    for app in doc["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        name = app.get("name", "default")
        serve.run(builder(app.get("args", {})), name=name, route_prefix=app.get("route_prefix", "/"), blocking=False)
        names.append(name)
    return names


def _stop(own_ray: bool, apps: list[str], stopper: _Stopper, t0: float) -> bool:
    """Stop what this run started; False when Serve's graceful stop ran out of time (its thread still runs)."""
    import ray
    from ray import serve

    procs = _descendants()
    clean = not stopper.forced.is_set()
    if clean:
        graceful = serve.shutdown if own_ray else (lambda: [serve.delete(a) for a in apps])
        clean = _run_with_timeout(graceful, _SERVE_SHUTDOWN_S)
        if not clean:
            print(f"kvserve: Serve did not stop within {_SERVE_SHUTDOWN_S:.0f} s; stopping Ray", flush=True)
    if own_ray:
        if clean:  # with Serve's stop still running in its thread, ray.shutdown would kill the process under it
            _run_with_timeout(ray.shutdown, max(STOP_BUDGET_S - (time.monotonic() - t0) - 3, 1))
        procs += [p for p in _descendants() if p not in procs]
        left = sweep(procs, grace_s=2.0)
        if left:
            print(f"kvserve: ended {left} leftover process(es) of this run", flush=True)
    else:
        print("kvserve: the Ray cluster it joined keeps running (`ray stop` stops it)", flush=True)
    return clean


def run(config: str, address: str | None = None, fast_path: bool = False) -> int:
    """Serve ``config`` until Ctrl-C / SIGTERM on a Ray of its own, or on the cluster at ``address``.

    Before anything starts: the HTTP port must be free (on a Ray of its own) and no orphaned Serve HAProxy
    may run (``haproxy_guard.preflight``). ``fast_path`` puts HAProxy in front (``haproxy_guard.fast_path_env``,
    HAProxy tied to its proxy) for the Ray this command starts.
    """
    from serve_app.config import ConfigError, load_serve_config
    from serve_app.haproxy_guard import fast_path_env, preflight

    try:
        doc, _ = load_serve_config(config)
    except ConfigError as err:
        print(f"kvserve serve: {err}", file=sys.stderr)
        return 2
    refusal = preflight(int((doc.get("http_options") or {}).get("port", 8000)) if address is None else None)
    if refusal:
        print(f"kvserve serve: {refusal}", file=sys.stderr)
        return 2
    if fast_path:  # the Ray started below inherits this process's environment
        os.environ.update(fast_path_env())
    stopper = _Stopper()
    stopper.install()
    t_start = time.monotonic()
    url, base = health_url(doc.get("http_options"))
    import ray

    own_ray = address is None
    ray.init(address=address or "local")
    stopper.install()  # ray.init installs its own SIGTERM handler
    apps: list[str] = []
    try:
        apps = _deploy(doc)
        print(f"kvserve: deploying {config}; the engines take a while (see README: cold start)", flush=True)
        if wait_ready(lambda: fetch_health(url), stopper.requested, lambda s: print(s, flush=True)):
            print(f"kvserve: ready at {base} after {time.monotonic() - t_start:.0f} s "
                  "(Ctrl-C stops it; `./dev status` shows replicas)", flush=True)
            while not stopper.requested.wait(1.0):
                pass
    except Exception as err:  # noqa: BLE001 - one line, then stop what was started
        print(f"kvserve serve: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        stopper.requested.set()
        stopper.signal_name = stopper.signal_name or "error"
    t0 = time.monotonic()
    print(f"kvserve: stopping ({stopper.signal_name or 'requested'}) ...", flush=True)
    clean = _stop(own_ray, apps, stopper, t0)
    print(f"kvserve: stopped in {time.monotonic() - t0:.1f} s", flush=True)
    code = 0 if stopper.signal_name in ("SIGINT", "SIGTERM") else 1
    if not clean:
        # Serve's stop is still running in a thread on a Ray that is gone: the interpreter's exit (Ray's atexit
        # shutdown) would race it and end the process with Ray's fatal-error status instead of ours.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
