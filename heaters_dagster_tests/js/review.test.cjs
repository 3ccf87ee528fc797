// Unit tests of the review page's pure functions: `node --test heaters_dagster_tests/js/`
// (run from pytest by test_review_app.py::test_review_js_unit_tests).
"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");

const R = require(path.join(__dirname, "..", "..", "heaters_dagster", "review", "static", "review.js"));

function layout(clipFps, effFps, frameCount, cols) {
  const n = frameCount;
  return { cols: cols || 5, rows: Math.ceil(n / (cols || 5)), tile_width: 160, tile_height: 90, frame_count: n,
    effective_fps: effFps, clip_fps: clipFps, clip_duration_s: n / effFps };
}

test("tile i is clip frame i when the sheet samples at the clip's rate (no off-by-one)", () => {
  const L = layout(24, 24, 48);
  for (let i = 0; i < 48; i++) assert.equal(R.tileToFrame(i, L, 48), i);
  // 12.5 fps clip sampled at its own rate as well
  const L2 = layout(12.5, 12.5, 25);
  for (let i = 0; i < 25; i++) assert.equal(R.tileToFrame(i, L2, 25), i);
});

test("30 and 60 fps clips sampled at 24 fps map to the frames ffmpeg put in the tiles", () => {
  // Measured from sheets ffmpeg made of videos that carry their frame number (see the pytest).
  const t30 = [0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14];
  const t60 = [1, 3, 6, 8, 11, 13, 16, 18, 21, 23, 26, 28];
  t30.forEach((f, i) => assert.equal(R.tileToFrame(i, layout(30, 24, 48), 60), f, "30 fps tile " + i));
  t60.forEach((f, i) => assert.equal(R.tileToFrame(i, layout(60, 24, 48), 120), f, "60 fps tile " + i));
  // NTSC 29.97 at 24
  const ntsc = layout(30000 / 1001, 24, 48);
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].map((i) => R.tileToFrame(i, ntsc, 60)), [0, 1, 3, 4, 5, 6, 8, 9]);
});

test("tileToFrame never leaves the clip", () => {
  const L = layout(60, 24, 48);
  assert.equal(R.tileToFrame(1000, L, 120), 119);
  assert.equal(R.tileToFrame(-5, L, 120), 0);
  assert.equal(R.tileToFrame(47, L, 120), 118);
});

test("tileOffset walks the grid row by row", () => {
  const L = layout(24, 24, 12, 5);
  assert.deepEqual(R.tileOffset(0, L, 1), { x: -0, y: -0 });
  assert.deepEqual(R.tileOffset(4, L, 1), { x: -640, y: -0 });
  assert.deepEqual(R.tileOffset(7, L, 2), { x: -640, y: -180 });
});

test("video frames: mediaTime rounds to its frame, seeks aim mid-frame, steps stay inside", () => {
  assert.equal(R.frameAtMediaTime(37 / 30, 30, 5400), 37);
  assert.equal(R.frameAtMediaTime(1.233333, 30, 5400), 37); // what Chromium reports for frame 37
  assert.equal(R.frameAtMediaTime(179.99, 30, 5400), 5399);
  for (const fps of [24, 25, 30000 / 1001, 30, 50, 60]) {
    for (const f of [0, 1, 2, 17, 1234, 5398]) {
      assert.equal(R.frameAtCurrentTime(R.seekTime(f, fps), fps, 5400), f, fps + " fps frame " + f);
      assert.equal(R.frameAtMediaTime(f / fps, fps, 5400), f);
    }
  }
  assert.equal(R.seekTime(0, 30), 0.5 / 30);
  assert.equal(R.stepFrame(0, -1, 100), 0);
  assert.equal(R.stepFrame(99, 1, 100), 99);
  assert.equal(R.stepFrame(10, 1, 100), 11);
});

test("frameToTile picks the tile showing the frame, or the one before it", () => {
  for (const [fps, n] of [[24, 48], [30, 60], [60, 120]]) {
    const L = layout(fps, 24, 48);
    for (let f = 0; f < n; f++) {
      const t = R.frameToTile(f, L, n);
      assert.ok(R.tileToFrame(t, L, n) <= f || t === 0, fps + " fps frame " + f);
      if (t + 1 < L.frame_count) assert.ok(R.tileToFrame(t + 1, L, n) > f);
    }
  }
});

test("prefetch stays within 3x the current clip's bytes", () => {
  const item = (id, bytes) => ({ id: id, video: bytes == null ? null : { url: "/v/" + id, bytes: bytes } });
  const plan = R.prefetchPlan([item(1, 100), item(2, 150), item(3, 100), item(4, 40)], 100, 3);
  assert.deepEqual(plan.map((p) => p.id), [1, 2, 4]); // 100 + 150 = 250; 3 (100) would pass 300; 4 fits
  assert.deepEqual(R.prefetchPlan([item(1, 400)], 100, 3), []);
  assert.deepEqual(R.prefetchPlan([item(1, null), item(2, 10)], 0, 3), []);
});

