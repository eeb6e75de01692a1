"""What the tests, the benchmarks and the demo share: real server launchers (redis, the lm server,
Mooncake, etcd, vLLM), process management on 127.0.0.1, prompts, and the reader of the
connector's structured log events. Not part of the installed package."""


class Unavailable(RuntimeError):
    """A server or tool this machine lacks (a skip in the tests, a skipped case in a benchmark)."""
