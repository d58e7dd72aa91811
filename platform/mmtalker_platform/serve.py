"""The Ray Serve application: online animation with dynamic batching, and catalog jobs.

Routes (``jobs/serve.yaml`` deploys it with ``serve deploy``; ``mmtalker serve`` runs it here):

- ``POST /v1/animate?format=npz|glb|arkit&speaker=NAME``: the body is one audio file (wav, flac,
  ogg, mp3); the answer is the animation as ``.npz``, ``.glb`` (rigged with ARKit-named morph
  targets for models of the ICT head) or ``arkit``: the per-frame ARKit-52 weights as JSON (ICT
  models only). Requests are grouped by
  ``@serve.batch`` and clips of similar length run as one model call.
- ``POST /v1/jobs``: JSON ``{"catalog", "output", ...}`` submits a batch animation job through
  the Ray Jobs API; answers ``202 {"id"}``.
- ``GET /v1/jobs/{id}``: the job's state and its item counts so far.
- ``GET /healthz``: the model being served.

With the variable named by ``token_env`` set in the replicas' environment, every route but
``/healthz`` needs ``Authorization: Bearer <token>``. The token is read inside the replica, so it
never travels in the deployments' arguments (which Serve stores and shows).

Under overload and faults the application sheds load instead of failing: requests beyond the
bounded queues, requests still unanswered after ``request_timeout_s`` and requests whose model
replica died get ``503`` with ``Retry-After``; no other 5xx is answered.
"""

import asyncio
import hmac
import io
import json
import logging
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import numpy as np
import ray
from fastapi import FastAPI, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from mmtalker.errors import AudioError, AudioTooLongError, MMTalkerError
from mmtalker.inference import decode_audio, face_of, prepare_audio
from mmtalker.io.export import output_bytes
from mmtalker_platform.batch import animate_isolated, read_progress, whole_head
from mmtalker_platform.catalog import within
from mmtalker_platform.model_source import resolve_model
from mmtalker_platform.redaction import redact, redact_text
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import ModelChoice

JOB_PREFIX = "animate-"
#: Largest ``POST /v1/jobs`` body: a job request is a few fields.
JOB_BODY_BYTES = 64 * 2**10
#: What a model replica that is gone, overloaded or too slow makes the API answer.
UNAVAILABLE = (BackPressureError, RayActorError, ReplicaUnavailableError,
               DeploymentUnavailableError, TimeoutError)  # fmt: skip
logger = logging.getLogger("ray.serve")


class ScalingSpec(BaseModel):
    """Autoscaling of the model replicas by the requests each is working on."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    #: Requests per replica the autoscaler aims at (a batch and a half keeps batches full).
    target_ongoing_requests: float = Field(12.0, gt=0)


class ServeConfig(ModelChoice):
    """The application's arguments (``args:`` in ``jobs/serve.yaml``)."""

    #: Largest accepted upload, in MiB, and longest accepted audio, in seconds.
    max_upload_mb: float = Field(20.0, gt=0)
    max_seconds: float = Field(60.0, gt=0)
    #: Requests grouped into one model call, and how long a request waits for company.
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    replicas: int = Field(1, ge=1)
    #: Scale the model replicas with the load instead of keeping ``replicas``.
    autoscaling: ScalingSpec | None = None
    cpus_per_replica: float = Field(1.0, gt=0)
    use_gpu: bool = False
    #: CPUs of each HTTP front replica: it reads, decodes and resamples the uploads.
    decode_cpus: float = Field(1.0, gt=0)
    #: Requests waiting for a replica, per caller, beyond those being worked on; more get 503
    #: with ``Retry-After: retry_after_s``. Bounds memory and the wait of accepted requests.
    max_queued_requests: int = Field(32, ge=1)
    retry_after_s: int = Field(2, ge=1)
    #: An animation not answered within this gets 503 (the server is overloaded).
    request_timeout_s: float = Field(60.0, gt=0)
    #: Environment variable holding the bearer token, read in the replicas; unset or empty
    #: means no authentication.
    token_env: str = "MMTALKER_SERVE_TOKEN"
    #: Ray Jobs API for ``POST /v1/jobs``; default: MMTALKER_RAY_DASHBOARD when set, else the
    #: dashboard of the Ray cluster the application runs in.
    jobs_address: str | None = None
    #: Locations jobs may read catalogs from and write outputs to (``s3://bucket/prefix/`` or
    #: absolute paths). Without a token, POST /v1/jobs is refused unless this names some.
    job_prefixes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _absolute_checkpoint(self) -> "ServeConfig":
        # Replicas and the jobs this app submits run in other working directories.
        if self.checkpoint is not None:
            self.checkpoint = str(Path(self.checkpoint).expanduser().resolve())
        return self

    def allows(self, location: str) -> bool:
        """Whether ``location`` lies under one of ``job_prefixes`` (and has no ``..``)."""
        return within(location, self.job_prefixes)

    @property
    def model_batches(self) -> int:
        """Requests a model replica takes at once: one batch running, one gathering."""
        return 2 * self.max_batch_size


