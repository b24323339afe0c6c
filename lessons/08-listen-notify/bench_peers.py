"""This engine beside two peers, pgqueuer and DBOS: burn-down, pickup latency, durable steps.

Run it from the repository root with `make bench-peers` (about seven minutes): it builds the
peers' own environment first, `.venv-peers`, from peers/requirements.txt, since the peers are
no dependencies of the project. Then, for a quicker, noisier look:

    cd lessons/08-listen-notify && python bench_peers.py --tasks 2000 --rounds 1 --only burn

Each engine gets a database of its own on the same server as main.py: `bench_peers_lesson_08`
(this lesson's schema), `bench_peers_pgqueuer` and `bench_peers_dbos` (the peers install their
own tables). Ours runs through bench.py's functions, in this process and in worker processes;
each peer through a script of peers/, run by `.venv-peers/bin/python`, which measures it once
and prints one line of JSON. The rounds alternate, ours then the peers', ours then the peers'...
so that a busier minute of the machine falls on all of them alike; every number below is the
median of the rounds (three by default). It prints the machine, and a table:

- burn-down: N no-op tasks, all queued before the clock starts, drained by W processes. Ours:
  W workers with S slots each (bench.py's bench_burn_down); pgqueuer: W consumers with a batch
  size of S (a dequeue takes up to S jobs). Both on the database clock, from the first claim
  (pick) to the last completion. The ratio is ours divided by pgqueuer's: above 1, ours is
  faster;
- pickup latency: how long a task waits, enqueued at a random moment, until an idle worker
  starts it. Ours (bench_latency: INSERT to claim, the database clock) and pgqueuer's
  (`enqueue()` to the job's function) wake on a NOTIFY, the tasks at most 0.1 s apart
  (peers/pgqueuer_bench.py says why that matters to pgqueuer); DBOS polls its queue every
  second (its default), so its latency is about half of that;
- durable step: a function of ten no-op steps, each one recorded in the database before the
  next; the median time per step. Ours: bench_steps, the first run; DBOS: a workflow of ten
  `@DBOS.step()` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

import bench
from bench import bench_burn_down, bench_latency, bench_steps, machine, register
from engine import Engine
from hardway.postgres import REPO_ROOT, recreate_database, server_url

LESSON_DIR = Path(__file__).resolve().parent
PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
PEERS_DIR = LESSON_DIR / "peers"

OUR_DBNAME = "bench_peers_lesson_08"
PGQUEUER_DBNAME = "bench_peers_pgqueuer"
DBOS_DBNAME = "bench_peers_dbos"

# (processes, slots): slots are pgqueuer's batch size.
BURN_DOWN_CONFIGURATIONS = [(1, 10), (1, 100), (2, 10), (2, 100)]
# Our idle worker listens, and polls every 5 s as well (a safety net), as bench.py's own table
# measures it. bench_latency enqueues its tasks at random moments at most 0.1 s apart:
# pgqueuer's jobs come as far apart.
SAFETY_POLL = 5.0
LISTENING_GAP = 0.1
OUR_LATENCY_SAMPLES = 40
PGQUEUER_LATENCY_SAMPLES = 40
DBOS_LATENCY_SAMPLES = 15  # fewer: each one waits for DBOS's poll, half a second on average

# A line of the table: what is measured, then lesson 08's, pgqueuer's and DBOS's numbers, and
# the ratio of ours to pgqueuer's ("" where there is none).
Row = tuple[str, str, str, str, str]


def peer_versions() -> str:
    """The peers' versions, as installed in their environment."""
    report = (
        "from importlib.metadata import version;"
        " print(', '.join(f'{name} {version(name)}' for name in ('pgqueuer', 'dbos', 'psycopg')))"
    )
    completed = subprocess.run(
        [str(PEERS_PYTHON), "-c", report], check=True, stdout=subprocess.PIPE, text=True
    )
    return completed.stdout.strip()


