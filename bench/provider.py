"""A near-free image provider for benchmarks: asyncio, HTTP/1.1 keep-alive, a canned OpenAI answer after a delay;
with --stream, OpenAI's image events instead (a partial image at once, the completed image after the delay).

    python bench/provider.py --port 9001 --delay 1.0 --image-bytes 2300000
    python bench/provider.py --port 9002 --delay 5.0 --image-bytes 2300000 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os

TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


def payload(image_bytes: int) -> str:
    """Base64 of a PNG signature and random bytes (they do not compress, so the base64 is as large as a real image of
    that size); else of a 1x1 PNG."""
    if not image_bytes:
        return TINY_PNG
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(image_bytes - 8)).decode()


def answer(image_bytes: int) -> bytes:
    b64 = payload(image_bytes)
    body = json.dumps({"created": 1700000000, "data": [{"b64_json": b64}]}).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n").encode()
    return head + body


def events(image_bytes: int) -> tuple[bytes, bytes]:
    """The head and first event of a streamed answer, and its last event with the body's end."""
    b64 = payload(image_bytes)
    fields = {"b64_json": b64, "created_at": 1700000000, "size": "1024x1024", "quality": "high",
              "background": "opaque", "output_format": "png"}
    partial = {"type": "image_generation.partial_image", "partial_image_index": 0, **fields}
    completed = {"type": "image_generation.completed", **fields,
                 "usage": {"input_tokens": 10, "output_tokens": 4160, "total_tokens": 4170}}
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    def chunk(event: dict[str, object]) -> bytes:  # chunked and kept alive, as OpenAI's servers stream
        data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    return head + chunk(partial), chunk(completed) + b"0\r\n\r\n"


async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                 answer_: tuple[bytes, bytes]) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if length:
                await reader.readexactly(length)
            writer.write(answer_[0])
            await writer.drain()
            await asyncio.sleep(delay)
            writer.write(answer_[1])
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, response: bytes) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            if delay:
                await asyncio.sleep(delay)
            writer.write(response)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--image-bytes", type=int, default=0)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    if args.stream:
        streamed = events(args.image_bytes)
        server = await asyncio.start_server(lambda r, w: stream(r, w, args.delay, streamed), "127.0.0.1",
                                            args.port, backlog=2048)
    else:
        response = answer(args.image_bytes)
        server = await asyncio.start_server(lambda r, w: serve(r, w, args.delay, response), "127.0.0.1",
                                            args.port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
