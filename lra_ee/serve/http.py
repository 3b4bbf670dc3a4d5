"""Request bodies read within bounds of size and time, and JSON answers that cannot fail to encode.

``read_body`` streams the ASGI body chunk by chunk (Content-Length or chunked alike): past ``limit_bytes``
it stops with :class:`BodyTooLarge` (413) without reading the rest; a chunk that does not come within
``read_timeout_s``, or a body not complete within ``total_timeout_s``, stops it with :class:`BodyTimeout`
(408); a client that goes away mid-body is :class:`ClientGone` (no answer, no traceback). Slow or stalled
uploads so hold a replica's request slot for a bounded time only.

``json_response`` encodes a result strictly (no NaN / Infinity, which are not JSON): a body that holds
them, e.g. a model that gives non-finite outputs, becomes a 500 JSON error naming the cause.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

READ_TIMEOUT_S = 10.0  # the longest wait for the next chunk of a request body
BODY_TIMEOUT_S = 60.0  # the longest a whole body may take to arrive
REQUEST_TIMEOUT_S = 120.0  # the longest a request may take in the replica, body to answer (then 503 JSON)
PROXY_TIMEOUT_MARGIN_S = 30.0  # the proxy's own request timeout lies this far beyond (its answer is text/plain)


class BodyError(Exception):
    """A request body that cannot be read: ``status`` is the HTTP answer, ``str()`` the message."""

    status = 400


class BodyTooLarge(BodyError):
    status = 413


class BodyTimeout(BodyError):
    status = 408


class ClientGone(BodyError):
    status = 499  # nobody is left to answer


async def read_body(request, limit_bytes: int, read_timeout_s: float = READ_TIMEOUT_S,
                    total_timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The body of a Starlette ``request``, at most ``limit_bytes``, each chunk within ``read_timeout_s`` and the
    whole within ``total_timeout_s``; :class:`BodyTooLarge`, :class:`BodyTimeout` or :class:`ClientGone`."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise BodyError(f"Content-Length {length[:40]!r} is not a number of bytes")
        if int(length) > limit_bytes:
            raise BodyTooLarge(f"body of {int(length)} bytes exceeds {limit_bytes} bytes")
    deadline = time.monotonic() + total_timeout_s
    chunks, received = [], 0
    stream = request.stream().__aiter__()
    while True:
        left = deadline - time.monotonic()
        wait = min(read_timeout_s, left)
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=wait)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            stalled = left > read_timeout_s
            what = f"no data for {read_timeout_s:g} s" if stalled else f"not complete in {total_timeout_s:g} s"
            raise BodyTimeout(f"request body incomplete after {received} bytes: {what}") from None
        except ClientDisconnect:
            raise ClientGone("the client disconnected while sending the body") from None
        except Exception as err:  # Ray's receive channel from the proxy failed (the client went away)
            raise ClientGone(f"the body could not be received ({type(err).__name__})") from None
        received += len(chunk)
        if received > limit_bytes:
            raise BodyTooLarge(f"body exceeds {limit_bytes} bytes (stopped reading at {received})")
        if chunk:
            chunks.append(chunk)
    return b"".join(chunks)


def _first_non_finite(obj, path: str = "") -> str | None:
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "the answer")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        where = _first_non_finite(value, f"{path}.{key}" if path else str(key))
        if where is not None:
            return where
    return None


def json_response(status: int, body: dict):
    """A Starlette ``Response`` with strict JSON; NaN / Infinity anywhere in ``body`` answer 500 naming where."""
    from starlette.responses import Response

    try:
        payload = json.dumps(body, allow_nan=False, separators=(",", ":"))
    except ValueError:
        where = _first_non_finite(body)
        status = 500
        payload = json.dumps({"error": f"the model gave a non-finite value (NaN or Inf) in {where} for this image; "
                                       f"the saved weights or the input are numerically broken"})
    except TypeError as err:  # not JSON-serialisable: a server bug, still answered in JSON
        status, payload = 500, json.dumps({"error": f"cannot encode the answer: {err}"})
    return Response(payload, status_code=status, media_type="application/json")
