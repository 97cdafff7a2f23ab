"""The experiment harness behind run_*.py and train.sh: flags, stages, outputs, results, sweeps, plots.

`import lorpa` does not need it; the method lives one level up.
"""
