"""Drives Tollgate's `POST /v1/chat/completions` with the official `openai` SDK, as a
customer's application would, and prints what the SDK saw as one JSON object, one entry per
scenario (tests/integration/python.rs asserts on it).

Usage: openai_chat.py --base-url URL --customer ID [--poor-customer ID] [--only-chat | --only-unbounded]
The API key is the SDK's usual OPENAI_API_KEY. Model `mock-model` answers with exactly
`max_tokens` tokens ("tok ") behind Tollgate.

A scenario that the server refuses reports the SDK's exception instead of failing the
script; any other exception does fail it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import openai

MODEL = "mock-model"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def status_error(e: openai.APIStatusError) -> dict[str, Any]:
    """What the SDK's status error carries: its class, status, and our body."""
    try:
        response_json = e.response.json()
    except ValueError:
        response_json = None
    return {
        "exception": type(e).__name__,
        "is_api_status_error": isinstance(e, openai.APIStatusError),
        "status_code": e.status_code,
        # The SDK unwraps `{"error": {...}}` into `body` and lifts `code` and `type`.
        "body": e.body,
        "code": e.code,
        "type": e.type,
        "message": e.message,
        "request_id": e.request_id,
        "response_json": response_json,
    }


def scenario(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return run()
    except openai.APIStatusError as e:
        return status_error(e)


def chat(client: openai.OpenAI) -> dict[str, Any]:
    completion = client.chat.completions.create(model=MODEL, max_tokens=5, messages=ask("Say hello."))
    choice = completion.choices[0]
    return {
        "request_id": completion._request_id,
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "usage": completion.usage.model_dump() if completion.usage else None,
    }


def stream(client: openai.OpenAI, max_tokens: int, **options: Any) -> dict[str, Any]:
    chunks = client.chat.completions.create(
        model=MODEL, max_tokens=max_tokens, messages=ask("Count slowly."), stream=True, **options
    )
    content, content_chunks, usage_chunks, last = "", 0, 0, None
    with chunks:
        for chunk in chunks:
            last = chunk
            for choice in chunk.choices:
                if choice.delta.content:
                    content += choice.delta.content
                    content_chunks += 1
            if chunk.usage is not None:
                usage_chunks += 1
    return {
        "request_id": chunks.response.headers.get("x-request-id"),
        "content": content,
        "content_chunks": content_chunks,
        "usage_chunks": usage_chunks,
        "last_chunk_usage": last.usage.model_dump() if last and last.usage else None,
    }


def raw(client: openai.OpenAI) -> dict[str, Any]:
    response = client.chat.completions.with_raw_response.create(model=MODEL, max_tokens=2, messages=ask("Hi"))
    completion = response.parse()
    return {
        "request_id": response.headers.get("x-request-id"),
        "status": response.status_code,
        "cost": response.headers.get("x-tollgate-cost"),
        "remaining": response.headers.get("x-tollgate-remaining"),
        "completion_tokens": completion.usage.completion_tokens if completion.usage else None,
    }


def refusal(client: openai.OpenAI, customer: str, streamed: bool) -> dict[str, Any]:
    # A per-request header overrides the client's default customer.
    result = client.chat.completions.create(
        model=MODEL,
        max_tokens=20,
        messages=ask("Write a long essay."),
        stream=streamed,
        extra_headers={"X-Tollgate-Customer": customer},
    )
    raise AssertionError(f"expected a refusal for {customer}, got {result!r}")


def unbounded(client: openai.OpenAI, kind: str) -> dict[str, Any]:
    """A request whose cost Tollgate cannot bound, as an application would send it."""
    if kind == "hosted_tool":
        result: Any = client.responses.create(
            model=MODEL, max_output_tokens=5, input="What happened today?", tools=[{"type": "web_search"}]
        )
    elif kind == "file_by_id":
        result = client.responses.create(
            model=MODEL,
            max_output_tokens=5,
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_file", "file_id": "file-abc123"},
                        {"type": "input_text", "text": "Summarize this file."},
                    ],
                }
            ],
        )
    else:
        result = client.chat.completions.create(
            model=MODEL, max_tokens=5, messages=ask("Any news?"), web_search_options={}
        )
    raise AssertionError(f"expected {kind} to be refused, got {result!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--customer", required=True)
    parser.add_argument("--poor-customer")
    parser.add_argument("--only-chat", action="store_true")
    parser.add_argument("--only-unbounded", action="store_true")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, default_headers={"X-Tollgate-Customer": args.customer})
    if args.only_unbounded:
        kinds = ["hosted_tool", "file_by_id", "web_search_options"]
        json.dump({kind: scenario(lambda: unbounded(client, kind)) for kind in kinds}, sys.stdout, indent=1)
        return
    results = {"chat": scenario(lambda: chat(client))}
    if not args.only_chat:
        results["stream"] = scenario(lambda: stream(client, 4))
        results["stream_with_usage"] = scenario(
            lambda: stream(client, 3, stream_options={"include_usage": True})
        )
        results["raw"] = scenario(lambda: raw(client))
    if args.poor_customer:
        results["refusal"] = scenario(lambda: refusal(client, args.poor_customer, streamed=False))
        results["stream_refusal"] = scenario(lambda: refusal(client, args.poor_customer, streamed=True))
    json.dump(results, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
