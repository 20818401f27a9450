"""The OpenAPI 3.1 description of ``/api/v1/`` (served as ``GET /api/v1/openapi.json``).

Hand-written next to the routes (``tests/test_api.py`` checks that every route is described
and nothing else is); the schemas are those of the JSON the handlers build.
"""

from __future__ import annotations

from typing import Any

from cxr_worker import __version__
from cxr_worker.web.auth import COOKIE, CSRF_HEADER
from cxr_worker.worklist.studies import BANDS, READ_FILTERS, STATUS_FILTERS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), "see the message")
_PNG = {"description": "PNG", "content": {"image/png": {"schema": {"type": "string",
                                                                    "format": "binary"}}}}
_NULL_STR = {"type": ["string", "null"]}
_NULL_TIME = {"type": ["string", "null"], "format": "date-time"}
_NULL_NUM = {"type": ["number", "null"]}


def _op(summary: str, responses: dict[str, Any], *, role: str | None = "reader",
        params: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
        tag: str = "worklist") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {**responses}}
    if role is None:
        op["security"] = []
    else:
        op["description"] = f"Role: {role}."
        op["responses"].update({"401": _ERROR, "403": _ERROR})
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
            "description": description}


_UID = _path("uid", "Study Instance UID")
_SOP = _path("sop", "SOP Instance UID (of a received image)")
_SIZE = _q("size", {"type": "integer", "minimum": 64, "maximum": 1024, "default": 256},
           "longest side in pixels")
_LIMIT = _q("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
            "rows per page; more are behind 'next', never cut silently")

_DELIVERY_STATUS = {"enum": ["pending", "retrying", "sent", "failed", "held", "cancelled"],
                    "description": "failed: dead-lettered after jobs.max_attempts (the result "
                    "is undelivered); cancelled: replaced before it reached its destination"}
_KIND = {"enum": ["sc", "sr", "kos", "hl7"],
         "description": "sc Secondary Capture, sr Structured Report, kos rejection note (to "
         "the PACS); hl7 ORU^R01 (to the RIS)"}
_STUDY_DELIVERY = {"type": "object", "properties": {
    "kind": _KIND, "status": _DELIVERY_STATUS, "attempts": {"type": "integer"},
    "last_error": _NULL_STR}}
_DELIVERY = {"type": "object", "properties": {
    "kind": _KIND, "status": _DELIVERY_STATUS, "attempts": {"type": "integer"},
    "last_error": _NULL_STR,
    "result_uid": {"type": "string", "description": "SOP Instance UID (hl7: MSH-10)"},
    "label": _NULL_STR, "threshold": _NULL_NUM, "model_version": _NULL_STR,
    "sent_at": _NULL_TIME, "superseded_at": _NULL_TIME,
    "superseded_by": {**_NULL_STR, "description": "the result UID that replaced it"},
    "rejected_by": {**_NULL_STR, "description": "the rejection note (KOS) that withdrew it"}}}

