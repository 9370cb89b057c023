"""The step's host<->device staging buffers (CPU stands in for the device here)."""

import torch

from nv_engine.worker.staging import DeviceToHost, HostToDevice


def test_host_to_device_packs_aligned_parts_and_grows():
    h = HostToDevice(64, torch.device("cpu"), depth=2)
    h.add([1, 2, 3], torch.int64)
    h.add([0.5, 1.5], torch.float32)
    big = list(range(100))  # past the 64-byte buffer: it grows, keeping what was added
    h.add(big, torch.int32)
    a, b, c = h.send()
    assert a.tolist() == [1, 2, 3] and a.dtype == torch.int64
    assert b.tolist() == [0.5, 1.5] and b.dtype == torch.float32
    assert c.tolist() == big and c.dtype == torch.int32
    assert all(t.data_ptr() % 16 == 0 for t in (a, b, c))
    # the next send goes to the other slot: the views of this one stay valid meanwhile
    (d,) = (h.add([7], torch.int64), h.send())[1]
    assert d.tolist() == [7] and a.tolist() == [1, 2, 3]


def test_device_to_host_rotates_buffers():
    d = DeviceToHost(4, torch.device("cpu"), depth=2)
    first = d.send(torch.tensor([1, 2]))
    second = d.send(torch.tensor([3, 4, 5, 6, 7]))  # more than the buffer: it grows
    assert first.tolist() == [1, 2]
    assert second.tolist() == [3, 4, 5, 6, 7]
