"""The ``torch`` backend: explicit forward/backward in PyTorch with the kernels' exact contract
(same inputs, same outputs, same saved tensors), so the hand-derived backward is checked on CPU with
``gradcheck`` before any GPU is involved."""
