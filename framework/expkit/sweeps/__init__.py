"""Sweeps: many runs of one job with sampled arguments, early termination, the best registered.

A sweep is Azure ML's HyperDrive (v1) or sweep job (v2) on Optuna: the sweep spec
(`expkit sweep sweep.yaml`, `Experiment.submit(SweepSpec)`) names the trial's job spec, a
search space, a sampling algorithm, an objective (primary metric and goal), an early
termination policy and limits. Each trial is an ordinary expkit run of the job, its `args`
overridden by the sampled values, on whatever compute target the job names; the training
script logs its metrics as it always does and never imports Optuna.

Modules, one job each:
- `spec`: the sweep spec (YAML or Python), validated; Azure ML v2 names and HyperDrive's forms.
- `space`: the search space on Optuna: samplers, a trial's values, the trial's job spec.
- `policies`: early termination (Bandit, median stopping, truncation selection as Azure ML
  defines them; successive halving and Hyperband from Optuna), as Optuna pruners that say why.
- `study`: the sweep's Optuna study, in a journal file in the sweep's folder (no server).
- `driver`: the loop that asks for trials, starts them as runs, reports their primary metric
  and stops those the policy terminates; `python -m expkit.sweeps.driver` in the background.
- `report`: the table of a sweep's trials (the live one and `expkit sweeps show`).
- `best`: the best trial, and registering its model (`register_best`).
- `plot`: the optimization history and the parameters' importances in a picture
  (`expkit sweeps show --plot`).

Optuna is imported only by `space`, `policies`, `study`, `plot` and the driver, never at
start-up.
"""
