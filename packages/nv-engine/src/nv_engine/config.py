from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CUDA_GRAPH_BATCH_SIZES = (
    1,
    2,
    4,
    8,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
    160,
    192,
    224,
    256,
    320,
    384,
    448,
    512,
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's: "fp8" is e4m3
# peer-memory all-reduces by default with more than two ranks: a decode step's messages (256
# rows of hidden size 8192); larger ones cost each rank (ranks - 1) reads of the whole message,
# where NCCL's ring moves about two
PEER_ALL_REDUCE_MANY_RANKS_BYTES = 4 << 20
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineTuning:
    """Internal constants: measured defaults, not settings a user is expected to change (they
    can, as LLM(...) keywords, for experiments). Checked like Config's fields."""

    cuda_graph_batch_sizes: tuple[int, ...] = DEFAULT_CUDA_GRAPH_BATCH_SIZES
    # Decode graphs of up to this many rows launch nv's kernels with programmatic dependent
    # launch (Hopper and newer; 0: never); docs/benchmarks.md has the sweep that chose it
    pdl_max_batch_size: int = 64
    # prompt_logprobs: prompt positions projected onto the vocabulary at once (bounds their
    # [positions, vocab] float32 temporaries, which the memory profile makes room for)
    prompt_logprobs_chunk: int = 256
    cpu_kvcache_bytes: int = 1 << 30  # KV budget on CPU when num_kvcache_blocks is None
    cuda_graph_reserve_bytes: int = 1 << 30  # kept free for CUDA graphs and the allocator
    # the KV pool sized from memory holds at most this many blocks: only tiny models reach it
    # (a 0.6B model's 16-token blocks number ~77,000 on an H200), where millions of blocks would
    # cost seconds of bookkeeping at start-up and serve only as prefix cache
    max_num_kvcache_blocks: int = 1 << 18
    distributed_timeout_s: float = 300.0
    # TP all-reduces of bf16 messages up to this size go through symmetric memory
    # (PeerAllReduce) instead of NCCL (0: NCCL always; None: every step's, when the ranks are
    # one machine's spawned processes, else 0; Config.peer_all_reduce_bytes)
    peer_all_reduce_max_bytes: int | None = None
    peer_all_reduce_algorithm: str = "one_shot"  # PeerAllReduce.ALGORITHMS
    # greedy and temperature-only batches take the sampler's Triton kernels (which TP samples
    # from each rank's vocabulary shard with): None on CUDA; True on CPU runs them in Triton's
    # interpreter (TRITON_INTERPRET=1), for tests
    fused_sampler: bool | None = None
    # cascade attention: in a decode step of at least shared_prefix_min_seqs rows (CUDA graphs
    # of that many rows or more get a cascade twin), the rows whose block tables start with
    # the same blocks, shared_prefix_min_tokens tokens or more of them (a common system
    # prompt, a prefix-cache hit), attend to those once together (0: never); backends that
    # gain from it only (the Triton one). 1024: measured on workload P (docs/benchmarks.md)
    shared_prefix_min_tokens: int = 1024
    shared_prefix_min_seqs: int = 64

    def __post_init__(self) -> None:
        sizes = tuple(sorted(set(self.cuda_graph_batch_sizes)))
        for bs in sizes:
            _positive_int("cuda_graph_batch_sizes", bs)
        object.__setattr__(self, "cuda_graph_batch_sizes", sizes)
        _int_at_least("pdl_max_batch_size", self.pdl_max_batch_size, 0)
        _positive_int("prompt_logprobs_chunk", self.prompt_logprobs_chunk)
        _positive_int("cpu_kvcache_bytes", self.cpu_kvcache_bytes)
        _int_at_least("cuda_graph_reserve_bytes", self.cuda_graph_reserve_bytes, 0)
        if self.peer_all_reduce_max_bytes is not None:
            _int_at_least("peer_all_reduce_max_bytes", self.peer_all_reduce_max_bytes, 0)
        from nv_models import PeerAllReduce

        if self.peer_all_reduce_algorithm not in PeerAllReduce.ALGORITHMS:
            raise ValueError(
                f"peer_all_reduce_algorithm must be one of {PeerAllReduce.ALGORITHMS}, got "
                f"{self.peer_all_reduce_algorithm!r}"
            )
        if self.fused_sampler is not None and not isinstance(self.fused_sampler, bool):
            kind = type(self.fused_sampler).__name__
            raise TypeError(f"fused_sampler must be a bool or None, got {kind}")
        _positive_int("max_num_kvcache_blocks", self.max_num_kvcache_blocks)
        _int_at_least("shared_prefix_min_tokens", self.shared_prefix_min_tokens, 0)
        _positive_int("shared_prefix_min_seqs", self.shared_prefix_min_seqs)
        if not isinstance(self.distributed_timeout_s, (int, float)) or not (
            self.distributed_timeout_s > 0
        ):
            raise ValueError(
                f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s!r}"
            )


