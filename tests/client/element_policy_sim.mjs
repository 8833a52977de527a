// Runs the page's own <audio> engine (cut out of static/index.html: constants, small
// helpers, room timeline, shared engine helpers and the element engine) in virtual
// time against a fake element that behaves as WebKitGTK's GStreamer one was traced to:
// every playbackRate change is a flushing seek to the last reported position (a few
// ms stale), every flush holds the position for a moment, and a flush that comes
// within FLUSH_CONFLICT_MS of the previous one leaves the element standing at
// readyState 2 until it is reloaded. The element's clock runs DRIFT_PPM fast, so
// the engine has something to correct. Prints one JSON line.
//
// usage: node element_policy_sim.mjs INDEX_HTML SCENARIO
//   webkitgtk  the user agent is WebKitGTK's MiniBrowser
//   busy       WebKitGTK on a busy machine: each flush stands still 0-150 ms (seeded), as traced under load
//   chromium   the user agent is Chromium (the default policy, rate trims) on the same element
//   policies   no run: the policy the page picks for a list of user agents, whether
//              their media elements share one output (Chromium: the engine primes it), and
//              whether the engine plays them through the page's AudioContext (desktop Chromium)
import { readFileSync } from "node:fs";

const SECTION = "// ---------------------------------------------------------------- ";
const html = readFileSync(process.argv[2], "utf8");
const scenario = process.argv[3];
const cut = (from, to) => {
  const a = html.indexOf(`${SECTION}${from}`), b = html.indexOf(`${SECTION}${to}`);
  if (a < 0 || b < a) throw new Error(`sections ${from}..${to} not found in the page`);
  return html.slice(a, b);
};

const UAS = {
  webkitgtk: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/60.5 Safari/605.1.15",
  wpe: "Mozilla/5.0 (Linux; aarch64) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Safari/605.1.15 WPE",
  safariMac: "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
  safariIos: "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
  chromium: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36",
  chromiumHeadless: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/156.0.0.0 Safari/537.36",
  chromeAndroid: "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Mobile Safari/537.36",
  firefox: "Mozilla/5.0 (X11; Linux x86_64; rv:153.0) Gecko/20100101 Firefox/153.0",
};

const FLUSH_HOLD_MS = 30;        // a flush: the position holds this long, then runs on
const FLUSH_CONFLICT_MS = 150;   // a flush this soon after the last one: the element stands until reloaded
const STALE_MS = 3;              // a rate change seeks to the reported position, this far behind the sound
const DRIFT_PPM = 300;           // the element's clock against the true one
const RUN_MS = 60_000;
const BUSY_HOLD_MAX_MS = 150;

let seed = 12345;              // a fixed LCG: the same "busy machine" every run
const random = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
const holdMs = () => (scenario === "busy" ? random() * BUSY_HOLD_MAX_MS : FLUSH_HOLD_MS);

// -- virtual time and timers
let t = 1000;
const timers = [];
let timerSeq = 0;
const setTimeout = (fn, ms) => { const id = ++timerSeq; timers.push({ id, at: t + Math.max(0, ms), fn }); return id; };
const clearTimeout = (id) => { const i = timers.findIndex((x) => x.id === id); if (i >= 0) timers.splice(i, 1); };
const performance = { now: () => t };

