"""Searches as Ray jobs (Ray's Job Submission API).

A job's entrypoint is ``<python> -m <the CLI module> <command> ...`` run by the cluster's job
supervisor on the head node, with ``RAY_ADDRESS`` set: the search inside connects to that
cluster (see :func:`autobits.cluster.runtime.ray_session`) and its evaluator actors spread
over the cluster's nodes.  ``<python>`` defaults to this interpreter, right for a cluster of
machines sharing this installation (and for a local cluster); give the cluster's own
interpreter (e.g. ``python`` on the AWS example, which installs autobits there) otherwise.

Paths: the job runs in its own working directory (``working_dir`` when given: uploaded to
the cluster, at most Ray's package limit), so the run directory (``--out``) and any
relative input path that exists here are made absolute before submission.  Results land in
that run directory, on the head node's filesystem.

``address`` is the dashboard's HTTP address, as for ``ray job submit`` (``127.0.0.1:8265``
or ``http://127.0.0.1:8265``; reach a remote cluster's through ``ray dashboard CLUSTER.yaml``,
which forwards it to localhost).

Authentication: when Ray finds a token here (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``; ``ray get-auth-token`` prints a cluster's on its head node), every
request carries it; a job server that requires a token this machine does not have is
refused with an :class:`~autobits.errors.AutobitsError` saying how to configure it.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from autobits.cluster.runtime import JOB_ENV, apply_ray_env
from autobits.errors import AutobitsError

__all__ = ["JobInfo", "submit", "list_jobs", "job_status", "job_logs", "wait_job",
           "absolutize", "dashboard_url"]

log = logging.getLogger(__name__)

#: Options whose value is a path the job must see absolutely: outputs always, inputs when
#: they exist here.
OUTPUT_FLAGS = ("--out", "--json")
INPUT_FLAGS = ("--model", "--text", "--allocation", "--policy")
#: Environment carried into the job (besides JOB_ENV): offline model loading, the model cache.
PASS_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "AUTOBITS_CACHE", "HF_HOME")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class JobInfo:
    """One job as ``autobits jobs`` shows it."""

    id: str
    status: str
    entrypoint: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    message: str

    @property
    def seconds(self) -> float | None:
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time

    def to_json(self) -> dict:
        return {"id": self.id, "status": self.status, "entrypoint": self.entrypoint,
                "start_time": self.start_time, "end_time": self.end_time,
                "seconds": self.seconds, "message": self.message}


def dashboard_url(address: str) -> str:
    """``host:port`` -> ``http://host:port`` (a URL with a scheme is kept)."""
    if not address:
        raise AutobitsError("a Ray job needs --address: the cluster dashboard's host:port")
    return address if "://" in address else f"http://{address}"


def _token_header() -> dict[str, str]:
    """``Authorization: Bearer <token>`` when Ray finds a token on this machine, else {}."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since Ray last looked
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return {}
        return {"Authorization": f"Bearer {loader.get_raw_token(ignore_auth_mode=True)}"}
    finally:
        # the loader is process-wide: a token read here must not outlive this call (a later
        # Ray connection in this process reads its own environment again)
        loader.reset_cache()


def _auth_error(url: str, e: Exception) -> AutobitsError:
    """Ray's AuthenticationError (HTTP 401: no token sent; 403: a wrong one) as one line."""
    if "Authentication failed" in str(e):
        return AutobitsError(
            f"the Ray job server at {url} rejected this machine's authentication token: put "
            f"the cluster's token (`ray get-auth-token` on its head node) in RAY_AUTH_TOKEN or "
            f"~/.ray/auth_token")
    return AutobitsError(
        f"the Ray job server at {url} requires an authentication token and none is configured "
        f"here: put the cluster's token (`ray get-auth-token` on its head node) in "
        f"RAY_AUTH_TOKEN or ~/.ray/auth_token")


def _client(address: str):
    apply_ray_env()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    try:
        return JobSubmissionClient(url, headers=_token_header())
    except AuthenticationError as e:
        raise _auth_error(url, e) from None
    except RuntimeError as e:
        if "ray[default]" in str(e):
            raise AutobitsError(
                "Ray's job client is not installed here (it comes with ray[default]): "
                "pip install 'autobits[cluster]'") from None
        raise AutobitsError(f"no Ray job server at {url}: {e}") from None
    except (ConnectionError, ValueError) as e:
        raise AutobitsError(f"no Ray job server at {url}: {e}") from None


