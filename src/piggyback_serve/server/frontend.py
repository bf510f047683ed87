"""One front-end process (started by server/frontends.py, never by hand): uvicorn on the
listening socket it inherits, the app as a front end of the engine service.

    python -m piggyback_serve.server.frontend --fd N --engine /path/engine.sock

Settings come from the environment, as the supervisor passes it on.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from piggyback_serve._pipes import quiet_when_the_reader_leaves
from piggyback_serve.server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    return quiet_when_the_reader_leaves(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="piggyback_serve.server.frontend", description=__doc__)
    p.add_argument("--fd", type=int, required=True, help="the listening socket's descriptor")
    p.add_argument("--engine", required=True, help="the engine service's Unix socket")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from piggyback_serve.server.app import create_app
    from piggyback_serve.server.cli import serve

    sock = socket.socket(fileno=args.fd)
    settings = Settings()
    app = create_app(settings, engine_address=args.engine)
    return serve(app, sock, args.log_level, settings)


if __name__ == "__main__":
    sys.exit(main())
