// Runs the page's own clock-sync code (cut out of static/index.html: the
// constants, small helpers and clock sync sections) against a simulated link,
// and prints one JSON line of error statistics. No browser, no sockets.
//
// usage: node clock_sim.mjs INDEX_HTML '{"lo":20,"hi":80,"ppm":0,"seconds":90,...}'
import { readFileSync } from "node:fs";

const SECTION = "// ---------------------------------------------------------------- ";
const html = readFileSync(process.argv[2], "utf8");
const start = html.indexOf(`${SECTION}constants`);
const end = html.indexOf(`${SECTION}room timeline`);
if (start < 0 || end < start) throw new Error("clock sync sections not found in the page");
const { createClockSync } = new Function(`${html.slice(start, end)}\nreturn { createClockSync };`)();

const cfg = {
  seeds: 100, seconds: 90, from: 8, lo: 20, hi: 80, ppm: 0, spikeP: 0.05, spike: 30, certain: 2,
  ...JSON.parse(process.argv[3] || "{}"),
};

function rng(seed) {
  let s = seed >>> 0;
  return () => { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; return s / 2 ** 32; };
}

// the page's schedule: a burst of 43 at 35 ms, warm-up at 66 ms to 96 samples, then every 2-3 s
const gapAfter = (n, r) => (n < 43 ? 35 : n < 96 ? 66 : 2000 + r() * 1000);

// bandViolations: pongs after which the offset was further off than half the clock's band() (a hard
// bound while no rate is assumed); certainAt: per seed, the pongs in when band() <= cfg.certain
const worst = [], finalSkewPpm = [], certainAt = [];
let bandViolations = 0, bandChecks = 0;
for (let seed = 1; seed <= cfg.seeds; seed++) {
  const r = rng(seed);
  const clock = createClockSync();
  const offset = 1.7e12 + r() * 1e6;                 // server epoch ms - true ms
  const local = (t) => 5000 + t * (1 + cfg.ppm * 1e-6); // the page's performance.now()
  const delay = () => cfg.lo + r() * (cfg.hi - cfg.lo) + (r() < cfg.spikeP ? r() * cfg.spike : 0);
  let t = 1000, n = 0, w = 0;
  while (t < cfg.seconds * 1000) {
    const up = delay(), down = delay();
    const t1 = t + up + offset;
    clock.add(local(t), t1, t1 + 0.1, local(t + up + 0.1 + down));
    n += 1;
    if (clock.ready() && clock.info().skew === 0) {
      const back = t + up + 0.1 + down;
      bandChecks += 1;
      if (Math.abs(clock.toServer(local(back)) - (back + offset)) > clock.band() / 2 + 1e-6) bandViolations += 1;
    }
    if (certainAt.length < seed && clock.ready() && clock.band() <= cfg.certain) certainAt.push(n);
    const gap = gapAfter(n, r);
    for (let u = t; u < t + gap; u += 100) {
      if (u < cfg.from * 1000 || !clock.ready()) continue;
      w = Math.max(w, Math.abs(clock.toServer(local(u)) - (u + offset)));
    }
    t += gap;
  }
  if (certainAt.length < seed) certainAt.push(null);
  worst.push(w);
  finalSkewPpm.push(clock.info().skew * 1e6);
}
worst.sort((a, b) => a - b);
const q = (p) => worst[Math.min(worst.length - 1, Math.floor(p * worst.length))];
console.log(JSON.stringify({ cfg, worst_p50: q(0.5), worst_p90: q(0.9), worst_max: worst[worst.length - 1], final_skew_ppm: finalSkewPpm,
  band_checks: bandChecks, band_violations: bandViolations, certain_at: certainAt }));
