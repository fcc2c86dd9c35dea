"""Facts about the process a command runs in, that decide where its outputs may go.

Under `ray job submit --working-dir .` the entrypoint runs in Ray's temporary copy of that directory
(``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``), which `ray stop` deletes: a relative output
path there is lost without a word. Workers of a fanned-out job start in directories of their own, so a relative
path means another place on every node. Both are decided here, once, from the working directory and the
environment Ray sets (``RAY_JOB_CONFIG_JSON_ENV_VAR``), as pure functions a test can feed.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

from data import storage

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job manager for a submitted entrypoint: the job's runtime env, with ``working_dir`` if uploaded."""


def ray_job_working_dir(cwd: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The temporary working directory of a submitted Ray job when this process runs in one, else None."""
    cwd = os.getcwd() if cwd is None else cwd
    environ = os.environ if environ is None else environ
    try:
        runtime_env = json.loads(environ.get(RAY_JOB_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {}
    parts = cwd.replace(os.sep, "/").split("/")
    in_copy = "working_dir_files" in parts or any(p.startswith("_ray_pkg_") for p in parts)
    return cwd if in_copy and (runtime_env.get("working_dir") or RAY_JOB_ENV not in environ) else None


def output_location(value: str, key: str, *, fan_out: bool = False, cwd: str | None = None,
                    environ: Mapping[str, str] | None = None, output: bool = True) -> str:
    """A path as the command must use it: a URL or an absolute path as given; a relative one refused in a Ray
    job's temporary working directory, made absolute against the driver's when the work fans out to other
    processes (``fan_out``), and left as it is otherwise. ``output=False``: an input (a set), whose relative
    path there would name the copy, which holds only the files git does not ignore."""
    if not value or storage.is_remote(value) or os.path.isabs(value):
        return value
    temporary = ray_job_working_dir(cwd, environ)
    if temporary is not None:
        why = "which `ray stop` deletes" if output else "which holds only the files git does not ignore"
        raise ValueError(f"{key}={value} is relative, and this job runs in Ray's temporary copy of the working dir "
                         f"({temporary}), {why}: give {key} as an absolute path that every node sees "
                         f"(e.g. {key}=$PWD/{value} in the submitting shell) or an s3:// URL")
    return os.path.abspath(os.path.join(cwd or os.getcwd(), value)) if fan_out else value
