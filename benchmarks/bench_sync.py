"""Inter-client sync benchmark in real Chromium (``just bench-sync``).

The setup of ``tests/browser/test_sync.py``, for longer: three pages with clocks
skewed by -2 s, 0 and +3.5 s join one room through a TCP proxy that adds a
random 20-80 ms one-way delay. The host sets a track and plays; midway it seeks,
then pauses and resumes. Every ~100 ms the benchmark reads each page's output
position (Web Audio: the source's schedule through ``getOutputTimestamp``; the
element: ``currentTime``) against the true, unskewed clock and records the
spread (max - min) between pages. Rounds within the settle time after each
start/seek/resume are left out of the steady-state figures; how long it takes
is reported as the convergence time of a fourth page joining mid-play.

Prints a table, then one JSON line.

    python benchmarks/bench_sync.py [--seconds N] [--engines webaudio,element]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser.conftest import (  # noqa: E402
    TRACK_NAME,
    DelayProxy,
    launch_chromium,
    open_skewed_page,
    percentile,
    start_server,
    write_click_track,
)
from tests.browser.sync_scenario import (  # noqa: E402
    Phase,
    convergence_time,
    find_host,
    measure,
    open_room,
    room_url,
    seek,
    set_track_and_play,
    toggle_play,
    wait_all_valid,
    wait_clocks,
)

SETTLE_S = {"webaudio": 1.0, "element": 4.0}
CONVERGED_MS = {"webaudio": 5.0, "element": 30.0}
CONVERGED_HOLD_S = 2.0
CONVERGE_TIMEOUT_S = 60.0
LATE_JOINER_SKEW_MS = 1234.0
GOALS_P95_MS = {"webaudio": 5.0, "element": 30.0}


def run_engine(
    browser: Any, proxy: DelayProxy, engine: str, seconds: float, ppms: tuple[float, ...] | None
) -> dict[str, Any]:
    room, pages = open_room(browser, proxy, engine, ppms=ppms)
    settle = SETTLE_S[engine]
    steady = Phase("steady")
    try:
        wait_clocks(pages)
        host = find_host(pages)
        set_track_and_play(host)
        wait_all_valid(pages, 20)
        measure(pages, settle + seconds * 0.4, steady, settle)
        seek(host, 20.0)
        time.sleep(1.0)
        wait_all_valid(pages, 20)
        measure(pages, settle + seconds * 0.3, steady, settle)
        toggle_play(host)
        time.sleep(1.5)
        toggle_play(host)
        time.sleep(0.5)
        wait_all_valid(pages, 20)
        measure(pages, settle + seconds * 0.3, steady, settle)
        # a fourth page joins mid-play: time from opening it to a sustained spread under the bound
        t0 = time.monotonic()
        late = open_skewed_page(browser, room_url(proxy, room, engine, "late"), LATE_JOINER_SKEW_MS)
        pages.append(late)
        opened = time.monotonic() - t0
        converge = convergence_time(
            pages, CONVERGED_MS[engine], CONVERGED_HOLD_S, CONVERGE_TIMEOUT_S
        )
        converge_total = opened + converge
    finally:
        for page in pages:
            page.context.close()
    s = steady.spreads
    return {
        "engine": engine,
        "rounds": len(s),
        "p50_ms": round(percentile(s, 0.5), 3),
        "p95_ms": round(percentile(s, 0.95), 3),
        "max_ms": round(max(s), 3) if s else None,
        "abs_err_p50_ms": round(steady.summary()["abs_p50"], 3),
        "converge_s": round(converge_total, 2),
        "converge_bound_ms": CONVERGED_MS[engine],
        "goal_p95_ms": GOALS_P95_MS[engine],
        "goal_met": bool(s) and percentile(s, 0.95) < GOALS_P95_MS[engine],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured play time per engine")
    parser.add_argument("--engines", default="webaudio,element")
    parser.add_argument("--seed", type=int, default=1, help="proxy delay seed")
    parser.add_argument(
        "--delay-ms",
        default="20,80",
        help="the proxy's random one-way delay range in ms (default: 20,80)",
    )
    parser.add_argument(
        "--ppm",
        default="0,0,0",
        help="clock rate error of the three pages in ppm, e.g. -80,0,120 (default: none)",
    )
    args = parser.parse_args(argv)

    import tempfile

    from playwright.sync_api import sync_playwright

    ppms = tuple(float(x) for x in args.ppm.split(","))
    lo, hi = (float(x) for x in args.delay_ms.split(","))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp)
        # long enough for every phase and the late join
        write_click_track(media / TRACK_NAME, seconds=int(args.seconds * 1.5) + 150)
        server = start_server(media)
        try:
            with (
                DelayProxy(server.port, (lo, hi), seed=args.seed) as proxy,
                sync_playwright() as pw,
            ):
                browser = launch_chromium(pw)
                try:
                    for engine in args.engines.split(","):
                        results.append(
                            run_engine(browser, proxy, engine.strip(), args.seconds, ppms)
                        )
                finally:
                    browser.close()
        finally:
            server.stop()

    columns = [
        ("engine", "<10"),
        ("rounds", ">6"),
        ("p50 ms", ">8"),
        ("p95 ms", ">8"),
        ("max ms", ">8"),
        ("|abs| ms", ">9"),
        ("converge s", ">11"),
        ("goal p95", ">9"),
    ]
    header = " ".join(f"{name:{fmt}}" for name, fmt in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        goal = f"<{r['goal_p95_ms']:g} {'ok' if r['goal_met'] else 'MISS'}"
        print(
            f"{r['engine']:<10} {r['rounds']:>6} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
            f"{r['max_ms']:>8.2f} "
            f"{r['abs_err_p50_ms']:>9.2f} {r['converge_s']:>11.2f} {goal:>9}"
        )
    print(
        json.dumps(
            {
                "benchmark": "sync",
                "seconds": args.seconds,
                "ppm": ppms,
                "delay_ms": [lo, hi],
                "results": results,
            }
        ),
        flush=True,
    )
    return 0 if all(r["goal_met"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
