"""autobits.envs"""
