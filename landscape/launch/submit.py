"""submitit's side of the launcher: the executors, the job every task runs as, and whether a submitted job lives.

Imported only when a launcher runs (:func:`landscape.launch.driver.drive`, after checking that submitit is
installed): :class:`Job` must subclass ``submitit.helpers.Checkpointable`` when it is defined.
"""

from __future__ import annotations

import datetime
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import submitit

from adapters.errors import UserError
from landscape.config import RunConfig
from landscape.launch.plan import write_marker

# Slurm's states of a job that is not over: it is left alone (UNKNOWN: sacct cannot tell, e.g. just submitted)
ALIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN", "READY")


class Job(submitit.helpers.Checkpointable):
    """One task of a launcher run: ``fn(config, *args)`` in the command's folder, then its ``done`` marker.

    ``Checkpointable``: on pre-emption or timeout submitit requeues the same call, which resumes from what the
    task saved (a training checkpoint, a shard's points). A :class:`UserError` (a bad input, which a second
    attempt would meet again) is written as the task's ``failed`` marker for the driver to report."""

    def __init__(self, fn: Callable, config: RunConfig, args: tuple, name: str, folder: Path, digest: str):
        self.fn, self.config, self.args = fn, config, args
        self.name, self.folder, self.digest = name, Path(folder), digest
        self.cwd = os.getcwd()  # relative paths of the command (--out, --config, --data-root) stay its

    def __call__(self) -> str:
        os.chdir(self.cwd)
        start = time.perf_counter()
        try:
            self.fn(self.config, *self.args)
        except UserError as e:
            write_marker(self.folder, "failed", self.name, self.digest, error=str(e))
            raise
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        seconds = round(time.perf_counter() - start, 1)
        write_marker(self.folder, "done", self.name, self.digest, finished=stamp, seconds=seconds)
        return self.name


def project_root() -> Path:
    """The folder that holds the ``landscape`` package: the jobs import it from there."""
    import landscape

    return Path(landscape.__file__).resolve().parents[1]


def executor(config: RunConfig, logs: Path, kind: str):
    """The submitit executor of ``config.launcher`` for jobs of ``kind`` (train, grid, finish): Slurm with the
    config's partition, GPUs per task, time limit, array parallelism and passthrough; or local processes."""
    setup = [f"export PYTHONPATH={shlex.quote(str(project_root()))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if config.launcher == "local":
        import torch

        ex = submitit.LocalExecutor(folder=logs)
        gpus = min(config.gpus_per_task, torch.cuda.device_count())  # 0: CUDA_VISIBLE_DEVICES is emptied
        ex.update_parameters(timeout_min=config.time_limit, gpus_per_node=gpus, setup=setup)
        return ex
    ex = submitit.SlurmExecutor(folder=logs)
    params = {"job_name": f"landscape-{kind}", "time": config.time_limit, "ntasks_per_node": 1,
              "array_parallelism": config.array_parallelism, "setup": setup,
              "additional_parameters": dict(config.slurm)}  # fmt: skip
    if config.gpus_per_task:
        params["gpus_per_task"] = config.gpus_per_task
    if config.partition:
        params["partition"] = config.partition
    ex.update_parameters(**params)
    return ex


def sbatch_text(config: RunConfig, logs: Path, kind: str = "grid", tasks: int = 1) -> str:
    """The sbatch script the Slurm executor would submit for ``tasks`` jobs of ``kind`` (an array when more than
    one; for the docs and tests)."""
    ex = executor(config, logs, kind)
    if tasks > 1:
        ex.parameters["map_count"] = tasks  # as submitit's own array submission sets it
    return ex._make_submission_file_text("python -u -m submitit.core._submit " + str(logs), "UID")


def alive(launcher: str, logs: Path, job_id: str) -> bool:
    """Whether the job ``job_id`` is pending or running: Slurm asks sacct (through submitit); a local job is a
    process of this machine, alive unless gone or a zombie."""
    if launcher == "slurm":
        return submitit.SlurmJob(folder=logs, job_id=job_id).state.upper() in ALIVE
    return pid_alive(int(job_id))


def pid_alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone (or no /proc: then ask the kernel)
        if not Path("/proc").is_dir():
            try:
                os.kill(pid, 0)
                return True
            except OSError:
                return False
        return False
    return fields[0] not in ("Z", "X")


def job_log(logs: Path, job_id: str) -> Path:
    """The stderr file of a job (task 0)."""
    return submitit.core.utils.JobPaths(logs, job_id=job_id, task_id=0).stderr


__all__ = ["ALIVE", "Job", "alive", "executor", "job_log", "pid_alive", "project_root", "sbatch_text"]
