"""Import TensorFlow so that it can share a process with MuJoCo's OSMesa renderer.

TensorFlow and Mesa's software rasterizer (llvmpipe, behind libOSMesa) both carry LLVM. In
one process their symbols collide: creating an OSMesa context after TensorFlow is loaded, or
loading TensorFlow after an OSMesa context exists, ends in a segmentation fault. Loading
libOSMesa and TensorFlow with RTLD_DEEPBIND makes each resolve its own symbols first, which
keeps both working in either order (a data loader next to a MuJoCo evaluation, the tests of
both in one pytest process, `python -m embodied.collect` writing while it renders).

Everything in `embodied.data` imports TensorFlow and tensorflow-datasets through `tf()` and
`tfds()` here; TensorFlow is also kept off the GPUs, which belong to torch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_READY = False


def _preload_osmesa() -> None:
    if os.environ.get("MUJOCO_GL", "osmesa").lower() != "osmesa":
        return  # EGL/GLFW: no OSMesa in this process
    name = ctypes.util.find_library("OSMesa")
    if name:
        try:
            ctypes.CDLL(name, mode=os.RTLD_DEEPBIND | os.RTLD_LOCAL)
        except OSError:
            pass  # rendering will report its own error


def tf():
    """The `tensorflow` module (imported once with RTLD_DEEPBIND, CPU only)."""
    global _READY
    if not _READY:
        if "tensorflow" not in sys.modules and hasattr(os, "RTLD_DEEPBIND"):
            _preload_osmesa()
            flags = sys.getdlopenflags()
            sys.setdlopenflags(os.RTLD_NOW | os.RTLD_DEEPBIND)
            try:
                import tensorflow  # noqa: F401
            finally:
                sys.setdlopenflags(flags)
        import tensorflow

        try:
            tensorflow.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError):
            pass  # devices already initialized elsewhere
        _READY = True
    import tensorflow

    return tensorflow


def tfds():
    """The `tensorflow_datasets` module (TensorFlow imported first, as in `tf()`)."""
    tf()
    import tensorflow_datasets

    return tensorflow_datasets
