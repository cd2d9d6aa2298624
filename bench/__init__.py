"""Benchmarks of amqtask against raw aio-pika and peer frameworks: `python -m bench` (see README,
"Benchmark")."""