def run_peer(script: str, url: str, *args: str) -> dict[str, Any]:
    """One measurement of a peer: its script run by the peers' Python, its line of JSON."""
    completed = subprocess.run(
        [str(PEERS_PYTHON), str(PEERS_DIR / script), url, *args],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def compare_burn_down(
    engine: Engine, our_url: str, pgqueuer_url: str, tasks: int, rounds: int
) -> list[Row]:
    rows = []
    for processes, slots in BURN_DOWN_CONFIGURATIONS:
        ours, theirs = [], []
        for round_number in range(1, rounds + 1):
            ours.append(bench_burn_down(engine, our_url, tasks, processes, slots, rounds=1))
            result = run_peer(
                "pgqueuer_bench.py",
                pgqueuer_url,
                "burn-down",
                f"--jobs={tasks}",
                f"--consumers={processes}",
                f"--batch-size={slots}",
            )
            theirs.append(result["jobs_per_s"])
            print(
                f"  burn-down {processes} x {slots}, round {round_number}:"
                f" lesson 08 {ours[-1]:,.0f}/s, pgqueuer {theirs[-1]:,.0f}/s",
                flush=True,
            )
        our_rate, their_rate = statistics.median(ours), statistics.median(theirs)
        rows.append(
            (
                f"burn-down {tasks:,} no-ops, {processes} x {slots}, tasks/s",
                f"{our_rate:,.0f}",
                f"{their_rate:,.0f}",
                "",
                f"{our_rate / their_rate:.2f}",
            )
        )
    return rows


def compare_latency(
    engine: Engine, our_url: str, pgqueuer_url: str, dbos_url: str, rounds: int
) -> list[Row]:
    ours, pgqueuer, dbos = [], [], []
    for round_number in range(1, rounds + 1):
        ours.append(bench_latency(engine, our_url, SAFETY_POLL, OUR_LATENCY_SAMPLES))
        result = run_peer(
            "pgqueuer_bench.py",
            pgqueuer_url,
            "latency",
            f"--samples={PGQUEUER_LATENCY_SAMPLES}",
            f"--max-gap={LISTENING_GAP}",
        )
        pgqueuer.append((result["p50_ms"], result["p99_ms"]))
        result = run_peer("dbos_bench.py", dbos_url, "latency", f"--samples={DBOS_LATENCY_SAMPLES}")
        dbos.append((result["p50_ms"], result["p99_ms"]))
        print(
            f"  pickup latency, round {round_number}, p50/p99 ms: lesson 08 {ours[-1][0]:.1f}/"
            f"{ours[-1][1]:.1f}, pgqueuer {pgqueuer[-1][0]:.1f}/{pgqueuer[-1][1]:.1f},"
            f" DBOS {dbos[-1][0]:.0f}/{dbos[-1][1]:.0f}",
            flush=True,
        )
    rows = []
    for quantile, label in enumerate(("p50", "p99")):
        rows.append(
            (
                f"pickup latency {label}, ms",
                f"{statistics.median(p[quantile] for p in ours):,.1f}",
                f"{statistics.median(p[quantile] for p in pgqueuer):,.1f}",
                f"{statistics.median(p[quantile] for p in dbos):,.0f}",
                "",
            )
        )
    return rows


def compare_steps(engine: Engine, our_url: str, dbos_url: str, rounds: int) -> list[Row]:
    ours, dbos = [], []
    for round_number in range(1, rounds + 1):
        first_run, _replayed = bench_steps(engine, our_url)
        ours.append(first_run * 1000)
        dbos.append(run_peer("dbos_bench.py", dbos_url, "steps")["step_ms"])
        print(
            f"  durable step, round {round_number}:"
            f" lesson 08 {ours[-1]:.2f} ms, DBOS {dbos[-1]:.2f} ms",
            flush=True,
        )
    return [
        (
            "durable step, ms",
            f"{statistics.median(ours):.2f}",
            "",
            f"{statistics.median(dbos):.2f}",
            "",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per burn-down round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement")
    parser.add_argument("--only", choices=["burn", "latency", "steps"], help="one measurement")
    args = parser.parse_args()
    if not PEERS_PYTHON.exists():
        raise SystemExit(f"error: no {PEERS_PYTHON}: `make bench-peers` creates it")
    server = server_url()
    schema = (LESSON_DIR / "sql/schema.sql").read_text()
    our_url = recreate_database(server, OUR_DBNAME, schema)
    pgqueuer_url = recreate_database(server, PGQUEUER_DBNAME, "")
    dbos_url = recreate_database(server, DBOS_DBNAME, "")
    # bench.py's worker processes find their database by this name.
    bench.DBNAME = OUR_DBNAME
    print(machine(our_url))
    print(f"peers: {peer_versions()} (.venv-peers)", flush=True)
    rows = []
    with Engine(our_url) as engine:
        register(engine)
        if args.only in (None, "burn"):
            rows += compare_burn_down(engine, our_url, pgqueuer_url, args.tasks, args.rounds)
        if args.only in (None, "latency"):
            rows += compare_latency(engine, our_url, pgqueuer_url, dbos_url, args.rounds)
        if args.only in (None, "steps"):
            rows += compare_steps(engine, our_url, dbos_url, args.rounds)
    header = (f"median of {args.rounds} round(s)", "lesson 08", "pgqueuer", "DBOS", "ratio")
    width = max(len(row[0]) for row in [header, *rows])
    for what, ours, pgqueuer, dbos, ratio in [header, *rows]:
        print(f"  {what:<{width}}  {ours:>10}  {pgqueuer:>10}  {dbos:>8}  {ratio:>6}")
    if args.only in (None, "burn"):
        print("  ratio: lesson 08's tasks/s divided by pgqueuer's (above 1: lesson 08 is faster)")


if __name__ == "__main__":
    main()