class JobRequest(BaseModel):
    """Body of ``POST /v1/jobs``; the job animates with the served model unless ``model``."""

    model_config = ConfigDict(extra="forbid")

    catalog: str = Field(min_length=1)
    output: str = Field(min_length=1)
    model: str | None = None
    formats: list[Literal["npz", "glb", "obj", "arkit"]] = ["npz"]
    speaker: str | None = None
    overwrite: bool = False
    actors: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _cluster_paths(self) -> "JobRequest":
        for field in ("catalog", "output"):
            value = getattr(self, field)
            if "://" not in value and not value.startswith("/"):
                raise ValueError(f"{field} must be an s3:// URI or an absolute path on the cluster")
            # A job's arguments are stored by the Jobs API: credentials have no place there.
            if "://" in value and "@" in urlparse(value).netloc:
                raise ValueError(
                    f"{field} must not carry credentials; the cluster has its own for storage"
                )
        return self


def check_job_locations(config: ServeConfig, token: str, job: JobRequest) -> None:
    """Jobs read and write where the server allows (403 otherwise); an open server submits none.

    Defined before the deployments, as every function they use: Serve captures their module
    globals when they are declared.
    """
    prefixes = config.job_prefixes
    if not token and not prefixes:
        raise HTTPException(
            403, "job submission is off on this server: it has no bearer token (set "
            f"{config.token_env}) and no job_prefixes limiting where jobs read and write",
        )  # fmt: skip
    for location in (job.catalog, job.output) if prefixes else ():
        if not config.allows(location):
            raise HTTPException(
                403, f"{location} is outside the locations jobs may use here: {prefixes}"
            )


def jobs_address(config: ServeConfig, settings: PlatformSettings) -> str:
    """The Jobs API jobs go to: ``jobs_address``, MMTALKER_RAY_DASHBOARD, or this cluster's.

    Inside the cluster, the address of its GCS is enough: the Jobs API client looks the
    dashboard up there, which is how a RayService's replicas find their own cluster's.
    """
    if config.jobs_address:
        return config.jobs_address
    if "ray_dashboard" in settings.model_fields_set:
        return settings.ray_dashboard
    return ray.get_runtime_context().gcs_address


