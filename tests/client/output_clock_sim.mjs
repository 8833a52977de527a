// Runs the page's own output clock (cut out of static/index.html: the constants,
// small helpers and output clock sections) against a fake AudioContext whose
// getOutputTimestamp() the scenario shapes, and prints one JSON line.
//
// usage: node output_clock_sim.mjs INDEX_HTML SCENARIO
//   glitch  one reading in every 20 is 8 ms off (Chromium on a busy machine)
//   step    the output falls 30 ms behind for good at 2 s (an underrun)
//   firefox the user agent is Firefox: which latency APIs does the clock call?
import { readFileSync } from "node:fs";

const SECTION = "// ---------------------------------------------------------------- ";
const html = readFileSync(process.argv[2], "utf8");
const scenario = process.argv[3];
const cut = (from, to) => {
  const a = html.indexOf(`${SECTION}${from}`), b = html.indexOf(`${SECTION}${to}`);
  if (a < 0 || b < a) throw new Error(`sections ${from}..${to} not found in the page`);
  return html.slice(a, b);
};
let t = 1000;   // the page's performance.now(), driven by the scenario
const performance = { now: () => t };
const navigator = { userAgent: scenario === "firefox"
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
