"""autobits.kernels"""
