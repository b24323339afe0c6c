"""Approve (or reject) an expense claim: send the event `approved:<claim>`.

While `python main.py` waits for an approval, from another terminal:

    cd lessons/09-durable-sleep-and-events && python approve.py 1 yes    # or: no

Anyone may send an event: a person, a script, another task. The claim's task, wherever it is
(suspended on no worker, or on a worker that was just killed), receives it. Only the first
answer counts: a second `approve.py 1 no` changes nothing, and says so.
"""

import argparse
import getpass
import sys

from engine import Engine
from worker import lesson_database_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Send the event approved:<claim>.")
    parser.add_argument("claim", type=int, help="the expense claim's number (main.py's is 1)")
    parser.add_argument("decision", choices=["yes", "no"])
    parser.add_argument("--by", default=getpass.getuser(), help="who decides (default: you)")
    args = parser.parse_args(argv)
    event = f"approved:{args.claim}"
    with Engine(lesson_database_url()) as engine:
        sent = engine.send_event(event, {"approved": args.decision == "yes", "by": args.by})
    if not sent.first:
        print(f"{event} was sent already, with {sent.payload}: nothing changed")
        sys.exit(1)
    if sent.woken:
        print(f"sent {event}; it woke task {', '.join(map(str, sent.woken))}")
    else:
        print(f"sent {event}; no task waits for it yet: the first to wait receives it at once")


if __name__ == "__main__":
    main()
