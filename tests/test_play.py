"""`dreamer4 play`: the session (world model + real game, agent, cache slide, recording), the HTTP
endpoints' refusals, and the page itself in headless Chromium (driven over the DevTools protocol).

All of it plays the session run of tests/test_agent.py (conftest.trained_agent: tokenizer,
dynamics, both agent phases), with one server and one session for the module, so the Craftax
step and the world model's step compile once.
"""

from __future__ import annotations

import ast
import http.client
import importlib.util
import json
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cdp import CHROMIUM, Browser
from conftest import TOK_OVERRIDES, make_test_config
from flax import nnx

from dreamer4.cli import main
from dreamer4.data import store
from dreamer4.data.env import make_env
from dreamer4.data.store import Dataset, DatasetError
from dreamer4.play.keys import BINDINGS, key_bindings
from dreamer4.play.record import Recorder
from dreamer4.play.server import bind, serve
from dreamer4.play.session import PlaySession
from dreamer4.runtime.loading import build_tokenizer

CONTEXT = 2  # with the test dynamics' seq_len 4 the cache holds 4 steps: it slides every 2 steps


# ----------------------------------------------------------------------------- no model needed
PYGAME_TO_BROWSER = {
    "K_SPACE": " ",
    "K_TAB": "Tab",
    "K_COMMA": ",",
    "K_PERIOD": ".",
    "K_LEFTBRACKET": "[",
    "K_RIGHTBRACKET": "]",
    "K_MINUS": "-",
    "K_EQUALS": "=",
    "K_SEMICOLON": ";",
}


