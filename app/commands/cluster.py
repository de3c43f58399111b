"""``autobits submit`` and ``autobits jobs``: searches as Ray jobs on a cluster.

    autobits submit --address 127.0.0.1:8265 -- search --agent optuna --target-bpw 4.5 --out /runs/a
    autobits jobs --address 127.0.0.1:8265            # table of jobs and their status
    autobits jobs --address 127.0.0.1:8265 --logs ID  # one job's output

``--address`` is the cluster dashboard's host:port (the Ray Job API server), as for
``ray job submit``.  The run directory of a submitted search is made absolute; its results
land there on the head node.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from autobits.app.options import format_table
from autobits.errors import AutobitsError

__all__ = ["register", "cmd_submit", "cmd_jobs"]


def cmd_submit(args: argparse.Namespace) -> int:
    from autobits.cluster import jobs

    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise AutobitsError("give the command to run after '--', e.g. -- search --target-bpw 4.5 "
                            "--out /abs/run")
    from autobits.app.cli import build_parser

    build_parser().parse_args(command)  # a typo fails here, not on the cluster
    sid = jobs.submit(address=args.address, command=command, working_dir=args.working_dir,
                      python=args.python, job_id=args.job_id, module="autobits.app.cli")
    print(sid)
    if not args.wait:
        return 0
    info = jobs.wait_job(address=args.address, job_id=sid, timeout=args.timeout)
    logs = jobs.job_logs(address=args.address, job_id=sid)
    tail = "\n".join(logs.rstrip().splitlines()[-20:])
    print(tail, file=sys.stderr)
    print(f"job {sid}: {info.status} after {info.seconds or 0:.0f}s"
          + (f" ({info.message})" if info.status != "SUCCEEDED" and info.message else ""))
    return 0 if info.status == "SUCCEEDED" else 1


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    from autobits.cluster import jobs

    if args.logs:
        print(jobs.job_logs(address=args.address, job_id=args.logs), end="")
        return 0
    infos = jobs.list_jobs(address=args.address)
    rows = []
    for j in infos:
        entry = j.entrypoint.split(" -m autobits.app.cli ", 1)[-1]
        if len(entry) > 70:
            entry = entry[:67] + "..."
        secs = j.seconds
        rows.append([j.id, j.status, _when(j.start_time), f"{secs:.0f}s" if secs is not None else "-",
                     entry])
    if args.json:
        payload = {"address": args.address, "jobs": [j.to_json() for j in infos]}
        if args.json == "-":
            print(json.dumps(payload, indent=2))
            return 0
        from autobits.io import write_json_atomic

        write_json_atomic(args.json, payload)
    if rows:
        print(format_table(rows, ["id", "status", "started", "time", "command"]))
    else:
        print("no jobs")
    print(f"\n{len(infos)} job(s) at {args.address}"
          + (f"; written to {args.json}" if args.json else ""))
    return 0


def register(sub) -> dict:
    p = sub.add_parser("submit", help="run an autobits command (a search) as a Ray job on a cluster",
                       description="Submit `autobits COMMAND ...` as a Ray job and print its id.")
    p.add_argument("--address", required=True,
                   help="the cluster dashboard's host:port (Ray Job API), e.g. 127.0.0.1:8265")
    p.add_argument("--working-dir", default=None,
                   help="folder uploaded as the job's working directory (optional; the package "
                   "must be installed on the cluster either way)")
    p.add_argument("--python", default=None,
                   help="interpreter running the job on the cluster (default: this one, %s)"
                   % sys.executable)
    p.add_argument("--job-id", default=None, help="submission id (default: Ray's)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job to end, print its last log lines; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, default=None,
                   help="with --wait: give up after this many seconds")
    p.add_argument("argv", metavar="COMMAND", nargs=argparse.REMAINDER,
                   help="after '--': the autobits command, e.g. search --target-bpw 4.5 --out /abs/run")

    p = sub.add_parser("jobs", help="list the Ray jobs of a cluster with their status")
    p.add_argument("--address", required=True, help="the cluster dashboard's host:port")
    p.add_argument("--logs", metavar="ID", default=None, help="print this job's output instead")
    p.add_argument("--json", default=None, help="also write the list as JSON here ('-': stdout only)")
    return {"submit": cmd_submit, "jobs": cmd_jobs}
