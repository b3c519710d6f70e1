"""Shared fixtures: CPU tests pinned to the CPU, and a real S3-compatible server (moto's server mode) on
loopback for object-store tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": ""}
SLOW_ENV = "TRIARCH_SLOW"  # `make test-slow`: the slow tier (JIT-compiled DeepSpeed ops), not part of `make test`


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only with TRIARCH_SLOW=1 (`make test-slow`); CI's `make test` skips them."""
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow tier: run with {SLOW_ENV}=1 (make test-slow)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test not marked ``gpu`` runs its ranks, CLI runs and SLURM jobs on the CPU even on a GPU host:
    they inherit an environment with no visible CUDA device (``train.device: auto`` then means CPU; bit-exact
    and 4-rank assertions are CPU guarantees). In-process code of such tests pins ``cpu`` itself."""
    if request.node.get_closest_marker("gpu") is None:
        for key, value in HIDE_GPUS.items():
            monkeypatch.setenv(key, value)


S3_REGION = "us-east-1"
S3_TEST_KEY = "testing"  # moto accepts any credentials; these never leave the loopback server


@dataclass(frozen=True)
class S3Server:
    """Where the loopback S3 server listens and the fsspec ``storage_options`` that reach it."""

    endpoint_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (boto3: s3fs's mkdir sends a location constraint us-east-1 rejects)."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url, region_name=S3_REGION, aws_access_key_id=S3_TEST_KEY,
                     aws_secret_access_key=S3_TEST_KEY).create_bucket(Bucket=name)

    def filesystem(self) -> Any:
        """An ``s3fs.S3FileSystem`` talking to this server."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on 127.0.0.1 with a free port, for the whole test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": S3_TEST_KEY, "secret": S3_TEST_KEY, "endpoint_url": endpoint,
               "client_kwargs": {"region_name": S3_REGION}, "skip_instance_cache": True}
    try:
        yield S3Server(endpoint, options)
    finally:
        server.stop()


@pytest.fixture()
def run_cli(capsys: pytest.CaptureFixture):
    """Call the ``triarch`` CLI's own entry point in this process (the code a subprocess runs, without its
    start-up): ``run_cli(*args) -> (exit code, stderr)``. For errors that come before any rank starts."""
    import logging

    from triarch.cli import main

    def call(*args: str) -> tuple[int, str]:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        capsys.readouterr()
        try:
            with pytest.raises(SystemExit) as done:
                main([str(a) for a in args])
        finally:  # the CLI configures logging for its process: leave this one as it was
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
            root.setLevel(level)
        return int(done.value.code), capsys.readouterr().err

    return call