def absolutize(args: Sequence[str], *, cwd: str | os.PathLike | None = None) -> list[str]:
    """``args`` with the values of :data:`OUTPUT_FLAGS` made absolute, and those of
    :data:`INPUT_FLAGS` too when they name an existing file or folder."""
    base = Path(cwd or os.getcwd())
    out: list[str] = []
    it = iter(range(len(args)))
    args = list(args)
    for i in it:
        a = args[i]
        flag, eq, val = a.partition("=")
        if flag in OUTPUT_FLAGS + INPUT_FLAGS:
            if eq:
                out.append(f"{flag}={_abs(flag, val, base)}")
                continue
            if i + 1 < len(args):
                out.extend([a, _abs(flag, args[i + 1], base)])
                next(it, None)
                continue
        out.append(a)
    return out


def _abs(flag: str, value: str, base: Path) -> str:
    p = Path(value).expanduser()
    if p.is_absolute() or value == "-":
        return str(p) if value != "-" else value
    if flag in OUTPUT_FLAGS or (base / p).exists():
        return str((base / p).resolve())
    return value  # e.g. a built-in model name


def submit(*, address: str, module: str, command: Sequence[str], working_dir: str | None = None,
           python: str | None = None, job_id: str | None = None,
           env: dict[str, str] | None = None) -> str:
    """Submit ``<python> -m <module> <command...>`` as a Ray job; returns its submission id.

    ``module`` is the command-line entry point the job runs (the application layer names
    its own CLI; this layer does not know it)."""
    command = list(command)
    if not command:
        raise AutobitsError("nothing to submit: give the autobits command after '--', "
                            "e.g. autobits submit --address A -- search --target-bpw 4.5 --out DIR")
    argv = absolutize(command)
    entry = shlex.join([python or sys.executable, "-m", module, *argv])
    env_vars = dict(JOB_ENV)
    env_vars.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
    env_vars["PYTHONUNBUFFERED"] = "1"
    env_vars.update(env or {})
    runtime_env: dict = {"env_vars": env_vars}
    if working_dir:
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise AutobitsError(f"--working-dir {str(wd)!r} is not a directory")
        runtime_env["working_dir"] = str(wd)
    client = _client(address)
    sid = client.submit_job(entrypoint=entry, runtime_env=runtime_env, submission_id=job_id,
                            metadata={"autobits": " ".join(argv[:1])})
    log.info("submitted %s: %s", sid, entry)
    return sid


def _info(d) -> JobInfo:
    ms = lambda t: t / 1000.0 if t else None  # noqa: E731
    status = getattr(d.status, "value", str(d.status))
    return JobInfo(id=d.submission_id or d.job_id or "?", status=status,
                   entrypoint=d.entrypoint or "", start_time=ms(d.start_time),
                   end_time=ms(d.end_time), message=d.message or "")


def list_jobs(*, address: str) -> list[JobInfo]:
    """Every job the cluster knows, oldest first."""
    jobs = [_info(d) for d in _client(address).list_jobs() if getattr(d, "submission_id", None)]
    return sorted(jobs, key=lambda j: j.start_time or 0.0)


def job_status(*, address: str, job_id: str) -> JobInfo:
    try:
        return _info(_client(address).get_job_info(job_id))
    except RuntimeError as e:
        raise AutobitsError(f"no job {job_id!r} at {address}: {e}") from None


def job_logs(*, address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def wait_job(*, address: str, job_id: str, timeout: float | None = None,
             poll: float = 2.0) -> JobInfo:
    """Poll until the job ends (SUCCEEDED, FAILED or STOPPED) or ``timeout`` seconds pass."""
    t0 = time.monotonic()
    while True:
        info = job_status(address=address, job_id=job_id)
        if info.status in TERMINAL:
            return info
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise AutobitsError(f"job {job_id} still {info.status} after {timeout:.0f}s")
        time.sleep(poll)
