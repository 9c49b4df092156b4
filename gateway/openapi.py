"""The gateway's OpenAPI 3.1 document, generated from the msgspec types.

Routes are declared once in the route table (:mod:`dovecote.gateway.routing`),
which generates each view and registers it here; hand-written (streaming)
views use :meth:`ApiRegistry.route` directly. Either way it both registers the
Quart view and records the operation: the request and response Structs that
validate traffic are the ones the document describes, so the two cannot drift.

Error shapes: an operation documents the error body it really sends. The
platform's own is :class:`~dovecote.gateway.errors.Error` (the ``default``
response); a route that speaks another system's wire shape names its own
(``error=``, and explicit statuses in ``responses``, :class:`AnyOf` where one
status has several shapes), and registers with :meth:`ApiRegistry.error_shape`
how the app's own answers under its path prefix (405, 413, an unknown path,
an unexpected failure) are rendered, so those keep the documented shape too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from dovecote.gateway.errors import Error

__all__ = ["AnyOf", "ApiRegistry", "ErrorRenderer", "Operation"]

ErrorRenderer = Callable[[int, str, str], Any]
"""``render(status, code, message)``: the HTTP response of an error in a route family's own shape."""


class AnyOf:
    """A response documented as any of several types (``anyOf`` in the document)."""

    def __init__(self, *types: Any) -> None:
        self.types = types


class Operation(msgspec.Struct, kw_only=True):
    """One documented operation."""

    method: str
    path: str
    summary: str
    tags: list[str]
    request: Any = None
    request_content: str = "application/json"
    """The request body's media type (``multipart/form-data`` for uploads)."""
    query: Any = None
    responses: dict[int, Any] = {}
    security: bool = True
    operation_id: str = ""
    error: Any = None
    """The error body of statuses not listed in ``responses`` (``Error`` when unset)."""
    descriptions: dict[int, str] = {}
    streams: bool = False
    """A hand-written view, for a stream (SSE, WebSocket, relay, streaming up/download)."""
    declared: Any = None
    """The route table entry (:class:`~dovecote.gateway.routing.Route`) the view was generated from,
    or None for a hand-written (streaming) view."""
    view: Any = None


