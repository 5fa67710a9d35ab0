"""`dreamer4 play`: the HTTP layer over a PlaySession (play/session.py), and the command itself.

Why the standard library (`http.server.ThreadingHTTPServer`, JSON over POST): one person plays one
session, each key press is one request and one reply holding two 63x63 frames (~16 KB of base64),
so a step costs well under a millisecond of HTTP on localhost next to the model; a WebSocket
server (aiohttp, starlette) would add a dependency and an event loop without making a step faster.
Back-pressure is explicit instead: the page sends at most one step at a time and keeps only the
newest pending key (key repeats arriving meanwhile are dropped, never queued), and the server
answers a step that arrives while another is running with 409 {"dropped": true}.

Routes (a fixed table; nothing from the request ever reaches the file system):

    GET  /                 the page (dreamer4/play/static/index.html)
    GET  /play.js          its script (and /play.css, its style)
    GET  /api/info         the run: env, key bindings, K choices, agent, episodes, recording
    POST /api/reset        {"start": "world"|"episode", "seed": int, "episode": int, "lockstep": bool}
    POST /api/step         {"action": int, "K": int, "actor": "human"|"agent"}
    GET  /api/video.gif    the session so far, imagined | real (also /api/video.mp4)

Frames travel as base64 of their raw RGB bytes (H * W * 3, row-major); the page draws them on a
canvas and upscales with nearest-neighbour (CSS `image-rendering: pixelated`).

Security: binds 127.0.0.1 by default. Every request's Host header must name this server when it
is bound to a loopback address (no DNS rebinding); a POST must be `application/json`, at most
4 KiB, and from no other Origin than the page's (no cross-site requests); JSON with unknown
fields, wrong types or out-of-range values is answered 400 with the reason.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import json
import signal
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from dreamer4.config import ConfigError
from dreamer4.play.record import check_target
from dreamer4.play.session import STARTS, PlaySession, encode_video, inspect_run

MAX_BODY = 4096
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/play.js": ("play.js", "text/javascript; charset=utf-8"),
    "/play.css": ("play.css", "text/css; charset=utf-8"),
}
VIDEOS = {"/api/video.gif": ("gif", "image/gif"), "/api/video.mp4": ("mp4", "video/mp4")}
RESET_LOCK_TIMEOUT_S = 60.0  # a reset waits for a running step (a step never waits: it is dropped)


class BadRequest(ValueError):
    """A request the server refuses; the message says why (sent back as JSON)."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- input validation
def _int(body: dict, key: str, lo: int, hi: int, default=None) -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"field {key!r} must be an integer, got {v!r}")
    if not lo <= v < hi:
        raise BadRequest(f"field {key!r} must be in [{lo}, {hi}), got {v}")
    return v


