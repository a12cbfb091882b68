#!/usr/bin/env bash
# Placeholder until the runner issue (9) lands its own one-node Slurm set-up.
echo "start-slurm: not set up yet" >&2
exit 1
