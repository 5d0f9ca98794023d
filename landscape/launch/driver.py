"""The command's body under ``--launcher``: submit the first unfinished phase's jobs, or gather and resubmit.

Each call looks at the phases in order (:func:`landscape.launch.plan.phases`). A phase whose tasks all have their
``done`` marker is over; in the first one that is not, every task with neither a marker nor a live job (never
submitted, or its job failed, was killed, cancelled, or timed out beyond submitit's requeue) is submitted, all in
one array, and the call prints the job ids and returns. ``--wait``: it polls until the finish job is done. A task
stopped by a bad input (its ``failed`` marker) is reported as the one-line error it met; a task that failed
:data:`MAX_ATTEMPTS` times is reported with its log instead of being resubmitted again.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from adapters.errors import UserError
from landscape.config import RunConfig
from landscape.launch import plan

MAX_ATTEMPTS = 3
POLL_S = {"local": 0.5, "slurm": 10.0}  # --wait: seconds between looks at the jobs (Slurm's: sacct queries)


def require_submitit(launcher: str) -> None:
    """submitit is an optional dependency, and Slurm's commands must be at hand: one line naming the fix."""
    import shutil

    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError(
            "--launcher needs submitit: pip install 'submitit>=1.5.4' (or pip install '.[cluster]')"
        ) from None
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None] if launcher == "slurm" else []
    if missing:
        raise UserError(f"--launcher slurm: {' and '.join(missing)} not found on PATH: run the command on a node of "
                        "the Slurm cluster (a login node), or use --launcher local on this machine")  # fmt: skip


def drive(
    config: RunConfig,
    argv: Sequence[str],
    jobs: Mapping[str, Callable],
    poll_s: float | None = None,
    phases: Callable | None = None,
    digest: str | None = None,
) -> Path:
    """Advance the launcher run of ``config`` (the command's ``argv``): submit what is missing, report what
    runs; with ``config.wait``, until the finish job is done. ``jobs``: the body of each task kind
    ({train, grid, finish} -> function(config, *args)). ``phases`` (config, argv) -> [(phase, tasks)] and
    ``digest``: another command's plan and settings (``landscape.curves``), default the run's
    (:func:`plan.phases`, :func:`plan.settings_digest`); its state lives in ``config.out_dir / .launch``."""
    require_submitit(config.launcher)
    out = config.out_dir
    phases = phases or plan.phases
    state = plan.State.open(out, digest or plan.settings_digest(config))
    if config.restart:  # every job again, every grid point again (the grid store of other settings is cleared)
        from landscape.engine.store import GridStore

        state.forget()
        for folder in (out / ".grid", *(out / ".grid").glob("draw-*"), out / ".paths"):
            GridStore(folder, {}).clear()
    # the jobs: the run in one process (their restart was done here, once)
    job_config = dataclasses.replace(config, restart=False, wait=False)
    said = [""]  # --wait: a phase's progress is printed when it changes
    while True:
        if _step(config, job_config, phases(config, argv), jobs, state, said):
            print(f"launcher {config.launcher}: finished; the run's files are in {out}", flush=True)
            return out
        if not config.wait:
            print(f"rerun the same command to gather and resubmit (or add --wait); logs in {state.folder / 'logs'}",
                  flush=True)  # fmt: skip
            return out
        time.sleep(POLL_S[config.launcher] if poll_s is None else poll_s)


def _step(config: RunConfig, job_config: RunConfig, planned, jobs, state: plan.State, said: list[str]) -> bool:
    """One look at the jobs: True when the finish job is done; else the first unfinished phase's missing tasks
    are submitted (printed with their job ids)."""
    from landscape.launch import submit

    logs = state.folder / "logs"
    for phase, tasks in planned:
        open_tasks = [t for t in tasks if not state.finished(t.name)]
        if not open_tasks:
            continue
        running, missing = [], []
        for task in open_tasks:
            error = state.failure(task.name)
            if error is not None:
                state.give_up(task.name)  # reported once: the rerun after the fix submits it again
                raise UserError(f"{task.name} job stopped: {error}")
            record = state.jobs.get(task.name)
            if record and submit.alive(config.launcher, logs, record["job_id"]):
                running.append(task)
                continue
            if record and record["attempts"] >= MAX_ATTEMPTS:
                log = submit.job_log(logs, record["job_id"])
                state.give_up(task.name)
                raise UserError(f"{task.name} failed {record['attempts']} times: read {log}, fix the cause and "
                                "rerun the same command")  # fmt: skip
            missing.append(task)
        if missing:
            _submit(job_config, jobs, state, phase, missing, logs)
        done = len(tasks) - len(open_tasks)
        ids = ", ".join(f"{t.name} {state.jobs[t.name]['job_id']}" for t in running)
        line = f"[{phase}] {done}/{len(tasks)} done" + (f"; running: {ids}" if ids else "")
        if line != said[0]:
            print(line, file=sys.stderr, flush=True)
            said[0] = line
        return False
    return True


def _submit(config: RunConfig, jobs, state: plan.State, phase: str, tasks: list, logs: Path) -> None:
    """Submit ``tasks`` as one batch (a Slurm job array) and record their job ids."""
    from landscape.launch import submit

    executor = submit.executor(config, logs, phase)
    calls = [submit.Job(jobs[t.kind], config, t.args, t.name, state.folder, state.digest) for t in tasks]
    with executor.batch():
        submitted = [executor.submit(call) for call in calls]
    for task, job in zip(tasks, submitted, strict=True):
        before = state.jobs.get(task.name, {}).get("attempts", 0)
        state.jobs[task.name] = {"job_id": str(job.job_id), "attempts": before + 1, "phase": phase}
        again = " (resubmitted)" if before else ""
        print(f"[{phase}] submitted {task.name}: job {job.job_id}{again}", flush=True)
    state.save()


__all__ = ["MAX_ATTEMPTS", "drive", "require_submitit"]
