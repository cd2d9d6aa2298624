"""Peer frameworks' sides of the benchmark, run by `bench.versus` in a venv of their own.

One module per framework (`celery_peer`, `dramatiq_peer`, `faststream_peer`, `taskiq_peer`), each
importing only its framework and `_common` (the standard library): never amqtask, whose venv
they do not share. `requirements.txt` pins the versions measured.
"""
