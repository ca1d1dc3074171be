"""TokModel's benchmark and profiling tools, installed with the package: `tokmodel bench serve|throughput|latency`
and `tokmodel profile` (bench/cli.py). benchmarks/ in the checkout holds the campaign scripts built on them."""
