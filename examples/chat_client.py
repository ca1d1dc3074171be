"""Chat with a running `tokmodel serve` through the official openai client: only the base URL changes.

    pip install -e ".[client]"                # TokModel and the openai client
    tokmodel serve &
    python examples/chat_client.py "Write a haiku about paged attention."
    python examples/chat_client.py            # interactive: one line per turn, Ctrl-D to quit

The API key comes from --api-key or $TOKMODEL_API_KEY; the server checks it only when started with --api-key.
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    import openai
except ImportError:
    sys.exit('chat_client.py needs the openai client: pip install -e ".[client]"')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="one question; without it, an interactive chat")
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("TOKMODEL_API_KEY"),
                        help="the server's API key (default: $TOKMODEL_API_KEY)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    # The openai client insists on a key even for a server that checks none.
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "none")
    try:
        chat(client, args)
    except openai.AuthenticationError:
        return _fail(f"the server at {args.base_url} refused the API key: pass the one it was started with "
                     f"(--api-key or TOKMODEL_API_KEY)")
    except openai.APIConnectionError:
        return _fail(f"no server answers at {args.base_url}: start one with `tokmodel serve`, or pass --base-url")
    except openai.APIStatusError as e:
        return _fail(f"the server answered {e.status_code}: {e.message}")
    except KeyboardInterrupt:
        return 130
    return 0


def chat(client: openai.OpenAI, args: argparse.Namespace) -> None:
    model = client.models.list().data[0].id
    messages: list[dict] = []
    for prompt in [args.prompt] if args.prompt else _lines():
        messages.append({"role": "user", "content": prompt})
        reply = _stream_reply(client, model, messages, args)
        messages.append({"role": "assistant", "content": reply})


def _fail(message: str) -> int:
    print(f"chat_client: {message}", file=sys.stderr)
    return 1


def _lines():
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def _stream_reply(client: openai.OpenAI, model: str, messages: list[dict], args: argparse.Namespace) -> str:
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
    sys.exit(main())
