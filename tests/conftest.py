"""Shared pytest setup."""

import os
import sys

# Machines of this kind export PYTHONDONTWRITEBYTECODE=1. The suite starts hundreds of Python processes
# (CLIs, launcher runs, node tasks, DataLoader workers, servers); without cached bytecode each one
# recompiles torch and transformers on import (seconds of CPU each on 2 cores). Let this session and its
# child processes write and reuse .pyc files.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
