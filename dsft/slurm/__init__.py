"""Slurm through submitit: ``dsft submit`` / ``status`` (submit.py), preemption-safe requeue (job.py with
dsft/preemption.py), ``dsft sweep`` as one job array (sweep.py), ``dsft sbatch`` templates (sbatch.py).
resources.py is the one place where a config becomes Slurm resource requests."""
