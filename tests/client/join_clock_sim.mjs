// Runs the page's own clock-sync code and ping schedule (cut out of
// static/index.html) from a join on: pings on a simulated link whose delivery is
// in order each way (a TCP connection: a ping delayed by the one before it waits
// for it, as through the browser tests' proxy), and prints one JSON line with
// the |clock error| percentiles over many seeds at times after the first ping.
//
// usage: node join_clock_sim.mjs INDEX_HTML '{"lo":20,"hi":80,"at":[1000,1500]}'
// ("inorder": false delivers every message after its own delay alone: what the
// same jitter would allow without a TCP connection's head-of-line blocking)
import { readFileSync } from "node:fs";

const SECTION = "// ---------------------------------------------------------------- ";
const html = readFileSync(process.argv[2], "utf8");
const start = html.indexOf(`${SECTION}constants`);
const end = html.indexOf(`${SECTION}room timeline`);
if (start < 0 || end < start) throw new Error("clock sync sections not found in the page");
const page = new Function(`${html.slice(start, end)}
return { createClockSync, PING_BURST_COUNT, PING_BURST_SPACING_MS, PING_WARMUP_SAMPLES, PING_WARMUP_INTERVAL_MS };`)();

const cfg = {
  seeds: 400, lo: 20, hi: 80, at: [500, 1000, 1500, 2000, 3000], inorder: true,
  burst: page.PING_BURST_COUNT, spacing: page.PING_BURST_SPACING_MS,
  ...JSON.parse(process.argv[3] || "{}"),
};

function rng(seed) {
  let s = seed >>> 0;
  return () => { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; return s / 2 ** 32; };
}

const gapAfter = (n) => (n < cfg.burst ? cfg.spacing : page.PING_WARMUP_INTERVAL_MS);
const last = Math.max(...cfg.at);
const errors = cfg.at.map(() => []);
for (let seed = 1; seed <= cfg.seeds; seed++) {
  const r = rng(seed);
  const clock = page.createClockSync();
  const offset = 1.7e12 + r() * 1e6;                 // server epoch ms - true ms
  const local = (t) => 5000 + t;                     // the page's performance.now()
  const delay = () => cfg.lo + r() * (cfg.hi - cfg.lo);
  const pongs = [];
  let up = 0, down = 0;
  for (let t = 0, n = 1; t < last; t += gapAfter(n), n += 1) {
    const arrive = t + delay();
    up = cfg.inorder ? Math.max(arrive, up) : arrive;  // in order: never before the one before
    const back = up + 0.1 + delay();
    down = cfg.inorder ? Math.max(back, down) : back;
    pongs.push({ t0: local(t), t1: up + offset, t2: up + 0.1 + offset, t3: local(down), back: down });
  }
  pongs.sort((a, b) => a.back - b.back);
  let i = 0;
  cfg.at.forEach((at, k) => {
    for (; i < pongs.length && pongs[i].back <= at; i++) {
      const p = pongs[i];
      clock.add(p.t0, p.t1, p.t2, p.t3);
    }
    errors[k].push(clock.ready() ? Math.abs(clock.toServer(local(at)) - (at + offset)) : Infinity);
  });
}
const q = (list, p) => {
  const s = [...list].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
};
const result = {};
cfg.at.forEach((at, k) => { result[at] = { p50: q(errors[k], 0.5), p90: q(errors[k], 0.9), ready: errors[k].filter(Number.isFinite).length / cfg.seeds }; });
console.log(JSON.stringify({ cfg, result }));
