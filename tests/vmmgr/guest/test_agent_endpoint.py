"""The agent endpoint relay (``TakeRelay``/``AnswerRelay``) against the REAL agent process.

Code in the guest makes an HTTP request to the endpoint on the loopback; the
host takes it over the agent channel and answers; the code gets that answer.
Nothing listens before the host's first ``TakeRelay``; with nothing asked, a
take answers None at its wait.
"""

from __future__ import annotations

import json

import httpx
import trio

from dovecote.vmmgr.guest import open_agent
from tests.helpers.suite import free_port

from .conftest import RunningAgent


async def test_a_request_to_the_endpoint_is_taken_by_the_host_and_gets_its_answer(
    agent: RunningAgent,
) -> None:
    port = free_port()
    with trio.fail_after(30):
        async with open_agent(agent.socket, connect_timeout=10) as client:
            async with httpx.AsyncClient(timeout=10) as http:
                try:
                    await http.get(f"http://127.0.0.1:{port}/api/agent/me")
                    raise AssertionError("the endpoint listened before the host asked for it")
                except httpx.ConnectError:
                    pass
                assert await client.take_relay(wait_s=0.2, port=port) is None  # starts it; nothing asked

                answers: list[httpx.Response] = []

                async def call() -> None:
                    answers.append(await http.post(
                        f"http://127.0.0.1:{port}/api/agent/tasks/claim-next?x=1",
                        json={"lease_seconds": 5}, headers={"X-AGH-Agent": "me"}))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    taken = await client.take_relay(wait_s=10, port=port)
                    assert taken is not None
                    assert (taken.method, taken.path) == ("POST", "/api/agent/tasks/claim-next?x=1")
                    assert taken.headers["x-agh-agent"] == "me"
                    assert json.loads(taken.body) == {"lease_seconds": 5}
                    await client.answer_relay(taken.no, 409, b'{"error":"lease expired"}')
                assert answers[0].status_code == 409
                assert answers[0].json() == {"error": "lease expired"}
                assert answers[0].headers["content-type"] == "application/json"