def _fields(body, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; expected some of {sorted(allowed)}")
    return body


def parse_reset(body, session: PlaySession) -> dict:
    body = _fields(body, {"start", "seed", "episode", "lockstep"})
    start = body.get("start", "world")
    if start not in STARTS:
        raise BadRequest(f"field 'start' must be one of {list(STARTS)}, got {start!r}")
    lockstep = body.get("lockstep", True)
    if not isinstance(lockstep, bool):
        raise BadRequest(f"field 'lockstep' must be true or false, got {lockstep!r}")
    out = {"start": start, "seed": _int(body, "seed", 0, 2**31, default=0), "lockstep": lockstep, "episode": 0}
    if start == "episode":
        if not session.episodes:
            raise BadRequest("this run has no dataset episodes to start from")
        out["episode"] = _int(body, "episode", 0, len(session.episodes), default=0)
    return out


def parse_step(body, session: PlaySession) -> dict:
    body = _fields(body, {"action", "K", "actor"})
    actor = body.get("actor", "human")
    if actor not in ("human", "agent"):
        raise BadRequest(f"field 'actor' must be 'human' or 'agent', got {actor!r}")
    if actor == "agent" and not session.has_agent:
        raise BadRequest("this run has no agent stage, so actor 'agent' is not available")
    K = body.get("K", session.default_k)
    if isinstance(K, bool) or K not in session.ks:
        raise BadRequest(f"field 'K' must be one of {session.ks}, got {K!r}")
    action = None
    if actor == "human":
        action = _int(body, "action", 0, session.spec.num_actions)
    elif "action" in body:
        raise BadRequest("field 'action' is chosen by the agent when actor is 'agent'; leave it out")
    return {"action": action, "K": K, "actor": actor}


def frame_b64(frame) -> str | None:
    return None if frame is None else base64.b64encode(np.ascontiguousarray(frame, np.uint8).tobytes()).decode()


def wire(result: dict) -> dict:
    """A session result as JSON: frames as base64 raw RGB."""
    out = dict(result)
    out["imagined"] = frame_b64(result["imagined"])
    out["real"] = frame_b64(result["real"])
    return out


# ----------------------------------------------------------------------------- the app and handler
class PlayApp:
    """The session, its lock and the page's bytes (read once from the package)."""

    def __init__(self, session: PlaySession):
        self.session = session
        self.lock = threading.Lock()
        pkg = resources.files("dreamer4.play") / "static"
        self.static = {route: ((pkg / name).read_bytes(), ctype) for route, (name, ctype) in STATIC.items()}
        self.info = json.dumps(session.describe()).encode()
        self.dropped = 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class PlayHandler(BaseHTTPRequestHandler):
    server_version = "dreamer4-play"
    protocol_version = "HTTP/1.1"  # keep-alive: one connection for every step of a session
    # headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm holds the body
    # back until the client's delayed ACK (~40 ms on Linux) of the headers
    disable_nagle_algorithm = True

    @property
    def app(self) -> PlayApp:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        pass  # one line per key press would drown the terminal; errors are answered to the page

    # -- plumbing ------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _check_host(self) -> None:
        """Loopback binds answer only requests addressed to this server (no DNS rebinding)."""
        bound, port = self.server.server_address[:2]
        if not _loopback(bound):
            return
        host = self.headers.get("Host", "")
        allowed = {f"{h}:{port}" for h in ("localhost", "127.0.0.1", "[::1]", bound)}
        if host not in allowed:
            raise BadRequest(f"Host {host!r} is not this server", HTTPStatus.FORBIDDEN)

    def _body(self):
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise BadRequest("POST bodies must be application/json", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host", ""):
            raise BadRequest(f"cross-origin request from {origin!r} refused", HTTPStatus.FORBIDDEN)
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("a POST needs a Content-Length", HTTPStatus.LENGTH_REQUIRED) from None
        if not 0 <= n <= MAX_BODY:
            raise BadRequest(f"body of {n} bytes refused (at most {MAX_BODY})", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(n)
        self._body_read = True
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"the body is not JSON: {e}") from None

    def _route(self, method: str) -> None:
        self._body_read = False
        try:
            self._check_host()
            path = urlsplit(self.path).path
            if method == "GET":
                self._get(path)
            else:
                self._post(path)
        except BadRequest as e:
            if method == "POST" and not self._body_read:  # never take an unread body for the next request
                self.close_connection = True
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):  # noqa: N802  (http.server's names)
        self._route("GET")

    def do_HEAD(self):  # noqa: N802
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def _refuse_method(self):
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported here")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

    # -- routes --------------------------------------------------------------------------------------
    def _get(self, path: str) -> None:
        app = self.app
        if path in app.static:
            body, ctype = app.static[path]
            self._send(HTTPStatus.OK, body, ctype)
        elif path == "/api/info":
            self._send(HTTPStatus.OK, app.info, "application/json")
        elif path in VIDEOS:
            fmt, ctype = VIDEOS[path]
            with app.lock:  # a consistent copy; encoding runs outside the lock
                frames = app.session.video_frames()
            data = encode_video(frames, fmt)
            self._send(
                HTTPStatus.OK, data, ctype, {"Content-Disposition": f'attachment; filename="dreamer4-play.{fmt}"'}
            )
        elif path in ("/api/reset", "/api/step"):
            raise BadRequest(f"{path} takes a POST", HTTPStatus.METHOD_NOT_ALLOWED)
        else:
            raise BadRequest("not found", HTTPStatus.NOT_FOUND)

    def _post(self, path: str) -> None:
        app = self.app
        if path == "/api/step":
            args = parse_step(self._body(), app.session)
            if not app.lock.acquire(blocking=False):  # a step is running: drop this one, never queue
                app.dropped += 1
                self._json(HTTPStatus.CONFLICT, {"dropped": True, "error": "busy: a step is running"})
                return
            try:
                result = app.session.step(args["action"], args["K"], args["actor"])
            except ValueError as e:  # e.g. the real episode is over
                raise BadRequest(str(e), HTTPStatus.CONFLICT) from None
            finally:
                app.lock.release()
            self._json(HTTPStatus.OK, wire(result))
        elif path == "/api/reset":
            args = parse_reset(self._body(), app.session)
            if not app.lock.acquire(timeout=RESET_LOCK_TIMEOUT_S):
                raise BadRequest("busy: a step did not finish in time", HTTPStatus.SERVICE_UNAVAILABLE)
            try:
                result = app.session.reset(**args)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            finally:
                app.lock.release()
            self._json(HTTPStatus.OK, wire(result))
        elif path in STATIC or path == "/api/info" or path in VIDEOS:
            raise BadRequest(f"{path} takes a GET", HTTPStatus.METHOD_NOT_ALLOWED)
        else:
            raise BadRequest("not found", HTTPStatus.NOT_FOUND)


class PlayServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False  # a port in use is an error, never shared


def bind(host: str, port: int) -> PlayServer:
    """Bind first (before any model loads), so a busy port is one sentence in a second."""
    try:
        server = PlayServer((host, port), PlayHandler, bind_and_activate=False)
        server.server_bind()
        server.server_activate()
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port}: {host}:{port} is already in use; pick another port") from None
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return server


