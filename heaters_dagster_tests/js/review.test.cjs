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

test("playback advances at effective_fps times speed and loops", () => {
  const L = layout(24, 24, 48);
  assert.equal(R.playbackTile(0, 1000, L, 1), 24);
  assert.equal(R.playbackTile(0, 1000, L, 1.5), 36);
  assert.equal(R.playbackTile(0, 1000, L, 2), 0); // 48 tiles: back to the start
  assert.equal(R.playbackTile(40, 500, L, 1), 4);
  assert.equal(R.playbackTile(3, 40, L, 1), 3); // less than one frame later
  assert.equal(R.stepTile(0, -1, L), 0);
  assert.equal(R.stepTile(47, 1, L), 47);
  assert.equal(R.stepTile(10, 1, L), 11);
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
  const L = layout(60, 24, 48);
  const body = R.eventBody(clip, "split", { tile: 12, layout: L, target: null, reviewer: "ann" });
  assert.deepEqual(body, { clip_id: 7, action: "split", payload: { frame: 31 }, reviewer: "ann" });
  assert.equal(body.payload.frame, R.tileToFrame(12, L, 120));
  assert.match(R.eventBody(clip, "split", { tile: 0, layout: L, reviewer: "ann" }).error, /cannot split at frame 1/);
  assert.deepEqual(R.eventBody(clip, "merge", { tile: 0, layout: L, target: null, reviewer: "ann" }).payload, {});
  assert.deepEqual(R.eventBody(clip, "merge", { tile: 0, layout: L, target: 6, reviewer: "ann" }).payload,
    { target_clip_id: 6 });
  assert.match(R.eventBody(clip, "group", { tile: 0, layout: L, target: null, reviewer: "ann" }).error, /choose/);
  assert.deepEqual(R.eventBody(clip, "group", { tile: 0, layout: L, target: 9, reviewer: "ann" }).payload,
    { target_clip_id: 9 });
  assert.deepEqual(R.eventBody(clip, "approve", { tile: 5, layout: L, target: 9, reviewer: "ann" }).payload, {});
});

test("ID mode accepts only live clips of the source", () => {
  const ns = [{ id: 3 }, { id: 5 }];
  assert.deepEqual(R.parseTarget("5", ns, 4), { id: 5 });
  assert.deepEqual(R.parseTarget(" #3 ", ns, 4), { id: 3 });
  assert.match(R.parseTarget("4", ns, 4).error, /current clip/);
  assert.match(R.parseTarget("9", ns, 4).error, /not a live clip/);
  assert.match(R.parseTarget("5; drop", ns, 4).error, /digits/);
});
