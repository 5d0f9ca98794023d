"""``--launcher slurm`` / ``--launcher local``: a run's work as submitit jobs, submitted, gathered and resubmitted.

The run is cut into phases, each a set of jobs that only needs the phases before it (:mod:`landscape.launch.plan`):

1. ``train``: one job per (method, training seed) (the baseline with the run's seed; ``--seeds N``'s extra seeds);
2. ``grid``: a job array, one task per contiguous chunk of the grid's points (``--shards``), each loading the
   model once and checkpointing every point in its own file of the run's grid store (``.grid/rank<K>.npz``);
   in the same array a random chart's other draws (``.grid/draw-k``), the paths' inner points with their
   per-sample losses (``.paths``) and ``--curvature``'s (solution, coordinates) entries (``.curvature``): per
   entry one task for its top eigenvalues and a few for ranges of its trace and density probes
   (:mod:`landscape.launch.probes`);
3. ``finish``: one job that runs the command in one process, every solution and grid point reused from disk (and
   each curvature entry joined from its tasks' parts): it computes the rest (paths, spectra, curvature, figures)
   and writes the run's files, landscape.json recording the launcher and the shard count.

:func:`drive` is the command's body under ``--launcher``: it reads ``.launch/state.json`` in the run folder,
submits the jobs of the first unfinished phase that are neither finished nor running (a job that died, was
cancelled or failed is resubmitted), prints their ids and returns; ``--wait`` keeps doing so until the finish job
is done. Rerunning the same command is the way to gather. Each job writes a marker when it finishes
(``.launch/done/<task>.json``), keyed by the run's settings, so nothing finished is submitted twice; every job is
idempotent (a solution or grid point already on disk under the same key is reused) and resumable (training from
its checkpoint, a shard from its saved points), and submitit's ``Checkpointable`` requeues it on pre-emption
and timeout. submitit is imported only here, when a launcher is asked for (``pip install .[cluster]``).
"""

from __future__ import annotations

from landscape.launch.driver import drive
from landscape.launch.plan import grid_shards

__all__ = ["drive", "grid_shards"]
