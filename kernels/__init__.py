"""Triton kernels for Fast-dLLM v2 decoding, each beside its plain-PyTorch reference.

Installed under the import name ``fastdllm_kernels`` (see setup.py for why not ``kernels``). Importing this
package imports nothing heavy: ``<op>.reference`` needs only torch, ``<op>.kernel`` needs triton.
"""
