"""Runs the web node's WGSL kernels (webnode/kernels/*.wgsl) through wgpu-py, for the kernel tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import wgpu

KERNEL_DIR = Path(__file__).resolve().parents[2] / "webnode" / "kernels"
# Storage bindings must be non-empty and a multiple of 4 bytes; uniform structs are padded to 16.
MIN_BUFFER_BYTES = 16
STORAGE_USAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
UNIFORM_USAGE = wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST
Constants = Mapping[str, int | float | bool]
BufferRange = tuple[wgpu.GPUBuffer, int, int]  # (buffer, byte offset, byte size): a binding of part of a buffer


class NoAdapter(RuntimeError):
    """wgpu found no adapter at all (no GPU and no software fallback)."""


def request_adapter() -> wgpu.GPUAdapter:
    """The adapter the tests run on: a real GPU when there is one, else a software one (llvmpipe)."""
    errors: list[str] = []
    for options in ({"power_preference": "high-performance"}, {"force_fallback_adapter": True}):
        try:
            adapter = wgpu.gpu.request_adapter_sync(**options)
        except RuntimeError as error:  # wgpu-native raises when it finds nothing for these options
            errors.append(f"{options}: {error}")
            continue
        if adapter is not None:
            return adapter
        errors.append(f"{options}: none")
    raise NoAdapter("wgpu found no adapter: " + "; ".join(errors))


class WgslRunner:
    """One wgpu device plus a pipeline cache keyed by kernel file and override constants (as the page's)."""

    def __init__(self, adapter: wgpu.GPUAdapter, *, shader_f16: bool = False) -> None:
        features = ["shader-f16"] if shader_f16 else []
        self.adapter = adapter
        self.device = adapter.request_device_sync(required_features=features)
        self._modules: dict[str, wgpu.GPUShaderModule] = {}
        self._pipelines: dict[tuple[str, tuple[tuple[str, float], ...]], wgpu.GPUComputePipeline] = {}

    @property
    def description(self) -> str:
        info = self.adapter.info
        return f"{info['device']} ({info['backend_type']}, {info['adapter_type']})"

    def pipeline(self, kernel: str, constants: Constants | None = None) -> wgpu.GPUComputePipeline:
        """The compute pipeline of webnode/kernels/<kernel>.wgsl, entry point main, with these overrides."""
        key = (kernel, tuple(sorted((name, float(value)) for name, value in (constants or {}).items())))
        if key not in self._pipelines:
            if kernel not in self._modules:
                code = (KERNEL_DIR / f"{kernel}.wgsl").read_text()
                self._modules[kernel] = self.device.create_shader_module(label=kernel, code=code)
            compute = {"module": self._modules[kernel], "entry_point": "main", "constants": dict(key[1])}
            self._pipelines[key] = self.device.create_compute_pipeline(label=kernel, layout="auto", compute=compute)
        return self._pipelines[key]

    def storage(self, data: np.ndarray) -> wgpu.GPUBuffer:
        """A storage buffer holding `data` (C order, its own dtype: float32, float16 bits as uint16, uint32)."""
        raw = np.ascontiguousarray(data).tobytes()
        raw += bytes(-len(raw) % 4)
        raw += bytes(max(0, MIN_BUFFER_BYTES - len(raw)))
        return self.device.create_buffer_with_data(data=raw, usage=STORAGE_USAGE)

    def empty(self, count: int, dtype: type = np.float32) -> wgpu.GPUBuffer:
        """A zero-filled storage buffer of `count` elements of `dtype`."""
        return self.storage(np.zeros(count, dtype))

    def uniform(self, *fields: int | float) -> wgpu.GPUBuffer:
        """A params struct: Python ints as u32, floats as f32, in order, zero-padded to a multiple of 16 bytes."""
        words = [np.float32(f).view(np.uint32) if isinstance(f, float) else np.uint32(f) for f in fields]
        words += [np.uint32(0)] * (-len(words) % 4)
        return self.device.create_buffer_with_data(data=np.array(words, np.uint32).tobytes(), usage=UNIFORM_USAGE)

    def dispatch(
        self,
        kernel: str,
        bindings: Sequence[wgpu.GPUBuffer | BufferRange],
        workgroups: tuple[int, int, int],
        constants: Constants | None = None,
    ) -> None:
        """Run one dispatch; bindings[i] is @group(0) @binding(i): a whole buffer or (buffer, offset, size)."""
        pipeline = self.pipeline(kernel, constants)
        entries = [{"binding": i, "resource": _resource(binding)} for i, binding in enumerate(bindings)]
        bind_group = self.device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)
        encoder = self.device.create_command_encoder()
        compute_pass = encoder.begin_compute_pass()
        compute_pass.set_pipeline(pipeline)
        compute_pass.set_bind_group(0, bind_group)
        compute_pass.dispatch_workgroups(*workgroups)
        compute_pass.end()
        self.device.queue.submit([encoder.finish()])

    def read(self, buffer: wgpu.GPUBuffer, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        """The first prod(shape) elements of a storage buffer."""
        count = int(np.prod(shape))
        raw = self.device.queue.read_buffer(buffer, size=count * np.dtype(dtype).itemsize)
        return np.frombuffer(raw, dtype).reshape(shape).copy()


def linear_groups(groups: int) -> tuple[int, int, int]:
    """A 1D count of workgroups laid out as (x, y, 1) under the 65535-per-dimension default limit."""
    limit = 65535
    return (min(groups, limit), -(-groups // limit), 1)


def _resource(binding: wgpu.GPUBuffer | BufferRange) -> dict[str, object]:
    if isinstance(binding, tuple):
        buffer, offset, size = binding
        return {"buffer": buffer, "offset": offset, "size": size}
    return {"buffer": binding}
