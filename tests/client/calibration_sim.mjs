// Runs the page's calibration analysis (cut out of static/index.html: the constants,
// small helpers and "calibration analysis" sections) on synthetic recordings whose
// chirps arrive at known delays, and prints one JSON line.
//
// usage: node calibration_sim.mjs INDEX_HTML SCENARIO
//   delays   three devices 12.3, 52.34 and 212.71 ms late (fractional samples), in
//            noise, on a microphone clock 40 ppm fast; a fourth device never plays
//   echo     as delays, but device b also arrives 25 ms later at 0.9 of its height
//   late     as delays, but the recording starts after round 1
//   outlier  as delays, but device c is 15 ms later in round 2
//   noisy    as delays, with the chirps 15 dB under the noise (RMS)
import { readFileSync } from "node:fs";

const SECTION = "// ---------------------------------------------------------------- ";
const html = readFileSync(process.argv[2], "utf8");
const scenario = process.argv[3];
const cut = (from, to) => {
  const a = html.indexOf(`${SECTION}${from}\n`), b = html.indexOf(`${SECTION}${to}\n`);
  if (a < 0 || b < a) throw new Error(`sections ${from}..${to} not found in the page`);
  return html.slice(a, b);
};
const source = `${cut("constants", "clock sync")}\n${cut("calibration analysis", "calibration controller")}
return { analyseCalibration, proposeOffsets, fitServerLine, CAL_CHIRP_F0_HZ, CAL_CHIRP_F1_HZ, CAL_CHIRP_MS, CAL_CHIRP_FADE_MS, CAL_CHIRP_GAIN };`;
const page = new Function("performance", "globalThis", source)({ now: () => 0 }, { navigator: { userAgent: "node" } });

// a seeded generator: the same noise every run
let seed = 12345;
const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
const gauss = () => Math.sqrt(-2 * Math.log(rand() + 1e-12)) * Math.cos(2 * Math.PI * rand());

// The chirp at continuous time t (s) after its start: the page's formula, evaluated off the sample grid.
const T = page.CAL_CHIRP_MS / 1000, K = Math.log(page.CAL_CHIRP_F1_HZ / page.CAL_CHIRP_F0_HZ);
const fade = page.CAL_CHIRP_FADE_MS / 1000;
function chirpAt(t) {
  if (t < 0 || t > T) return 0;
  const edge = Math.min(t, T - t);
  const w = edge < fade ? 0.5 - 0.5 * Math.cos((Math.PI * edge) / fade) : 1;
  return page.CAL_CHIRP_GAIN * w * Math.sin((2 * Math.PI * page.CAL_CHIRP_F0_HZ * T / K) * (Math.exp((t / T) * K) - 1));
}

const RATE = 48000;
const cal = { id: "cal-x", mic: "m", slots: { a: 0, b: 1, c: 2, d: 3 }, start_at: 1_800_000_003_000.25, slot_ms: 1200, rounds: 3 };
const DELAYS = { a: 12.3, b: 52.34, c: 212.71 };  // d never plays
const PPM = 40;                                    // the microphone's sample clock runs fast
const serverAt0 = cal.start_at - 1500.4;
const msPerSample = (1000 / RATE) * (1 - PPM * 1e-6);
const seconds = (1500 + cal.rounds * 4 * cal.slot_ms + 1000) / 1000;
const data = new Float32Array(Math.round(seconds * RATE));
const noise = scenario === "noisy" ? 0.3 : 0.02;
const level = scenario === "noisy" ? 0.15 : 0.3;
for (let i = 0; i < data.length; i += 1) data[i] = noise * gauss();
const place = (atServer, gain) => {
  const i0 = Math.floor((atServer - serverAt0) / msPerSample) - 2;
  for (let i = i0; i < i0 + RATE * (T + 0.01); i += 1) {
    const t = (serverAt0 + i * msPerSample - atServer) / 1000;
    data[i] += gain * chirpAt(t);
  }
};
for (let r = 0; r < cal.rounds; r += 1) {
  for (const [id, d] of Object.entries(DELAYS)) {
    const due = cal.start_at + (r * 4 + cal.slots[id]) * cal.slot_ms;
    const extra = scenario === "outlier" && id === "c" && r === 1 ? 15 : 0;
    place(due + d + extra, level);
    if (scenario === "echo" && id === "b") place(due + d + 25, 0.9 * level);
  }
}
// "late": the microphone opened just before round 2's first window
const first = scenario === "late" ? Math.round((cal.start_at + 4 * cal.slot_ms - 400 - serverAt0) / msPerSample) : 0;
const rec = { data, sampleRate: RATE, serverAt0, msPerSample, first, end: data.length };
const started = Date.now();
const measured = page.analyseCalibration(rec, cal);
const ms = Date.now() - started;
const current = { a: 0, b: 10, c: 0 };
const proposal = page.proposeOffsets(measured, (id) => current[id]);
const line = page.fitServerLine([{ ctx: 10, server: 5000 }, { ctx: 12, server: 7000.08 }, { ctx: 11, server: 6000.04 }]);
console.log(JSON.stringify({
  truth: DELAYS, ms, measured: measured.map(({ perRound, ...m }) => ({ ...m, perRound: perRound.map((p) => ({ ok: p.ok, reason: p.reason })) })),
  proposal, line: { msPerSecond: line.msPerSecond, at11: line.at(11) },
}));