class ApiRegistry:
    """Collects operations and renders the OpenAPI document."""

    def __init__(self, title: str, version: str, description: str = "") -> None:
        self.title = title
        self.version = version
        self.description = description
        self.operations: list[Operation] = []
        self._cache: dict[str, Any] | None = None
        self._error_shapes: list[tuple[str, ErrorRenderer]] = []

    def error_shape(self, prefix: str, render: ErrorRenderer) -> None:
        """Render the app's own error answers under ``prefix`` with ``render``."""
        self._error_shapes.append((prefix, render))
        self._error_shapes.sort(key=lambda entry: -len(entry[0]))

    def render_error(self, path: str, status: int, code: str, message: str) -> Any:
        """The response of an error on ``path`` in its routes' shape, or None for the platform's own."""
        for prefix, render in self._error_shapes:
            if path.startswith(prefix):
                return render(status, code, message)
        return None

    def route(self, app: Any, method: str, path: str, *, summary: str, tags: list[str],
              request: Any = None, responses: dict[int, Any] | None = None,
              security: bool = True, query: Any = None,
              request_content: str = "application/json", error: Any = None,
              descriptions: dict[int, str] | None = None, declared: Any = None,
              streams: bool = False,
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a Quart view for ``method path`` and document it.

        ``path`` uses OpenAPI's ``{name}`` placeholders; they become Quart's
        ``<name>`` converters. ``query`` is a Struct whose fields are the
        operation's query parameters. ``request_content`` is the body's media
        type (the ``request`` Struct then describes its form fields).
        ``error`` is the body of the error statuses ``responses`` does not
        list (the platform's ``Error`` when unset); ``descriptions`` says
        when an explicit status is answered (e.g. a documented 503's codes).
        ``declared`` is the route table entry of a generated view
        (:func:`~dovecote.gateway.routing.register_routes`); hand-written
        views are for streams only and say so (``streams=True``).
        """

        def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
            quart_path = path.replace("{", "<").replace("}", ">")
            app.add_url_rule(quart_path, view.__name__ + "_" + method.lower(), view,
                             methods=[method])
            self.operations.append(Operation(
                method=method.lower(), path=path, summary=summary, tags=tags,
                request=request, request_content=request_content, query=query,
                responses=responses or {200: None},
                security=security,
                operation_id=view.__name__, error=error,
                descriptions=descriptions or {}, declared=declared, streams=streams,
                view=view))
            self._cache = None
            return view

        return decorate

    def stream(self, app: Any, method: str, path: str, view: Callable[..., Any], *, summary: str,
               tags: list[str], rule: str = "", websocket: bool = False, name: str = "",
               responses: dict[int, Any] | None = None, security: bool = True,
               request: Any = None, request_content: str = "application/json") -> None:
        """Serve and document a hand-written streaming view (an SSE or streamed body, a WebSocket, a relay).

        ``rule`` is the Quart rule when it needs converters (``<path:name>``);
        by default it is ``path`` with ``{name}`` as ``<name>``. ``name`` is the
        endpoint and operation id (default: the view's name).
        """
        name = name or view.__name__
        quart_rule = rule or path.replace("{", "<").replace("}", ">")
        if websocket:
            app.add_websocket(quart_rule, name, view)
        else:
            app.add_url_rule(quart_rule, name, view, methods=[method])
        self.operations.append(Operation(
            method=method.lower(), path=path, summary=summary, tags=tags, request=request,
            request_content=request_content, responses=responses or {200: None}, security=security,
            operation_id=name, streams=True, view=view))
        self._cache = None

    def document(self) -> dict[str, Any]:
        """Return the OpenAPI 3.1 document (built once, then cached)."""
        if self._cache is not None:
            return self._cache
        types: list[Any] = [Error]
        for op in self.operations:
            if op.request is not None:
                types.append(op.request)
            for t in [*op.responses.values(), op.error]:
                types.extend(t.types if isinstance(t, AnyOf) else [t] if t is not None else [])
        schemas, components = msgspec.json.schema_components(
            types, ref_template="#/components/schemas/{name}")
        refs = dict(zip(map(id, types), schemas, strict=True))

        def ref(t: Any) -> Any:
            if isinstance(t, AnyOf):
                return {"anyOf": [refs[id(member)] for member in t.types]}
            return refs[id(t)]

        paths: dict[str, dict[str, Any]] = {}
        for op in self.operations:
            entry: dict[str, Any] = {
                "operationId": op.operation_id,
                "summary": op.summary,
                "tags": op.tags,
                "responses": {},
            }
            if not op.security:
                entry["security"] = []
            params = [seg[1:-1] for seg in op.path.split("/") if seg.startswith("{")]
            parameters = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in params
            ]
            if op.query is not None:
                parameters.extend(_query_parameters(op.query))
            if parameters:
                entry["parameters"] = parameters
            if op.request is not None:
                entry["requestBody"] = {
                    "required": True,
                    "content": {op.request_content: {"schema": refs[id(op.request)]}},
                }
            for status, rtype in sorted(op.responses.items()):
                response: dict[str, Any] = {"description": op.descriptions.get(status)
                                            or _describe(status)}
                if rtype is not None:
                    response["content"] = {"application/json": {"schema": ref(rtype)}}
                entry["responses"][str(status)] = response
            entry["responses"].setdefault("default", {
                "description": "Error",
                "content": {"application/json": {"schema": ref(op.error or Error)}},
            })
            paths.setdefault(op.path, {})[op.method] = entry
        self._cache = {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version,
                     "description": self.description},
            "paths": paths,
            "components": {
                "schemas": components,
                "securitySchemes": {
                    "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                    "SessionCookie": {"type": "apiKey", "in": "cookie", "name": "wrenn_sid"},
                },
            },
            "security": [{"ApiKeyAuth": []}, {"SessionCookie": []}],
        }
        return self._cache


def _query_parameters(query: Any) -> list[dict[str, Any]]:
    schema = msgspec.json.schema(query)
    body = schema["$defs"][schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
    required = set(body.get("required", []))
    return [{"name": name, "in": "query", "required": name in required, "schema": prop}
            for name, prop in body.get("properties", {}).items()]


def _describe(status: int) -> str:
    return {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
            503: "Service Unavailable"}.get(status, str(status))
