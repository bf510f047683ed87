"""piggyback-serve: many image classifiers from one frozen backbone with Piggyback masks.

`piggyback_serve.client` (the base install: httpx, no torch), `piggyback_serve.masks` (the
method, training, artifacts: the `masks` extra) and `piggyback_serve.server` (the `server`
extra). Importing this package imports none of them.
"""
