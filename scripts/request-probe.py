#!/usr/bin/env python3
"""Where a request's time goes on the server (README, "Performance").

    request-probe.py run INTRACOM REQUESTS [URI]
        Runs `INTRACOM bench --only request --rounds 1 --requests REQUESTS` against URI
        and prints, every 250 ms, the commands the server ran (serverStatus
        metrics.commands: insert, update, findAndModify, getMore) and the CPU used by
        the server process (found by its listening port) and by the bench process.

    request-probe.py claims [URI [SETTLED,...]]
        Times 500 claims and settles, one after the other, in a throwaway collection
        with intracom's claim index, with SETTLED (default 0,2000) settled requests
        beside the 500 pending ones, for the claim filter as intracom writes it (an
        `$and` of clauses) and for the same conjunction written at the top level.

Needs pymongo (the Python test server's venv that `scripts/test` installs has it:
~/.cache/intracom/secantus-py/bin/python). Linux only (reads /proc).
"""

import subprocess
import sys
import time

import pymongo

DEFAULT_URI = "mongodb://127.0.0.1:27555/?directConnection=true"


def commands(client):
    counted = client.admin.command("serverStatus")["metrics"]["commands"]
    return {
        name: counted.get(name, {}).get("total", 0)
        for name in ("insert", "update", "findAndModify", "getMore", "find", "aggregate")
    }


def cpu_ticks(pid):
    """utime + stime of a process, in clock ticks (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def server_pid(uri):
    port = uri.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]
    found = subprocess.run(["pgrep", "-f", f"port {port}"], capture_output=True, text=True)
    pids = found.stdout.split()
    if not pids:
        sys.exit(f"no server process found listening with `--port {port}`")
    return int(pids[0])


def run(intracom, requests, uri):
    client = pymongo.MongoClient(uri)
    server = server_pid(uri)
    tick = float(subprocess.check_output(["getconf", "CLK_TCK"]))
    bench = subprocess.Popen(
        [intracom, "bench", "--uri", uri, "--only", "request", "--rounds", "1",
         "--requests", str(requests)],
        stdout=subprocess.PIPE,
        text=True,
    )
    before = (time.monotonic(), commands(client), cpu_ticks(server), cpu_ticks(bench.pid))
    while bench.poll() is None:
        time.sleep(0.25)
        now = (time.monotonic(), commands(client), cpu_ticks(server), cpu_ticks(bench.pid))
        if now[3] is None:
            break
        seconds = now[0] - before[0]
        ran = " ".join(f"{name}={now[1][name] - before[1][name]}" for name in now[1])
        print(
            f"{ran} server_cpu={(now[2] - before[2]) / tick / seconds:.2f}"
            f" bench_cpu={(now[3] - before[3]) / tick / seconds:.2f}"
        )
        before = now
    print(bench.stdout.read())


def claims(uri, settled_counts=(0, 2000)):
    client = pymongo.MongoClient(uri)
    db = client["intracom_claim_probe"]
    lease_end = {"$dateAdd": {"startDate": "$lease.at", "unit": "millisecond",
                              "amount": "$lease.ms"}}
    lease_free = [{"lease": None}, {"$expr": {"$lte": [lease_end, "$$NOW"]}}]
    forms = {
        # As `claim_filter` in `src/medium/mongo/work.rs` writes it.
        "$and of clauses": {"$and": [
            {"serviceNameDest": "billing", "delivery": "one", "state": "pending"},
            {"action": {"$in": ["echo"]}},
            {"$or": lease_free},
        ]},
        "top level": {"serviceNameDest": "billing", "delivery": "one", "state": "pending",
                      "action": {"$in": ["echo"]}, "$or": lease_free},
    }
    claim = {"$set": {"lease.owner": "probe", "lease.ms": 30000},
             "$currentDate": {"lease.at": True}, "$inc": {"attempts": 1}}

    def request(i, state):
        return {"_id": f"r{i}", "serviceNameDest": "billing", "delivery": "one",
                "state": state, "priority": 0, "ts": i, "action": "echo"}

    for settled in settled_counts:
        for name, query in forms.items():
            db.drop_collection("messages")
            messages = db["messages"]
            # As `src/medium/mongo/setup.rs` creates it.
            messages.create_index(
                [("serviceNameDest", 1), ("state", 1), ("priority", -1), ("ts", 1)],
                name="work_claim",
                partialFilterExpression={"delivery": "one"},
            )
            if settled:
                messages.insert_many([request(i, "done") for i in range(settled)])
            messages.insert_many([request(10_000 + i, "pending") for i in range(500)])
            started = time.monotonic()
            done = 0
            while True:
                work = messages.find_one_and_update(
                    query, claim, sort=[("priority", -1), ("ts", 1)])
                if work is None:
                    break
                messages.update_one(
                    {"_id": work["_id"], "state": "pending", "lease.owner": "probe"},
                    {"$set": {"state": "done"}, "$unset": {"lease": ""}},
                )
                done += 1
            print(f"{settled} settled, {name}: {done} claims and settles in"
                  f" {time.monotonic() - started:.3f} s")
    client.drop_database("intracom_claim_probe")


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "run":
        run(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else DEFAULT_URI)
    elif len(sys.argv) >= 2 and sys.argv[1] == "claims":
        counts = (0, 2000)
        if len(sys.argv) > 3:
            counts = tuple(int(n) for n in sys.argv[3].split(","))
        claims(sys.argv[2] if len(sys.argv) > 2 else DEFAULT_URI, counts)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
