"""``make smoke``: the first thing a new user does, checked from a copy of this tree as a fresh clone has it.

In a temporary directory: ``make run`` (a new virtualenv with requirements.txt alone, migrate, bootstrap, gunicorn
with gunicorn.conf.py) once per worker class on a free port, ``/readyz`` answering 200, one image generated with the
demo key that bootstrap printed and decoded as a PNG of the requested size (and one more as an image job, run by
the workers' own job runners), every module of the app importable from
that virtualenv, then SIGTERM and a clean exit within 15 s. Standard library only: it checks the product, not itself.
Exits non-zero, with the gateway's output, at the first thing that fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = (256, 256)
STOP_WITHIN_S = 15


def fail(message: str, log: Path | None = None) -> None:
    if log is not None and log.exists():
        print(log.read_text(errors="replace")[-6000:], file=sys.stderr)
    sys.exit(f"smoke: FAILED: {message}")


def copy_tree(to: Path) -> None:
    """The files a clone of this tree would have: tracked ones and new ones git does not ignore, as they are now."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    for name in filter(None, names):
        source = ROOT / name.decode()
        if source.is_file():
            target = to / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG whose image data decompresses to exactly what its header says."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, header, idat = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if zlib.crc32(kind + chunk) != struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]:
            raise ValueError(f"bad CRC in {kind!r}")
        header, idat = (chunk, idat) if kind == b"IHDR" else (header, idat + chunk if kind == b"IDAT" else idat)
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    if len(zlib.decompress(idat)) != height * (1 + (width * channels * depth + 7) // 8):
        raise ValueError("image data does not match the header")
    return width, height


def wait_for_key_and_ready(proc: subprocess.Popen[bytes], log: Path, base: str, within: float) -> str:
    deadline, key = time.monotonic() + within, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"make run exited with {proc.returncode} before serving", log)
        found: list[str] = re.findall(r"^\s+(sk-[A-Za-z0-9_-]{20,})\s*$", log.read_text(errors="replace"),
                                      re.MULTILINE)
        key = key or (found[0] if found else None)
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:
                if answer.status == 200 and key:
                    return key
        except OSError:
            pass
        time.sleep(0.2)
    fail(f"no demo key and 200 from /readyz within {within:g} s", log)
    raise AssertionError


def generate(base: str, key: str, log: Path, *, job: bool = False) -> None:
    """One image, answered whole or (``job``) as an image job polled until it succeeds, which needs the job runner
    that ``make run`` must start by itself."""
    body = json.dumps({"model": "dall-e-2", "prompt": "a lighthouse at dawn", "size": f"{SIZE[0]}x{SIZE[1]}",
                       "response_format": "b64_json"}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    request = urllib.request.Request(f"{base}/v1/images/generations", data=body, method="POST",
                                     headers={**headers, "Prefer": "respond-async"} if job else headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            result = json.load(answer)
        for _ in range(300 if job else 0):
            if result["status"] == "succeeded":
                result = result["result"]
                break
            if result["status"] in ("failed", "cancelled"):
                fail(f"the image job ended {result['status']}: {result['error']}", log)
            time.sleep(0.1)
            poll = urllib.request.Request(f"{base}/v1/images/jobs/{result['id']}", headers=headers)
            with urllib.request.urlopen(poll, timeout=10) as answer:
                result = json.load(answer)
        image = base64.b64decode(result["data"][0]["b64_json"])
    except (OSError, KeyError) as error:
        fail(f"the {'image job' if job else 'generation'} failed: {error!r}", log)
    try:
        size = png_size(image)
    except (ValueError, KeyError, struct.error, zlib.error) as error:
        fail(f"the image is not a whole PNG: {error}", log)
    if size != SIZE:
        fail(f"the image is {size}, not {SIZE}", log)


def imports_everything(tree: Path, data: Path, log: Path) -> None:
    """Every module of the served app imports with what requirements.txt installed, and nothing else."""
    code = ("import django, importlib, pkgutil; django.setup()\n"
            "import openopen8, gateway, channels\n"
            "for pkg in (openopen8, gateway, channels):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n")
    done = subprocess.run([str(tree / ".venv/bin/python"), "-c", code], cwd=tree, capture_output=True, text=True,
                          env={**clean_env(), "DJANGO_SETTINGS_MODULE": "openopen8.settings",
                               "OPENOPEN8_DATA_DIR": str(data)})
    if done.returncode:
        fail(f"a module of the app does not import from requirements.txt alone:\n{done.stderr[-3000:]}", log)


def clean_env() -> dict[str, str]:
    """This environment without anything that points the gateway elsewhere, or at another Python's packages."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OPENOPEN8_", "PROMETHEUS_", "VIRTUAL_ENV"))
            and k not in ("DATABASE_URL", "REDIS_URL", "PYTHONPATH", "DJANGO_SETTINGS_MODULE")}


def serve_once(tree: Path, worker_class: str) -> float:
    """``make run`` with this worker class until one image is made, then a graceful stop; returns seconds taken."""
    started = time.monotonic()
    port, data, log = free_port(), tree.parent / f"data-{worker_class}", tree.parent / f"run-{worker_class}.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        make = subprocess.Popen(["make", "-C", str(tree), "run", f"DATA_DIR={data}", f"BIND=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**clean_env(), "OPENOPEN8_WORKER_CLASS": worker_class})
    try:
        key = wait_for_key_and_ready(make, log, base, within=600)
        generate(base, key, log)
        generate(base, key, log, job=True)
        imports_everything(tree, data, log)
        # make execs gunicorn in its recipe's shell: the master is make's child. Stop it as a deploy would.
        master = int(subprocess.run(["ps", "-o", "pid=", "--ppid", str(make.pid)], capture_output=True,
                                    text=True).stdout.split()[0])
        os.kill(master, signal.SIGTERM)
        stopping = time.monotonic()
        try:
            code = make.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            fail(f"gunicorn ({worker_class}) had not stopped {STOP_WITHIN_S} s after SIGTERM", log)
        if code != 0:
            fail(f"make run ({worker_class}) exited with {code} after SIGTERM", log)
        print(f"smoke: {worker_class}: served, made a {SIZE[0]}x{SIZE[1]} PNG (and one as an image job), stopped in "
              f"{time.monotonic() - stopping:.1f} s ({time.monotonic() - started:.0f} s in all)")
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
    return time.monotonic() - started


def main() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="oo8-smoke-") as tmp:
        tree = Path(tmp) / "openopen8"
        copy_tree(tree)
        for worker_class in ("gevent", "gthread"):
            serve_once(tree, worker_class)
    print(f"smoke: passed in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
