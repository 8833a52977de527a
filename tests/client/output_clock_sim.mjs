// Runs the page's own output clock (cut out of static/index.html: the constants,
// small helpers and output clock sections) against a fake AudioContext whose
// getOutputTimestamp() the scenario shapes, and prints one JSON line.
//
// usage: node output_clock_sim.mjs INDEX_HTML SCENARIO[:SEED]
//   glitch  one reading in every 20 is 8 ms off (Chromium on a busy machine)
//   step    the output falls 30 ms behind for good at 2 s (an underrun)
//   firefox the user agent is Firefox: which latency APIs does the clock call?
//   firefox-steps   Firefox's currentTime as measured under PulseAudio: it moves once per audio
//                   callback (896 frames at 48 kHz, every 20th 1024), each step seen 0-1.5 ms late
//                   (one in 15 a late callback: 4-12 ms), performance.now() in whole ms, the 25 ms
//                   tick jittered by ±3 ms: does the fit hold the envelope (the steps' true times)?
//   firefox-stall   the same, and at 3 s the output stalls for 40 ms (an underrun) for good
//   firefox-shift   the same, and at 3 s it falls 12 ms behind (less than a step: not seen as a stall)
import { readFileSync } from "node:fs";

const SECTION = "// ---------------------------------------------------------------- ";
const html = readFileSync(process.argv[2], "utf8");
const [scenario, seedArg] = process.argv[3].split(":");   // firefox-* take a seed: firefox-steps:3
const cut = (from, to) => {
  const a = html.indexOf(`${SECTION}${from}`), b = html.indexOf(`${SECTION}${to}`);
  if (a < 0 || b < a) throw new Error(`sections ${from}..${to} not found in the page`);
  return html.slice(a, b);
};
let t = 1000;   // the page's performance.now(), driven by the scenario
const performance = { now: () => t };
const navigator = { userAgent: scenario.startsWith("firefox")
  ? "Mozilla/5.0 (X11; Linux x86_64; rv:153.0) Gecko/20100101 Firefox/153.0"
  : "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36" };
const source = `${cut("constants", "clock sync")}\n${cut("output clock", "shared engine helpers")}\nreturn { createOutputClock };`;
const { createOutputClock } = new Function("performance", "globalThis", source)(performance, { navigator });

const calls = { getOutputTimestamp: 0, outputLatency: 0 };
let reading = 0;
const ctx = {
  baseLatency: 0.01, state: "running",
  get outputLatency() { calls.outputLatency += 1; return 0.04; },
  get currentTime() { return (t - 1000) / 1000 + 0.05; },
  getOutputTimestamp() {
    calls.getOutputTimestamp += 1;
    reading += 1;
    // the true mapping: context time = (perf - 1000) / 1000, minus a 30 ms step after 2 s
    const perf = Math.floor(t / 10) * 10;            // pairs move in 10 ms quanta
    let ctxMs = perf - 1000 - (scenario === "step" && t > 3000 ? 30 : 0);
    if (scenario === "glitch" && reading % 20 === 0) ctxMs += 8;
    return { contextTime: ctxMs / 1000, performanceTime: perf };
  },
};
if (scenario.startsWith("firefox-")) stepped();
else continuous();

function continuous() {
const clock = createOutputClock(ctx);
const errors = [];          // heard - true, ms, once the clock is ready
for (; t < 6000; t += 25) {  // the page's 25 ms control tick
  clock.sample();
  if (!clock.ready()) continue;
  const truth = (t - 1000 - (scenario === "step" && t > 3000 ? 30 : 0)) / 1000;
  errors.push({ t, err: (clock.heardCtxAt(t) - truth) * 1000 });
}
const after = (ms) => errors.filter((e) => e.t >= ms).map((e) => Math.abs(e.err));
console.log(JSON.stringify({
  method: clock.method, calls, readings: errors.length,
  maxErr: Math.max(...after(0)),
  maxErrAfterStep: Math.max(...after(3150)),   // a few readings after the step
  latencyMs: clock.latencyMs(),
}));
}

// Firefox's stepped currentTime. Truth: the context time a step's value reaches at the moment it is
// due, (perf - 1000) / 1000 s, less the stall from STALL_AT on; a step is seen on the main thread
// (currentTime) only a little after that.
function stepped() {
  let seed = 12345 + 7919 * Number(seedArg ?? 0);
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  const STALL_AT = 4000, stall = { "firefox-stall": 40, "firefox-shift": 12 }[scenario] ?? 0;
  const shiftAt = (perf) => (perf >= STALL_AT ? stall : 0);
  const steps = [];           // [perf seen, context ms]
  for (let frames = 0, k = 0; frames / 48 < 8000; k++) {
    frames += k % 20 === 19 ? 1024 : 896;
    const ctxMs = frames / 48;
    const due = 1000 + ctxMs;
    const late = rand() < 1 / 15 ? 4 + 8 * rand() : 1.5 * rand();
    steps.push([due + shiftAt(due) + late, ctxMs]);
  }
  let i = -1;
  const fctx = {
    baseLatency: 0, state: "running",
    get outputLatency() { calls.outputLatency += 1; return 0.04; },
    get currentTime() { while (i + 1 < steps.length && steps[i + 1][0] <= t) i++; return i < 0 ? 0 : steps[i][1] / 1000; },
    getOutputTimestamp() { calls.getOutputTimestamp += 1; return { contextTime: 0, performanceTime: 0 }; },
  };
  let exact = 1000;
  const clock = createOutputClock(fctx);
  const errors = [];
  const medianOffs = [];      // the old fit for comparison: the median of the last 24 readings' offsets
  const offs = [];
  for (; exact < 8000; exact += 25 + 6 * (rand() - 0.5)) {
    t = Math.floor(exact);    // Firefox's performance.now() is in whole ms
    const before = fctx.currentTime;
    clock.sample();
    offs.push(before * 1000 - t);
    if (offs.length >= 24) medianOffs.push({ t: exact, off: [...offs.slice(-24)].sort((a, b) => a - b)[12] });
    if (!clock.ready()) continue;
    const truthMs = exact - 1000 - shiftAt(exact);
    errors.push({ t: exact, err: clock.heardCtxAt(exact) * 1000 - truthMs });
  }
  const pct = (v, q) => { const s = [...v].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(q * s.length))]; };
  const window = (from, to) => errors.filter((e) => e.t >= from && e.t < to).map((e) => e.err);
  const steady = window(2500, STALL_AT);
  const moves = steady.slice(1).map((e, k) => Math.abs(e - steady[k]));   // how much the fit moves per tick
  const oldSteady = medianOffs.filter((m) => m.t >= 2500 && m.t < STALL_AT).map((m) => m.off - (-1000));
  console.log(JSON.stringify({
    method: clock.method, calls, readings: errors.length,
    steady: { n: steady.length, p50: pct(steady, 0.5), p5: pct(steady, 0.05), p95: pct(steady, 0.95), maxAbs: Math.max(...steady.map(Math.abs)),
      movedTotal: moves.reduce((a, b) => a + b, 0), maxMove: Math.max(...moves) },
    // the median of the readings (the fit before): half a step behind, wandering with the tick's phase
    oldMedian: { p50: pct(oldSteady, 0.5), p5: pct(oldSteady, 0.05), p95: pct(oldSteady, 0.95) },
    afterStall: {
      maxAbs200ms: Math.max(...window(STALL_AT + 200, STALL_AT + 1600).map(Math.abs)),
      maxAbsFrom1600ms: Math.max(...window(STALL_AT + 1600, 8000).map(Math.abs)),
      n: window(STALL_AT + 1600, 8000).length,
    },
  }));
}
