"""What runs in each Slurm task: the same training entry as ``dsft train`` and ``dsft.run``, with Slurm's
end-of-job signal turned into save-at-the-next-step-and-stop, and the requeue handed to submitit.

submitit 1.5.4 (core/job_environment.py) installs, in every task, a handler for USR2 (``$SUBMITIT_PREEMPT_SIGNAL``)
that on the task with global rank 0 calls ``checkpoint()``, pickles what it returns, runs ``scontrol requeue``
and exits; other tasks only log; SIGTERM is logged and ignored. Acting at an arbitrary point of a step would
lose the step and could leave a checkpoint half written, so :class:`SlurmTraining` replaces that handler with
one that only records the signal (dsft.preemption), lets the Trainer save and stop at the next step boundary,
and only then calls submitit's handler.
"""

from __future__ import annotations

import atexit
import os
import platform
import random
import signal
import time

import submitit

from dsft import preemption
from dsft.distributed import exit_now
from dsft.run import train_entry

# how long ranks other than 0 wait for the requeue (issued by rank 0) to end them
REQUEUE_WAIT_S = 300


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", 0))  # Slurm counts the requeues of a job


def _this_attempt() -> dict:
    """This attempt's timeline (signal, stop step, (re)start step, wall times) and its restart number."""
    return dict(preemption.timeline(), restart=_restart_count())


def export_distributed_env(env: submitit.JobEnvironment) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (first node) and MASTER_PORT from Slurm.

    The port is drawn from the job id and the restart count: every task computes the same one, and a requeued
    job does not meet the previous attempt's lingering listener. Each rank sees all GPUs of its node (the
    Trainer selects cuda:LOCAL_RANK), so CUDA_VISIBLE_DEVICES is left alone.
    """
    port = random.Random(f"{env.job_id}/{_restart_count()}").randint(20000, 60000)
    os.environ["MASTER_PORT"] = str(port)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class SlurmTraining(submitit.helpers.Checkpointable):
    """The callable every task of a dsft job runs. ``config`` is the config as submitted (a YAML file written at
    submission, with ``train.resume_from_checkpoint: auto``). Returns this rank's summary."""

    def __init__(self, config: str, max_requeues: int) -> None:
        self.config = config
        self.max_requeues = max_requeues
        self.attempts: list[dict] = []  # the attempts cut short so far (pickled along on every requeue)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        signum = getattr(signal, "SIG" + env.USR_SIG)
        submitit_handler = preemption.arm(signum)  # first: the signal may come while the libraries load
        export_distributed_env(env)
        try:
            result, distributed = train_entry(self.config, [], callbacks=[preemption.PreemptionCallback()])
        except preemption.Preempted as stop:
            self._hand_over_to_submitit(submitit_handler, signum, env, stop)
            raise  # not under submitit's handler (it never returns on rank 0 when it requeues)
        if distributed:
            # as `dsft train` does: skip the interpreter teardown that aborted intermittently after multi-rank
            # runs here; it runs after submitit has written this task's result
            atexit.register(exit_now, 0)
        return self._summary(env, result)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 when the job is to be requeued: the callable to run next time (this one,
        with one more attempt recorded), or None once ``max_requeues`` requeues have been used up."""
        if len(self.attempts) >= self.max_requeues:
            return None  # submitit then ends the job: "Job not requeued because: checkpoint function returned None"
        self.attempts.append(_this_attempt())
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _hand_over_to_submitit(self, handler, signum: int, env, stop: preemption.Preempted) -> None:
        if not callable(handler):
            return
        handler(signum, None)  # rank 0: checkpoint() + scontrol requeue + exit (or raises: not requeued)
        if env.global_rank == 0:
            return
        # other ranks: the requeue ends this task; stop waiting if rank 0 wrote a result instead (no requeue)
        rank0_result = submitit.core.utils.JobPaths(env.paths.folder, job_id=env.job_id, task_id=0).result_pickle
        deadline = time.monotonic() + REQUEUE_WAIT_S
        while time.monotonic() < deadline and not rank0_result.exists():
            time.sleep(1)
        raise submitit.core.utils.UncompletedJobError(
            f"rank {env.global_rank}: stopped at step {stop.step} on the end-of-job signal; the job was not requeued")

    def _summary(self, env, result) -> dict:
        losses = [(r["step"], r["loss"]) for r in result.log_history if "loss" in r]
        return {
            "rank": env.global_rank, "local_rank": env.local_rank, "world_size": env.num_tasks, "node": env.node,
            "host": platform.node(), "pid": os.getpid(), "job_id": env.job_id,
            "restart": _restart_count(),
            "global_step": max((r.get("step", 0) for r in result.log_history), default=0),
            "loss": losses[-1][1] if losses else None, "loss_step": losses[-1][0] if losses else None,
            "eval_loss": result.eval_metrics.get("eval_loss"), "output_dir": result.output_dir,
            "attempts": self.attempts + [_this_attempt()],
        }
