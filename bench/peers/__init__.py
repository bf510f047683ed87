"""The peers we compare against, each a standalone server: `python -m bench.peers.X`."""
