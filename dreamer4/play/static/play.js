// dreamer4 play: the page's logic. Plain JS, no build step; served by dreamer4/play/server.py.
//
// Back-pressure: at most one step request is in flight. A key pressed meanwhile becomes the one
// pending step (a newer key replaces it), and auto-repeats of a held key are dropped, so a slow
// step never builds a queue. The server also answers a step that overlaps another with 409.
"use strict";

const $ = (id) => document.getElementById(id);
// Read by tests (tests/test_play.py) through the DevTools protocol.
const state = (window.play = {
  info: null,
  keyToAction: new Map(),
  inFlight: false,
  pending: null,
  agentOn: false,
  lastAgentMs: 0,
  step: 0,
  actor: null,
  psnr: [],
  doneAt: [],
  dropped: 0,
  over: false,
  recorded: [],
  lastError: null,
  resets: 0,
});

function message(text, isError = false) {
  $("message").textContent = text || "";
  if (isError) state.lastError = text;
}

async function api(path, body) {
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: r.status, body: await r.json() };
}

// A frame arrives as base64 of raw RGB bytes; the canvas has the frame's own size and CSS
// upscales it with nearest-neighbour (image-rendering: pixelated).
function draw(canvas, b64) {
  const [h, w] = state.info.frame_shape;
  const bytes = atob(b64);
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0, j = 0; i < bytes.length; i += 3, j += 4) {
    img.data[j] = bytes.charCodeAt(i);
    img.data[j + 1] = bytes.charCodeAt(i + 1);
    img.data[j + 2] = bytes.charCodeAt(i + 2);
    img.data[j + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

function fmt(x, digits) {
  return x === null || x === undefined ? "-" : Number(x).toFixed(digits);
}

function plotPsnr() {
  const c = $("plot");
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const ys = state.psnr.slice(-300);
  if (!ys.length) return;
  const lo = Math.min(...ys) - 1;
  const hi = Math.max(...ys) + 1;
  ctx.fillStyle = "#666";
  ctx.font = "10px sans-serif";
  ctx.fillText(hi.toFixed(0) + " dB", 2, 10);
  ctx.fillText(lo.toFixed(0) + " dB", 2, c.height - 2);
  ctx.strokeStyle = "#1565c0";
  ctx.beginPath();
  ys.forEach((y, i) => {
    const px = 40 + (i * (c.width - 45)) / Math.max(1, ys.length - 1);
    const py = c.height - 4 - ((y - lo) / (hi - lo)) * (c.height - 8);
    if (i === 0) ctx.moveTo(px, py);
    else ctx.lineTo(px, py);
  });
  ctx.stroke();
}

function show(res, roundTripMs) {
  draw($("imagined"), res.imagined);
  $("realbox").classList.toggle("hidden", !res.real);
  if (res.real) draw($("real"), res.real);
  state.step = res.step;
  state.actor = res.actor;
  $("step").textContent = res.step;
  $("actor").textContent = res.actor || "-";
  $("action").textContent = res.action_name || "-";
  $("psnr").textContent = fmt(res.psnr, 1);
  if (res.psnr !== null) state.psnr.push(res.psnr);
  plotPsnr();
  $("real-reward").textContent = fmt(res.real_reward, 1);
  $("real-return").textContent = fmt(res.real_return, 1);
  $("pred-reward").textContent = fmt(res.pred_reward, 2);
  $("pred-value").textContent = fmt(res.pred_value, 2);
  $("agent-action").textContent =
    res.agent_action === null ? "-" : state.info.actions[res.agent_action];
  if (res.kind === "step") {
    const now = performance.now();
    state.doneAt.push(now);
    state.doneAt = state.doneAt.filter((t) => now - t < 1000);
    $("fps").textContent = state.doneAt.length;
    $("latency").textContent = fmt(roundTripMs, 1);
    $("server-ms").textContent = fmt(res.latency_ms, 1);
  }
  let note = "";
  if (res.achievements && res.achievements.length) note = "achievement: " + res.achievements.join(", ");
  if (res.asleep) note = (note ? note + "; " : "") + "asleep: every key is noop (as in Craftax)";
  if (res.done) {
    state.over = true;
    setAgent(false);
    note = `the real episode is over (${res.terminal ? "death" : "time limit"}); reset to play again`;
  }
  if (res.recorded) {
    state.recorded.push(res.recorded);
    note += ` — recorded as ${res.recorded}`;
  }
  if (note || res.kind === "reset") message(note);
}

function K() {
  return Number($("K").value);
}

function send(action, actor) {
  if (state.over) return;
  if (state.inFlight) {
    if (state.pending) state.dropped++; // a newer key replaces the pending one
    state.pending = { action, actor };
    $("dropped").textContent = state.dropped;
    return;
  }
  state.inFlight = true;
  const body = actor === "agent" ? { actor: "agent", K: K() } : { action, K: K(), actor: "human" };
  const t0 = performance.now();
  api("/api/step", body)
    .then(({ status, body }) => {
      if (status === 200) show(body, performance.now() - t0);
      else if (status === 409 && body.dropped) state.dropped++;
      else {
        message(body.error, true);
        setAgent(false);
      }
    })
    .catch((e) => message(String(e), true))
    .finally(() => {
      state.inFlight = false;
      $("dropped").textContent = state.dropped;
      const p = state.pending;
      state.pending = null;
      if (p) send(p.action, p.actor);
    });
}

async function reset() {
  setAgent(false);
  state.pending = null;
  const start = $("start").value;
  const body = { start, seed: Number($("seed").value) || 0, lockstep: $("lockstep").checked };
  if (start === "episode") body.episode = Number($("episode").value) || 0;
  message("resetting ...");
  const { status, body: res } = await api("/api/reset", body);
  if (status !== 200) {
    message(res.error, true);
    return;
  }
  state.over = false;
  state.psnr = [];
  state.resets++;
  show(res, null);
}

function setAgent(on) {
  state.agentOn = on && !!state.info && !!state.info.agent && !state.over;
  $("agent").classList.toggle("on", state.agentOn);
  $("agent").textContent = state.agentOn ? "stop the agent (Enter)" : "agent plays (Enter)";
}

// The agent steps at the chosen rate while it has control; any game key takes over.
function agentTick() {
  const now = performance.now();
  const rate = Math.max(1, Math.min(60, Number($("speed").value) || 5));
  if (state.agentOn && !state.inFlight && now - state.lastAgentMs >= 1000 / rate) {
    state.lastAgentMs = now;
    send(null, "agent");
  }
}

function onKey(e) {
  if (e.target.closest && e.target.closest("input, select")) return; // typing a seed, choosing K
  if (e.key === "Enter") {
    e.preventDefault();
    if (!e.repeat) setAgent(!state.agentOn);
    return;
  }
  if (e.key === "Backspace") {
    e.preventDefault();
    if (!e.repeat) reset();
    return;
  }
  const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  if (!state.keyToAction.has(key)) return;
  e.preventDefault(); // Tab and Space must not move the focus or scroll
  if (state.agentOn) {
    setAgent(false);
    message("you took over from the agent (Enter hands back)");
  }
  if (e.repeat && state.inFlight) {
    state.dropped++; // a held key's repeats never queue behind a slow step
    $("dropped").textContent = state.dropped;
    return;
  }
  send(state.keyToAction.get(key), "human");
}

async function init() {
  const info = await (await fetch("/api/info")).json();
  state.info = info;
  $("run").textContent = `${info.run} (${info.env_id})`;
  const [h, w] = info.frame_shape;
  for (const id of ["imagined", "real"]) {
    $(id).width = w;
    $(id).height = h;
  }
  const tbody = $("keys").querySelector("tbody");
  for (const b of info.keys) {
    state.keyToAction.set(b.key, b.action);
    const tr = document.createElement("tr");
    const k = document.createElement("td");
    const kbd = document.createElement("kbd");
    kbd.textContent = b.label;
    k.appendChild(kbd);
    const a = document.createElement("td");
    a.textContent = b.name;
    tr.append(k, a);
    tbody.appendChild(tr);
  }
  for (const [key, what] of [["Enter", "agent plays / stop the agent"], ["Backspace", "reset"]]) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td><kbd></kbd></td><td></td>";
    tr.querySelector("kbd").textContent = key;
    tr.lastChild.textContent = what;
    tbody.appendChild(tr);
  }
  for (const k of info.ks) $("K").add(new Option(`${k}`, `${k}`, false, k === info.default_k));
  for (const e of info.episodes) $("episode").add(new Option(`${e.id} (${e.length} steps)`, `${e.index}`));
  if (!info.episodes.length) $("start").options[1].disabled = true;
  if (!info.agent) {
    $("agent").disabled = true;
    $("agent-stats").classList.add("hidden");
  }
  $("recording").textContent = info.recording
    ? `Recording into ${info.recording}: each real-game session is committed as a labeled episode ` +
      `(policy human) when the game ends, on reset, and when the server stops.`
    : "Not recording (start the server with --record DATASET_DIR to record).";
  $("about").textContent =
    `Context: ${info.context} frames. The KV cache holds ${info.cache_len} steps; when it is full ` +
    `it restarts from the last ${info.slide_keep} steps (older ones are forgotten). ` +
    (info.agent ? `Agent: ${info.agent} (plays inside the world model; the real game follows).` : "No agent stage.");
  document.addEventListener("keydown", onKey);
  $("controls").addEventListener("submit", (e) => e.preventDefault());
  $("reset").addEventListener("click", (e) => {
    e.currentTarget.blur(); // Space on a focused button would press it again
    reset();
  });
  $("agent").addEventListener("click", (e) => {
    e.currentTarget.blur();
    setAgent(!state.agentOn);
  });
  for (const id of ["K", "start", "episode", "lockstep", "seed", "speed"])
    $(id).addEventListener("change", (e) => e.currentTarget.blur());
  setInterval(agentTick, 10); // not requestAnimationFrame: it stops in a hidden tab
  await reset();
  state.ready = true;
}

init().catch((e) => message("could not start: " + e, true));
