"""The Ray Serve application: online animation with dynamic batching, and catalog jobs.

Routes (``jobs/serve.yaml`` deploys it with ``serve deploy``; ``mmtalker serve`` runs it here):

- ``POST /v1/animate?format=npz|glb&speaker=NAME``: the body is one audio file (wav, flac, ogg,
  mp3); the answer is the animation as ``.npz`` or ``.glb``. Requests are grouped by
  ``@serve.batch`` and clips of similar length run as one model call.
- ``POST /v1/jobs``: JSON ``{"catalog", "output", ...}`` submits a batch animation job through
  the Ray Jobs API; answers ``202 {"id"}``.
- ``GET /v1/jobs/{id}``: the job's state and its item counts so far.
- ``GET /healthz``: the model being served.

With the variable named by ``token_env`` set where the application is built, every route but
``/healthz`` needs ``Authorization: Bearer <token>``.
"""

import asyncio
import hmac
import io
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from mmtalker.errors import AudioError, AudioTooLongError, MMTalkerError
from mmtalker.inference import Clip, decode_audio, prepare_audio
from mmtalker.io.export import npz_bytes, to_glb
from mmtalker_platform.batch import animate_isolated, read_progress
from mmtalker_platform.model_source import resolve_model
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import ModelChoice

JOB_PREFIX = "animate-"


class ServeConfig(ModelChoice):
    """The application's arguments (``args:`` in ``jobs/serve.yaml``)."""

    #: Largest accepted upload, in MiB, and longest accepted audio, in seconds.
    max_upload_mb: float = Field(20.0, gt=0)
    max_seconds: float = Field(60.0, gt=0)
    #: Requests grouped into one model call, and how long a request waits for company.
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    use_gpu: bool = False
    #: Environment variable holding the bearer token; unset or empty means no authentication.
    token_env: str = "MMTALKER_SERVE_TOKEN"
    #: Ray Jobs API for ``POST /v1/jobs`` (default: MMTALKER_RAY_DASHBOARD or the local one).
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
        if ".." in location.split("/"):
            return False
        return any(
            location == prefix.rstrip("/") or location.startswith(prefix.rstrip("/") + "/")
            for prefix in self.job_prefixes
        )


class JobRequest(BaseModel):
    """Body of ``POST /v1/jobs``; the job animates with the served model unless ``model``."""

    model_config = ConfigDict(extra="forbid")

    catalog: str = Field(min_length=1)
    output: str = Field(min_length=1)
    model: str | None = None
    formats: list[Literal["npz", "glb", "obj"]] = ["npz"]
    speaker: str | None = None
    overwrite: bool = False
    actors: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _cluster_paths(self) -> "JobRequest":
        for field in ("catalog", "output"):
            value = getattr(self, field)
            if "://" not in value and not value.startswith("/"):
                raise ValueError(f"{field} must be an s3:// URI or an absolute path on the cluster")
        return self


def check_job_locations(config: ServeConfig, token: str, job: JobRequest) -> None:
    """Jobs read and write where the server allows (403 otherwise); an open server submits none.

    Defined before the deployments: Serve captures their module globals when they are declared.
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


class AnimateItem(BaseModel):
    """One online request, as the animator deployment receives it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    audio: np.ndarray
    speaker: str | None
    format: Literal["npz", "glb"]


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
        clips, where = [], []
        for index, item in enumerate(items):
            try:
                template, speaker = checkpoint.face(item.speaker)
            except MMTalkerError as exc:
                results[index] = AnimateResult(status=400, error=str(exc))
                continue
            clips.append(Clip(item.audio, template, speaker))
            where.append(index)
        outcomes = animate_isolated(checkpoint, clips, max_batch=len(items), device=self.device)
        for index, vertices in zip(where, outcomes, strict=True):
            try:
                if isinstance(vertices, Exception):
                    raise vertices
                encode = npz_bytes if items[index].format == "npz" else to_glb
                results[index].content = encode(vertices, checkpoint.fps, checkpoint.topology)
                results[index].frames = len(vertices)
            except Exception as exc:  # this request fails alone; the rest of its batch is served
                results[index] = AnimateResult(status=500, error=f"animation failed: {exc}")
        return results


