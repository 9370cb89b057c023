from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nv_kernels import skinny_gemm, use_skinny_gemm
from nv_models.layers.activation import silu_and_mul
from nv_models.parallel import TPGroup, divide


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False
) -> torch.Tensor:
    """`F.linear`, except decode at small batch on CUDA, where nv's skinny GEMM reads the weight
    several times faster than cuBLAS's choice. `gated`: weight stacks [gate; up] and the result
    is silu(gate) * up (in the skinny GEMM's epilogue where it runs)."""
    if use_skinny_gemm(x, weight):
        return skinny_gemm(x, weight, bias, gated=gated)
    y = F.linear(x, weight, bias)
    return silu_and_mul(y) if gated else y


class LinearBase(nn.Module):
    """y = x W^T (+ b). `tp_dim` is the weight dim split across ranks (0: output, 1: input,
    None: replicated). Each parameter carries `weight_loader(param, loaded[, shard_id])`."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp: TPGroup, tp_dim: int | None
    ) -> None:
        super().__init__()
        self.tp = tp
        self.tp_dim = tp_dim
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _shard(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        size = loaded.shape[dim] // self.tp.size
        return loaded.narrow(dim, self.tp.rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if self.tp_dim is not None and (self.tp_dim < loaded.dim()):
            loaded = self._shard(loaded, self.tp_dim)
        _copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, tp: TPGroup = TPGroup()
    ) -> None:
        super().__init__(input_size, output_size, bias, tp, None)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice (no communication)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, tp: TPGroup = TPGroup()
    ) -> None:
        super().__init__(input_size, divide(output_size, tp.size, "output_size"), bias, tp, 0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked in one (e.g. gate_proj and up_proj); checkpoint
    tensors load into their slot by `shard_id` (the index into `output_sizes`)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, tp: TPGroup = TPGroup()
    ) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        size = self.output_sizes[shard_id] // self.tp.size
        _copy_checked(param.data.narrow(0, offset, size), self._shard(loaded, 0))


class GateUpParallelLinear(MergedColumnParallelLinear):
    """A SwiGLU MLP's gate_proj and up_proj stacked (shard ids 0 and 1); `forward` returns
    silu(gate) * up, computed in the GEMM's epilogue where the skinny GEMM runs."""

    def __init__(
        self, input_size: int, intermediate_size: int, bias: bool = False, tp: TPGroup = TPGroup()
    ) -> None:
        super().__init__(input_size, [intermediate_size] * 2, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, gated=True)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix; heads (query and KV) are split across ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        tp: TPGroup = TPGroup(),
    ) -> None:
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp.size, "num_attention_heads")
        self.num_kv_heads = divide(total_num_kv_heads, tp.size, "num_key_value_heads")
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        super().__init__(hidden_size, output_size, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        _copy_checked(param.data.narrow(0, offset, size), self._shard(loaded, 0))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce.
    The bias is added once: after the reduction, or before it on rank 0 alone. With
    `reduce_results=False` (vLLM's name) the output is this rank's partial sum, left for the
    consumer to reduce (an `RMSNorm(tp=...)` fuses the reduction into the norm); cuBLAS then
    writes it straight into PeerAllReduce's next slot where there is one, which spares the
    fused reduction its copy."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: TPGroup = TPGroup(),
        reduce_results: bool = True,
    ) -> None:
        super().__init__(divide(input_size, tp.size, "input_size"), output_size, bias, tp, 1)
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce_results:
            y = self.tp.all_reduce(linear(x, self.weight))
            return y + self.bias if self.bias is not None else y
        bias = self.bias if self.tp.rank == 0 else None  # added once, before the reduction
        peer = self.tp.peer
        # cuBLAS writes straight into the slot (the skinny GEMM allocates its own output)
        if (
            bias is None
            and peer is not None
            and x.dim() == 2
            and not use_skinny_gemm(x, self.weight)
        ):
            slot = peer.next_slot(x.shape[0], self.weight.shape[0], x.dtype)
            if slot is not None:
                return torch.mm(x, self.weight.t(), out=slot)
        y = linear(x, self.weight)
        return y + bias if bias is not None else y


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ShapeMismatch(tuple(dst.shape), tuple(src.shape))
    dst.copy_(src)


class ShapeMismatch(ValueError):
    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(f"expected shard shape {expected}, got {got}")
        self.expected, self.got = expected, got
