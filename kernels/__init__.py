"""Triton kernels of fastcl (installed as ``fastcl.kernels``); launch wrappers only."""