// -- the fake GStreamer <audio>
const log = { rateSets: 0, seeks: 0, seekTimes: [], stalls: 0, reloads: 0 };
function createFakeAudio() {
  let pos = 0;                 // media seconds at `since` (while running)
  let since = t;
  let rate = 1;
  let paused = true;
  let holdUntil = 0;
  let lastFlush = -Infinity;
  let stuck = false;
  let src = "";
  let loaded = false;
  const position = () => {
    if (paused || stuck || !loaded) return pos;
    const from = Math.max(since, holdUntil);
    return t <= from ? pos : pos + ((t - from) / 1000) * rate * (1 + DRIFT_PPM * 1e-6);
  };
  const flush = (to) => {
    pos = to;
    since = t;
    holdUntil = t + holdMs();
    if (!paused && t - lastFlush < FLUSH_CONFLICT_MS) { if (!stuck) log.stalls += 1; stuck = true; }
    lastFlush = t;
  };
  return {
    preload: "", preservesPitch: true, volume: 1, muted: false, networkState: 1, duration: 600, ended: false,
    get paused() { return paused; },
    get seeking() { return false; },
    get readyState() { return !loaded ? 0 : stuck ? 2 : 4; },
    get currentTime() { return position(); },
    set currentTime(v) { if (loaded) { log.seeks += 1; log.seekTimes.push(t); } flush(v); },
    get playbackRate() { return rate; },
    set playbackRate(r) { if (r === rate) return; log.rateSets += 1; const at = position() - STALE_MS / 1000; rate = r; flush(at); },
    get src() { return src; },
    set src(v) { src = v; loaded = false; },
    getAttribute: (name) => (name === "src" ? src || null : null),
    load() { if (src) { if (loaded) log.reloads += 1; loaded = true; stuck = false; paused = true; pos = 0; since = t; } },
    play() { if (paused) { pos = position(); since = t; paused = false; } return Promise.resolve(); },
    pause() { if (!paused) { pos = position(); paused = true; } },
    addEventListener() {},
  };
}

const source = [
  cut("constants", "clock sync"), cut("room timeline", "output clock"),
  cut("shared engine helpers", "Web Audio engine"), cut("<audio> element engine", "connection"),
  "return { createTimeline, createElementEngine, elementPolicy };",
].join("\n");

function load(ua) {
  return new Function("performance", "globalThis", "setTimeout", "clearTimeout", source)(
    performance, { navigator: { userAgent: ua } }, setTimeout, clearTimeout);
}

if (scenario === "policies") {
  const out = {};
  for (const [name, ua] of Object.entries(UAS)) {
    const policy = load(ua).elementPolicy({ userAgent: ua });
    out[name] = [policy.name, policy.sharedOutput, policy.routed];
  }
  console.log(JSON.stringify(out));
  process.exit(0);
}

const ua = UAS[scenario === "busy" ? "webkitgtk" : scenario];
if (!ua) throw new Error(`unknown scenario ${scenario}`);
const { createTimeline, createElementEngine } = load(ua);
const timeline = createTimeline();
const track = { url: "/media/t.wav", duration: 600, title: "t" };
timeline.apply({ version: 1, track, paused: false, position: 0, rate: 1, start_at: t + 500, volume: 1 }, true);
const doc = { createElement: () => createFakeAudio(), defaultView: { navigator: { userAgent: ua } } };
const deps = {
  clock: { ready: () => true, toServer: (p) => p, toLocal: (s) => s },
  timeline, settings: { latencyOffsetMs: 0, localVolume: 1, muted: false }, doc, room: () => ({ volume: 1 }),
  getAudio: () => null,   // no AudioContext here: the elements keep their own output
};
const engine = createElementEngine(deps);
engine.start();

const errors = [];   // |element - timeline| ms, every 100 ms after the first 5 s
let nextProbe = t + 5000;
const end = t + RUN_MS;
while (t < end) {
  timers.sort((a, b) => a.at - b.at || a.id - b.id);
  const next = timers.shift();
  if (!next) break;
  while (nextProbe <= next.at && nextProbe < end) {
    t = nextProbe;
    const pr = engine.probe();
    const want = timeline.at(t);
    errors.push(Math.abs((pr.position - want.position) * 1000));
    nextProbe += 100;
  }
  t = next.at;
  next.fn();
}
errors.sort((a, b) => a - b);
const gaps = log.seekTimes.slice(1).map((s, i) => s - log.seekTimes[i]).filter((g) => g > 0);
console.log(JSON.stringify({
  policy: engine.probe().policy,
  rateSets: log.rateSets, seeks: log.seeks, stalls: log.stalls, reloads: log.reloads,
  minSeekGapMs: gaps.length ? Math.min(...gaps) : null,
  errP50: errors[Math.floor(errors.length / 2)], errP90: errors[Math.floor(errors.length * 0.9)],
  errMax: errors[errors.length - 1],
}));