class AnimateItem(BaseModel):
    """One online request, as the animator deployment receives it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    audio: np.ndarray
    speaker: str | None
    format: Literal["npz", "glb", "arkit"]


class AnimateResult(BaseModel):
    """The encoded animation, or the reason this one request failed (an HTTP status)."""

    content: bytes = b""
    frames: int = 0
    batch_size: int = 0
    status: int = 200
    error: str = ""


@serve.deployment
class Animator:
    """Holds the model once per replica; animates batches of requests."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.device = "cuda" if config.use_gpu else "cpu"
        # build_app pinned a registry reference to one version, so replicas never mix versions.
        source = resolve_model(config, PlatformSettings())
        self.checkpoint, self.model_id = source.load(self.device), source.model_id
        self.animate.set_max_batch_size(config.max_batch_size)
        self.animate.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        """The served model: id, speakers, rates, mesh size."""
        checkpoint = self.checkpoint
        return {
            "model": self.model_id, "speakers": checkpoint.model.speakers, "fps": checkpoint.fps,
            "sample_rate": checkpoint.sample_rate,
            "vertices": checkpoint.model.topology.num_vertices,
        }  # fmt: skip

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def animate(self, items: list[AnimateItem]) -> list[AnimateResult]:
        """Animate a batch of requests in a worker thread (the replica keeps answering)."""
        return await asyncio.to_thread(self._animate, items)

    def _animate(self, items: list[AnimateItem]) -> list[AnimateResult]:
        checkpoint = self.checkpoint
        results = [AnimateResult(batch_size=len(items)) for _ in items]
        faces, where = [], []
        for index, item in enumerate(items):
            try:
                if item.format == "arkit" and not whole_head(checkpoint):
                    raise MMTalkerError(
                        f"format arkit needs a model of the ICT head; {self.model_id} animates "
                        "its own mesh only"
                    )
                faces.append(face_of(checkpoint, *checkpoint.face(item.speaker)))
            except MMTalkerError as exc:
                results[index] = AnimateResult(status=400, error=str(exc))
                continue
            where.append(index)
        outcomes = animate_isolated(
            checkpoint, [items[i].audio for i in where], faces, max_batch=len(items),
            device=self.device,
        )  # fmt: skip
        for index, animation in zip(where, outcomes, strict=True):
            try:
                if isinstance(animation, Exception):
                    raise animation
                results[index].content = output_bytes(
                    animation.vertices, checkpoint.fps, animation.topology, items[index].format,
                    animation.rig,
                )  # fmt: skip
                results[index].frames = len(animation.vertices)
            except Exception as exc:  # this request fails alone; the rest of its batch is served
                results[index] = AnimateResult(status=500, error=f"animation failed: {exc}")
        return results


app = FastAPI(title="MMTalker", description="Speech-driven 3D facial animation.")


