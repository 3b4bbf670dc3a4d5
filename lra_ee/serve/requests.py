"""JSON request bodies: parse and bound them, then answer them through the deployment's batches.

    POST /classify   {"image": b64, "labels": [...]?, "templates": [...]?}  -> one /classify answer
                     {"images": [b64, ...], "labels"?, "templates"?}          -> {"results": [answer, ...]}
    POST /embed      {"image": b64} -> one /embed answer;  {"images": [b64, ...]} -> {"results": [...]}
    POST /embed_text {"texts": [...]} -> {"embeddings": [[...], ...]} (L2-normalised rows)

Images are base64 strings (standard alphabet, a ``data:image/...;base64,`` prefix allowed) of a
JPEG/PNG/WebP file. A body that breaks a limit, is not JSON, or holds bad base64 or a bad image gets
one ``400 {"error": ...}`` naming the field and the limit, before anything reaches a batch. Without
``labels`` a ``/classify`` image is scored against the stored classifier, as a raw body is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass

from ..errors import UserError
from .core import ItemResult
from .decode import BadImage
from .labels import DEFAULT_TEMPLATES, text_capable

MAX_IMAGES = 64  # images in one JSON request
MAX_LABELS = 1000  # labels of one /classify request
MAX_TEMPLATES = 100  # templates of one /classify request
MAX_PROMPTS = 20_000  # labels x templates (text-tower rows one request may ask for)
MAX_TEXTS = 256  # texts of one /embed_text request
MAX_TEXT_CHARS = 300  # characters of a label, template or text (the tokenizer keeps 77 tokens anyway)
JSON_ROUTES = ("embed", "classify", "embed_text")


class BadRequest(UserError, ValueError):
    """A JSON body this server cannot take (answered with HTTP 400, the message naming the field)."""


@dataclass(frozen=True)
class ImagesRequest:
    """``/embed`` or ``/classify``: the images (decoded from base64, not yet from their format), whether the
    answer is one object (``"image"``) or a list (``"images"``), and for ``/classify`` the label set."""

    images: tuple[bytes, ...]
    single: bool
    labels: tuple[str, ...] | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES


@dataclass(frozen=True)
class TextsRequest:
    texts: tuple[str, ...]


def looks_like_json(content_type: str | None, body: bytes) -> bool:
    """A JSON body: declared so, or starting with ``{`` (no image format does)."""
    if content_type and content_type.split(";")[0].strip().lower() == "application/json":
        return True
    return body.lstrip()[:1] == b"{"


def _b64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"{where}: a data URL must look like data:image/png;base64,<data>")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"{where} is not valid base64: {err}") from None
    if not data:
        raise BadRequest(f"{where} is empty: send a base64-encoded JPEG, PNG or WebP file")
    return data


def _strings(value, where: str, limit: int, *, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list of strings, got {type(value).__name__}")
    if not value and not allow_empty:
        raise BadRequest(f"{where} must not be empty")
    if len(value) > limit:
        raise BadRequest(f"{where} has {len(value)} entries, more than the limit of {limit}")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise BadRequest(f"{where}[{i}] must be a string, got {type(s).__name__}")
        if not s.strip():
            raise BadRequest(f"{where}[{i}] is empty")
        if len(s) > MAX_TEXT_CHARS:
            raise BadRequest(f"{where}[{i}] has {len(s)} characters, more than the limit of {MAX_TEXT_CHARS}")
    return tuple(value)


def _templates(value) -> tuple[str, ...]:
    templates = _strings(value, "templates", MAX_TEMPLATES)
    for i, t in enumerate(templates):
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise BadRequest(f"templates[{i}] must hold exactly one '{{}}' (where the label goes) and no other "
                             f"braces, got {t!r}")
    return templates


def parse(endpoint: str, body: bytes) -> ImagesRequest | TextsRequest:
    """A JSON request body of ``endpoint`` -> its request; :class:`BadRequest` naming what is wrong."""
    if endpoint not in JSON_ROUTES:
        raise BadRequest(f"no JSON endpoint /{endpoint}: {', '.join('/' + r for r in JSON_ROUTES)}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the JSON body must be an object, got {type(data).__name__}")
    allowed = {"embed": {"image", "images"}, "classify": {"image", "images", "labels", "templates"},
               "embed_text": {"texts"}}[endpoint]
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown} for /{endpoint}: it takes {sorted(allowed)}")
    if endpoint == "embed_text":
        if "texts" not in data:
            raise BadRequest('/embed_text takes {"texts": ["...", ...]}')
        return TextsRequest(_strings(data["texts"], "texts", MAX_TEXTS))
    if ("image" in data) == ("images" in data):
        raise BadRequest(f'/{endpoint} takes either "image" (one base64 string) or "images" (a list of them)')
    if "image" in data:
        images, single = (_b64(data["image"], "image"),), True
    else:
        raw = data["images"]
        if not isinstance(raw, list) or not raw:
            raise BadRequest('"images" must be a non-empty list of base64 strings')
        if len(raw) > MAX_IMAGES:
            raise BadRequest(f'"images" has {len(raw)} entries, more than the limit of {MAX_IMAGES}')
        images, single = tuple(_b64(v, f"images[{i}]") for i, v in enumerate(raw)), False
    labels, templates = None, DEFAULT_TEMPLATES
    if "labels" in data:
        labels = _strings(data["labels"], "labels", MAX_LABELS)
        if len(set(labels)) != len(labels):
            raise BadRequest("labels must be distinct")
    if "templates" in data:
        if labels is None:
            raise BadRequest('"templates" needs "labels"')
        templates = _templates(data["templates"])
    if labels is not None and len(labels) * len(templates) > MAX_PROMPTS:
        raise BadRequest(f"{len(labels)} labels x {len(templates)} templates = {len(labels) * len(templates)} "
                         f"prompts, more than the limit of {MAX_PROMPTS}")
    return ImagesRequest(images, single, labels, templates)


async def answer(server, endpoint: str, body: bytes) -> ItemResult:
    """Answer a JSON request on ``server`` (an ``ImageModelServer``): images decoded on its decode pool, the
    text tower on its model thread, every image through its batches (``server._infer``)."""
    core = server.core
    try:
        req = parse(endpoint, body)
        if isinstance(req, TextsRequest) or req.labels is not None:
            if not text_capable(core.engine):
                raise BadRequest("this model has no text tower: labels and /embed_text need a QuantCLIP model "
                                 "directory (QuantCLIP.save)")
        elif endpoint == "classify" and not core.has_classifier:
            raise BadRequest('this model has no stored classifier: send "labels" with the image, or use /embed')
    except BadRequest as err:
        return ItemResult(400, {"error": str(err)})
    loop = asyncio.get_running_loop()
    if isinstance(req, TextsRequest):
        try:
            rows = await loop.run_in_executor(server._model_thread, core.labels.rows, req.texts)
        except Exception as err:  # the text tower failed: 500 to this request only
            return ItemResult(500, {"error": f"text tower failed: {type(err).__name__}: {err}"})
        return ItemResult(200, {"embeddings": rows.cpu().tolist()})
    where = ["image"] if req.single else [f"images[{i}]" for i in range(len(req.images))]
    decoded = await asyncio.gather(*(loop.run_in_executor(server._decode_pool, core.prepare, b) for b in req.images),
                                   return_exceptions=True)
    for name, out in zip(where, decoded):
        if isinstance(out, BadImage):
            return ItemResult(400, {"error": f"{name}: {out}"})
        if isinstance(out, BaseException):
            raise out
    labels = None
    if req.labels is not None:
        try:
            labels = await loop.run_in_executor(server._model_thread, core.labels.get, req.labels, req.templates)
        except Exception as err:
            return ItemResult(500, {"error": f"text tower failed: {type(err).__name__}: {err}"})
    items = [(endpoint, image) if labels is None else (endpoint, image, labels) for image in decoded]
    results = await asyncio.gather(*(server._infer(item) for item in items))
    failed = next((r for r in results if r.status != 200), None)
    if failed is not None:
        return failed
    return results[0] if req.single else ItemResult(200, {"results": [r.body for r in results]})
