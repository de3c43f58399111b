"""autobits.agents"""
