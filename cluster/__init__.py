"""autobits.cluster"""
