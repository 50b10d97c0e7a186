"""The scoring service: ``build_app(settings)`` returns the FastAPI app; one ``Detector`` loads in its lifespan.

Routes: ``POST /v1/score`` (multipart files -> ``lare2 score``'s rows), ``GET /v1/info``, ``/healthz``,
``/readyz``, ``/metrics`` (Prometheus), ``/docs`` (OpenAPI), and the web page at ``/`` with its
files under ``/static``. Uploads are scored from their bytes: the service never opens a path a
client names, and a file name is only a label (and, for runs trained with class prompts, the
GenImage-style source of the image's class, as in ``lare2 score``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from lare2.serve.batching import BatchScorer, QueueFull
from lare2.serve.guards import BearerToken, ByteBudget, UploadLimits
from lare2.serve.metrics import MetricsMiddleware, ServeMetrics

if TYPE_CHECKING:
    from lare2.detect import Detector, Result

STATIC = Path(__file__).resolve().parent / "static"
SERVICE_PACKAGES = ("fastapi", "starlette", "uvicorn", "python-multipart", "prometheus-client")
NO_NAME_PHRASE = "an in-memory image has no file name"
"""How ``Detector`` explains a class-prompt image without a class; an upload has a name, so the row names it."""


@dataclass(kw_only=True)
class ServeSettings:
    """``lare2 serve``'s settings: the model options of ``lare2 score``, then the service's limits."""

    run: str
    """A finished run (``lare2 train --out``)."""
    sd: str | None = None
    """Latent diffusion weights, when not where the run recorded them."""
    clip: str | None = None
    """CLIP weights, when not where the run recorded them."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    threshold: float | None = None
    """Decision threshold on p(fake); None: the run's calibrated one."""
    workers: int = 0
    """DataLoader workers decoding each batch's images (0: on the model thread). ``lare2 score`` starts 2 for its
    one long call; here every batch is a call, and starting workers for each costs more than they save."""
    max_batch: int = 16
    """Images per model call at most."""
    max_wait_ms: float = 10.0
    """How long a batch waits for more images after its first, milliseconds."""
    max_queue: int = 256
    """Images waiting for a batch at most; a request that does not fit answers 503 with Retry-After."""
    max_upload_mb: float = 20.0
    """Request body limit, MiB; over it: 413."""
    max_inflight_mb: float | None = None
    """Upload bytes held at once by all requests together, MiB (None: 4 x ``max_upload_mb``); a request that does
    not fit answers 503 with Retry-After. With ``max_queue``, this bounds the memory that uploads take."""
    token: str | None = None
    """With a token, every route but /healthz needs ``Authorization: Bearer <token>``."""

    def __post_init__(self) -> None:
        from lare2.shared.errors import InputError

        for option, value in (("--max-upload-mb", self.max_upload_mb), ("--max-inflight-mb", self.max_inflight_mb)):
            if value is not None and not value > 0:  # 0 would refuse every request
                raise InputError(f"{option} {value:g}: expected > 0 (MiB); give a positive size")
        if self.max_inflight_mb is not None and self.max_inflight_mb < self.max_upload_mb:
            raise InputError(f"--max-inflight-mb {self.max_inflight_mb:g}: below --max-upload-mb "
                             f"{self.max_upload_mb:g}, so an upload within the limit could never be let in; "
                             "raise --max-inflight-mb or lower --max-upload-mb")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_inflight_bytes(self) -> int:
        mib = self.max_inflight_mb if self.max_inflight_mb is not None else 4 * self.max_upload_mb
        return int(mib * 2**20)


@dataclass
class Service:
    """What the routes share: the loaded detector, its batcher, the metrics, a thread drawing heatmaps."""

    settings: ServeSettings
    metrics: ServeMetrics
    detector: Detector | None = None
    scorer: BatchScorer | None = None
    drawer: ThreadPoolExecutor | None = None

    @property
    def run_name(self) -> str:
        return Path(self.settings.run).resolve().name

    def room(self) -> bool:
        return self.scorer is not None and self.scorer.has_room()

    def retry_after(self) -> int:
        return self.scorer.retry_after() if self.scorer is not None else 5


def load_detector(settings: ServeSettings) -> Detector:
    """The run's ``Detector``, one model call per batch (``batch_size = max_batch``)."""
    from lare2.detect import Detector

    return Detector.from_run(settings.run, sd=settings.sd, clip=settings.clip, device=settings.device,
                             threshold=settings.threshold, num_workers=settings.workers, batch_size=settings.max_batch)