_TUNING_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineTuning))
# vLLM's engine-argument names for Config fields that keep Nano-vLLM's names here
_VLLM_NAMES = {"block_size": "kvcache_block_size", "num_gpu_blocks_override": "num_kvcache_blocks"}


@dataclass(slots=True)
class Config:
    """What a user sets: Nano-vLLM's fields plus nv's. Raises ValueError/TypeError naming the
    field for bad values. `hf_config` is read from `model`/config.json; internal constants are
    in `tuning` (EngineTuning). Resolved once, in `__post_init__` (and by the engine's memory
    profile, which may lower max_model_len in a copy); nothing changes it afterwards."""

    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kvcache_block_size: int = 256
    num_kvcache_blocks: int | None = None  # None: sized from memory
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    dtype: str = "auto"  # auto: the checkpoint's dtype on CUDA (bf16 if unknown), float32 on CPU
    enable_prefix_caching: bool = True
    # auto: K/V cached in the model's dtype; fp8 / fp8_e4m3 / fp8_e5m2 (vLLM's names): 8-bit
    # floats with one scale per tensor (a checkpoint's self_attn.k_scale / v_scale, else 1.0 as
    # in vLLM), about twice the tokens in the same memory
    kv_cache_dtype: str = "auto"
    attention_backend: str = "auto"  # auto | torch | triton | flash-attn
    load_format: str = "auto"  # auto: safetensors in `model`; dummy: random weights (benchmarks)
    # SamplingParams.logprobs / prompt_logprobs ask for at most this many top tokens (vLLM's
    # max_logprobs); the memory profile makes room for that many on the largest batch
    max_logprobs: int = 20
    seed: int = 0  # seeds requests that set no seed of their own (deterministically, in order)
    tokenizer: str | None = None  # defaults to `model`
    # mp: the engine spawns ranks 1..N-1 on this machine; external: they are launched outside
    # (torchrun or `nv-engine worker`, several machines allowed) and join via env:// rendezvous
    distributed_executor_backend: str = "mp"
    # Schedule step t+1 while step t runs on the device (its sampled tokens are read back one
    # step later; EOS and stop tokens cost one wasted token). With TP, rank 0 broadcasts each
    # step's sampled tokens to the workers on the device. None: on.
    async_scheduling: bool | None = None
    # vLLM v1's unified token budget: each step takes every running request's next token
    # first, and prefill chunks fill the rest of max_num_batched_tokens, so a long prompt no
    # longer stalls the requests that are decoding (such mixed steps run eagerly; pure decode
    # steps keep their CUDA graphs). Off: a step is prefill-only or decode-only.
    mix_decode_and_prefill: bool = False
    tuning: EngineTuning = field(default_factory=EngineTuning)
    hf_config: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, model: str | os.PathLike | Config, **kwargs: Any) -> Config:
        """`model` itself if it is a Config (then no keywords), else `from_kwargs`."""
        if isinstance(model, Config):
            if kwargs:
                raise TypeError("give a Config or a model directory with keywords, not both")
            return model
        return cls.from_kwargs(model, **kwargs)

    @classmethod
    def from_kwargs(cls, model: str | os.PathLike, **kwargs: Any) -> Config:
        """`kwargs`: Config's fields, and EngineTuning's (gathered into `tuning`); vLLM's names
        for the fields nv names otherwise (`_VLLM_NAMES`: `block_size`, ...) are taken too."""
        for vllm, ours in _VLLM_NAMES.items():
            if vllm in kwargs:
                if ours in kwargs:
                    raise TypeError(f"give one of {vllm} and {ours} (the same setting)")
                kwargs[ours] = kwargs.pop(vllm)
        names = {f.name for f in dataclasses.fields(cls)} - {"model", "hf_config", "tuning"}
        unknown = sorted(set(kwargs) - names - _TUNING_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown config key(s) {unknown}; valid keys: {sorted(names | _TUNING_FIELDS)}"
            )
        tuning = {k: kwargs.pop(k) for k in list(kwargs) if k in _TUNING_FIELDS}
        return cls(model=str(model), tuning=EngineTuning(**tuning), **kwargs)

    def __post_init__(self) -> None:
        path = Path(self.model)
        if not path.is_dir():
            raise ValueError(f"model: {self.model!r} is not a directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"model: no config.json in {self.model!r}")
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_model_len", self.max_model_len)
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _positive_int("kvcache_block_size", self.kvcache_block_size)
        if self.num_kvcache_blocks is not None:
            _positive_int("num_kvcache_blocks", self.num_kvcache_blocks)
        _int_at_least("max_logprobs", self.max_logprobs, 0)
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not (
            0 < self.gpu_memory_utilization <= 1
        ):
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if self.distributed_executor_backend not in ("mp", "external"):
            raise ValueError(
                "distributed_executor_backend must be mp or external, got "
                f"{self.distributed_executor_backend!r}"
            )
        if self.async_scheduling is None:
            self.async_scheduling = True
        elif not isinstance(self.async_scheduling, bool):
            kind = type(self.async_scheduling).__name__
            raise TypeError(f"async_scheduling must be a bool or None, got {kind}")
        if not isinstance(self.mix_decode_and_prefill, bool):
            kind = type(self.mix_decode_and_prefill).__name__
            raise TypeError(f"mix_decode_and_prefill must be a bool, got {kind}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        from nv_kernels import BACKEND_NAMES

        if self.attention_backend not in BACKEND_NAMES:
            raise ValueError(
                f"attention_backend must be one of {BACKEND_NAMES}, got {self.attention_backend!r}"
            )
        if self.hf_config is None:
            from transformers import AutoConfig

            try:
                self.hf_config = AutoConfig.from_pretrained(self.model)
            except Exception as e:
                raise ValueError(f"model: cannot read config.json in {self.model!r}: {e}") from e
        max_pos = getattr(self.hf_config, "max_position_embeddings", None)
        if max_pos is not None:
            self.max_model_len = min(self.max_model_len, max_pos)
        from nv_models import attention_window

        window = attention_window(self.hf_config)
        if window is not None and window < self.max_model_len:
            logger.warning(
                "sliding-window attention (%d tokens) is computed as full attention, which is "
                "the same up to the window: max_model_len lowered from %d",
                window,
                self.max_model_len,
            )
            self.max_model_len = window

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available")
        return self.device

    def peer_all_reduce_bytes(self) -> int:
        """The largest bf16 all-reduce that goes through peer memory (0: none): the tuning's
        `peer_all_reduce_max_bytes`, or when that is None, for ranks spawned on one machine
        ("mp"): with two ranks a full step's message (max_num_batched_tokens rows of the hidden
        size: every all-reduce goes through peer memory, fused with the norm after it); with
        more, decode-sized messages (PEER_ALL_REDUCE_MANY_RANKS_BYTES), since each rank reads
        every other rank's whole message; for ranks started elsewhere ("external"), 0.
        docs/tensor_parallel.md has the measurements (two ranks only)."""
        chosen = self.tuning.peer_all_reduce_max_bytes
        if chosen is not None:
            return chosen
        if self.distributed_executor_backend != "mp":
            return 0
        if self.tensor_parallel_size > 2:
            return PEER_ALL_REDUCE_MANY_RANKS_BYTES
        return self.max_num_batched_tokens * self.hf_config.hidden_size * 2  # bf16

    def resolved_kv_cache_dtype(self, model_dtype):
        """The KV cache's torch dtype: the model's (auto), float8_e4m3fn or float8_e5m2."""
        import torch

        if self.kv_cache_dtype == "auto":
            return model_dtype
        return torch.float8_e5m2 if self.kv_cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn

    def resolved_dtype(self, device: str):
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if not device.startswith("cuda"):
            return torch.float32
        ckpt = getattr(self.hf_config, "torch_dtype", None) or getattr(
            self.hf_config, "dtype", None
        )
        ckpt = getattr(torch, ckpt) if isinstance(ckpt, str) else ckpt
        return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


def local_device_index(rank: int) -> int:
    """The GPU a tensor-parallel rank drives: LOCAL_RANK when a launcher set it (several nodes),
    else the rank."""
    return int(os.environ.get("LOCAL_RANK", rank))


def _positive_int(name: str, value: object) -> None:
    _int_at_least(name, value, 1)


def _int_at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
