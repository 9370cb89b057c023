"""What runs on each GPU rank: the ModelRunner (model, paged KV cache, sampling), its staged
host/device copies and CUDA graphs, logits processors, and the tensor-parallel worker processes."""