def serve(server: PlayServer, session: PlaySession) -> threading.Thread:
    """Serve `session` on a bound server in a background thread (tests, benchmarks)."""
    server.app = PlayApp(session)  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return thread


def url_of(server: PlayServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def run_play(
    run: str,
    port: int = 8000,
    host: str = "127.0.0.1",
    record: str | None = None,
    context: int | None = None,
    cache_len: int | None = None,
    seed: int = 0,
    log=print,
) -> int:
    """`dreamer4 play`: check the run and the recording target, bind, load, compile, serve until
    Ctrl-C / SIGTERM; the episode in progress is then committed."""
    info = inspect_run(run)
    if record:
        check_target(record, info.cfg.env.name, info.frame_shape, info.num_actions)
    server = bind(host, port)
    session = app = None
    try:
        t0 = time.time()
        session = PlaySession(run, record=record, context=context, cache_len=cache_len, log=log)
        session.reset("world", seed=seed)
        session.warm([session.default_k])
        log(
            f"loaded {Path(run)} ({session.env_name}, agent: {session.info.agent_stage or 'none'}) in {time.time() - t0:.0f} s"
        )
        if record:
            log(f"recording every real-game session into {record} (policy 'human')")
        server.app = app = PlayApp(session)  # type: ignore[attr-defined]
        signal.signal(signal.SIGTERM, _stop)
        log(f"dreamer4 play: open {url_of(server)} (Ctrl-C stops)")
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        log("stopping")
    finally:
        server.server_close()
        if session is not None:
            # wait for a step in flight, then commit the episode in progress
            locked = app.lock.acquire(timeout=RESET_LOCK_TIMEOUT_S) if app else False
            session.close()
            if locked:
                app.lock.release()
    return 0


def _stop(signum, frame):
    """SIGTERM stops like Ctrl-C, so the episode in progress is committed."""
    raise KeyboardInterrupt