def _craftax_key_mapping(module: str) -> list[tuple[str, str]]:
    """KEY_MAPPING of a craftax play script, read from its source (importing it imports pygame)."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "KEY_MAPPING":
            pairs = []
            for k, v in zip(node.value.keys, node.value.values):
                name = k.attr
                key = PYGAME_TO_BROWSER.get(name, name[2:] if len(name) == 3 else None)
                pairs.append((key, v.attr.lower()))
            return pairs
    raise AssertionError(f"no KEY_MAPPING in {module}")


def test_key_bindings_are_craftaxs_own():
    assert list(BINDINGS["classic"]) == _craftax_key_mapping("craftax.craftax_classic.play_craftax_classic")
    assert list(BINDINGS["full"]) == _craftax_key_mapping("craftax.craftax.play_craftax")
    _, _, spec = make_env("classic")
    b = key_bindings("classic", spec.action_meanings)
    assert {x["key"]: spec.action_meanings[x["action"]] for x in b}["Tab"] == "sleep"
    assert len({x["action"] for x in b}) == spec.num_actions  # every Classic action has a key


def test_decode_prefill_continues_like_decode():
    tok = build_tokenizer(make_test_config(TOK_OVERRIDES), (16, 16, 3))
    # the read-out starts at zero (every frame the bias): give it weights, or zeros equal zeros
    k = tok.patch_out.kernel
    k[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(1), k.shape)
    z = jax.random.uniform(jax.random.PRNGKey(0), (1, 4, tok.cfg.num_latents, tok.cfg.latent_dim), minval=-1)
    full = nnx.jit(lambda m, z: m.decode(z))(tok, z)
    assert not np.allclose(full[:, 2], full[:, 3], atol=1e-3)  # frames differ: the checks can fail
    head, dec = nnx.jit(lambda m, z: m.decode_prefill(z, 4))(tok, z[:, :2])
    np.testing.assert_allclose(head, full[:, :2], atol=1e-5)
    step = nnx.jit(lambda m, z, c, t: m.decode_step(z, c, t))
    fresh = dec
    for t in (2, 3):
        out, cache = step(tok, z[:, t : t + 1], {"dec": dec}, jnp.int32(t))
        dec = cache["dec"]
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5)
    # the step reads its cache: frame 3 after only the prefill (frame 2 never stepped) differs
    out, _ = step(tok, z[:, 3:4], {"dec": fresh}, jnp.int32(3))
    assert not np.allclose(out[:, 0], full[:, 3], atol=1e-4)


def test_recorder_refuses_other_env_a_second_recorder_and_cleans_uncommitted_shards(tmp_path):
    _, _, spec = make_env("classic")
    other = tmp_path / "full"
    with store.locked_manifest(other) as m:
        m.update({"format": store.FORMAT, "env": {"name": "full", "id": "Craftax-Pixels-v1"}, "shards": []})
    with pytest.raises(DatasetError, match=r"holds Craftax-Pixels-v1 episodes .* plays env.name='classic'"):
        Recorder(other, spec, 4, 3)
    root = tmp_path / "rec"
    rec = Recorder(root, spec, 4, 3, log=lambda *a: None)
    with pytest.raises(DatasetError, match="another `dreamer4 play` is recording into"):
        Recorder(root, spec, 4, 3)
    rec.close()
    (root / "shards" / "human-s000000").mkdir(parents=True)  # a recording killed before its commit
    rec = Recorder(root, spec, 4, 3, log=lambda *a: None)
    assert not (root / "shards" / "human-s000000").exists()
    rec.close()


def test_recorder_commits_by_the_manifest_log_and_folds_it_when_closed(tmp_path):
    """An episode's commit appends to manifest.log (manifest.json untouched, as collect's commits);
    readers see it at once; closing folds the log; a new recording continues the numbering."""
    _, _, spec = make_env("classic")
    root = tmp_path / "rec"

    def episode(T, seed):
        r = np.random.default_rng(seed)
        return {
            "frame": r.integers(0, 256, (T, *spec.frame_shape), np.uint8),
            "action": np.r_[-1, r.integers(0, spec.num_actions, T - 1)].astype(np.int32),
            "reward": np.r_[0.0, r.random(T - 1)].astype(np.float32),
            "is_first": np.arange(T) == 0,
            "is_last": np.arange(T) == T - 1,
            "is_terminal": np.zeros(T, bool),
            "achievements": np.zeros((T, len(spec.achievement_names)), bool),
        }

    rec = Recorder(root, spec, 4, 3, log=lambda *a: None)
    mpath, lpath = store.manifest_path(root), store.manifest_log_path(root)
    before = (mpath.stat().st_ino, mpath.read_bytes())
    eps = [episode(5, 0), episode(3, 1)]
    assert [rec.commit(e) for e in eps] == ["human-e000000", "human-e000001"]
    assert (mpath.stat().st_ino, mpath.read_bytes()) == before  # no rewrite per episode
    assert len(lpath.read_text().splitlines()) == 2
    m = store.read_manifest(root)
    assert [s["name"] for s in m["shards"]] == ["human-s000000", "human-s000001"]
    assert m["writers"]["human"] == {"committed_shards": 2, "episodes": 2}
    rec.close()
    assert not lpath.exists() and json.loads(mpath.read_text()) == m
    rec = Recorder(root, spec, 4, 3, log=lambda *a: None)
    assert rec.commit(episode(4, 2)) == "human-e000002"
    rec.close()
    assert store.verify(root) == ([], [])
    ds = Dataset.open(root)
    assert [e.length for e in ds.episodes] == [5, 3, 4]
    np.testing.assert_array_equal(ds.read(ds.episodes[1], 0, 3, ("frame",))["frame"], eps[1]["frame"])


# ----------------------------------------------------------------------------- the command's refusals
def test_cli_refuses_missing_run_busy_port_and_a_dataset_of_another_env(trained_agent, tmp_path, capsys):
    assert main(["play", "--run", str(tmp_path / "none")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["play", "--run", str(tmp_path / "empty")]) == 2
    assert "holds no trained tokenizer" in capsys.readouterr().err
    with socket.socket() as s:  # a busy port fails before any model loads
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["play", "--run", str(trained_agent), "--port", str(port)]) == 2
        assert f"127.0.0.1:{port} is already in use" in capsys.readouterr().err
    other = tmp_path / "full"
    with store.locked_manifest(other) as m:
        m.update({"format": store.FORMAT, "env": {"name": "full", "id": "Craftax-Pixels-v1"}, "shards": []})
    assert main(["play", "--run", str(trained_agent), "--record", str(other)]) == 2
    err = capsys.readouterr().err
    assert "holds Craftax-Pixels-v1 episodes" in err and "env.name='classic'" in err


# ----------------------------------------------------------------------------- one session and server
@pytest.fixture(scope="module")
def played(trained_agent, tmp_path_factory):
    """(session, server url parts, app, recording dir) on the session run; served in a thread."""
    rec = tmp_path_factory.mktemp("play") / "human"
    session = PlaySession(trained_agent, record=rec, context=CONTEXT, log=lambda *a: None)
    session.reset("world", seed=0)
    server = bind("127.0.0.1", 0)
    serve(server, session)
    yield session, server.server_address[1], server.app, rec
    server.shutdown()
    server.server_close()
    session.close()


def test_session_lockstep_agent_slide_and_recording(played):
    session, _, _, rec = played
    assert session.has_agent and session.cache_len == 4 and session.keep == 2 and session.ks == [1, 2, 4, 8]
    first = session.reset("world", seed=3)
    assert first["real"].shape == (63, 63, 3) and first["imagined"].dtype == np.uint8 and first["step"] == 0
    assert np.isfinite(first["psnr"])  # the tokenizer's reconstruction of the context's last frame
    frames, actions, slots = [first["real"]], [], []
    for i, (a, K) in enumerate([(2, 4), (2, 4), (1, 1), (3, 4)]):
        r = session.step(a, K)
        assert r["step"] == i + 1 and r["actor"] == "human" and r["K"] == K and np.isfinite(r["psnr"])
        assert r["imagined"].shape == r["real"].shape == (63, 63, 3)
        frames.append(r["real"]), actions.append(r["action"]), slots.append(r["slot"])
    # slots of the 4-step cache: the context holds 2, steps fill 3, 4, then it slides back to 2 kept
    assert slots == [3, 4, 3, 4]
    proposed = r["agent_action"]
    r = session.step(None, 4, actor="agent")
    assert r["actor"] == "agent" and r["action"] == proposed
    assert np.isfinite(r["pred_reward"]) and np.isfinite(r["pred_value"])
    frames.append(r["real"]), actions.append(r["action"])
    ep_id = session.finish_recording()
    assert ep_id == "human-e000000"
    # a held-out dataset episode: no real game beside it, nothing recorded
    r = session.reset("episode", episode=0)
    assert r["real"] is None and not r["lockstep"]
    r = session.step(0, 4)
    assert r["real"] is None and r["psnr"] is None and r["step"] == 1

    assert store.verify(rec) == ([], [])
    ds = Dataset.open(rec)
    (ep,) = ds.episodes
    assert ep.labeled and ep.split == "train" and ep.policy == "human+agent" and ep.length == CONTEXT + 5
    rows = ds.read(ep, 0, ep.length, ("frame", "action", "is_first", "is_last", "is_terminal"))
    assert ds.manifest["shards"][0]["episodes"][0]["agent_steps"] == 1
    # the step convention: row 0 the reset frame (action -1), the context's noop, then the actions
    # played, each stored with the frame it led into
    np.testing.assert_array_equal(rows["action"], [-1, 0] + actions)
    np.testing.assert_array_equal(rows["frame"][CONTEXT - 1 :], np.stack(frames))
    assert rows["is_first"].tolist() == [True] + [False] * (ep.length - 1)
    assert rows["is_last"][-1] and not rows["is_last"][:-1].any() and not rows["is_terminal"].any()


def _request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    data = body if isinstance(body, bytes | type(None)) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def test_endpoints_serve_only_their_routes_and_reject_bad_input(played):
    session, port, app, _ = played
    status, page = _request(port, "GET", "/")
    assert status == 200 and b'<script src="/play.js">' in page
    assert _request(port, "GET", "/play.js")[0] == 200 and _request(port, "GET", "/play.css")[0] == 200
    info = json.loads(_request(port, "GET", "/api/info")[1])
    assert info["env"] == "classic" and info["agent"] == "agent" and info["ks"] == [1, 2, 4, 8]
    # nothing else is served: no path from the request reaches the file system
    for path in ("/../../etc/passwd", "/static/index.html", "/static/../session.py", "/play.js/..", "/%2e%2e/x"):
        assert _request(port, "GET", path)[0] == 404, path
    assert _request(port, "PUT", "/")[0] == 405
    assert _request(port, "GET", "/api/step")[0] == 405
    assert _request(port, "POST", "/api/info", {})[0] == 405
    session.reset("world", seed=0)
    bad = [
        ({"action": 99}, "must be in [0, 17)"),
        ({"action": "1"}, "must be an integer"),
        ({"action": True}, "must be an integer"),
        ({"action": 1.5}, "must be an integer"),
        ({"action": 1, "K": 3}, "must be one of [1, 2, 4, 8]"),
        ({"action": 1, "actor": "robot"}, "'actor' must be"),
        ({"actor": "agent", "action": 1}, "chosen by the agent"),
        ({"action": 1, "path": "/etc"}, "unknown field"),
        ([1, 2], "JSON object"),
        ({}, "'action' must be an integer"),
    ]
    for body, why in bad:
        status, reply = _request(port, "POST", "/api/step", body)
        assert status == 400 and why in json.loads(reply)["error"], (body, reply)
    assert _request(port, "POST", "/api/step", b"{not json")[0] == 400
    assert _request(port, "POST", "/api/step", b"{}", {"Content-Type": "text/plain"})[0] == 415
    assert _request(port, "POST", "/api/step", b" " * 5000)[0] == 413
    assert _request(port, "POST", "/api/reset", {"start": "elsewhere"})[0] == 400
    assert _request(port, "POST", "/api/reset", {"seed": -1})[0] == 400
    assert _request(port, "POST", "/api/reset", {"start": "episode", "episode": 10**6})[0] == 400
    # DNS rebinding and cross-site requests
    assert _request(port, "GET", "/api/info", headers={"Host": f"evil.example:{port}"})[0] == 403
    status, _ = _request(port, "POST", "/api/step", {"action": 1}, {"Origin": "http://evil.example"})
    assert status == 403
    # a step while another runs is dropped at once, never queued
    with app.lock:
        status, reply = _request(port, "POST", "/api/step", {"action": 1})
    assert status == 409 and json.loads(reply)["dropped"]
    status, reply = _request(port, "POST", "/api/step", {"action": 1})
    r = json.loads(reply)
    assert status == 200 and r["step"] == 1 and len(r["imagined"]) == len(r["real"]) == 4 * 63 * 63 * 3 // 3
    status, gif = _request(port, "GET", "/api/video.gif")
    assert status == 200 and gif[:6] == b"GIF89a"
    status, mp4 = _request(port, "GET", "/api/video.mp4")
    assert status == 200 and mp4[4:8] == b"ftyp"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine (.ci/run installs it)")
def test_page_in_headless_chromium(played, tmp_path, capsys):
    """Open the page, press keys: the imagined and real frames change and the step counter goes
    up; the agent plays and the person takes over; a reset records the episode, which `dreamer4
    dataset verify` accepts."""
    session, port, _, rec = played
    b = Browser(tmp_path / "profile")
    try:
        b.open(f"http://127.0.0.1:{port}/")
        b.wait_for("window.play && window.play.ready")  # the page's own reset committed earlier play
        before = len(Dataset.open(rec, allow_empty=True).episodes)
        canvas = "document.getElementById('{}').toDataURL()"
        imagined, real = b.evaluate(canvas.format("imagined")), b.evaluate(canvas.format("real"))
        assert b.evaluate("document.querySelectorAll('#keys tbody tr').length") == 17 + 2
        for i, key in enumerate("dds"):  # a person waits for the frame before the next key
            b.key(key)
            b.wait_for(f"window.play.step >= {i + 1} && !window.play.inFlight")
        assert b.evaluate("document.getElementById('step').textContent") == "3"
        assert b.evaluate(canvas.format("imagined")) != imagined and b.evaluate(canvas.format("real")) != real
        assert float(b.evaluate("document.getElementById('psnr').textContent")) > 0
        b.key("Enter")  # the agent plays ...
        b.wait_for("window.play.actor === 'agent' && window.play.step >= 4")
        b.key("w")  # ... until the person takes over with a game key
        b.wait_for("!window.play.agentOn && !window.play.inFlight && window.play.actor === 'human'")
        n = b.evaluate("window.play.step")
        b.key("a")
        b.wait_for(f"window.play.step === {n + 1} && window.play.actor === 'human' && !window.play.inFlight")
        b.key("Backspace")  # reset: the session so far is committed as one episode
        b.wait_for("window.play.resets >= 2 && window.play.step === 0")
        assert b.evaluate("window.play.lastError") is None
    finally:
        b.close()
    assert main(["dataset", "verify", str(rec)]) == 0
    assert "all arrays match the manifest" in capsys.readouterr().out
    eps = Dataset.open(rec).episodes
    assert len(eps) == before + 1 and eps[-1].policy == "human+agent" and eps[-1].labeled
