"""A near-free image provider for benchmarks: asyncio, HTTP/1.1 keep-alive, a canned OpenAI answer after a delay.

    python bench/provider.py --port 9001 --delay 1.0 --image-bytes 2300000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os

TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


def answer(image_bytes: int) -> bytes:
    # Random bytes do not compress, so the base64 is as large as a real image of that size; else a 1x1 PNG.
    b64 = base64.b64encode(os.urandom(image_bytes)).decode() if image_bytes else TINY_PNG
    body = json.dumps({"created": 1700000000, "data": [{"b64_json": b64}]}).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n").encode()
    return head + body


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
    args = parser.parse_args()
    response = answer(args.image_bytes)
    server = await asyncio.start_server(lambda r, w: serve(r, w, args.delay, response), "127.0.0.1", args.port,
                                        backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
