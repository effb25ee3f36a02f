#!/usr/bin/env python3
"""Launch overhead of the plugin sandbox: start to exec (and back), with and without it.

Runs, N times each and interleaved so drift hits every variant alike:
  direct        /bin/true
  launcher      nexus-launch with an empty profile (supervision, and the filters every
                profile gets; it confines nothing, so the launcher warns, on stderr)
  sandbox       nexus-launch --profile profiles/default.toml (Landlock + seccomp)
  python        nexus-launch --profile profiles/example-python-model.toml
and prints the median, p95 and mean wall time of each, and the overhead over `direct`.

    cargo build --release -p nexus-launch
    python3 bench/sandbox_launch.py [--runs 300] [--launcher target/release/nexus-launch]
        [--before /path/to/an/older/nexus-launch]

--before adds the launcher variants of an older build (named `...@before`), interleaved
with the others in the same loop, so a before/after comparison sees the same machine
load (the development machines are shared and noisy).

The target is an added median <= 5 ms for the sandbox.
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(argv, env):
    start = time.perf_counter_ns()
    code = subprocess.call(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    elapsed = (time.perf_counter_ns() - start) / 1e6
    if code != 0:
        raise SystemExit(f"{argv} exited {code}")
    return elapsed


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument(
        "--launcher", default=os.path.join(ROOT, "target/release/nexus-launch")
    )
    parser.add_argument("--command", default="/bin/true")
    parser.add_argument("--before", help="an older nexus-launch to compare with")
    args = parser.parse_args()

    env = dict(os.environ)
    env.pop("NEXUS_SIGNAL_URL", None)
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.toml")
        with open(empty, "w") as f:
            f.write('version = 1\nname = "empty"\nmode = "best_effort"\n')
        env["NEXUS_PLUGIN_WORKDIR"] = tmp
        env["NEXUS_PLUGIN_DATA"] = tmp
        variants = {
            "direct": [args.command],
            "launcher": [args.launcher, "--profile", empty, "--", args.command],
            "sandbox": [
                args.launcher,
                "--profile",
                os.path.join(ROOT, "profiles/default.toml"),
                "--",
                args.command,
            ],
            "python": [
                args.launcher,
                "--profile",
                os.path.join(ROOT, "profiles/example-python-model.toml"),
                "--",
                args.command,
            ],
        }
        if args.before:
            for name in ["launcher", "sandbox", "python"]:
                variants[f"{name}@before"] = [args.before] + variants[name][1:]
        for argv in variants.values():  # warm the page cache
            for _ in range(10):
                timed(argv, env)
        samples = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, argv in variants.items():
                samples[name].append(timed(argv, env))

    base = statistics.median(samples["direct"])
    print(f"launch overhead, {args.runs} runs each, command {args.command}")
    print(f"{'variant':<16} {'median ms':>10} {'p95 ms':>8} {'mean ms':>8} {'+median ms':>11}")
    for name, values in samples.items():
        med = statistics.median(values)
        print(
            f"{name:<16} {med:>10.3f} {pct(values, 95):>8.3f} "
            f"{statistics.mean(values):>8.3f} {med - base:>11.3f}"
        )


if __name__ == "__main__":
    main()
