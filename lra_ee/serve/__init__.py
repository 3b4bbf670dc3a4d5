"""Serve a saved ``QuantEarlyExitViT`` over HTTP on Ray Serve (``lra-ee serve``; extra ``serve``).

    POST /embed      body: a JPEG/PNG/WebP file -> {"embedding": [...], "exit_layer": int}
    POST /classify   body: a JPEG/PNG/WebP file -> {"label", "name", "score", "top5", "exit_layer"}
    GET  /healthz    -> {"status": "ok", ...model and replica batching statistics}

and JSON bodies: base64 images, several per request, per-request labels, ``POST /embed_text``.

One module per responsibility:

- ``decode``: request body -> preprocessed image (``BadImage`` -> HTTP 400);
- ``engines``: the model seam (``QuantEngine``, ``OpenClipEngine``, ``ClipEngine``, ``load_engine``);
- ``labels``: per-request label sets (cached text embeddings, where their images may exit);
- ``requests``: JSON request bodies (parsing, limits, answering them through the batches);
- ``core``: the Ray-free inference core (``InferenceCore``: prepare one body, run a batch);
- ``deployment``: the Ray Serve deployment (``ImageModelServer``, ``build_app``, ``app_builder``, ``start``);
- ``cli``: the ``lra-ee serve`` command.

The names below are re-exported lazily (``lra_ee.serve:app_builder`` is the import path of a Serve
config), so importing this package imports neither Ray nor a model.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "decode": ("BadImage", "IMAGE_FORMATS", "MAX_PIXELS", "build_transform", "decode_image", "preprocess_body"),
    "engines": ("ClipEngine", "Engine", "EngineOutput", "ModelSource", "OpenClipEngine", "QuantEngine", "as_engine",
                "load_engine"),
    "labels": ("LabelBank", "LabelSet", "label_route"),
    "requests": ("BadRequest", "JSON_ROUTES", "MAX_IMAGES", "MAX_LABELS", "MAX_TEMPLATES", "MAX_TEXTS"),
    "core": ("ENDPOINTS", "TOP_K", "InferenceCore", "ItemResult"),
    "deployment": ("APP_NAME", "DEPLOYMENT_NAME", "INSTALL_HINT", "MAX_BODY_BYTES", "ImageModelServer", "app_builder",
                   "build_app", "start"),
    "cli": ("serve_main",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
