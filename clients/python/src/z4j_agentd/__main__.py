"""`python -m z4j_agentd ping|stats`: is the local daemon there, and what
does it say.

    python -m z4j_agentd ping                 # pong from z4j-agentd at ... in 0.2 ms
    python -m z4j_agentd stats                # the daemon's stats map, as JSON
    python -m z4j_agentd stats --socket /run/z4j-agentd/agent.sock

Exit status 0 when the daemon answered, 1 when it did not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from ._wire import default_socket_path
from .client import Client, DaemonUnavailable


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m z4j_agentd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["ping", "stats"], help="what to ask the daemon")
    ap.add_argument("--socket", default=None, help="the daemon's socket (default: Z4J_SOCKET_PATH, "
                    "else /run/z4j-agentd/agent.sock if it exists, else $XDG_RUNTIME_DIR/z4j/agent.sock, "
                    "else $TMPDIR/z4j-<uid>/agent.sock)")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)")
    args = ap.parse_args(argv)
    path = args.socket or default_socket_path()
    client = Client(path, process="python -m z4j_agentd", framing="json", connect_timeout=args.timeout)
    try:
        if args.command == "ping":
            started = time.monotonic()
            client._request({"type": "ping"}, "pong", args.timeout)
            took = (time.monotonic() - started) * 1000
            print(f"pong from z4j-agentd at {path} in {took:.1f} ms")
        else:
            print(json.dumps(client.daemon_stats(args.timeout), indent=2, sort_keys=True, ensure_ascii=False))
    except DaemonUnavailable as exc:
        print(f"no z4j-agentd answers at {path}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close(timeout=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