def build_app(settings: ServeSettings, detector: Detector | None = None) -> FastAPI:
    """The app; ``detector``: an already loaded one (else ``settings`` load it when the app starts)."""
    service = Service(settings, ServeMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.detector = detector or await asyncio.to_thread(load_detector, settings)
        service.scorer = BatchScorer(service.detector.score, max_batch=settings.max_batch,
                                     max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                                     metrics=service.metrics)
        service.drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lare2-heatmaps")
        service.scorer.start()
        try:
            yield
        finally:  # SIGTERM: the server stopped accepting and answered its requests; finish what is queued
            await service.scorer.close()
            service.drawer.shutdown(wait=True)

    # docs_url=None: the OpenAPI page is served below from swagger-ui-bundle's files, not a CDN (offline networks)
    app = FastAPI(title="lare2 serve", version=_version(), lifespan=lifespan, docs_url=None,
                  description="Scores images with a trained LaRE^2 detector: p(fake) and the verdict at the run's "
                              "threshold, with the rows of `lare2 score`.")
    app.state.service = service
    add_routes(app, service)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def openapi_page() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="lare2 serve: API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="")
    # outermost first: count every answer, then the token, then the upload limits and the in-flight bytes
    app.add_middleware(UploadLimits, max_bytes=settings.max_upload_bytes, room=service.room,
                       retry_after=service.retry_after,
                       inflight=ByteBudget(settings.max_inflight_bytes, service.metrics.inflight_bytes))
    app.add_middleware(BearerToken, token=settings.token)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    return app


def add_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/score", summary="Score uploaded images")
    async def score(files: list[UploadFile] = File(..., description="One or more image files."),
                    class_name: str | None = Form(None, description="Class-prompt runs: the images' ImageNet class, "
                                                  "or 'auto' (CLIP zero-shot); default: from GenImage-style names."),
                    heatmaps: bool = Query(False, description="Add each scored row's heatmap (PNG, base64).")) -> dict:
        return await score_uploads(service, files, class_name or None, heatmaps)

    @app.get("/v1/info", summary="The run, its threshold, extraction settings, model fingerprints, versions")
    async def info() -> dict:
        return run_info(service)

    @app.get("/healthz", summary="Alive")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="Models loaded and room in the queue")
    async def readyz() -> JSONResponse:
        ready = service.room()
        body = {"ready": ready, "queued_images": service.scorer.queued if service.scorer else 0,
                "max_queue": service.settings.max_queue}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        text, content_type = service.metrics.exposition()
        return Response(text, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")


async def score_uploads(service: Service, files: list[UploadFile], class_name: str | None, heatmaps: bool) -> dict:
    """The ``{"run", "threshold", "results"}`` answer: one row per file, in order."""
    from lare2.detect import AUTO_CLASS
    from lare2.shared.classnames import check_class_name
    from lare2.shared.errors import InputError

    detector, settings = service.detector, service.settings
    if not files:
        raise HTTPException(422, "no file: send one or more images in the multipart field 'files'")
    if len(files) > settings.max_queue:
        raise HTTPException(413, f"{len(files)} files in one request, over --max-queue {settings.max_queue}; "
                                 "send them in smaller requests")
    if class_name and class_name != AUTO_CLASS and detector.prompt_mode == "class":
        try:
            check_class_name(class_name, "class_name")
        except InputError as err:  # a bad class is the request's error, not every row's
            raise HTTPException(422, str(err)) from None
    names = [f.filename or f"<file {i}>" for i, f in enumerate(files)]
    datas = [await f.read() for f in files]
    class_names = [image_class(detector, name, class_name) for name in names]
    try:
        results = await service.scorer.score(datas, class_names)
    except QueueFull as full:
        raise HTTPException(503, str(full), headers={"Retry-After": str(full.retry_after)}) from None
    rows = [upload_row(result, name, detector) for result, name in zip(results, names)]
    if heatmaps:
        loop = asyncio.get_running_loop()
        pngs = await asyncio.gather(*(loop.run_in_executor(service.drawer, heatmap_png, detector, result, name)
                                      for result, name in zip(results, names)))
        for row, png in zip(rows, pngs):
            row["heatmap"] = png
    return {"run": service.run_name, "threshold": detector.threshold, "results": rows}


def image_class(detector: Detector, name: str, class_name: str | None) -> str | None:
    """The class ``Detector.score`` gets for an upload: as given, else (class prompts) from a GenImage-style name.

    ``lare2 score`` reads the class from a file's name; uploads are scored from bytes, which carry none."""
    from lare2.shared.classnames import class_name_from_filename

    if class_name or detector.prompt_mode != "class":
        return class_name
    return class_name_from_filename(name.replace("\\", "/").rsplit("/", 1)[-1]) or None


def upload_row(result: Result, name: str, detector: Detector) -> dict:
    """``lare2 score``'s row with ``path`` = the uploaded file name."""
    row = {**result.row(), "path": name}
    if NO_NAME_PHRASE in row["error"]:
        what = f"{name!r} is not a GenImage-style file name"
        row["error"] = row["error"].replace(NO_NAME_PHRASE, what).replace("--class-name", "class_name")
    return row


def heatmap_png(detector: Detector, result: Result, name: str) -> str | None:
    """The row's heatmap (``lare2 score --heatmaps``) as base64 PNG; None for an error row."""
    if result.status != "ok":
        return None
    with tempfile.TemporaryDirectory(prefix="lare2-heatmap-") as folder:  # our own file, never a client's path
        out = Path(folder) / "heatmap.png"
        titled = dataclasses.replace(result, path=name.replace("$", r"\$"))  # matplotlib reads $...$ as math
        detector.heatmap(titled, out)
        return base64.b64encode(out.read_bytes()).decode("ascii")


def run_info(service: Service) -> dict:
    from lare2.shared.jsonio import jsonable
    from lare2.shared.provenance import TRACKED_PACKAGES, package_versions

    detector, settings = service.detector, service.settings
    return jsonable({
        "run": service.run_name, "threshold": detector.threshold, "calibrated_threshold": detector.config.threshold,
        "target_fpr": detector.config.target_fpr, "model": detector.config.model.to_dict(),
        "prompt_mode": detector.prompt_mode, "extraction": detector.extraction.to_dict(),
        "extraction_fingerprint": detector.config.extraction_fingerprint,
        "model_fingerprints": detector.models.fingerprints, "device": str(detector.device),
        "limits": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                   "max_queue": settings.max_queue, "max_upload_mb": settings.max_upload_mb,
                   "max_inflight_mb": settings.max_inflight_bytes / 2**20},
        "versions": package_versions(TRACKED_PACKAGES + SERVICE_PACKAGES),
    })


def _version() -> str:
    import lare2

    return getattr(lare2, "__version__", "unknown")
