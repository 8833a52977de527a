# musicsync task runner (install: pip install rust-just, or pip install -e '.[test]')

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python3")

# list recipes
default:
    @just --list

# run the server (extra args go to `musicsync serve`, e.g. just serve --host 0.0.0.0)
serve *ARGS:
    {{python}} -m musicsync serve {{ARGS}}

# install everything the tests need (Debian: chromium, pulseaudio from apt; Python extras)
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    # Debian packages: chromium, and PulseAudio for the recorded-audio browser test
    missing=()
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v pulseaudio >/dev/null 2>&1 || missing+=(pulseaudio)
    command -v parec >/dev/null 2>&1 || missing+=(pulseaudio-utils)
    # ...and for tests/browser/test_other_browsers.py: Firefox, WebKitGTK's driver, Xvfb, npm
    command -v firefox-esr >/dev/null 2>&1 || missing+=(firefox-esr)
    command -v WebKitWebDriver >/dev/null 2>&1 || missing+=(webkit2gtk-driver)
    command -v Xvfb >/dev/null 2>&1 || missing+=(xvfb)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    # ...and for tests/cluster (musicsync serve --redis): a real Redis
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
    fi
    {{python}} -m pip install -q -e '.[test]'
    # puppeteer-core (drives Firefox), from the lock file; again only when that changed
    ob=tests/browser/other_browsers
    if ! cmp -s "$ob/package-lock.json" "$ob/node_modules/.installed-lock.json"; then
        npm ci --prefix "$ob" --no-audit --no-fund --loglevel=error
        cp "$ob/package-lock.json" "$ob/node_modules/.installed-lock.json"
    fi

# run the whole test suite (pytest's "no tests" exit code 5 counts as failure)
test *ARGS:
    {{python}} -m pytest {{ARGS}}

# ruff (with the ASYNC rules) and mypy --strict on the package
lint:
    {{python}} -m ruff check .
    {{python}} -m ruff format --check .
    {{python}} -m mypy

# server fan-out benchmark against a reference broadcaster (seating, latency, CPU per frame, memory per connection, stalled listeners)
bench *ARGS:
    {{python}} benchmarks/bench_fanout.py {{ARGS}}

# browser sync benchmark: inter-client spread per engine in real Chromium
bench-sync *ARGS:
    {{python}} benchmarks/bench_sync.py {{ARGS}}

# device-health bookkeeping: CPU per report and per health frame, rooms of 100 to 10 000
bench-health *ARGS:
    {{python}} benchmarks/bench_health.py {{ARGS}}

# audible sync benchmark: records real Chromium output through PulseAudio, per engine
bench-audible *ARGS:
    {{python}} benchmarks/bench_audible.py {{ARGS}}

# build dist/musicsync.pyz, a single-file deployment
zipapp:
    {{python}} -m musicsync.zipapp dist/musicsync.pyz

# build the zipapp, then run it under a Python with no packages: fetch /, a demo
# track and /metrics, open a WebSocket, SIGTERM it (expects close 1001, exit 0)
zipapp-smoke: zipapp
    {{python}} -m musicsync.zipapp --smoke dist/musicsync.pyz

# the whole suite as CI runs it: the core and server tests on two workers, then
# the browser tests on their own (their audio timing wants the machine to itself)
test-ci:
    {{python}} -m pytest -n 2 --dist loadfile --ignore=tests/browser -p no:benchmark
    {{python}} -m pytest tests/browser

# what CI runs
ci: lint test-ci zipapp-smoke