@serve.deployment
@serve.ingress(app)
class Api:
    """HTTP front: authentication, limits, decoding; the animator does the model work."""

    def __init__(self, animator: DeploymentHandle, config: ServeConfig) -> None:
        self.animator = animator
        self.config = config
        # Read here, in the replica: deployment arguments are stored and shown by Serve.
        self.token = os.environ.get(config.token_env, "")
        self.settings = PlatformSettings()
        self.model_info: dict[str, Any] | None = None
        self.jobs_client: Any = None

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness plus the model being served."""
        return {"status": "ok", **(await self._info())}

    @app.post("/v1/animate")
    async def animate(
        self,
        request: Request,
        format: Annotated[Literal["npz", "glb", "arkit"], Query()] = "npz",
        speaker: Annotated[str | None, Query()] = None,
    ) -> Response:
        """Animate the uploaded audio file; the body is the file itself."""
        self._authorize(request)
        data = await self._read_limited(request)
        info = await self._info()
        try:
            audio, seconds = await asyncio.to_thread(self._decode, data, info["sample_rate"])
        except AudioError as exc:
            status = 413 if isinstance(exc, AudioTooLongError) else 400
            raise HTTPException(status, str(exc)) from exc
        item = AnimateItem(audio=audio, speaker=speaker, format=format)
        result: AnimateResult = await self._call("animate", item)
        if result.status != 200:
            raise HTTPException(result.status, result.error)
        media = {
            "npz": "application/octet-stream", "glb": "model/gltf-binary",
            "arkit": "application/json",
        }[format]  # fmt: skip
        return Response(
            result.content,
            media_type=media,
            headers={
                "X-Frames": str(result.frames), "X-Audio-Seconds": f"{seconds:.3f}",
                "X-Batch-Size": str(result.batch_size), "X-Model": info["model"],
            },
        )  # fmt: skip

    @app.post("/v1/jobs", status_code=202)
    async def submit_job(self, request: Request) -> dict[str, str]:
        """Submit a catalog animation job to the Ray Jobs API; returns its id."""
        self._authorize(request)
        body = await self._read_limited(request, JOB_BODY_BYTES)
        try:
            job = JobRequest.model_validate_json(body)
        except ValidationError as exc:
            # Pydantic echoes the input: a URI with a password in it must not come back.
            raise HTTPException(422, redact(json.loads(exc.json(include_url=False)))) from exc
        check_job_locations(self.config, self.token, job)
        submission_id = f"{JOB_PREFIX}{uuid.uuid4().hex[:12]}"
        # The job reads and writes only where this server allows, manifest rows included.
        allowed = [arg for prefix in self.config.job_prefixes for arg in ("--allow", prefix)]
        command = [
            sys.executable, "-m", "mmtalker_platform.cli", "animate", "--catalog", job.catalog,
            "--output", job.output, "--formats", ",".join(job.formats), "--actors",
            str(job.actors), "--name", submission_id, *allowed,
            *self._model_arguments(job), *(["--speaker", job.speaker] if job.speaker else []),
            *(["--overwrite"] if job.overwrite else []),
        ]  # fmt: skip
        # No environment is passed: the job gets the cluster's own (registry, storage
        # credentials), so no secret enters the job's record in the Jobs API.
        metadata = redact({"kind": "animate", "output": job.output, "catalog": job.catalog})
        client = await asyncio.to_thread(self._jobs)
        try:
            await asyncio.to_thread(
                client.submit_job, entrypoint=shlex.join(command), submission_id=submission_id,
                metadata=metadata,
            )  # fmt: skip
        except RuntimeError as exc:
            raise HTTPException(
                502, f"the Ray Jobs API refused the job: {redact_text(str(exc))}"
            ) from exc
        logger.info("submitted %s: %s", submission_id, redact_text(shlex.join(command)))
        return {"id": submission_id, "status_url": f"/v1/jobs/{submission_id}"}

    @app.get("/v1/jobs/{job_id}")
    async def job_status(self, request: Request, job_id: str) -> dict[str, Any]:
        """A job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and item counts."""
        self._authorize(request)
        client = await asyncio.to_thread(self._jobs)
        try:
            info = await asyncio.to_thread(client.get_job_info, job_id)
        except RuntimeError as exc:
            # The Jobs API client turns every non-200 answer into a RuntimeError naming it.
            if "status code 404" in str(exc):
                raise HTTPException(404, f"no animation job {job_id!r}") from exc
            raise HTTPException(502, f"the Ray Jobs API failed: {redact_text(str(exc))}") from exc
        metadata = info.metadata or {}
        if metadata.get("kind") != "animate":
            raise HTTPException(404, f"no animation job {job_id!r}")
        progress = await asyncio.to_thread(read_progress, metadata["output"], self.settings.s3)
        # The first line only: a failed job's message can carry the tail of its log.
        message = redact_text((info.message or "").strip().split("\n")[0])[:300]
        return {
            "id": job_id, "status": str(info.status.value), "message": message,
            "catalog": metadata["catalog"], "output": metadata["output"], "progress": progress,
        }  # fmt: skip

    def _decode(self, data: bytes, sample_rate: int) -> tuple[np.ndarray, float]:
        """Mono audio at the model's rate and its duration; limits checked before decoding."""
        samples, rate = decode_audio(data, self.config.max_seconds)
        return prepare_audio(samples, rate, sample_rate), len(samples) / rate

    def _model_arguments(self, job: JobRequest) -> list[str]:
        if job.model is not None:
            return ["--model", job.model]
        if self.config.checkpoint is not None:
            return ["--checkpoint", self.config.checkpoint]
        return ["--model", self.config.model or ""]

    def _jobs(self) -> Any:
        """The Jobs API client, made on first use (the dashboard may start after Serve)."""
        from ray.job_submission import JobSubmissionClient

        if self.jobs_client is None:
            address = jobs_address(self.config, self.settings)
            try:
                self.jobs_client = JobSubmissionClient(address)
            except (ConnectionError, ValueError) as exc:
                raise HTTPException(
                    503, f"the Ray Jobs API at {address} is unreachable",
                    headers={"Retry-After": str(self.config.retry_after_s)},
                ) from exc  # fmt: skip
        return self.jobs_client

    async def _info(self) -> dict[str, Any]:
        if self.model_info is None:
            self.model_info = await self._call("info")
        return self.model_info

    async def _call(self, method: str, *args: Any) -> Any:
        """A model replica's answer; 503 when the replicas are full, gone or too slow."""
        response: DeploymentResponse | None = None
        try:
            response = getattr(self.animator, method).remote(*args)
            return await asyncio.wait_for(response, self.config.request_timeout_s)
        except UNAVAILABLE as exc:
            if response is not None:
                response.cancel()
            reason = (
                "the model replicas are busy"
                if isinstance(exc, BackPressureError | TimeoutError)
                else "the model replica is unavailable"
            )
            raise HTTPException(
                503, f"{reason}; retry in {self.config.retry_after_s} s",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from exc  # fmt: skip

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, credential = given.partition(" ")
        # Bytes: compare_digest refuses non-ASCII str, which would answer 500 instead of 401.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.encode(), self.token.encode()
        ):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    async def _read_limited(self, request: Request, limit: int | None = None) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed the limit (default:
        the upload limit)."""
        limit = limit or int(self.config.max_upload_mb * 2**20)
        too_big = HTTPException(413, f"the body exceeds the {limit / 2**20:g} MiB limit here")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = io.BytesIO()
        async for piece in request.stream():
            if body.tell() + len(piece) > limit:
                raise too_big
            body.write(piece)
        if body.tell() == 0:
            raise HTTPException(400, "the request body is empty; send the audio file as the body")
        return body.getvalue()


def build_app(config: ServeConfig) -> Application:
    """The application ``serve run``/``serve deploy`` and ``mmtalker serve`` start.

    A registry reference is pinned here to the version it names now, so every replica (and
    every job submitted through the app) uses that one even after an alias moves.
    """
    if config.model is not None:
        from mmtalker_platform.registry import show

        info = show(config.tracking_uri or PlatformSettings().tracking_uri, config.model)
        config = config.model_copy(update={"model": f"{info.name}/{info.version}"})
    resources: dict[str, Any] = {"num_cpus": config.cpus_per_replica}
    if config.use_gpu:
        resources["num_gpus"] = 1
    scaling: dict[str, Any] = (
        {"num_replicas": config.replicas}
        if config.autoscaling is None
        else {"autoscaling_config": AutoscalingConfig(**config.autoscaling.model_dump())}
    )
    # Both deployments shed load the same way: Serve answers a full queue of either with 503
    # and Retry-After by itself, on the way in or out of the HTTP front.
    backpressure = BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s)
    animator = Animator.options(
        ray_actor_options=resources,
        max_ongoing_requests=config.model_batches,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=backpressure,
        **scaling,
    ).bind(config)
    # The front lets through what every model replica can hold and queue, so batches fill and
    # the queues below bound the wait; beyond that the proxy answers 503 itself.
    replicas = config.autoscaling.max_replicas if config.autoscaling else config.replicas
    return Api.options(
        ray_actor_options={"num_cpus": config.decode_cpus},
        max_ongoing_requests=replicas * config.model_batches + config.max_queued_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=backpressure,
    ).bind(animator, config)
