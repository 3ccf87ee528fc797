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

  /**
   * The sprite tile nearest to clip frame `frame` at or before it (the scrub bar's hover preview):
   * the largest tile whose frame (tileToFrame) is not after `frame`.
   */
  function frameToTile(frame, layout, frameCount) {
    const r = layout.clip_fps / layout.effective_fps;
    let tile = clamp(Math.floor((frame + 1) / r - 0.5 + 1e-9), 0, Math.max(0, layout.frame_count - 1));
    while (tile > 0 && tileToFrame(tile, layout, frameCount) > frame) tile--;
    while (tile < layout.frame_count - 1 && tileToFrame(tile + 1, layout, frameCount) <= frame) tile++;
    return tile;
  }

  /**
   * Video frames. Clip files run at a constant frame rate with frame k presented at k / fps, so
   * the frame a presentation timestamp shows (requestVideoFrameCallback's mediaTime) is
   * round(t * fps). Seeks aim at the middle of a frame, (k + 0.5) / fps, so that rounding in the
   * decoder can never land on a neighbour; a currentTime from such a seek maps back with floor.
   */
  function frameAtMediaTime(t, fps, frameCount) {
    return clamp(Math.round(t * fps), 0, Math.max(0, frameCount - 1));
  }

  function frameAtCurrentTime(t, fps, frameCount) {
    return clamp(Math.floor(t * fps + 1e-6), 0, Math.max(0, frameCount - 1));
  }

  function seekTime(frame, fps) {
    return (frame + 0.5) / fps;
  }

  /** Step `delta` frames from `frame`, without wrapping. */
  function stepFrame(frame, delta, frameCount) {
    return clamp(frame + delta, 0, Math.max(0, frameCount - 1));
  }

  /**
   * Which of the next clips' videos to download ahead: in queue order, as long as the total stays
   * within `factor` times the current clip's bytes (a clip that does not fit is not started).
   */
  function prefetchPlan(items, currentBytes, factor) {
    let budget = Math.max(0, (currentBytes || 0) * (factor == null ? 3 : factor));
    const out = [];
    items.forEach(function (p) {
      if (!p.video || !(p.video.bytes > 0) || p.video.bytes > budget) return;
      budget -= p.video.bytes;
      out.push(p);
    });
    return out;
  }

  /** The split bar's description of the two parts a split before `frame` makes. */
  function splitParts(frame, frameCount) {
    if (frame < 1) return "part A would be empty: step right to the first frame of part B";
    if (frame > frameCount - 1) return "part B would be empty";
    return "part A: frames 0–" + (frame - 1) + " · part B: frames " + frame + "–" + (frameCount - 1);
  }

  /** What G will do, in words: the shown clip is approved, the target only joins the group. */
  function groupPlan(clip, target) {
    if (target == null) return null;
    const t = target.state ? target.state.replace(/_/g, " ") : "";
    const approve = clip.state === "review_approved" ? "put #" + clip.id : "approve #" + clip.id + " and put it";
    const keep = target.state && target.state !== "review_approved"
      ? " #" + target.id + " is not approved by this: it stays " + t + " for its own review." : "";
    return approve + " in a group with #" + target.id + "." + keep;
  }

  /** Whether F can merge now ({ok, target} or {error}), from the server's merge option. */
  function mergePlan(option, target) {
    if (!option) return { error: "cannot merge yet: the clip's neighbours are still loading" };
    if (!option.possible) return { error: "cannot merge: " + option.reason };
    if (target != null && target !== option.target) {
      return { error: "cannot merge with #" + target + ": only the clip right before (#" + option.target + ") can be merged" };
    }
    return { ok: true, target: option.target };
  }

  /** One line of at most `max` characters (server errors and reasons shown in toasts). */
  function oneLine(text, max) {
    const line = String(text == null ? "" : text).split(/\r?\n/)[0].trim();
    const m = max || 160;
    return line.length > m ? line.slice(0, m - 1) + "…" : line;
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
        if (ctx && ctx.mode === "split") return "split";
        return ctx && ctx.mode === "group" ? "group" : null;
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
      case "m":
        return "mute";
      default:
        return null;
    }
  }

  /**
   * The JSON body for POST /api/events, or {error}. `ctx`: {frame, target, reviewer, session}.
   * Split frames are clip-relative: the frame the player shows.
   */
  function eventBody(clip, action, ctx) {
    const body = { clip_id: clip.id, action: action, payload: {}, reviewer: ctx.reviewer };
    if (ctx.session) body.session = ctx.session;
    if (action === "split") {
      const frame = ctx.frame;
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
    tileToFrame: tileToFrame, tileOffset: tileOffset, frameToTile: frameToTile, frameAtMediaTime: frameAtMediaTime,
    frameAtCurrentTime: frameAtCurrentTime, seekTime: seekTime, stepFrame: stepFrame, prefetchPlan: prefetchPlan,
    splitParts: splitParts, groupPlan: groupPlan, mergePlan: mergePlan, oneLine: oneLine, splitProblem: splitProblem, keyToAction: keyToAction, eventBody: eventBody, parseTarget: parseTarget,
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
    token: null, reviewer: null, session: null, writable: false, clip: null, layout: null,
    frame: 0, wanted: null, playing: true, speed: 1, muted: false, mode: "play", target: null,
    neighbours: [], merge: null, history: [], busy: false, leaseTimer: null, emptyTimer: null, loginMsg: "",
    prefetched: [], gen: 0, spriteImg: null,
  };
  const HAS_RVFC = typeof HTMLVideoElement !== "undefined" && "requestVideoFrameCallback" in HTMLVideoElement.prototype;

  function toast(message, kind) {
    const el = $("toast");
    const item = document.createElement("div");
    item.className = "toast " + (kind || "info");
    item.textContent = oneLine(message);
    el.appendChild(item);
    while (el.children.length > 4) el.firstChild.remove();
    setTimeout(function () { item.remove(); }, kind === "error" ? 7000 : 3500);
  }

  function signedIn() { return !!(S.token && S.reviewer); }

  async function api_(method, url, body, opts) {
    const headers = { Accept: "application/json" };
    if (signedIn() || (opts && opts.withToken)) headers["X-Heaters-Token"] = S.token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(url, {
        method: method, headers: headers, body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store", credentials: "omit",
      });
    } catch (e) {
      return { status: 0, data: { error: "the review server cannot be reached" } };
    }
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (res.status === 403 && signedIn()) {
      signOut((data && data.error) || "the reviewer token was refused");
    }
    return { status: res.status, data: data };
  }

  function errorOf(res) {
    return oneLine((res.data && res.data.error) || ("HTTP " + res.status));
  }

  // -- sign in -----------------------------------------------------------------------------
  function newSessionId() {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  function readCredentials() {
    const params = new URLSearchParams(location.search);
    if (params.has("token")) {
      // Signed in once by the address: keep the token for this tab, take it out of the address
      // (and so out of the history, bookmarks and the Referer).
      if (params.get("token")) { sessionStorage.setItem("heaters.token", params.get("token")); S.freshToken = true; }
      params.delete("token");
      const q = params.toString();
      history.replaceState(null, "", location.pathname + (q ? "?" + q : "") + location.hash);
    }
    if (params.has("reviewer")) localStorage.setItem("heaters.reviewer", params.get("reviewer"));
    S.token = sessionStorage.getItem("heaters.token");
    S.reviewer = localStorage.getItem("heaters.reviewer") || "";
    // The lease identity of this tab: two tabs with the same name never hold the same clip.
    S.session = sessionStorage.getItem("heaters.session");
    if (!S.session) { S.session = newSessionId(); sessionStorage.setItem("heaters.session", S.session); }
    S.muted = localStorage.getItem("heaters.muted") === "1";
  }

  function renderLogin(message) {
    const ok = signedIn() && S.writable;
    $("login").hidden = ok;
    $("who").hidden = !ok;
    $("who-name").textContent = S.reviewer || "";
    if (!$("reviewer").value) $("reviewer").value = S.reviewer || "";
    // A token from the address: only the name is missing.
    $("token").hidden = !!S.token;
    $("token-have").hidden = !S.token;
    if (message !== undefined) S.loginMsg = message;
    $("login-msg").textContent = S.loginMsg || "";
    document.body.classList.toggle("readonly", !S.writable);
  }

  function signOut(message) {
    sessionStorage.removeItem("heaters.token");
    S.token = null;
    S.writable = false;
    S.history = [];
    renderHistory();
    renderLogin(message);
    if (message) toast(message, "error");
  }

  async function checkToken() {
    if (!S.token) return false;
    const res = await api_("GET", "/api/session", undefined, { withToken: true });
    if (res.status !== 200) return true; // keep it; the next write says what is wrong
    if (res.data.auth === "wrong") { signOut("wrong reviewer token"); return false; }
    if (res.data.auth === "disabled") { signOut("writes are disabled: the operator has configured no reviewer token"); return false; }
    return true;
  }

  // -- loading clips -----------------------------------------------------------------------
  async function loadNext(opts) {
    opts = opts || {};
    clearTimeout(S.emptyTimer);
    const q = new URLSearchParams();
    if (S.reviewer) q.set("reviewer", S.reviewer);
    if (signedIn()) q.set("session", S.session);
    if (opts.exclude && opts.exclude.length) q.set("exclude", opts.exclude.join(","));
    if (opts.prefer) q.set("prefer", String(opts.prefer));
    const res = await api_("GET", "/api/next?" + q.toString());
    if (res.status !== 200) {
      if (res.status === 403) return loadNext(opts); // signed out by api_: show it read-only
      toast("could not load the next clip: " + errorOf(res), "error");
      return;
    }
    const d = res.data;
    if (opts.linked && (!d.clip || d.clip.id !== opts.prefer)) {
      toast("clip " + opts.prefer + " is not waiting for review (or another reviewer has it)", "info");
    }
    S.writable = d.writable;
    renderLogin();
    $("queue-length").textContent = String(d.queue_length);
    showClip(d.clip);
    // The next clips' videos once this one has its first frame (they never compete with it).
    const gen = S.gen;
    const later = function () {
      if (gen === S.gen) prefetch(d.prefetch || [], d.clip && d.clip.video ? d.clip.video.bytes : 0);
    };
    if (d.clip && d.clip.video) $("video").addEventListener("loadeddata", later, { once: true });
    else later();
    if (!d.clip) S.emptyTimer = setTimeout(loadNext, 10000);
    if (S.leaseTimer) clearInterval(S.leaseTimer);
    S.leaseTimer = null;
    // The clip this tab holds: a reload asks for it first.
    if (d.clip && d.leased) sessionStorage.setItem("heaters.clip", String(d.clip.id));
    else sessionStorage.removeItem("heaters.clip");
    if (d.clip && d.leased) {
      S.leaseTimer = setInterval(renewLease, Math.max(5, d.lease_s / 3) * 1000);
    }
  }

  function prefetch(items, currentBytes) {
    // The next clips' videos, at most ~3x the current clip's bytes in all; the responses are
    // cacheable, so the player reuses them. Sprites are fetched only for the hover preview.
    const plan = prefetchPlan(items, currentBytes, 3);
    S.prefetched.forEach(function (c) { c.abort(); });
    S.prefetched = plan.map(function (p) {
      const ctl = new AbortController();
      fetch(p.video.url, { credentials: "omit", signal: ctl.signal })
        .then(function (r) { return r.ok ? r.arrayBuffer() : null; })
        .catch(function () { return null; });
      return ctl;
    });
    $("prefetch-count").textContent = String(plan.length);
  }

  async function renewLease() {
    if (!S.clip || !S.writable) return;
    const id = S.clip.id;
    const res = await api_("POST", "/api/clips/" + id + "/lease", { reviewer: S.reviewer, session: S.session });
    if (res.status === 409 && S.clip && S.clip.id === id) {
      // Lost (expired, or released by this tab's previous page after a reload): take it back if
      // it is still free, else say so and move on.
      await loadNext({ prefer: id });
      if (!S.clip || S.clip.id !== id) toast("your lease on clip " + id + " ran out and the clip went to another reviewer", "error");
    }
  }

  function showClip(clip) {
    S.gen += 1;
    S.clip = clip;
    S.layout = clip && clip.sprite ? clip.sprite.layout : null;
    S.frame = 0;
    S.wanted = null;
    S.mode = "play";
    S.target = null;
    S.neighbours = [];
    S.merge = null;
    S.spriteImg = null;
    $("empty").hidden = !!clip;
    $("stage").hidden = !clip;
    const video = $("video");
    const player = $("player");
    player.classList.toggle("novideo", !!clip && !clip.video);
    if (!clip) { video.removeAttribute("src"); video.load(); renderInfo(); renderTarget(); return; }
    $("scrub").max = String(Math.max(0, clip.frame_count - 1));
    if (clip.video) {
      video.muted = S.muted;
      video.playbackRate = S.speed;
      video.loop = true;
      video.src = clip.video.url;
      player.classList.add("loading");
      watchFrames(S.gen);
      setPlaying(true);
    } else {
      video.removeAttribute("src");
      video.load();
      S.playing = false;
      $("novideo-msg").textContent = "clip " + clip.id + " has no video file";
    }
    renderInfo();
    renderTarget();
    render();
    loadNeighbours(clip.id);
    loadSimilar(clip.id);
  }

  // -- the video: which frame is on screen -------------------------------------------------
  function shownFrame(frame) {
    if (!S.clip) return;
    S.frame = frame;
    // After a seek the frame on screen is the truth, whichever it is.
    if (S.wanted != null && (S.wanted === frame || !$("video").seeking)) S.wanted = null;
    render();
  }

  function watchFrames(gen) {
    const video = $("video");
    if (HAS_RVFC) {
      const onFrame = function (now, meta) {
        if (gen !== S.gen || !S.clip) return;
        if (!S.firstFrame) { S.firstFrame = true; if (performance.mark) performance.mark("heaters-first-frame"); }
        $("player").classList.remove("loading");
        shownFrame(frameAtMediaTime(meta.mediaTime, S.clip.fps, S.clip.frame_count));
        video.requestVideoFrameCallback(onFrame);
      };
      video.requestVideoFrameCallback(onFrame);
    }
  }

  function onVideoEvent(e) {
    const video = $("video");
    if (!S.clip || !S.clip.video) return;
    if (e.type === "loadeddata" || e.type === "seeked") $("player").classList.remove("loading");
    if (HAS_RVFC && e.type === "seeked") {
      // A seek to the frame already shown presents no new frame, so no callback comes.
      const gen = S.gen;
      setTimeout(function () {
        if (gen === S.gen && S.wanted != null && !video.seeking) {
          shownFrame(frameAtCurrentTime(video.currentTime, S.clip.fps, S.clip.frame_count));
        }
      }, 300);
    }
    if (!HAS_RVFC && (e.type === "seeked" || e.type === "timeupdate" || e.type === "loadeddata")) {
      shownFrame(S.wanted != null && e.type === "seeked" ? S.wanted
        : frameAtCurrentTime(video.currentTime, S.clip.fps, S.clip.frame_count));
    }
    if (e.type === "error" && video.error) {
      toast("the video of clip " + S.clip.id + " cannot be played (" + (video.error.message || "code " + video.error.code) + ")", "error");
    }
  }

  function seekFrame(frame) {
    const video = $("video");
    if (!S.clip || !S.clip.video) return;
    if (S.wanted == null && frame === S.frame &&
        frameAtCurrentTime(video.currentTime, S.clip.fps, S.clip.frame_count) === frame) { render(); return; }
    S.wanted = frame;
    video.currentTime = seekTime(frame, S.clip.fps);
    render();
  }

  function setPlaying(on) {
    const video = $("video");
    S.playing = on && !!(S.clip && S.clip.video);
    if (S.playing && S.mode === "split") S.mode = "play";
    if (S.playing) {
      S.wanted = null;
      const p = video.play();
      if (p && p.catch) {
        p.catch(function (err) {
          if (err && err.name === "NotAllowedError" && !video.muted) {
            // Browsers refuse sound before the first interaction: play muted, say how to unmute.
            video.muted = true;
            S.muted = true;
            render();
            toast("playing muted (the browser blocks sound until you interact): press M for sound");
            video.play().catch(function () { /* paused by the browser; Space plays */ });
          }
        });
      }
    } else {
      video.pause();
    }
    render();
  }

  function step(delta) {
    if (!S.clip || !S.clip.video) { toast("this clip has no video to step through", "error"); return; }
    if (S.playing) setPlaying(false);
    S.mode = "split";
    const from = S.wanted != null ? S.wanted : S.frame;
    seekFrame(stepFrame(from, delta, S.clip.frame_count));
  }

  function toggleMute() {
    const video = $("video");
    S.muted = !S.muted;
    video.muted = S.muted;
    localStorage.setItem("heaters.muted", S.muted ? "1" : "0");
    render();
  }

  // -- side panels -------------------------------------------------------------------------
  async function loadSimilar(clipId) {
    const box = $("similar");
    box.textContent = "";
    $("similar-model").textContent = "";
    const res = await api_("GET", "/api/clips/" + clipId + "/similar");
    if (!S.clip || S.clip.id !== clipId) return;
    if (res.status === 200 && res.data.model_id) {
      $("similar-model").textContent = "model " + res.data.model_id + (res.data.model_source === "stored"
        ? " (the stored embeddings'; the configured " + res.data.configured_model_id + " has none)" : "");
    }
    const items = res.status === 200 ? res.data.clips : [];
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "dim";
      li.textContent = res.status !== 200 ? "similar clips unavailable: " + errorOf(res)
        : res.data.unavailable || "no embedded clips yet";
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
    if (!S.clip || S.clip.id !== clipId) return;
    if (res.status !== 200) {
      S.merge = { possible: false, target: null, reason: "the clip's neighbours could not be loaded" };
      renderTarget();
      return;
    }
    S.neighbours = res.data.clips.filter(function (c) { return c.id !== clipId; });
    S.merge = res.data.merge;
    const me = res.data.clips.find(function (c) { return c.id === clipId; });
    if (me) { S.clip.state = me.state; S.clip.group_id = me.group_id; renderInfo(); }
    renderNeighbours();
    renderTarget();
  }

  // -- rendering ---------------------------------------------------------------------------
  function render() {
    const clip = S.clip;
    if (!clip) return;
    const player = $("player");
    const frame = S.frame;
    player.dataset.frame = String(frame);
    player.dataset.seeking = S.wanted != null ? "1" : "0";
    if (document.activeElement !== $("scrub")) $("scrub").value = String(S.wanted != null ? S.wanted : frame);
    $("counter").textContent = "frame " + frame + " / " + clip.frame_count;
    $("time").textContent = formatSeconds(frame / clip.fps);
    $("play").textContent = S.playing ? "❚❚" : "▶";
    $("play").setAttribute("aria-label", S.playing ? "pause" : "play");
    $("mute").textContent = S.muted ? "muted" : "sound";
    $("mute").setAttribute("aria-label", S.muted ? "unmute" : "mute");
    $("mute").setAttribute("aria-pressed", S.muted ? "true" : "false");
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
      $("split-parts").textContent = splitParts(frame, clip.frame_count);
      $("split-problem").textContent = problem || "";
      $("split-bar").classList.toggle("bad", !!problem);
    }
    $("group-bar").hidden = S.mode !== "group";
  }

  function renderInfo() {
    const c = S.clip;
    $("clip-id").textContent = c ? "#" + c.id : "–";
    $("clip-source").textContent = c ? "#" + c.source_video_id : "–";
    $("clip-times").textContent = c ? formatSeconds(c.start_s) + " → " + formatSeconds(c.end_s) +
      " (" + formatSeconds(c.end_s - c.start_s) + ")" : "–";
    $("clip-frames").textContent = c ? c.start_frame + "–" + (c.end_frame - 1) + " · " + c.frame_count +
      " frames @ " + Number(c.fps.toFixed(3)) + " fps" : "–";
    $("clip-state").textContent = c ? c.state.replace(/_/g, " ") + (c.group_id ? " · in group " + c.group_id : "") : "–";
    $("clip-video").textContent = c ? (c.video ? (c.video.bytes >= 1e6 ? (c.video.bytes / 1e6).toFixed(1) + " MB"
      : Math.ceil(c.video.bytes / 1e3) + " kB") : "no video file") : "–";
  }

  function targetClip() {
    const t = S.target;
    return t == null ? null : (S.neighbours.find(function (c) { return c.id === t; }) || { id: t });
  }

  function renderTarget() {
    const t = S.target;
    $("target").textContent = t == null ? "none" : "#" + t;
    const m = S.merge;
    const mergeBtn = document.querySelector('[data-command="merge"]');
    const plan = mergePlan(m, t);
    mergeBtn.classList.toggle("off", !plan.ok);
    mergeBtn.setAttribute("aria-disabled", plan.ok ? "false" : "true");
    mergeBtn.title = plan.ok ? "merge with the clip right before (#" + plan.target + ")" : plan.error;
    $("merge-label").textContent = plan.ok ? "Merge with #" + plan.target : "Merge";
    $("merge-why").textContent = m && !plan.ok ? plan.error : "";
    $("group-label").textContent = t == null ? "Group…" : "Group with #" + t;
    if (S.clip && t != null) $("group-plan").textContent = groupPlan(S.clip, targetClip());
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
    if (S.mode === "group" && id == null) S.mode = "play";
    renderTarget();
    render();
    if (id != null) toast("target: clip #" + id + " — G groups with it");
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

  function historyEntry(ev) {
    const p = ev.payload || {};
    return { event_id: ev.id, clip_id: ev.clip_id, action: ev.action, status: ev.outcome || "pending",
      undone: !!ev.undone_by, reason: ev.reason,
      detail: p.frame != null ? "@" + p.frame : p.target_clip_id != null ? "→ #" + p.target_clip_id : "" };
  }

  /** The reviewer's undoable events, from the server (so a reload or another tab sees them). */
  async function loadHistory() {
    if (!signedIn()) return [];
    const res = await api_("GET", "/api/undoable?" + new URLSearchParams({ reviewer: S.reviewer }).toString());
    if (res.status !== 200) return null;
    const server = res.data.events.map(historyEntry).reverse(); // oldest first
    const ids = new Set(server.map(function (h) { return h.event_id; }));
    // Keep what only this page knows (rejected and undone entries), then the server's list.
    S.history = S.history.filter(function (h) { return !ids.has(h.event_id) && (h.status === "rejected" || h.undone); })
      .concat(server).sort(function (a, b) { return a.event_id - b.event_id; });
    renderHistory();
    return res.data.events;
  }

  // -- scrub bar hover preview (the sprite sheet) ------------------------------------------
  function previewAt(e) {
    const box = $("preview");
    if (!S.clip || !S.layout) { box.hidden = true; return; }
    const scrub = $("scrub");
    const r = scrub.getBoundingClientRect();
    const x = clamp(e.clientX - r.left, 0, r.width);
    const frame = Math.round((x / Math.max(1, r.width)) * (S.clip.frame_count - 1));
    const L = S.layout;
    const tile = frameToTile(frame, L, S.clip.frame_count);
    const scale = Math.min(1, 200 / L.tile_width);
    const off = tileOffset(tile, L, scale);
    box.style.width = Math.round(L.tile_width * scale) + "px";
    box.style.height = Math.round(L.tile_height * scale) + "px";
    box.style.backgroundImage = 'url("' + S.clip.sprite.url + '")';
    box.style.backgroundSize = Math.round(L.sheet_width * scale) + "px " + Math.round(L.sheet_height * scale) + "px";
    box.style.backgroundPosition = off.x + "px " + off.y + "px";
    box.style.left = Math.round(clamp(x - (L.tile_width * scale) / 2, 0, Math.max(0, r.width - L.tile_width * scale))) + "px";
    box.dataset.tile = String(tile);
    $("preview-label").textContent = "frame " + tileToFrame(tile, L, S.clip.frame_count);
    box.hidden = false;
  }

  // -- actions -----------------------------------------------------------------------------
  async function act(action) {
    const clip = S.clip;
    if (!clip) return;
    if (!S.writable) { toast("read-only: sign in with the reviewer token to review", "error"); return; }
    if (action === "group") {
      if (S.target == null) { openIdMode("choose the clip to group with, then press G"); return; }
      if (S.mode !== "group") { S.mode = "group"; renderTarget(); render(); return; } // G again (or Enter) confirms
      S.mode = "play";
      render();
    }
    if (action === "merge") {
      const plan = mergePlan(S.merge, S.target);
      if (plan.error) { toast(plan.error, "error"); return; }
    }
    if (action === "split" && S.wanted != null) { toast("wait for the frame to show, then press Enter again"); return; }
    const body = eventBody(clip, action, { frame: S.frame, target: S.target, reviewer: S.reviewer, session: S.session });
    if (body.error) { toast(body.error, "error"); return; }
    if (S.busy) return;
    S.busy = true;
    try {
      const res = await api_("POST", "/api/events", body);
      if (res.status !== 201) {
        if (res.status !== 403) toast(action + " failed: " + errorOf(res), "error");
        return;
      }
      const entry = historyEntry(res.data);
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
    if (S.busy) return;
    S.busy = true;
    try {
      const events = await loadHistory(); // the server's list: this tab's, other tabs', before a reload
      if (events === null) { toast("undo failed: the list of your recent decisions did not load", "error"); return; }
      if (!events.length) { toast("nothing to undo (within the undo window)"); return; }
      const target = events[0];
      const res = await api_("POST", "/api/events", { clip_id: target.clip_id, action: "undo", payload: {},
        reviewer: S.reviewer, session: S.session });
      if (res.status !== 201) {
        if (res.status !== 403) toast("undo failed: " + errorOf(res), "error");
        return;
      }
      const entry = S.history.find(function (h) { return h.event_id === target.id; });
      if (entry) entry.undone = true;
      renderHistory();
      toast("undo of " + target.action + " on clip #" + target.clip_id + " sent");
      watchEvent({ event_id: res.data.id, clip_id: target.clip_id, action: "undo", silent: true }, function (ev) {
        if (ev.outcome === "applied") {
          toast("clip #" + target.clip_id + " is back for review");
          // Bring the clip back unless the reviewer is placing a split on the current one.
          if (S.mode !== "split") loadNext({ prefer: target.clip_id });
        } else if (ev.outcome === "rejected" && entry) {
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
        // An applied decision may change the shown clip's neighbours (merge) or group.
        if (res.data.outcome === "applied" && S.clip) loadNeighbours(S.clip.id);
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
    if (S.mode === "split" || S.mode === "group") { S.mode = "play"; render(); return; }
    if (S.target != null) { setTarget(null); toast("target cleared"); }
  }

  function command(name) {
    switch (name) {
      case "toggle-play": setPlaying(!S.playing); break;
      case "step-back": step(-1); break;
      case "step-forward": step(1); break;
      case "split":
        if (S.mode !== "split") { if (S.playing) setPlaying(false); S.mode = "split"; render(); break; }
        act("split"); break;
      case "cancel": cancel(); break;
      case "id-mode": openIdMode(); break;
      case "undo": undo(); break;
      case "mute": toggleMute(); break;
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
  async function start() {
    if (S.token && !S.reviewer) renderLogin("token received: enter your name to start reviewing");
    // A token just handed over in the address is checked first (a reload skips this round trip).
    if (S.token && (!S.reviewer || S.freshToken)) await checkToken();
    renderLogin();
    // /clip/<id> (the link on a sprite materialization in the Dagster UI): that clip first.
    const linked = /^\/clip\/(\d+)\/?$/.exec(location.pathname);
    const held = Number(sessionStorage.getItem("heaters.clip")) || null;
    await loadNext(linked ? { prefer: Number(linked[1]), linked: true } : held && signedIn() ? { prefer: held } : undefined);
    if (S.writable) loadHistory();
  }

  function boot() {
    readCredentials();
    renderLogin();
    $("login").addEventListener("submit", async function (e) {
      e.preventDefault();
      const name = $("reviewer").value.trim();
      const token = S.token || $("token").value;
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
      if (!(await checkToken())) return;
      await loadNext();
      if (S.writable) loadHistory();
    });
    $("logout").addEventListener("click", function () {
      if (S.clip && S.writable) api_("POST", "/api/clips/" + S.clip.id + "/release", { reviewer: S.reviewer, session: S.session });
      signOut();
      loadNext();
    });
    $("play").addEventListener("click", function () { setPlaying(!S.playing); });
    $("mute").addEventListener("click", toggleMute);
    $("scrub").addEventListener("input", function (e) {
      if (S.playing) setPlaying(false);
      seekFrame(Number(e.target.value) || 0);
    });
    $("scrub").addEventListener("mousemove", previewAt);
    $("scrub").addEventListener("mouseleave", function () { $("preview").hidden = true; });
    const video = $("video");
    ["loadeddata", "seeked", "timeupdate", "error"].forEach(function (n) { video.addEventListener(n, onVideoEvent); });
    video.addEventListener("click", function () { setPlaying(!S.playing); });
    document.querySelectorAll("[data-speed]").forEach(function (b) {
      b.addEventListener("click", function () { S.speed = Number(b.dataset.speed); video.playbackRate = S.speed; render(); });
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
    window.addEventListener("pagehide", function () {
      if (S.clip && S.writable && S.token) {
        fetch("/api/clips/" + S.clip.id + "/release", {
          method: "POST", keepalive: true, credentials: "omit",
          headers: { "Content-Type": "application/json", "X-Heaters-Token": S.token },
          body: JSON.stringify({ reviewer: S.reviewer, session: S.session }),
        });
      }
    });
    start();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})(typeof window !== "undefined" ? window : null);
