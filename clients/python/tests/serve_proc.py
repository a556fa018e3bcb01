"""Child process for test_serve.py: starts (or, as a non-zero local rank, joins) a daemon with
ringfeed.serve() and reports on stdout as JSON lines.

    serve_proc.py hold NAME          start, print the daemon's pid, then wait to be killed
    serve_proc.py rank NAME DONE_DIR read one epoch of this rank's lane; rank 0 leaves the
                                     `with` only once every other rank has written DONE_DIR/<rank>
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import ringfeed


def main() -> None:
    mode, name = sys.argv[1], (None if sys.argv[2] == "-" else sys.argv[2])
    if mode == "hold":
        daemon = ringfeed.serve(name=name, epochs=0)
        print(json.dumps({"daemon_pid": daemon.pid}), flush=True)
        time.sleep(600)
        return
    done = Path(sys.argv[3])
    rank = int(os.environ["LOCAL_RANK"])
    with ringfeed.serve(name=name, epochs=1, batch_size=8) as daemon:
        with daemon.loader() as loader:
            lanes, ids = set(), []
            for batch in loader:
                lanes.add(batch.lane)
                ids += batch.sample_ids.tolist()
        (done / str(rank)).touch()
        if rank == 0:
            deadline = time.monotonic() + 120
            world = int(os.environ["LOCAL_WORLD_SIZE"])
            while len(list(done.iterdir())) < world:  # the others still read from this daemon
                if time.monotonic() > deadline:
                    raise TimeoutError("the other ranks never finished")
                time.sleep(0.05)
        report = {"rank": rank, "pid": daemon.pid, "owned": daemon.owned, "name": daemon.name}
        print(json.dumps({**report, "lanes": sorted(lanes), "ids": ids}), flush=True)


if __name__ == "__main__":
    main()
