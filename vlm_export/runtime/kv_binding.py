"""The language model's KV cache kept inside onnxruntime between decode steps (I/O binding).

Why: `session.run(None, feed)` hands every present key/value back as a numpy array and
takes it in again next step. On CUDA that is a device→host→device round trip of the whole
cache per token. With an `IOBinding` the presents stay `OrtValue`s on the session's device
and are bound as the next step's past as they are. On CPU onnxruntime 1.32 already hands
its output buffers to numpy without copying (measured: the arrays' base is onnxruntime's
capsule, tracemalloc sees no cache-sized allocation on either path,
benchmarks/bench_generate_kv.py) and reads contiguous numpy inputs in place, so there the
binding changes no bytes; the one host allocation that grew per step was the loop's
attention mask, now a view of one buffer (runtime.generate.decode). Python allocates the
same bytes at every step (tests/test_generate_kv.py).

What changed with the GroupQueryAttention graph (families/gqa_attention.py): a bundle whose
manifest says `kv_share_buffer` gets one buffer per layer's key and value of `capacity`
positions (prompt + max_new_tokens), allocated on the first step and bound once as both
`past_key_values.N.*` and `present.N.*`; onnxruntime writes each step's new rows into it
in place, so no copy grows with the cache (`cache_bytes` stays at the capacity, the
buffers keep their address). Older bundles (a Concat graph) keep the growing present.

The device choice is a pure function (`binding_device`) so that the CUDA path is tested on
machines without a GPU; the CUDA run itself is tested where CUDAExecutionProvider exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from vlm_export.errors import InputError

# Providers whose kernels read CUDA device memory: the cache lives there between steps.
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass(frozen=True)
class Device:
    """Where bound tensors live: onnxruntime's device name ("cpu" or "cuda") and its index."""

    name: str
    index: int = 0