app = FastAPI(title="MMTalker", description="Speech-driven 3D facial animation.")


@serve.deployment
@serve.ingress(app)
class Api:
    """HTTP front: authentication, limits, decoding; the animator does the model work."""

    def __init__(self, animator: DeploymentHandle, config: ServeConfig, token: str) -> None:
        self.animator = animator
        self.config = config
        self.token = token
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
        format: Annotated[Literal["npz", "glb"], Query()] = "npz",
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
        result: AnimateResult = await self.animator.animate.remote(item)
        if result.status != 200:
            raise HTTPException(result.status, result.error)
        media = "application/octet-stream" if format == "npz" else "model/gltf-binary"
        return Response(
            result.content,
            media_type=media,
            headers={
                "X-Frames": str(result.frames), "X-Audio-Seconds": f"{seconds:.3f}",
                "X-Batch-Size": str(result.batch_size), "X-Model": info["model"],
            },
        )  # fmt: skip

    @app.post("/v1/jobs", status_code=202)
    async def submit_job(self, request: Request, job: JobRequest) -> dict[str, str]:
        """Submit a catalog animation job to the Ray Jobs API; returns its id."""
        self._authorize(request)
        check_job_locations(self.config, self.token, job)
        submission_id = f"{JOB_PREFIX}{uuid.uuid4().hex[:12]}"
        command = [
            sys.executable, "-m", "mmtalker_platform.cli", "animate", "--catalog", job.catalog,
            "--output", job.output, "--formats", ",".join(job.formats), "--actors",
            str(job.actors), "--name", submission_id,
            *self._model_arguments(job), *(["--speaker", job.speaker] if job.speaker else []),
            *(["--overwrite"] if job.overwrite else []),
        ]  # fmt: skip
        client = await asyncio.to_thread(self._jobs)
        try:
            await asyncio.to_thread(
                client.submit_job,
                entrypoint=shlex.join(command),
                submission_id=submission_id,
                metadata={"kind": "animate", "output": job.output, "catalog": job.catalog},
            )
        except RuntimeError as exc:
            raise HTTPException(502, f"the Ray Jobs API refused the job: {exc}") from exc
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
            raise HTTPException(502, f"the Ray Jobs API failed: {exc}") from exc
        metadata = info.metadata or {}
        if metadata.get("kind") != "animate":
            raise HTTPException(404, f"no animation job {job_id!r}")
        progress = await asyncio.to_thread(read_progress, metadata["output"], self.settings.s3)
        # The first line only: a failed job's message can carry the tail of its log.
        message = (info.message or "").strip().split("\n")[0][:300]
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
            address = self.config.jobs_address or self.settings.ray_dashboard
            try:
                self.jobs_client = JobSubmissionClient(address)
            except ConnectionError as exc:
                raise HTTPException(503, f"the Ray Jobs API at {address} is unreachable") from exc
        return self.jobs_client

    async def _info(self) -> dict[str, Any]:
        if self.model_info is None:
            self.model_info = await self.animator.info.remote()
        return self.model_info

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

    async def _read_limited(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed the upload limit."""
        limit = int(self.config.max_upload_mb * 2**20)
        too_big = HTTPException(
            413, f"upload exceeds the {self.config.max_upload_mb:g} MiB limit of this server"
        )
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
    token = os.environ.get(config.token_env, "")
    resources: dict[str, Any] = {"num_cpus": config.cpus_per_replica}
    if config.use_gpu:
        resources["num_gpus"] = 1
    animator = Animator.options(
        num_replicas=config.replicas,
        ray_actor_options=resources,
        max_ongoing_requests=max(4 * config.max_batch_size, 32),
    ).bind(config)
    # The front must let as many requests through as a batch can hold, or batches stay small.
    return Api.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max(4 * config.max_batch_size, 32)
    ).bind(animator, config, token)