test("split, group and merge say what they do", () => {
  assert.equal(R.splitParts(0, 48), "part A would be empty: step right to the first frame of part B");
  assert.equal(R.splitParts(12, 48), "part A: frames 0–11 · part B: frames 12–47");
  const clip = { id: 7, state: "pending_review" };
  assert.match(R.groupPlan(clip, { id: 5, state: "pending_review" }),
    /^approve #7 and put it in a group with #5\. #5 is not approved by this: it stays pending review/);
  assert.equal(R.groupPlan(clip, { id: 5, state: "review_approved" }), "approve #7 and put it in a group with #5.");
  assert.match(R.mergePlan(null, null).error, /loading/);
  assert.equal(R.mergePlan({ possible: false, target: null, reason: "no live clip right before this one" }, null).error,
    "cannot merge: no live clip right before this one");
  assert.deepEqual(R.mergePlan({ possible: true, target: 6, reason: null }, null), { ok: true, target: 6 });
  assert.match(R.mergePlan({ possible: true, target: 6, reason: null }, 9).error, /only the clip right before \(#6\)/);
  assert.equal(R.oneLine("first line\nsecond"), "first line");
  assert.equal(R.oneLine("x".repeat(300)).length, 160);
});

test("keys map to the reviewer's commands", () => {
  const play = { mode: "play", inInput: false };
  const split = { mode: "split", inInput: false };
  const k = (key, extra) => Object.assign({ key: key, ctrlKey: false, metaKey: false, altKey: false, shiftKey: false,
    repeat: false }, extra || {});
  assert.equal(R.keyToAction(k("a"), play), "approve");
  assert.equal(R.keyToAction(k("A", { shiftKey: true }), play), "approve");
  assert.equal(R.keyToAction(k("s"), play), "skip");
  assert.equal(R.keyToAction(k("d"), play), "archive");
  assert.equal(R.keyToAction(k("f"), play), "merge");
  assert.equal(R.keyToAction(k("g"), play), "group");
  assert.equal(R.keyToAction(k("i"), play), "id-mode");
  assert.equal(R.keyToAction(k(" "), play), "toggle-play");
  assert.equal(R.keyToAction(k("ArrowLeft"), play), "step-back");
  assert.equal(R.keyToAction(k("ArrowRight"), play), "step-forward");
  assert.equal(R.keyToAction(k("ArrowRight", { repeat: true }), play), "step-forward");
  assert.equal(R.keyToAction(k("Enter"), play), null, "Enter splits only in split mode");
  assert.equal(R.keyToAction(k("Enter"), split), "split");
  assert.equal(R.keyToAction(k("Escape"), split), "cancel");
  assert.equal(R.keyToAction(k("z", { ctrlKey: true }), play), "undo");
  assert.equal(R.keyToAction(k("z", { metaKey: true }), play), "undo");
  assert.equal(R.keyToAction(k("z", { ctrlKey: true, shiftKey: true }), play), null);
  assert.equal(R.keyToAction(k("a", { ctrlKey: true }), play), null, "Ctrl+A stays the browser's");
  assert.equal(R.keyToAction(k("a", { repeat: true }), play), null, "holding A does not approve twice");
  assert.equal(R.keyToAction(k("a"), { mode: "play", inInput: true }), null, "typing in an input");
  assert.equal(R.keyToAction(k("Escape"), { mode: "play", inInput: true }), "cancel");
  assert.equal(R.keyToAction(k("x"), play), null);
  assert.equal(R.keyToAction(k("m"), play), "mute");
  assert.equal(R.keyToAction(k("Enter"), { mode: "group", inInput: false }), "group", "Enter confirms a group");
});

test("split checks mirror the server: 1..n-1 and parts of at least 0.5 s", () => {
  assert.match(R.splitProblem(0, 48, 24), /at least one frame/);
  assert.match(R.splitProblem(48, 48, 24), /at least one frame/);
  assert.match(R.splitProblem(11, 48, 24), /0.5 s \(12 frames\)/);
  assert.equal(R.splitProblem(12, 48, 24), null);
  assert.equal(R.splitProblem(36, 48, 24), null);
  assert.match(R.splitProblem(37, 48, 24), /0.5 s/);
  // Python rounds 12.5 to 12 (half to even): 25 fps clips need 12 frames a side, like the server
  assert.equal(R.pyRound(12.5), 12);
  assert.equal(R.pyRound(13.5), 14);
  assert.equal(R.pyRound(2.4), 2);
  assert.equal(R.splitProblem(12, 50, 25), null);
  assert.match(R.splitProblem(11, 50, 25), /12 frames/);
});

test("event bodies: split sends the clip-relative frame that is shown", () => {
  const clip = { id: 7, frame_count: 120, fps: 60, start_frame: 600 };
  const body = R.eventBody(clip, "split", { frame: 31, target: null, reviewer: "ann", session: "abcdefgh1234" });
  assert.deepEqual(body, { clip_id: 7, action: "split", payload: { frame: 31 }, reviewer: "ann", session: "abcdefgh1234" });
  assert.match(R.eventBody(clip, "split", { frame: 0, reviewer: "ann" }).error, /cannot split at frame 0/);
  assert.deepEqual(R.eventBody(clip, "merge", { frame: 0, target: null, reviewer: "ann" }).payload, {});
  assert.deepEqual(R.eventBody(clip, "merge", { frame: 0, target: 6, reviewer: "ann" }).payload, { target_clip_id: 6 });
  assert.match(R.eventBody(clip, "group", { frame: 0, target: null, reviewer: "ann" }).error, /choose/);
  assert.deepEqual(R.eventBody(clip, "group", { frame: 0, target: 9, reviewer: "ann" }).payload, { target_clip_id: 9 });
  assert.deepEqual(R.eventBody(clip, "approve", { frame: 5, target: 9, reviewer: "ann" }).payload, {});
});

test("ID mode accepts only live clips of the source", () => {
  const ns = [{ id: 3 }, { id: 5 }];
  assert.deepEqual(R.parseTarget("5", ns, 4), { id: 5 });
  assert.deepEqual(R.parseTarget(" #3 ", ns, 4), { id: 3 });
  assert.match(R.parseTarget("4", ns, 4).error, /current clip/);
  assert.match(R.parseTarget("9", ns, 4).error, /not a live clip/);
  assert.match(R.parseTarget("5; drop", ns, 4).error, /digits/);
});
