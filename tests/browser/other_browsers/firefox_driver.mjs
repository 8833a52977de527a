// Drives Debian's Firefox ESR over WebDriver BiDi (puppeteer-core) for the
// Python browser tests: one JSON request per stdin line, one JSON answer per
// stdout line ({id, ok, value} or {id, ok: false, error}). Nothing else is
// written to stdout. Pages record console messages, uncaught errors and CSP
// violations (the last through a `securitypolicyviolation` listener that a
// preload script adds before the page's own script runs).
import { createInterface } from "node:readline";
import puppeteer from "puppeteer-core";

const COLLECT_VIOLATIONS = `(() => {
  const seen = [];
  Object.defineProperty(globalThis, "__obViolations", { value: seen, enumerable: false });
  document.addEventListener("securitypolicyviolation", (e) => {
    seen.push(e.violatedDirective + " blocked " + (e.blockedURI || "inline") + " at " + e.sourceFile + ":" + e.lineNumber);
  });
})();`;

let browser = null;
const pages = new Map();
let nextPage = 1;

function page(id) {
  const p = pages.get(id);
  if (!p) throw new Error(`no page ${id}`);
  return p;
}

const ops = {
  async launch({ executablePath, prefs, headless = true, args = [] }) {
    browser = await puppeteer.launch({
      browser: "firefox", executablePath, headless, args,
      extraPrefsFirefox: prefs ?? {}, protocolTimeout: 30_000, dumpio: true,
    });
    return await browser.version();
  },
  // Each page in a browser context (user context) of its own, so in a content
  // process of its own: a closed page's process winding down (it can take long
  // with audio running) never holds up the next test's page.
  async newPage({ width, height }) {
    const context = await browser.createBrowserContext();
    const p = await context.newPage();
    const rec = { page: p, context, console: [], errors: [] };
    p.on("console", (m) => rec.console.push({ type: m.type(), text: m.text() }));
    p.on("pageerror", (e) => rec.errors.push(String(e?.stack || e?.message || e)));
    await p.evaluateOnNewDocument(COLLECT_VIOLATIONS);
    await p.setViewport({ width, height });
    const id = nextPage++;
    pages.set(id, rec);
    return id;
  },
  async goto({ page: id, url }) {
    await page(id).page.goto(url, { waitUntil: "load", timeout: 30_000 });
    return null;
  },
  // `fn` is a function's source; it is called with `arg` in the page and its
  // JSON-serializable result returned (script.evaluate is not subject to CSP)
  async evaluate({ page: id, fn, arg = null }) {
    const value = await page(id).page.evaluate(`(${fn})(${JSON.stringify(arg)})`);
    return value === undefined ? null : value;
  },
  async click({ page: id, selector }) {
    await page(id).page.click(selector);
    return null;
  },
  async fill({ page: id, selector, value }) {
    await page(id).page.locator(selector).fill(value);
    return null;
  },
  async viewport({ page: id, width, height }) {
    await page(id).page.setViewport({ width, height });
    return null;
  },
  async screenshot({ page: id, path, fullPage = false }) {
    await page(id).page.screenshot({ path, fullPage });
    return null;
  },
  async logs({ page: id }) {
    const rec = page(id);
    const violations = await rec.page.evaluate("globalThis.__obViolations ?? []");
    return { console: rec.console, errors: rec.errors, violations };
  },
  async closePage({ page: id }) {
    const rec = page(id);
    pages.delete(id);
    await rec.page.close();
    await rec.context.close();
    return null;
  },
  async close() {
    if (browser) await browser.close();
    browser = null;
    return null;
  },
};

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let req;
  try {
    req = JSON.parse(line);
    const op = ops[req.op];
    if (!op) throw new Error(`unknown op ${req.op}`);
    const value = await op(req.args ?? {});
    process.stdout.write(JSON.stringify({ id: req.id, ok: true, value }) + "\n");
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: req?.id ?? null, ok: false, error: String(e?.stack || e) }) + "\n");
  }
  if (req?.op === "close") break;
}
if (browser) await browser.close();
process.exit(0);
