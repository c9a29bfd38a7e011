"""Test-session settings: the tests use tiny models, for which one thread per process is fastest (and
several threads per process slow down by an order of magnitude when the cores are shared)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for the subprocesses some tests start
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub during tests

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
