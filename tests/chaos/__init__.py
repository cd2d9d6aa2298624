"""The chaos run: producers and `amqtask worker --processes 2` under random broker kills,
worker-child kills and TCP cuts, on a private RabbitMQ node; then the invariants are counted.

`python -m tests.chaos --duration 180` (`make chaos`) runs it; `test_chaos.py` runs a short
version in `make test`. See `harness.py`.
"""
