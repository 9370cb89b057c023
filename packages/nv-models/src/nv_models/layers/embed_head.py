from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nv_models.parallel import TPGroup, divide


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across ranks; out-of-shard ids give zeros and
    an all-reduce sums the shards."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup = TPGroup()) -> None:
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.per_rank = divide(num_embeddings, tp.size, "vocab_size")
        self.vocab_start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        from nv_models.layers.linear import _copy_checked

        _copy_checked(
            param.data,
            loaded.narrow(0, self.vocab_start, self.per_rank)
            if loaded.shape[0] == self.num_embeddings
            else loaded,
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.per_rank)
        y = F.embedding(local * in_shard, self.weight) * in_shard.unsqueeze(-1)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection. Computes logits only for the rows asked for (in prefill,
    each sequence's last token), then gathers the vocab shards (unless `gather=False`: then the
    result is this rank's shard, token ids from `vocab_start`). `out`: a [rows, vocab / tp]
    tensor to write the shard into (the decode graphs' shared logits buffer)."""

    def forward(
        self,
        hidden: torch.Tensor,
        logits_indices: torch.Tensor | None = None,
        gather: bool = True,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        if out is None:
            logits = F.linear(hidden, self.weight)  # [num_rows, vocab / tp]
        else:
            if gather and self.tp.size > 1:
                raise ValueError("out= takes this rank's shard: pass gather=False with TP")
            logits = torch.matmul(hidden, self.weight.t(), out=out)
        return self.tp.gather_last_dim(logits) if gather else logits
