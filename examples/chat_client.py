"""Chat with a running `tokmodel serve` through the official openai client: only the base URL changes.

    tokmodel serve &
    python examples/chat_client.py "Write a haiku about paged attention."
    python examples/chat_client.py            # interactive: one line per turn, Ctrl-D to quit
"""
from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="one question; without it, an interactive chat")
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    # The server checks the key only when started with --api-key; the client insists on having one.
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("TOKMODEL_API_KEY", "none"))
    model = client.models.list().data[0].id
    messages: list[dict] = []
    for prompt in [args.prompt] if args.prompt else _lines():
        messages.append({"role": "user", "content": prompt})
        reply = _stream_reply(client, model, messages, args)
        messages.append({"role": "assistant", "content": reply})


def _lines():
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def _stream_reply(client: OpenAI, model: str, messages: list[dict], args: argparse.Namespace) -> str:
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, max_tokens=args.max_tokens,
                                            temperature=args.temperature, stream_options={"include_usage": True})
    parts = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(parts[-1], end="", flush=True)
        if chunk.usage:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
            print(f"\n[{chunk.usage.prompt_tokens} prompt tokens ({cached} cached), "
                  f"{chunk.usage.completion_tokens} generated]")
    return "".join(parts)


if __name__ == "__main__":
    main()
