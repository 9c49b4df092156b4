"""Fixtures of the recorder tests: one moto S3 server for the module run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.recorder.helpers import moto_server


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    with moto_server() as url:
        yield url
