"""Triton kernels of selfee_fast, shipped as `selfee_fast.kernels`.

Pure functions over tensors; nothing here imports the engine. Each file holds one concern
(the forward sweep, its backward, the pair loss) with its launcher and a plain-PyTorch
twin used by the tests.
"""
