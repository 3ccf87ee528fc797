/* Heaters review page. No dependencies. The pure parts (frame <-> tile mapping, key -> action,
 * split checks, event bodies) are exported for `node --test` (module.exports) and for the page
 * (window.HeatersReview); the rest drives the DOM. */
(function (root) {
  "use strict";

  // ---------------------------------------------------------------------------------------
  // Pure functions
  // ---------------------------------------------------------------------------------------
  const MIN_SPLIT_PART_S = 0.5; // mirrors heaters_dagster.review.events.MIN_SPLIT_PART_S
  const SPEEDS = [1, 1.5, 2];

  function clamp(v, lo, hi) {
    return Math.max(lo, Math.min(hi, v));
  }

  /** Python's round(): halves go to the even neighbour (so the page agrees with the server). */
  function pyRound(x) {
    const f = Math.floor(x);
    const d = x - f;
    if (Math.abs(d - 0.5) < 1e-9) return f % 2 === 0 ? f : f + 1;
    return Math.round(x);
  }

  /**
   * The clip-relative frame that sprite tile `tile` shows.
   *
   * The sprite is made by ffmpeg's `fps=effective_fps` filter. It rescales each input frame k's
   * time to output ticks rounding to nearest (halves up), k -> round(k / r) with
   * r = clip_fps / effective_fps, and fills tick i with the LAST input frame that landed on or
   * before it: the largest k with k / r < i + 0.5, i.e. ceil((i + 0.5) * r) - 1. When the clip
   * runs at the sampling rate (r = 1, every clip up to 24 fps) that is exactly frame i; for 30 fps
   * it equals round(i * r) with halves rounded up; for 50/60 fps clips it is one frame later than
   * round(i * r) on many tiles. The tests check this against sheets ffmpeg made from clips that
   * carry their frame number in the picture.
   */
  function tileToFrame(tile, layout, frameCount) {
    const r = layout.clip_fps / layout.effective_fps;
    const frame = Math.ceil((tile + 0.5) * r - 1e-9) - 1;
    const last = Math.max(0, (frameCount || Math.round(layout.clip_duration_s * layout.clip_fps)) - 1);
    return clamp(frame, 0, last);
  }

  /** Background offset (CSS px, negative) of tile `tile` at display scale `scale`. */
  function tileOffset(tile, layout, scale) {
    const col = tile % layout.cols;
    const row = Math.floor(tile / layout.cols);
    return { x: -Math.round(col * layout.tile_width * scale), y: -Math.round(row * layout.tile_height * scale) };
  }

  /** The tile to show `elapsedMs` after `startTile` while playing at `speed` (loops). */
  function playbackTile(startTile, elapsedMs, layout, speed) {
    const n = Math.max(1, layout.frame_count);
    const steps = Math.floor((elapsedMs / 1000) * layout.effective_fps * speed + 1e-9);
    return (((startTile + steps) % n) + n) % n;
  }

  /** Step one tile, without wrapping. */
  function stepTile(tile, delta, layout) {
    return clamp(tile + delta, 0, Math.max(0, layout.frame_count - 1));
  }

  /** Why a split at clip-relative `frame` would be rejected (same rules as the server), or null. */
  function splitProblem(frame, frameCount, fps) {
    if (!Number.isInteger(frame) || frame < 1 || frame > frameCount - 1) {
      return "a split needs at least one frame on each side (frames 1.." + (frameCount - 1) + ")";
    }
    const minFrames = Math.max(1, pyRound(MIN_SPLIT_PART_S * fps));
    if (frame < minFrames || frameCount - frame < minFrames) {
      return "each part must be at least " + MIN_SPLIT_PART_S + " s (" + minFrames + " frames)";
    }
    return null;
  }

  /**
   * The page command for a key press, or null. `ev`: {key, ctrlKey, metaKey, altKey, repeat};
   * `ctx`: {mode: "play" | "split", inInput: bool}.
   */
  function keyToAction(ev, ctx) {
    const key = ev.key || "";
    const lower = key.length === 1 ? key.toLowerCase() : key;
    if ((ev.ctrlKey || ev.metaKey) && !ev.altKey && lower === "z" && !ev.shiftKey) return "undo";
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return null; // leave browser shortcuts alone
    if (ctx && ctx.inInput) return key === "Escape" ? "cancel" : null;
    if (ev.repeat && !(key === "ArrowLeft" || key === "ArrowRight")) return null;
    switch (lower) {
      case " ":
      case "Spacebar":
        return "toggle-play";
      case "ArrowLeft":
        return "step-back";
      case "ArrowRight":
        return "step-forward";
      case "Enter":
        return ctx && ctx.mode === "split" ? "split" : null;
      case "Escape":
        return "cancel";
      case "a":
        return "approve";
      case "s":
        return "skip";
      case "d":
        return "archive";
      case "f":
        return "merge";
      case "g":
        return "group";
      case "i":
        return "id-mode";
      default:
        return null;
    }
  }

  /**
   * The JSON body for POST /api/events, or {error}. `ctx`: {tile, layout, target, reviewer}.
   * Split frames are clip-relative: the frame the page shows (tileToFrame of the current tile).
   */
  function eventBody(clip, action, ctx) {
    const body = { clip_id: clip.id, action: action, payload: {}, reviewer: ctx.reviewer };
    if (action === "split") {
      if (!ctx.layout) return { error: "this clip has no sprite sheet to pick a frame from" };
      const frame = tileToFrame(ctx.tile, ctx.layout, clip.frame_count);
      const problem = splitProblem(frame, clip.frame_count, clip.fps);
      if (problem) return { error: "cannot split at frame " + frame + ": " + problem };
      body.payload.frame = frame;
    } else if (action === "merge") {
      if (ctx.target != null) body.payload.target_clip_id = ctx.target;
    } else if (action === "group") {
      if (ctx.target == null) return { error: "choose the clip to group with first (I, then its id)" };
      if (ctx.target === clip.id) return { error: "a clip cannot be grouped with itself" };
      body.payload.target_clip_id = ctx.target;
    }
    return body;
  }

  /** A target id typed in ID mode: a live clip of this source other than the current one. */
  function parseTarget(text, neighbours, currentId) {
    const t = String(text || "").trim().replace(/^#/, "");
    if (!/^[0-9]{1,15}$/.test(t)) return { error: "type a clip id (digits)" };
    const id = parseInt(t, 10);
    if (id === currentId) return { error: "that is the current clip" };
    if (!neighbours.some(function (c) { return c.id === id; })) {
      return { error: "clip " + id + " is not a live clip of this source" };
    }
    return { id: id };
  }

  function formatSeconds(s) {
    if (!isFinite(s)) return "–";
    const m = Math.floor(s / 60);
    const rest = s - m * 60;
    return (m > 0 ? m + ":" + (rest < 10 ? "0" : "") : "") + rest.toFixed(2) + (m > 0 ? "" : " s");
  }

  const api = {
    tileToFrame: tileToFrame, tileOffset: tileOffset, playbackTile: playbackTile, stepTile: stepTile,
    splitProblem: splitProblem, keyToAction: keyToAction, eventBody: eventBody, parseTarget: parseTarget,
    pyRound: pyRound, formatSeconds: formatSeconds, SPEEDS: SPEEDS, MIN_SPLIT_PART_S: MIN_SPLIT_PART_S,
  };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  if (root) root.HeatersReview = api;
  if (typeof document === "undefined") return;

  // ---------------------------------------------------------------------------------------
  // The page
  // ---------------------------------------------------------------------------------------
  const $ = function (id) { return document.getElementById(id); };
  const S = {
    token: null, reviewer: null, writable: false, clip: null, layout: null, tile: 0, playing: true,
    speed: 1, mode: "play", target: null, neighbours: [], history: [], busy: false, leaseTimer: null,
    emptyTimer: null, loginMsg: "", scale: 1, lastTs: null, acc: 0, prefetched: [], spriteReady: false,
  };

  function toast(message, kind) {
    const el = $("toast");
    const item = document.createElement("div");
    item.className = "toast " + (kind || "info");
    item.textContent = message;
    el.appendChild(item);
    setTimeout(function () { item.remove(); }, kind === "error" ? 7000 : 3500);
  }

  async function api_(method, url, body, opts) {
    const headers = { Accept: "application/json" };
    if (S.token) headers["X-Heaters-Token"] = S.token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(url, Object.assign({
      method: method, headers: headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit",
    }, opts || {}));
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (res.status === 403 && S.token) {
      signOut((data && data.error) || "the reviewer token was refused");
    }
    return { status: res.status, data: data };
  }

  // -- sign in -----------------------------------------------------------------------------
  function readCredentials() {
    const params = new URLSearchParams(location.search);
    if (params.has("token")) {
      sessionStorage.setItem("heaters.token", params.get("token"));
      params.delete("token");
      const q = params.toString();
      history.replaceState(null, "", location.pathname + (q ? "?" + q : "") + location.hash);
    }
    if (params.has("reviewer")) localStorage.setItem("heaters.reviewer", params.get("reviewer"));
    S.token = sessionStorage.getItem("heaters.token");
    S.reviewer = localStorage.getItem("heaters.reviewer") || "";
  }

  function renderLogin(message) {
    const signedIn = !!(S.token && S.reviewer);
    $("login").hidden = signedIn;
    $("who").hidden = !signedIn;
    $("who-name").textContent = S.reviewer || "";
    $("reviewer").value = S.reviewer || "";
    if (message !== undefined) S.loginMsg = message;
    $("login-msg").textContent = S.loginMsg || "";
    document.body.classList.toggle("readonly", !S.writable);
  }

  function signOut(message) {
    sessionStorage.removeItem("heaters.token");
    S.token = null;
    S.writable = false;
    renderLogin(message);
    if (message) toast(message, "error");
  }

  // -- loading clips -----------------------------------------------------------------------
  async function loadNext(opts) {
    opts = opts || {};
    clearTimeout(S.emptyTimer);
    const q = new URLSearchParams();
    if (S.reviewer) q.set("reviewer", S.reviewer);
    if (opts.exclude && opts.exclude.length) q.set("exclude", opts.exclude.join(","));
    if (opts.prefer) q.set("prefer", String(opts.prefer));
    const res = await api_("GET", "/api/next?" + q.toString());
    if (res.status !== 200) {
      if (res.status !== 403) toast("could not load the next clip: " + ((res.data && res.data.error) || res.status), "error");
      if (res.status === 403) return loadNext(opts);
      return;
    }
    const d = res.data;
    if (opts.linked && (!d.clip || d.clip.id !== opts.prefer)) {
      toast("clip " + opts.prefer + " is not waiting for review (or another reviewer has it)", "info");
    }
    S.writable = d.writable;
    renderLogin();
    $("queue-length").textContent = String(d.queue_length);
    prefetch(d.prefetch || []);
    showClip(d.clip);
    if (!d.clip) S.emptyTimer = setTimeout(loadNext, 10000);
    if (S.leaseTimer) clearInterval(S.leaseTimer);
    S.leaseTimer = null;
    if (d.clip && d.leased) {
      S.leaseTimer = setInterval(renewLease, Math.max(5, d.lease_s / 3) * 1000);
    }
  }

  function prefetch(items) {
    // Keep references so the browser finishes (and caches) the downloads.
    S.prefetched = items.filter(function (p) { return p.sprite; }).map(function (p) {
      const img = new Image();
      img.decoding = "async";
      img.src = p.sprite.url;
      return img;
    });
    $("prefetch-count").textContent = String(S.prefetched.length);
  }

  async function renewLease() {
    if (!S.clip || !S.writable) return;
    const id = S.clip.id;
    const res = await api_("POST", "/api/clips/" + id + "/lease", { reviewer: S.reviewer });
    if (res.status === 409 && S.clip && S.clip.id === id) {
      toast("your lease on clip " + id + " ran out and the clip went to another reviewer", "error");
      loadNext({ exclude: [id] });
    }
  }

  function showClip(clip) {
    S.clip = clip;
    S.layout = clip && clip.sprite ? clip.sprite.layout : null;
    S.tile = 0;
    S.acc = 0;
    S.playing = true;
    S.mode = "play";
    S.target = null;
    S.neighbours = [];
    S.spriteReady = false;
    $("empty").hidden = !!clip;
    $("stage").hidden = !clip;
    if (!clip) { renderInfo(); renderTarget(); return; }
    const player = $("player");
    player.style.backgroundImage = "none";
    player.classList.add("loading");
    if (S.layout) {
      const url = clip.sprite.url;
      const img = new Image();
      img.onload = function () {
        if (!S.clip || S.clip.id !== clip.id) return;
        player.style.backgroundImage = 'url("' + url + '")';
        player.classList.remove("loading");
        S.spriteReady = true;
        render();
      };
      img.onerror = function () { toast("the sprite sheet of clip " + clip.id + " did not load", "error"); };
      img.src = url;
    }
    $("scrub").max = String(S.layout ? S.layout.frame_count - 1 : 0);
    layoutPlayer();
    renderInfo();
    renderTarget();
    render();
    loadNeighbours(clip.id);
    loadSimilar(clip.id);
  }

  async function loadSimilar(clipId) {
    const box = $("similar");
    box.textContent = "";
    $("similar-model").textContent = "";
    const res = await api_("GET", "/api/clips/" + clipId + "/similar");
    if (!S.clip || S.clip.id !== clipId) return;
    if (res.status === 200 && res.data.model_id) {
      // Which model's vectors these are: the stored embeddings' when the configured model has none.
      $("similar-model").textContent = "model " + res.data.model_id + (res.data.model_source === "stored"
        ? " (the stored embeddings'; the configured " + res.data.configured_model_id + " has none)" : "");
    }
    const items = res.status === 200 ? res.data.clips : [];
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "dim";
      li.textContent = res.status === 200 ? "no embedded clips yet" : "unavailable: " + ((res.data && res.data.error) || res.status);
      box.appendChild(li);
      return;
    }
    items.forEach(function (c) {
      const li = document.createElement("li");
      li.textContent = "clip " + c.id + " · " + (100 * c.similarity).toFixed(1) + "% · video " + c.source_video_id +
        " · " + c.start_s.toFixed(2) + "–" + c.end_s.toFixed(2) + " s";
      box.appendChild(li);
    });
  }

  async function loadNeighbours(clipId) {
    const res = await api_("GET", "/api/clips/" + clipId + "/neighbours");
    if (res.status !== 200 || !S.clip || S.clip.id !== clipId) return;
    S.neighbours = res.data.clips.filter(function (c) { return c.id !== clipId; });
    renderNeighbours();
    renderTarget();
  }

  // -- rendering ---------------------------------------------------------------------------
  function layoutPlayer() {
    const player = $("player");
    if (!S.layout) { player.style.width = "480px"; player.style.height = "270px"; return; }
    const L = S.layout;
    // The column's width (not the wrapper's, which a wide player would stretch), less its padding.
    const maxW = Math.max(200, ($("stage").clientWidth || 960) - 24);
    const maxH = Math.max(160, window.innerHeight - 300);
    S.scale = Math.min(maxW / L.tile_width, maxH / L.tile_height, 2);
    player.style.width = Math.round(L.tile_width * S.scale) + "px";
    player.style.height = Math.round(L.tile_height * S.scale) + "px";
    player.style.backgroundSize = Math.round(L.sheet_width * S.scale) + "px " +
      Math.round(L.sheet_height * S.scale) + "px";
  }

  function currentFrame() {
    return S.layout ? tileToFrame(S.tile, S.layout, S.clip.frame_count) : 0;
  }

  function render() {
    const clip = S.clip;
    if (!clip) return;
    const player = $("player");
    const frame = currentFrame();
    if (S.layout) {
      const off = tileOffset(S.tile, S.layout, S.scale);
      player.style.backgroundPosition = off.x + "px " + off.y + "px";
    }
    player.dataset.tile = String(S.tile);
    player.dataset.frame = String(frame);
    $("scrub").value = String(S.tile);
    $("counter").textContent = "frame " + frame + " / " + clip.frame_count;
    $("time").textContent = formatSeconds(frame / clip.fps);
    $("play").textContent = S.playing ? "❚❚" : "▶";
    $("play").setAttribute("aria-label", S.playing ? "pause" : "play");
    document.querySelectorAll("[data-speed]").forEach(function (b) {
      b.classList.toggle("on", Number(b.dataset.speed) === S.speed);
    });
    const split = S.mode === "split";
    document.body.classList.toggle("split-mode", split);
    $("split-bar").hidden = !split;
    if (split) {
      const problem = splitProblem(frame, clip.frame_count, clip.fps);
      $("split-frame").textContent = String(frame);
      $("split-abs").textContent = String(clip.start_frame + frame);
      $("split-parts").textContent = "part A: frames 0–" + (frame - 1) + " · part B: frames " + frame + "–" +
        (clip.frame_count - 1);
      $("split-problem").textContent = problem || "";
      $("split-bar").classList.toggle("bad", !!problem);
    }
  }

  function renderInfo() {
    const c = S.clip;
    $("clip-id").textContent = c ? "#" + c.id : "–";
    $("clip-source").textContent = c ? "#" + c.source_video_id : "–";
    $("clip-times").textContent = c ? formatSeconds(c.start_s) + " → " + formatSeconds(c.end_s) +
      " (" + formatSeconds(c.end_s - c.start_s) + ")" : "–";
    $("clip-frames").textContent = c ? c.start_frame + "–" + (c.end_frame - 1) + " · " + c.frame_count +
      " frames @ " + Number(c.fps.toFixed(3)) + " fps" : "–";
    $("clip-state").textContent = c ? c.state.replace(/_/g, " ") : "–";
    $("clip-sprite").textContent = S.layout ? S.layout.frame_count + " tiles @ " +
      Number(S.layout.effective_fps.toFixed(3)) + " fps" : (c ? "no sprite sheet" : "–");
  }

  function renderTarget() {
    const t = S.target;
    $("target").textContent = t == null ? "none" : "#" + t;
    $("merge-label").textContent = t == null ? "Merge with previous" : "Merge into #" + t;
    $("group-label").textContent = t == null ? "Group…" : "Group with #" + t;
    document.querySelectorAll("#neighbours button").forEach(function (b) {
      b.classList.toggle("on", Number(b.dataset.id) === t);
    });
  }

  function renderNeighbours() {
    const box = $("neighbours");
    box.textContent = "";
    if (!S.clip) return;
    const all = S.neighbours.concat([Object.assign({}, S.clip, { relation: "current" })])
      .sort(function (a, b) { return a.start_frame - b.start_frame || a.id - b.id; });
    all.forEach(function (c) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.id = String(c.id);
      b.className = "chip" + (c.relation ? " " + c.relation : "");
      b.disabled = c.relation === "current";
      b.title = c.state.replace(/_/g, " ") + " · frames " + c.start_frame + "–" + (c.end_frame - 1) +
        (c.group_id ? " · group " + c.group_id : "");
      const id = document.createElement("b");
      id.textContent = "#" + c.id;
      const t = document.createElement("span");
      t.textContent = formatSeconds(c.start_s) + (c.relation === "previous" ? " · prev" :
        c.relation === "next" ? " · next" : c.relation === "current" ? " · this" : "");
      b.appendChild(id);
      b.appendChild(t);
      b.addEventListener("click", function () { setTarget(c.id); });
      box.appendChild(b);
    });
    renderTarget();
  }

  function setTarget(id) {
    S.target = id;
    renderTarget();
    if (id != null) toast("target: clip #" + id + " — F merges into it, G groups with it");
  }

  function renderHistory() {
    const ol = $("history");
    ol.textContent = "";
    S.history.slice(-8).reverse().forEach(function (h) {
      const li = document.createElement("li");
      li.className = h.status;
      const what = document.createElement("span");
      what.textContent = h.action + " #" + h.clip_id + (h.detail ? " " + h.detail : "");
      const st = document.createElement("em");
      st.textContent = h.undone ? "undone" : h.status;
      li.appendChild(what);
      li.appendChild(st);
      if (h.reason) li.title = h.reason;
      ol.appendChild(li);
    });
  }

  // -- playback ----------------------------------------------------------------------------
  function frameLoop(ts) {
    if (S.lastTs == null) S.lastTs = ts;
    const dt = Math.min(250, ts - S.lastTs);
    S.lastTs = ts;
    if (S.playing && S.layout && S.spriteReady && S.layout.frame_count > 1) {
      S.acc += dt;
      const next = playbackTile(S.tile, S.acc, S.layout, S.speed);
      if (next !== S.tile) {
        const stepMs = 1000 / (S.layout.effective_fps * S.speed);
        const steps = Math.floor(S.acc / stepMs + 1e-9);
        S.acc -= steps * stepMs;
        S.tile = next;
        render();
      }
    }
    requestAnimationFrame(frameLoop);
  }

  function setPlaying(on) {
    S.playing = on;
    S.acc = 0;
    if (on && S.mode === "split") S.mode = "play";
    render();
  }

  function step(delta) {
    if (!S.layout) return;
    S.playing = false;
    S.mode = "split";
    S.tile = stepTile(S.tile, delta, S.layout);
    render();
  }

  // -- actions -----------------------------------------------------------------------------
  async function act(action) {
    const clip = S.clip;
    if (!clip) return;
    if (!S.writable) { toast("read-only: sign in with the reviewer token to review", "error"); return; }
    if (action === "group" && S.target == null) { openIdMode("choose the clip to group with, then press G"); return; }
    const body = eventBody(clip, action, { tile: S.tile, layout: S.layout, target: S.target, reviewer: S.reviewer });
    if (body.error) { toast(body.error, "error"); return; }
    if (S.busy) return;
    S.busy = true;
    try {
      const res = await api_("POST", "/api/events", body);
      if (res.status !== 201) {
        if (res.status !== 403) toast(action + " failed: " + ((res.data && res.data.error) || res.status), "error");
        return;
      }
      const entry = { event_id: res.data.id, clip_id: clip.id, action: action, status: "pending", undone: false,
        detail: body.payload.frame != null ? "@" + body.payload.frame :
          body.payload.target_clip_id != null ? "→ #" + body.payload.target_clip_id : "" };
      S.history.push(entry);
      renderHistory();
      watchEvent(entry);
      await loadNext({ exclude: [clip.id] });
    } finally {
      S.busy = false;
    }
  }

  async function undo() {
    if (!S.writable) { toast("read-only: sign in with the reviewer token to undo", "error"); return; }
    const entry = S.history.slice().reverse().find(function (h) { return !h.undone && h.status !== "rejected"; });
    if (!entry) { toast("nothing to undo"); return; }
    if (S.busy) return;
    S.busy = true;
    try {
      const res = await api_("POST", "/api/events", { clip_id: entry.clip_id, action: "undo", payload: {}, reviewer: S.reviewer });
      if (res.status !== 201) {
        if (res.status !== 403) toast("undo failed: " + ((res.data && res.data.error) || res.status), "error");
        return;
      }
      entry.undone = true;
      renderHistory();
      toast("undo of " + entry.action + " on clip #" + entry.clip_id + " sent");
      const undoEntry = { event_id: res.data.id, clip_id: entry.clip_id, action: "undo", status: "pending", undone: true,
        silent: true };
      watchEvent(undoEntry, function (ev) {
        if (ev.outcome === "applied") {
          toast("clip #" + entry.clip_id + " is back for review");
          // Bring the clip back unless the reviewer already moved into a split on the current one.
          if (S.mode !== "split") loadNext({ prefer: entry.clip_id });
        } else if (ev.outcome === "rejected") {
          entry.undone = false;
          renderHistory();
        }
      });
    } finally {
      S.busy = false;
    }
  }

  function watchEvent(entry, onDone) {
    let delay = 400;
    let waited = 0;
    async function poll() {
      const res = await api_("GET", "/api/events/" + entry.event_id);
      if (res.status === 200 && res.data.outcome && res.data.outcome !== "pending") {
        entry.status = res.data.outcome;
        entry.reason = res.data.reason;
        if (!entry.silent) renderHistory();
        if (res.data.outcome === "rejected") {
          toast(entry.action + " of clip #" + entry.clip_id + " was rejected: " + res.data.reason, "error");
        }
        if (onDone) onDone(res.data);
        return;
      }
      waited += delay;
      if (waited > 120000) return; // the review sensor may not be running; stop asking
      delay = Math.min(delay * 1.5, 4000);
      setTimeout(poll, delay);
    }
    setTimeout(poll, delay);
  }

  function openIdMode(hint) {
    const input = $("target-input");
    document.body.classList.add("id-mode");
    input.focus();
    input.select();
    if (hint) toast(hint);
  }

  function commitTargetInput() {
    const input = $("target-input");
    const parsed = parseTarget(input.value, S.neighbours, S.clip ? S.clip.id : null);
    if (parsed.error) { toast(parsed.error, "error"); return; }
    setTarget(parsed.id);
    input.value = "";
    input.blur();
    document.body.classList.remove("id-mode");
  }

  function cancel() {
    if (S.mode === "split") { S.mode = "play"; render(); return; }
    if (S.target != null) { setTarget(null); toast("target cleared"); }
  }

  function command(name) {
    switch (name) {
      case "toggle-play": setPlaying(!S.playing); break;
      case "step-back": step(-1); break;
      case "step-forward": step(1); break;
      case "split":
        if (S.mode !== "split") { S.playing = false; S.mode = "split"; render(); break; }
        act("split"); break;
      case "cancel": cancel(); break;
      case "id-mode": openIdMode(); break;
      case "undo": undo(); break;
      case "approve": case "skip": case "archive": case "merge": case "group": act(name); break;
      default: break;
    }
  }

  function onKey(e) {
    const t = e.target;
    const inInput = !!t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA") && t.type !== "range";
    const name = keyToAction(e, { mode: S.mode, inInput: inInput });
    if (!name) return;
    e.preventDefault();
    if (inInput && name === "cancel") { t.blur(); document.body.classList.remove("id-mode"); return; }
    command(name);
  }

  // -- wiring ------------------------------------------------------------------------------
  function boot() {
    readCredentials();
    renderLogin();
    $("login").addEventListener("submit", function (e) {
      e.preventDefault();
      const name = $("reviewer").value.trim();
      const token = $("token").value;
      if (!/^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$/.test(name)) {
        $("login-msg").textContent = "name: letters, digits, space and _ . @ + - (up to 64)";
        return;
      }
      if (!token) { $("login-msg").textContent = "enter the reviewer token"; return; }
      S.reviewer = name;
      S.token = token;
      S.loginMsg = "";
      localStorage.setItem("heaters.reviewer", name);
      sessionStorage.setItem("heaters.token", token);
      $("token").value = "";
      loadNext();
    });
    $("logout").addEventListener("click", function () {
      if (S.clip && S.writable) api_("POST", "/api/clips/" + S.clip.id + "/release", { reviewer: S.reviewer });
      signOut();
      loadNext();
    });
    $("play").addEventListener("click", function () { setPlaying(!S.playing); });
    $("scrub").addEventListener("input", function (e) {
      S.playing = false;
      S.tile = Number(e.target.value) || 0;
      render();
    });
    document.querySelectorAll("[data-speed]").forEach(function (b) {
      b.addEventListener("click", function () { S.speed = Number(b.dataset.speed); S.acc = 0; render(); });
    });
    document.querySelectorAll("[data-command]").forEach(function (b) {
      b.addEventListener("click", function () { command(b.dataset.command); });
    });
    $("target-input").addEventListener("keydown", function (e) {
      if (e.key === "Enter") { e.preventDefault(); commitTargetInput(); }
    });
    $("target-clear").addEventListener("click", function () { setTarget(null); });
    document.addEventListener("keydown", onKey);
    // A clicked button keeps no focus, so Space/Enter stay page shortcuts.
    document.addEventListener("click", function (e) {
      const b = e.target && e.target.closest ? e.target.closest("button") : null;
      if (b) b.blur();
    });
    window.addEventListener("resize", function () { layoutPlayer(); render(); });
    window.addEventListener("pagehide", function () {
      if (S.clip && S.writable && S.token) {
        fetch("/api/clips/" + S.clip.id + "/release", {
          method: "POST", keepalive: true, credentials: "omit",
          headers: { "Content-Type": "application/json", "X-Heaters-Token": S.token },
          body: JSON.stringify({ reviewer: S.reviewer }),
        });
      }
    });
    requestAnimationFrame(frameLoop);
    // /clip/<id> (the link on a sprite materialization in the Dagster UI): that clip first.
    const linked = /^\/clip\/(\d+)\/?$/.exec(location.pathname);
    loadNext(linked ? { prefer: Number(linked[1]), linked: true } : undefined);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})(typeof window !== "undefined" ? window : null);
