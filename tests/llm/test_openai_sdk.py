"""The official ``openai`` SDK as a client of the simulator: its protocol stays true.

If the SDK reads the simulator's answers (plain, streamed, tool calls, models) and maps
its errors to the SDK's own classes, the simulator speaks what real providers speak, and
what ResilientLLMClient is tested against is the protocol, not our reading of it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import openai
import pytest

from aura.llm import Faults, LLMSimulator

MESSAGES = [{"role": "user", "content": json.dumps({"title": "Trail shoe", "brand": "Acme"})}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "save_enrichment",
            "description": "Store the description and tags",
            "parameters": {"type": "object", "properties": {"description": {"type": "string"}}},
        },
    }
]
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def sim() -> AsyncIterator[LLMSimulator]:
    async with LLMSimulator(Faults(api_key="sk-sdk"), models=("gpt-4o-mini", "gpt-4o")) as s:
        yield s


@pytest.fixture
async def sdk(sim: LLMSimulator) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-sdk", max_retries=0)
    yield client
    await client.close()


async def test_chat(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, n=2, response_format={"type": "json_object"}
    )
    assert answer.model == "gpt-4o-mini"
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].finish_reason == "stop"
    content = answer.choices[0].message.content
    assert content is not None
    assert json.loads(content)["description"].startswith("Trail shoe by Acme")
    assert answer.usage is not None
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


async def test_a_length_cut(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"
    assert len((answer.choices[0].message.content or "").split()) == 2


async def test_streaming(sdk: openai.AsyncOpenAI) -> None:
    plain = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len(pieces) > 5
    assert "".join(pieces) == plain.choices[0].message.content
    assert finish == "stop"
    assert usage is not None
    assert plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens


async def test_tool_calls_plain_and_streamed_then_the_tool_result(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, tool_choice="required"
    )
    message = answer.choices[0].message
    assert message.content is None
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    (call,) = message.tool_calls
    assert call.type == "function"
    assert call.function.name == "save_enrichment"

    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, stream=True
    )
    name, arguments, call_id = "", "", None
    async for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or ():
            call_id = delta_call.id or call_id
            if delta_call.function is not None:
                name += delta_call.function.name or ""
                arguments += delta_call.function.arguments or ""
    assert (call_id, name, arguments) == (call.id, "save_enrichment", call.function.arguments)

    follow_up = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        tools=TOOLS,
        messages=[
            *MESSAGES,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "saved"},
        ],
    )
    assert follow_up.choices[0].finish_reason == "stop"
    assert follow_up.choices[0].message.content


async def test_models(sdk: openai.AsyncOpenAI) -> None:
    listed = [model.id async for model in sdk.models.list()]
    assert listed == ["gpt-4o-mini", "gpt-4o"]
    assert (await sdk.models.retrieve("gpt-4o")).id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("gpt-5-imaginary")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (422, openai.UnprocessableEntityError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
async def test_status_errors_map_to_the_sdks_classes(
    sim: LLMSimulator, sdk: openai.AsyncOpenAI, status: int, error: type[openai.APIStatusError]
) -> None:
    sim.faults.update({"error_rate": 1.0, "error_statuses": [status], "retry_after": 7})
    with pytest.raises(error) as raised:
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raised.value.status_code == status
    assert (raised.value.response.headers.get("retry-after") == "7") is (status in (429, 503))


async def test_auth_model_and_request_errors(sim: LLMSimulator, sdk: openai.AsyncOpenAI) -> None:
    wrong = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await wrong.close()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="'n' must be"):
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, n=99)


async def test_stream_faults_reach_the_sdk(sim: LLMSimulator, sdk: openai.AsyncOpenAI) -> None:
    sim.faults.update({"midstream_error_rate": 1.0})
    stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for _ in stream:
            pass
    sim.faults.update({"midstream_error_rate": 0.0, "midstream_reset_rate": 1.0})
    stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):  # the SDK surfaces the reset while reading
        async for _ in stream:
            pass
