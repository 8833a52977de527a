"""Audible sync benchmark: what several real Chromium browsers play (``just bench-audible``).

The scenario of ``tests/browser/test_audible.py``, with longer phases. Each
listener is its own Chromium process whose sound goes to one channel of a
private PulseAudio null sink; one ``parec`` recording holds every channel,
sample-aligned. The pages (clock skews -2 s, 0, +3.5 s) join one room through a
proxy adding 20-80 ms of one-way jitter; the host plays, seeks, pauses and
resumes, the proxy drops every connection, and one listener reloads its page.
For each phase the clicks of a coded click track are matched across channels:
the spread (latest minus earliest onset of the same click) is what a room of
listeners hears. Needs ``pulseaudio`` and ``pulseaudio-utils``.

Prints a table per engine, then one JSON line.

    python benchmarks/bench_audible.py [--seconds N] [--engines webaudio,element]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import audible, pulse  # noqa: E402
from tests.browser.conftest import DelayProxy, start_server  # noqa: E402

SETTLE_S = {"webaudio": 1.0, "element": 4.0, "mixed": 4.0}
GOALS_P95_MS = {"webaudio": 5.0, "element": 30.0, "mixed": 30.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per phase")
    parser.add_argument(
        "--engines",
        default="webaudio,element",
        help="comma-separated; 'mixed' puts every other page on <audio>, the rest on Web Audio",
    )
    parser.add_argument("--browsers", type=int, default=3, help="Chromium processes (2-6)")
    parser.add_argument("--wav", type=Path, help="keep each engine's recording as WAV here")
    parser.add_argument(
        "--no-boost",
        action="store_true",
        help="leave Chromium's PulseAudio threads at normal priority",
    )
    args = parser.parse_args(argv)
    if not pulse.available():
        print("needs pulseaudio, pactl and parec (apt-get install pulseaudio pulseaudio-utils)")
        return 2

    from playwright.sync_api import sync_playwright

    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp)
        # every phase, with the settle times, fits before the track ends
        seconds = int(audible.SEEK_TO_S + 6 * (args.seconds + 10))
        pulse.write_coded_click_track(media / audible.TRACK_FILE, seconds)
        server = start_server(media)
        try:
            with (
                pulse.PulseServer(args.browsers) as pa,
                DelayProxy(server.port) as proxy,
                sync_playwright() as pw,
            ):
                for engine in args.engines.split(","):
                    engine = engine.strip()
                    settings = audible.Settings(
                        engine, SETTLE_S[engine], args.seconds, boost=not args.no_boost
                    )
                    wav = args.wav / f"audible-{engine}.wav" if args.wav else None
                    if wav:
                        wav.parent.mkdir(parents=True, exist_ok=True)
                    report = audible.run(
                        pw, pa, proxy, settings, say=lambda m: print(m, flush=True), keep_wav=wav
                    )
                    print(report.table(), flush=True)
                    reports.append(report)
        finally:
            server.stop()

    results = []
    for r in reports:
        d = r.as_dict()
        goal = GOALS_P95_MS[r.engine]
        d["goal_p95_ms"] = goal
        judged = [p.summary() for p in r.phases if not p.settling and not p.underruns]
        d["goal_met"] = bool(judged) and all(
            s["p95"] is not None and s["p95"] < goal for s in judged
        )
        results.append(d)
    print(json.dumps({"benchmark": "audible", "seconds": args.seconds, "results": results}))
    return 0 if all(r["goal_met"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
