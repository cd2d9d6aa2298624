"""Benchmarks of amqtask against raw aio-pika: `python -m bench` (see README, "Benchmark")."""
