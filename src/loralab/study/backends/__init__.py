"""Backends run units (one run, or a fused group of runs) as child processes: ``local`` on
this machine (local.py), ``ray`` inside Ray tasks anywhere in a cluster (ray.py). Both start
the same process, built in process.py, and read its outcome from the run directories."""
