"""Run a whole protocol: the job graph, a content-addressed cache, and Dask executors.

The pipeline is a chain of stages (data -> segment -> crops -> train -> predict ->
predictions -> saliency-maps -> saliency -> stats -> report). Each stage is planned once the stages before it have
finished, as a list of small :class:`Job` objects: a function with its arguments, a cache
key and a done marker. The key hashes the job's inputs (file contents or the keys of the
jobs that made them), the part of the resolved protocol the job reads and the cellbg
version, so a job whose marker holds the same key is skipped, and changing one model's
settings re-runs only that model's training jobs. Every job logs to
``<run>/logs/<stage>-<key>.log`` (training jobs a line per epoch), and the run to
``<run>/.cellbg/run.log``.

Small stages run in this process; segmentation batches, training, prediction and saliency
jobs run on
Dask workers: a :class:`distributed.LocalCluster` by default, or batch jobs through
dask-jobqueue (Slurm, PBS, SGE, LSF). A job that raises is retried ``executor.retries``
times; a job whose worker dies is retried as often and then reported; finished jobs are
never lost, so a killed run resumes where it stopped.

The parts, one file each:

``jobs``
    the job model and cache: :class:`Job`, :class:`Stage`, :func:`hash_key`, file digests,
    and the summaries a run returns;
``execute``
    running one job with its output captured to its log and its done marker written last;
``executors``
    Dask clusters, local and on batch systems (the only module that knows about Dask);
``display``
    the progress a person sees (a bar per stage and per running job) and the run log;
``loop``
    :func:`run_stages`: planning, caching, the run lock and the run record;
``pipeline``
    the cellbg stages and :func:`run_protocol`;
``status``
    :func:`status`: how far a run folder is.

Examples
--------
>>> from cellbg.runner import hash_key
>>> len(hash_key({"a": 1}, "b"))
16
"""

from cellbg.runner.executors import make_cluster
from cellbg.runner.jobs import (
    STATE_DIR,
    FileDigests,
    Job,
    JobFailure,
    NotReady,
    RunContext,
    RunSummary,
    Stage,
    StageSummary,
    hash_key,
    job_log_path,
)
from cellbg.runner.loop import run_stages
from cellbg.runner.pipeline import final_lines, pipeline_stages, run_protocol
from cellbg.runner.status import RunStatus, status

__all__ = [
    "STATE_DIR",
    "Job",
    "Stage",
    "RunContext",
    "NotReady",
    "JobFailure",
    "StageSummary",
    "RunSummary",
    "RunStatus",
    "hash_key",
    "FileDigests",
    "job_log_path",
    "run_stages",
    "pipeline_stages",
    "run_protocol",
    "final_lines",
    "status",
    "make_cluster",
]