_STUDY = {
    "type": "object",
    "properties": {
        "study_instance_uid": {"type": "string"}, "accession_number": {"type": "string"},
        "status": {"enum": ["pending", "scored", "sent", "retrying", "undelivered", "held",
                            "not_scored", "failed"],
                   "description": "undelivered: a delivery failed for good (the study keeps "
                   "its result and place; POST /instances/{sop}/retry sends it again); "
                   "failed: an image's processing failed"},
        "label": {"enum": ["SUSPECTED PNEUMONIA", "NO PNEUMONIA DETECTED", "NOT SCORED",
                           "PENDING", "FAILED"]},
        "deliveries": {"type": "array", "items": _STUDY_DELIVERY,
                       "description": "per output kind, the worst state of the study's "
                       "images' current deliveries"},
        "probability": _NULL_NUM, "threshold": _NULL_NUM, "model_version": _NULL_STR,
        "population": {"enum": ["in_population", "outside", "unknown"]},
        "reason": _NULL_STR, "images": {"type": "integer"},
        "received_at": {"type": "string", "format": "date-time",
                        "description": "the study's first image (waiting since)"},
        "study_datetime": {**_NULL_STR,
                           "description": "Study Date + Study Time as the modality wrote "
                           "them: its local time, ISO 8601 without a zone (not converted); "
                           "null when no image had a usable Study Date"},
        "scored_at": _NULL_TIME, "sent_at": _NULL_TIME, "band": {"enum": list(BANDS)},
        "read_by": _NULL_STR, "read_at": _NULL_TIME,
        "key_sop_instance_uid": {**_NULL_STR,
                                 "description": "the image the row shows: the most "
                                 "suspicious scored one, else the first received"},
        "urls": {"type": "object", "properties": {"self": {"type": "string"},
                                                  "thumbnail": {"type": "string"},
                                                  "heatmap": {"type": "string"}}},
    },
}
_INSTANCE = {
    "type": "object",
    "properties": {
        "sop_instance_uid": {"type": "string"}, "series_instance_uid": {"type": "string"},
        "status": {"enum": ["received", "scored", "retrying", "undelivered", "held", "sent",
                            "not_scored", "failed"]},
        "delivery": {"enum": ["sent", "retrying", "undelivered", "held", "waiting", None],
                     "description": "its current deliveries together (the worst): waiting: "
                     "built, not sent yet (queued, or sending paused); null: none (no "
                     "result, or no output with a destination)"},
        "deliveries": {"type": "array", "items": _DELIVERY,
                       "description": "the current delivery of each output"},
        "superseded": {"type": "array", "items": _DELIVERY,
                       "description": "deliveries a later decision replaced"},
        "label": _NULL_STR, "probability": _NULL_NUM, "threshold": _NULL_NUM,
        "model_version": _NULL_STR, "population": {"type": "string"}, "reason": _NULL_STR,
        "attempts": {"type": "integer"},
        "send_attempts": {"type": "integer",
                          "description": "the most attempts among its current deliveries"},
        "received_at": {"type": "string", "format": "date-time"}, "scored_at": _NULL_TIME,
        "sent_at": _NULL_TIME, "result_sop_instance_uid": _NULL_STR,
        "heatmap_available": {"type": "boolean"},
        "urls": {"type": "object", "properties": {"thumbnail": {"type": "string"},
                                                  "heatmap": {"type": "string"}}},
    },
}
_SESSION = {"type": "object", "properties": {
    "name": {"type": "string"}, "role": {"enum": ["reader", "admin"]},
    "via": {"enum": ["session", "bearer", "none"]}, "csrf_token": _NULL_STR,
    "expires_at": _NULL_TIME}}
_SENDING = {"type": "object", "properties": {
    "sending_paused": {"type": "boolean"}, "updated_by": _NULL_STR, "updated_at": _NULL_TIME}}


def spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "cxr-worker worklist API", "version": __version__,
                 "description": "The triage worklist of cxr-worker (a triage aid, not a "
                 "diagnosis). Authenticate with 'Authorization: Bearer <token>' (cxr-worker "
                 f"token create) or the '{COOKIE}' cookie from POST /api/v1/session; with the "
                 f"cookie, POST and DELETE need the {CSRF_HEADER} header."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": COOKIE}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}},
                          "required": ["error"]},
                "Study": _STUDY, "Instance": _INSTANCE, "Session": _SESSION,
                "Sending": _SENDING},
        },
    }


def _paths() -> dict[str, Any]:
    paths = _described()
    for ops in paths.values():
        for method, op in ops.items():
            if method in ("post", "delete") and op.get("security") != []:
                op["description"] += (f" With the session cookie, send the {CSRF_HEADER} "
                                      "header.")
                op["parameters"] = [*op.get("parameters", []), {
                    "name": CSRF_HEADER, "in": "header", "required": False,
                    "schema": {"type": "string"},
                    "description": "required with the session cookie (csrf_token)"}]
    return paths


