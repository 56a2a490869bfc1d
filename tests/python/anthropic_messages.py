"""Drives Tollgate's `POST /v1/messages` with the official `anthropic` SDK (and the Responses
API with the `openai` SDK), as a customer's application would, and prints what the SDKs saw
as one JSON object, one entry per scenario (tests/integration/python.rs asserts on it).

Usage: anthropic_messages.py --base-url URL --customer ID (--poor-customer ID | --only-unbounded)
The key is the SDKs' usual ANTHROPIC_API_KEY (sent as `x-api-key`). Model `claude-mock`
answers with exactly `max_tokens` tokens ("tok ") behind Tollgate; `mock-model` does the same
for the Responses API.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import anthropic
import openai

MODEL = "claude-mock"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def status_error(e: anthropic.APIStatusError | openai.APIStatusError) -> dict[str, Any]:
    return {
        "exception": type(e).__name__,
        # Newer SDKs raise a subclass per status (PaymentRequiredError for 402).
        "is_api_status_error": isinstance(e, (anthropic.APIStatusError, openai.APIStatusError)),
        "status_code": e.status_code,
        "body": e.body,
        "message": e.message,
        "request_id": e.response.headers.get("x-request-id"),
    }


def scenario(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return run()
    except (anthropic.APIStatusError, openai.APIStatusError) as e:
        return status_error(e)


def message(client: anthropic.Anthropic) -> dict[str, Any]:
    reply = client.messages.create(model=MODEL, max_tokens=5, messages=ask("Say hello."))
    return {
        "text": "".join(block.text for block in reply.content if block.type == "text"),
        "stop_reason": reply.stop_reason,
        "input_tokens": reply.usage.input_tokens,
        "output_tokens": reply.usage.output_tokens,
    }


def stream(client: anthropic.Anthropic) -> dict[str, Any]:
    with client.messages.stream(model=MODEL, max_tokens=4, messages=ask("Count.")) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    return {"text": text, "output_tokens": final.usage.output_tokens, "stop_reason": final.stop_reason}


def raw(client: anthropic.Anthropic) -> dict[str, Any]:
    response = client.messages.with_raw_response.create(model=MODEL, max_tokens=2, messages=ask("Hi"))
    response.parse()
    return {
        "status": response.status_code,
        "cost": response.headers.get("x-tollgate-cost"),
        "remaining": response.headers.get("x-tollgate-remaining"),
    }


def count(client: anthropic.Anthropic) -> dict[str, Any]:
    counted = client.messages.count_tokens(model=MODEL, messages=ask("How many?"))
    return {"input_tokens": counted.input_tokens}


def responses(base_url: str, key: str, customer: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0,
                           default_headers={"X-Tollgate-Customer": customer})
    reply = client.responses.create(model="mock-model", input="Say hello.", max_output_tokens=3)
    streamed = ""
    completed = None
    with client.responses.stream(model="mock-model", input="Count.", max_output_tokens=2) as s:
        for event in s:
            if event.type == "response.output_text.delta":
                streamed += event.delta
            elif event.type == "response.completed":
                completed = event.response
    return {
        "text": reply.output_text,
        "output_tokens": reply.usage.output_tokens if reply.usage else None,
        "streamed": streamed,
        "streamed_output_tokens": completed.usage.output_tokens if completed and completed.usage else None,
    }


def unbounded(client: anthropic.Anthropic, kind: str) -> dict[str, Any]:
    """A request whose cost Tollgate cannot bound, as an application would send it."""
    if kind == "document_by_url":
        content: Any = [
            {"type": "document", "source": {"type": "url", "url": "https://example.com/annual-report.pdf"}},
            {"type": "text", "text": "Summarize this report."},
        ]
        result: Any = client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": content}])
    elif kind == "web_search":
        result = client.messages.create(
            model=MODEL,
            max_tokens=5,
            messages=ask("What happened today?"),
            tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        )
    else:
        result = client.messages.create(
            model=MODEL,
            max_tokens=5,
            messages=ask("Plot this."),
            tools=[{"type": "code_execution_20250522", "name": "code_execution"}],
        )
    raise AssertionError(f"expected {kind} to be refused, got {result!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--customer", required=True)
    parser.add_argument("--poor-customer")
    parser.add_argument("--only-unbounded", action="store_true")
    args = parser.parse_args()
    key = os.environ["ANTHROPIC_API_KEY"]

    def client(customer: str) -> anthropic.Anthropic:
        # No retries: a refused call must reach Tollgate exactly once.
        return anthropic.Anthropic(base_url=args.base_url, max_retries=0,
                                   default_headers={"X-Tollgate-Customer": customer})

    if args.only_unbounded:
        kinds = ["document_by_url", "web_search", "code_execution"]
        print(json.dumps({kind: scenario(lambda: unbounded(client(args.customer), kind)) for kind in kinds}))
        return
    rich, poor = client(args.customer), client(args.poor_customer)
    results = {
        "message": scenario(lambda: message(rich)),
        "stream": scenario(lambda: stream(rich)),
        "raw": scenario(lambda: raw(rich)),
        "count_tokens": scenario(lambda: count(rich)),
        "responses": scenario(lambda: responses(args.base_url, key, args.customer)),
        "refused": scenario(lambda: message(poor)),
        "refused_stream": scenario(lambda: stream(poor)),
        "bad_key": scenario(lambda: message(anthropic.Anthropic(base_url=args.base_url, api_key="tg_sk_wrong",
                                                                max_retries=0))),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
