"""The Ray Serve application: a FastAPI ingress over the library's segmentation engine (labelshift.serving).

    serve run serve/config.yaml          # or: make serve

Endpoints: ``POST /v1/segment`` (raw image body or multipart), ``GET|PUT /v1/priors``, ``GET /healthz``,
``GET /`` (an upload page), OpenAPI at ``/docs``. Errors are JSON ``{"error": ..., "detail": ...}``, overload
included (the replica's own admission answers 503 before Serve's plain-text one would). Decoding, limits, the
maths and the answers live in the library; this module reads HTTP and batches.
"""
import asyncio
import json
import os
from pathlib import Path
from typing import AsyncIterator

import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from labelshift.bundle import apply_overrides_file, load_bundle
from labelshift.data.decode import MEDIA_TYPES, ImageInputError, ImageLimits, decode_image, media_format
from labelshift.priors import ClassPrior
from labelshift.runtime import apply_runtime
from labelshift.serving import ParameterError, SegmentationEngine, SegmentOptions, ServeSettings
from labelshift.serving.admission import RETRY_AFTER_S, Admission, Overloaded
from labelshift.serving.auth import check_mutation
from labelshift.serving.encode import mask_png, overlay_png, segmentation_document
from labelshift.serving.settings import TAU_RANGE, TEMPERATURE_RANGE, TOKEN_ENV, AdjustMode, OutputFormat

MULTIPART_OVERHEAD = 64 * 1024  # bytes of multipart framing allowed beyond the image byte limit
MAX_PRIOR_BYTES = 1024 * 1024
PAGE = (Path(__file__).parent / "static" / "index.html").read_text()

api = FastAPI(title="labelshift segmentation", version="1",
              description="Semantic segmentation with label-shift correction (Inference Adjustment).")


def _error(status: int, error: str, detail) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


@api.exception_handler(RequestValidationError)
async def _bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _error(422, "bad_parameters", detail)


@api.exception_handler(ParameterError)
async def _unusable_parameters(request: Request, exc: ParameterError) -> JSONResponse:
    return _error(422, "bad_parameters", str(exc))


@api.exception_handler(ImageInputError)
async def _bad_image(request: Request, exc: ImageInputError) -> JSONResponse:
    return _error(exc.status, exc.reason, exc.detail)


@api.exception_handler(Overloaded)
async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    answer = _error(503, "overloaded", exc.detail)
    answer.headers["Retry-After"] = str(RETRY_AFTER_S)
    return answer


async def _capped(stream: AsyncIterator[bytes], limit: int, what: str) -> AsyncIterator[bytes]:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise ImageInputError(413, "too_large", f"{what} passed {limit} bytes; the limit is {limit} bytes")
        yield chunk


async def read_upload(request: Request, limits: ImageLimits) -> tuple[bytes, str | None]:
    """(image bytes, declared format or None) of a raw ``image/png|jpeg`` body or a multipart upload (field
    ``image``, else the first file), the byte limit enforced while reading."""
    content_type = request.headers.get("content-type", "")
    declared_length = request.headers.get("content-length", "")
    multipart = content_type.lower().startswith("multipart/form-data")
    limit = limits.max_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    if declared_length.isdigit() and int(declared_length) > limit:
        raise ImageInputError(413, "too_large", f"Content-Length {declared_length}; the limit is {limit} bytes")
    if not multipart:
        declared = media_format(content_type)
        return b"".join([chunk async for chunk in _capped(request.stream(), limit, "the body")]), declared
    try:
        form = await MultiPartParser(request.headers, _capped(request.stream(), limit, "the upload"), max_files=1,
                                     max_fields=8).parse()
    except MultiPartException as error:
        raise ImageInputError(400, "corrupt", f"malformed multipart body: {error.message}") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    upload = form.get("image") if isinstance(form.get("image"), UploadFile) else (files[0] if files else None)
    if upload is None:
        raise ImageInputError(400, "corrupt", "the multipart body holds no file (send it as the 'image' field)")
    data = await upload.read()
    await form.close()
    part_type = (upload.content_type or "").split(";", 1)[0].strip().lower()
    declared = MEDIA_TYPES.get(part_type)
    if declared is None and part_type not in ("", "application/octet-stream"):
        media_format(part_type)  # a declared type that is not an image we take: 415
    return data, declared