def binding_device(providers: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> Device:
    """The device the KV cache is kept on for a session whose providers are `providers`
    (in priority order, as `session.get_providers()` lists them) and provider options
    `options` (`session.get_provider_options()`): CUDA memory of the configured device for
    the CUDA and TensorRT providers, host memory for everything else."""
    first = providers[0] if providers else "CPUExecutionProvider"
    if first not in _CUDA_PROVIDERS:
        return Device("cpu", 0)
    raw = (options or {}).get(first, {}).get("device_id", 0)
    try:
        return Device("cuda", int(raw))
    except (TypeError, ValueError):
        return Device("cuda", 0)


@dataclass
class KvCache:
    """The past of one sequence: one OrtValue per `past_key_values.N.key/value` input, on the
    binding's device, and how many positions it holds."""

    values: dict[str, Any]
    length: int
    capacity: int


class BoundStep:
    """An `LmStep` (runtime.generate) over one onnxruntime session through an IOBinding.

    One instance serves one generation: `capacity` is the most positions the cache may hold
    (prompt + max_new_tokens, at most the model's context); a step that would pass it is
    refused with an InputError rather than growing the cache further.
    """

    def __init__(self, session: Any, layers: int, kv_heads: int, head_dim: int, capacity: int,
                 max_positions: int, share_buffer: bool = False) -> None:
        import onnxruntime as ort

        if capacity > max_positions:
            raise InputError(f"prompt + max_new_tokens = {capacity} positions; the model's context is {max_positions}: "
                             "shorten the prompt or lower max_new_tokens")
        self._ort = ort
        self.session = session
        self.device = binding_device(session.get_providers(), session.get_provider_options())
        self.capacity = capacity
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        self.present_names = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        types = {i.name: i.type for i in session.get_inputs()}
        self.kv_dtype = _ORT_TYPES.get(types.get(self.past_names[0], "tensor(float)"), np.float32)
        self.embeds_dtype = _ORT_TYPES.get(types.get("inputs_embeds", "tensor(float)"), np.float32)
        self.kv_shape = (kv_heads, head_dim)
        self.binding = session.io_binding()
        self.share_buffer = share_buffer
        self._shared: KvCache | None = None  # the capacity-long buffers, bound once (share_buffer)
        self.steps = 0
        self.host_bytes: list[int] = []  # per step: bytes handed to numpy (the logits): constant
        self.cache_bytes: list[int] = []  # per step: bytes of the presents onnxruntime holds (constant when shared)

    def empty(self, batch: int) -> KvCache:
        """A past of length 0: the prefill's input (one graph for both steps). Held in host
        memory on every device: zero bytes for onnxruntime to copy, no zero-size device allocation."""
        zero = np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), dtype=self.kv_dtype)
        value = self._ort.OrtValue.ortvalue_from_numpy(zero)
        return KvCache({name: value for name in self.past_names}, 0, self.capacity)

    def __call__(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                 past: KvCache | None) -> tuple[np.ndarray, KvCache]:
        if self.share_buffer:
            return self._shared_step(embeds, mask, positions, past)
        past = self.empty(embeds.shape[0]) if past is None else past
        length = self._checked_length(past, embeds)
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        self._bind_step(embeds, mask, positions)
        for name in self.past_names:
            binding.bind_ortvalue_input(name, past.values[name])
        for name in self.present_names:
            binding.bind_output(name, self.device.name, self.device.index)  # allocated on the device
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # OrtValues sharing the buffers: nothing copied here
        present = {p: outputs[1 + i] for i, p in enumerate(self.past_names)}
        return self._finish(outputs[0], KvCache(present, length, past.capacity))

    def _checked_length(self, past: KvCache, embeds: np.ndarray) -> int:
        length = past.length + embeds.shape[1]
        if length > past.capacity:
            raise InputError(f"the KV cache would hold {length} positions, over this generation's bound of "
                             f"{past.capacity} (prompt + max_new_tokens)")
        return length

    def _bind_step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> None:
        """The step's own inputs and the logits output; the new token's rows are small: bound
        from host memory, onnxruntime copies them over. Binding a name again replaces it."""
        binding = self.binding
        binding.bind_output("logits", "cpu")  # (batch, vocab): read on the host to choose the token
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.embeds_dtype))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))

    def _shared_step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                     past: KvCache | None) -> tuple[np.ndarray, KvCache]:
        """One step over the capacity-long buffers: `past` None starts the sequence over (the
        kernel's first-prompt path reads nothing of the buffer), else it must be the last result."""
        if self._shared is None or self._shared.values[self.past_names[0]].shape()[0] != embeds.shape[0]:
            self._allocate(embeds.shape[0])
        cache = self._shared
        if past is not None and past.values is not cache.values:
            raise InputError("this step shares one KV buffer per layer: pass the cache its last call returned, or None")
        cache.length = self._checked_length(KvCache(cache.values, 0 if past is None else past.length, cache.capacity), embeds)
        self._bind_step(embeds, mask, positions)
        self.session.run_with_iobinding(self.binding)
        return self._finish(self.binding.get_outputs()[0], KvCache(cache.values, cache.length, cache.capacity))

    def _allocate(self, batch: int) -> None:
        """One (batch, kv_heads, capacity, head_dim) buffer per past input, bound as that
        past and as its present; logits bound first so it stays output 0."""
        shape = [batch, self.kv_shape[0], self.capacity, self.kv_shape[1]]
        values = {name: self._ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device.name, self.device.index)
                  for name in self.past_names}
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_output("logits", "cpu")
        for past_name, present_name in zip(self.past_names, self.present_names):
            binding.bind_ortvalue_input(past_name, values[past_name])
            binding.bind_ortvalue_output(present_name, values[past_name])
        self._shared = KvCache(values, 0, self.capacity)

    def _finish(self, logits_value: Any, cache: KvCache) -> tuple[np.ndarray, KvCache]:
        logits = logits_value.numpy()
        self.steps += 1
        self.host_bytes.append(int(logits.nbytes))
        self.cache_bytes.append(sum(int(v.tensor_size_in_bytes()) for v in cache.values.values()))
        return logits, cache


def bound_step(runner: Any, config: Any, capacity: int) -> BoundStep | None:
    """A BoundStep over `runner`'s onnxruntime session, or None where the runner has none
    (TensorRT plans run through runtime.trt_runner: the caller keeps its numpy step)."""
    session = getattr(runner, "session", None)
    if session is None or not hasattr(session, "io_binding"):
        return None
    return BoundStep(session, config.num_layers, config.num_kv_heads, config.head_dim, capacity, config.max_positions,
                     share_buffer=bool(getattr(config, "kv_share_buffer", False)))
