"""The experiment harness behind `train.sh --table`: cells of a sweep, run here or on SLURM.

`cells` says what a cell is and how it starts (skipped when finished, resumed when interrupted);
`local` runs cells on this machine, several at once; `slurm` submits them as one array job through
`submitit` (the optional `slurm` extra).
"""