def _http_bind_host() -> str | None:
    """The address Serve's HTTP proxies bind (None when it cannot be read: treated as not loopback)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - any failure means "unknown", which refuses unauthenticated changes
        return None


@serve.deployment(name="Segmenter")
@serve.ingress(api)
class Segmenter:
    """One replica: a bundle's model and priors, batched inference, hot-swappable priors."""

    def __init__(self, settings: dict) -> None:
        self.settings = ServeSettings.model_validate(settings)
        bundle = load_bundle(self.settings.bundle)
        if self.settings.overrides:
            bundle = apply_overrides_file(bundle, self.settings.overrides)
        apply_runtime(self.settings.torch_threads or bundle.config.runtime.torch_threads,
                      bundle.config.runtime.deterministic)
        self.engine = SegmentationEngine(bundle, device=self.settings.device,
                                         default_adjust=self.settings.default_adjust, online=self.settings.online)
        self.token = self.settings.token or os.environ.get(TOKEN_ENV) or None
        self.bind_host = _http_bind_host()
        queued = self.settings.max_queued_requests
        self.admission = Admission(self.settings.max_ongoing_requests, None if queued == -1 else queued)
        self._segment_batch.set_max_batch_size(self.settings.max_batch_size)
        self._segment_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        """Serve's ``user_config`` (at start, and whenever it changes): the target prior / IA settings laid over the
        bundle's and the overrides', swapped in place (no restart)."""
        self.engine.reconfigure(user_config)

    def check_health(self) -> None:
        """Serve replaces the replica when this raises (the model no longer answers)."""
        self.engine.check_health()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _segment_batch(self, requests: list[tuple]) -> list:
        images, options = [image for image, _ in requests], [option for _, option in requests]
        return await asyncio.to_thread(self.engine.segment, images, options)

    @api.post("/v1/segment", summary="Segment one image (PNG/JPEG as the raw body, or multipart field 'image')")
    async def segment(self, request: Request, adjust: AdjustMode | None = None,
                      temperature: float | None = Query(None, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1]),
                      tau_source: float | None = Query(None, ge=TAU_RANGE[0], le=TAU_RANGE[1]),
                      tau_target: float | None = Query(None, ge=TAU_RANGE[0], le=TAU_RANGE[1]),
                      output_format: OutputFormat = Query("png", alias="format")) -> Response:
        options = SegmentOptions(adjust or self.engine.default_adjust, temperature, tau_source, tau_target)
        self.engine.check_options(options)
        async with self.admission.admit():  # 503 (JSON) at once when the replica is full
            data, declared = await read_upload(request, self.settings.limits)
            image = await asyncio.to_thread(decode_image, data, self.settings.limits, declared)
            result = await self._segment_batch((image, options))
        headers = {"X-Labelshift-Adjust": result.adjust, "X-Labelshift-Prior": result.prior or "none"}
        if output_format == "json":
            return JSONResponse(segmentation_document(result.mask, self.engine.class_names, self.engine.palette,
                                                      result.info()), headers=headers)
        if output_format == "overlay":
            encoded = await asyncio.to_thread(overlay_png, image, result.mask, self.engine.palette)
        else:
            encoded = await asyncio.to_thread(mask_png, result.mask, self.engine.palette)
        return Response(encoded, media_type="image/png", headers=headers)

    @api.get("/v1/priors", summary="The target prior, IA settings and online tracking state")
    async def get_priors(self) -> dict:
        return self.engine.priors_document()

    @api.put("/v1/priors", summary="Replace the target prior (a ClassPrior JSON document)")
    async def put_priors(self, request: Request) -> Response:
        refusal = check_mutation(self.token, request.headers.get("authorization"), self.bind_host,
                                 request.client.host if request.client else None)
        if refusal is not None:
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            return JSONResponse({"error": refusal.reason, "detail": refusal.detail}, refusal.status, headers)
        body = b"".join([chunk async for chunk in _capped(request.stream(), MAX_PRIOR_BYTES, "the prior")])
        try:
            self.engine.set_target_prior(ClassPrior.from_dict(json.loads(body)))
        except (ValueError, TypeError, AttributeError) as error:
            return _error(422, "bad_prior", str(error))
        return JSONResponse(self.engine.priors_document())

    @api.get("/healthz", summary="The model answers")
    async def healthz(self) -> dict:
        await asyncio.to_thread(self.engine.check_health)
        bundle = self.engine.bundle
        return {"status": "ok", "model_stage": bundle.model_stage, "model_sha256": bundle.model_sha256,
                "prior_corrected": bundle.prior_corrected, "replica": serve.get_replica_context().replica_tag,
                "pid": os.getpid(), "actor_id": ray.get_runtime_context().get_actor_id(),
                "requests": self.admission.state()}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)


def build_app(args: dict) -> serve.Application:
    """The application of ``serve/config.yaml`` (``import_path: serve.app:build_app``); ``args`` are
    :class:`ServeSettings` (the YAML sets ``user_config`` per deployment)."""
    return make_app(args)


def make_app(args: dict, user_config: dict | None = None) -> serve.Application:
    """The application for ``args`` (:class:`ServeSettings`) and an optional ``user_config`` (the priors and IA
    settings, for Python callers). The bundle path is resolved here (the replicas' working directory differs)."""
    settings = ServeSettings.model_validate(args)
    bundle_dir = Path(settings.bundle).resolve()
    load_bundle(bundle_dir)  # a missing or broken bundle fails the deploy with its reason
    overrides = str(Path(settings.overrides).resolve()) if settings.overrides else None
    resolved = settings.model_copy(update={"bundle": str(bundle_dir), "overrides": overrides,
                                           "token": settings.token or os.environ.get(TOKEN_ENV) or None})
    return Segmenter.options(
        **settings.serve_options(), health_check_period_s=settings.health_check_period_s,
        ray_actor_options={"num_cpus": settings.num_cpus},
        **({"user_config": user_config} if user_config is not None else {})).bind(resolved.model_dump())
