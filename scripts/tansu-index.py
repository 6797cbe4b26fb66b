#!/usr/bin/env python3
"""Add the index tansu 0.6's sqlite schema lacks: header (topition, offset_id).

tansu looks up the headers of every record it returns from a fetch with a
join on header (topition, offset_id), and that table has no index: each
fetched record scans every header ever written, in every topic. Herald's
outcome events carry two headers, so fetch cost grows with the number of
outcomes stored and the broker slows to a crawl within a benchmark run
(measured in BENCHMARKS.md, 2026-11-28: 600 -> 2,000 notifications/s).

Usage: tansu-index.py PATH/TO/tansu.db   (idempotent; waits for tansu to
create its schema, up to ~20 s)
"""
import sqlite3
import sys
import time


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: tansu-index.py PATH/TO/tansu.db", file=sys.stderr)
        return 2
    db = sys.argv[1]
    last = None
    for _ in range(200):
        try:
            c = sqlite3.connect(db, timeout=10)
            try:
                c.execute(
                    "create index if not exists herald_header_topition_offset"
                    " on header (topition, offset_id)"
                )
                c.commit()
                return 0
            finally:
                c.close()
        except sqlite3.OperationalError as e:  # no such table yet, or locked
            last = e
            time.sleep(0.1)
    print(f"tansu-index: could not add the header index to {db}: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
