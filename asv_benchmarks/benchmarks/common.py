"""What every fastbn benchmark shares: the profile, the cases, one base class."""

import json
import os
import timeit

import numpy as np

import fastbn

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_profile():
    with open(os.path.join(_HERE, "config.json")) as f:
        profile = json.load(f)["profile"]
    profile = os.environ.get("FASTBN_ASV_PROFILE", profile)
    if profile not in ("fast", "regular"):
        raise ValueError(f"unknown asv profile {profile!r}: fast or regular")
    return profile


PROFILE = get_profile()

# The cases of `python -m fastbn bench`: (shape, data_format).
CASES = {
    "NHWC-32x56x56x64": ((32, 56, 56, 64), "NHWC"),
    "NCHW-32x64x56x56": ((32, 64, 56, 56), "NCHW"),
    "NHWC-32x7x7x512": ((32, 7, 7, 512), "NHWC"),
    "2D-256x4096": ((256, 4096), "NHWC"),
    "NHWC-64x112x112x64": ((64, 112, 112, 64), "NHWC"),
    "NCHW-32x512x7x7": ((32, 512, 7, 7), "NCHW"),
    "NHWC-4x4x4x8": ((4, 4, 4, 8), "NHWC"),
}
FAST_CASES = ("NHWC-32x7x7x512", "NHWC-4x4x4x8")
CASE_NAMES = list(FAST_CASES if PROFILE == "fast" else CASES)
BACKENDS = fastbn.backends.registered()


class Benchmark:
    """Base class: timing settings by profile, and inputs for a (backend, case)."""

    timer = timeit.default_timer
    processes = 1
    timeout = 600
    param_names = ["backend", "case"]
    params = (BACKENDS, CASE_NAMES)
    if PROFILE == "fast":
        repeat, number, warmup_time, min_run_count = 1, 1, 0, 1
    else:
        repeat, warmup_time = (3, 20, 10.0), 0.2

    def setup(self, backend, case):
        reason = fastbn.backends.status().get(backend)
        if reason is not None:
            raise NotImplementedError(f"{backend} does not work here: {reason}")
        self.backend = backend
        shape, self.data_format = CASES[case]
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
        self.dy = rng.standard_normal(shape, dtype=np.float32)
        axis = 1 if self.data_format == "NCHW" else len(shape) - 1
        channels = shape[axis]
        self.axes = tuple(a for a in range(len(shape)) if a != axis)
        self.scale = np.ones(channels, np.float32)
        self.offset = np.zeros(channels, np.float32)
        self.mean = self.x.mean(axis=self.axes)
        self.variance = self.x.var(axis=self.axes)
        self.out = np.empty_like(self.x)


def checksum(array):
    """A summary of a result that moves when the numbers do: for track_ benchmarks."""
    return float(np.round(np.abs(np.asarray(array, np.float64)).sum(), 3))
