"""How a run was launched: by a Hydra launcher, which sets each job's threads, or by torchrun. Imports no
torch, so that ``fa-train`` checks a config before torch loads.

Threads for each job of a sweep, from the Hydra launcher that runs the jobs (``hydra/launcher``).

Left alone, every torch process starts one thread per core, so ``n`` jobs running side by side start
``n`` times as many threads as there are cores, which then wait on each other. (joblib divides the
cores among its workers itself only when the environment sets no ``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS``; many clusters set them.) So a job's ``trainer.threads``, when not set, follows
its launcher:

- ``joblib``: the cores divided by the jobs joblib runs at once (``hydra.launcher.n_jobs``, where -1
  is one job per core, -2 all cores but one, as in joblib), so that jobs × threads ≤ cores;
- ``submitit_slurm`` and ``submitit_local``: ``hydra.launcher.cpus_per_task``, the cores Slurm
  grants each job (null: torch's default, which on Slurm is the job's CPU allocation);
- Hydra's basic launcher runs one job at a time: torch's default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from fa_cli.config import ConfigError

log = logging.getLogger(__name__)

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
#: What torchrun (and ``srun`` with these set) tells each process.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def concurrent_jobs(n_jobs: int, cores: int) -> int:
    """How many jobs joblib runs at once for ``n_jobs``: itself when positive; when negative, all cores
    but ``-n_jobs - 1`` of them (joblib's rule), at least one."""
    if n_jobs == 0:
        raise ConfigError("hydra.launcher.n_jobs", "must not be 0: a number of jobs, or -1 for one per core")
    return n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)


def threads_per_job(launcher: Mapping[str, Any], cores: int | None = None) -> int | None:
    """torch's threads for each job that ``launcher`` (the ``hydra.launcher`` config) runs, so that the
    jobs running at once do not oversubscribe the cores; None where torch's default is right.
    ``cores``: the machine's usable cores (joblib's count, which honours CPU affinity and cgroup quotas)."""
    target = str(launcher.get("_target_", ""))
    if target == JOBLIB:
        cores = cores or _joblib_cores()
        return max(1, cores // concurrent_jobs(int(launcher.get("n_jobs", -1)), cores))
    if target.startswith(SUBMITIT):
        cpus = launcher.get("cpus_per_task")
        return int(cpus) if cpus else None
    return None


def job_threads(requested: int | None, launcher: Mapping[str, Any]) -> int | None:
    """``trainer.threads`` for a job: what was asked for, else what its launcher allows (see above).
    Warns when the jobs running at once would still ask for more threads than there are cores."""
    threads = requested or threads_per_job(launcher)
    if str(launcher.get("_target_", "")) == JOBLIB and threads:
        cores = _joblib_cores()
        jobs = concurrent_jobs(int(launcher.get("n_jobs", -1)), cores)
        if jobs * threads > cores:
            log.warning(
                f"{jobs} jobs at once × {threads} threads on {cores} cores: they will slow each other down; "
                f"set hydra.launcher.n_jobs to {cores} or fewer, and leave trainer.threads unset"
            )
    return threads


def _joblib_cores() -> int:
    from joblib import cpu_count  # installed with the joblib launcher, the only one that needs it

    return cpu_count()
