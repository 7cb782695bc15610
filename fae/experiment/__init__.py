"""Experiment grids: named variants of configs, trained at one budget over several seeds, each run
swept by `fae test`, compared in one table and one `fae report` (`fae experiment`).

  - spec: the experiment file read and checked, and the grid of runs it names;
  - task: one run's work (fit, resuming its folder's checkpoint, then test) as a submitit job that
    stops, resumes and requeues as a run on a cluster must;
  - state: what a run's folder, lock, status file and scheduler say of it (done, running, ...);
  - table: the experiment's table of means and spreads across seeds;
  - launch: the `fae experiment` command, on submitit's local executor or as one SLURM job array.
"""