def _described() -> dict[str, Any]:
    studies_page = {"type": "object", "properties": {
        "studies": {"type": "array", "items": _ref("Study")},
        "next": {**_NULL_STR, "description": "cursor of the next page; null on the last"},
        "limit": {"type": "integer"}, "version": {"type": "integer"},
        "now": {"type": "string", "format": "date-time"}}}
    return {
        "/api/v1/health": {"get": _op(
            "Readiness of this process (as /readyz) with mode, version and auth",
            {"200": _json({"type": "object"}), "503": _json({"type": "object"}, "not ready")},
            role=None, tag="service")},
        "/api/v1/openapi.json": {"get": _op("This description", {"200": _json(
            {"type": "object"})}, role=None, tag="service")},
        "/api/v1/session": {
            "post": _op("Sign in with a token: sets the HttpOnly session cookie",
                        {"200": _json(_ref("Session")), "400": _ERROR, "401": _ERROR,
                         "415": _ERROR}, role=None, tag="session",
                        body={"type": "object", "properties": {"token": {"type": "string"}},
                              "required": ["token"]}),
            "get": _op("Who am I; the CSRF token of this session",
                       {"200": _json(_ref("Session"))}, tag="session"),
            "delete": _op("Sign out (ends the session, clears the cookie)",
                          {"200": _json({"type": "object"})}, tag="session")},
        "/api/v1/studies": {"get": _op(
            "The triage list: bands suspected, outside, routine, not_scored, pending, failed",
            {"200": {**_json(studies_page), "headers": {"ETag": {"schema": {
                "type": "string"}}}}, "304": {"description": "unchanged (If-None-Match)"},
             "400": _ERROR},
            params=[
                _q("status", {"enum": list(STATUS_FILTERS)}, "study status, or suspected"),
                _q("band", {"enum": list(BANDS)}, "one band"),
                _q("since", {"type": "string", "format": "date-time"},
                   "studies with an image received since (UTC unless a zone is given)"),
                _q("accession", {"type": "string"}, "accession number, exactly"),
                _q("read", {"enum": list(READ_FILTERS), "default": "unread"},
                   "unread: the active list"),
                _LIMIT, _q("cursor", {"type": "string"}, "the 'next' of the previous page")])},
        "/api/v1/studies/{uid}": {"get": _op(
            "One study with its images (reasons, model version, threshold, times, delivery)",
            {"200": _json({"type": "object", "properties": {
                "study": _ref("Study"), "instances": {"type": "array",
                                                      "items": _ref("Instance")},
                "sending_paused": {"type": "boolean"}, "version": {"type": "integer"},
                "now": {"type": "string"}}}), "304": {"description": "unchanged"},
             "404": _ERROR}, params=[_UID])},
        "/api/v1/studies/{uid}/read": {
            "post": _op("Mark the study read (who: the token's name); it leaves the list",
                        {"200": _json({"type": "object"}), "404": _ERROR}, params=[_UID]),
            "delete": _op("Put the study back on the active list",
                          {"200": _json({"type": "object"}), "404": _ERROR}, params=[_UID])},
        "/api/v1/studies/{uid}/replay": {"post": _op(
            "Replay the study's stored images through the pipeline",
            {"202": _json({"type": "object", "properties": {"requeued": {"type": "integer"}}}),
             "404": _ERROR, "409": _ERROR}, role="admin", params=[_UID], tag="admin")},
        "/api/v1/instances/{sop}/thumbnail.png": {"get": _op(
            "The received image, downscaled", {"200": _PNG, "400": _ERROR, "404": _ERROR},
            params=[_SOP, _SIZE])},
        "/api/v1/instances/{sop}/heatmap.png": {"get": _op(
            "The image under its Grad-CAM heatmap (404 when it has none)",
            {"200": _PNG, "400": _ERROR, "404": _ERROR}, params=[_SOP, _SIZE])},
        "/api/v1/instances/{sop}/retry": {"post": _op(
            "Retry a dead letter: queue its failed deliveries again (send), or process it "
            "again when its processing failed (process)",
            {"202": _json({"type": "object", "properties": {
                "retry": {"enum": ["send", "process"]}}}), "404": _ERROR, "409": _ERROR},
            role="admin", params=[_SOP], tag="admin")},
        "/api/v1/sending/pause": {"post": _op(
            "Pause sending results to the PACS and the RIS (kept across restarts)",
            {"200": _json(_ref("Sending"))}, role="admin", tag="admin")},
        "/api/v1/sending/resume": {"post": _op(
            "Resume sending results", {"200": _json(_ref("Sending"))},
            role="admin", tag="admin")},
        "/api/v1/admin/summary": {"get": _op(
            "Images per status, queue depth, dead letters, sending, the PACS's last C-ECHO",
            {"200": _json({"type": "object"})}, role="admin", tag="admin")},
        "/api/v1/admin/dead-letters": {"get": _op(
            "Images whose processing failed or with an undelivered result, oldest first",
            {"200": _json({"type": "object", "properties": {
                "instances": {"type": "array", "items": _ref("Instance")},
                "next": _NULL_STR}}), "400": _ERROR},
            role="admin", params=[_LIMIT, _q("cursor", {"type": "string"}, "'next'")],
            tag="admin")},
        "/api/v1/events": {"get": _op(
            "Server-sent events: 'changed' with {\"version\": N} when the list changes",
            {"200": {"description": "text/event-stream", "content": {
                "text/event-stream": {"schema": {"type": "string"}}}}})},
    }
